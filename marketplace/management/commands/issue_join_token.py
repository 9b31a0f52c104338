"""Issue a single-use, expiring join token for one device."""

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from core.errors import FlexError
from marketplace.services import join_token_issue


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("label", help="who or what the token is for, e.g. 'jetson-3'")
        parser.add_argument(
            "--hours", type=float, default=24.0, help="lifetime in hours (default 24)"
        )
        parser.add_argument(
            "--aggregator", action="store_true", help="the device may bid as an aggregator"
        )

    def handle(self, *args, label, hours, aggregator, **options):
        try:
            issued = join_token_issue(
                label=label, ttl=timedelta(hours=hours), may_aggregate=aggregator
            )
        except FlexError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(issued.raw)
        self.stderr.write(
            f"join token for {label!r}, valid until {issued.token.expires_at:%Y-%m-%d %H:%M} UTC"
            f"{' (may aggregate)' if aggregator else ''}; it is shown only once"
        )
