"""Issue single-use, expiring join tokens: one per label, all in one call."""

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from core.errors import FlexError
from marketplace.services import join_token_issue


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument(
            "labels",
            nargs="+",
            metavar="label",
            help="who or what each token is for, e.g. 'jetson-3' (one token per label)",
        )
        parser.add_argument(
            "--hours", type=float, default=24.0, help="lifetime in hours (default 24)"
        )
        parser.add_argument(
            "--aggregator", action="store_true", help="the devices may bid as aggregators"
        )

    def handle(self, *args, labels, hours, aggregator, **options):
        if len(set(labels)) != len(labels):
            twice = sorted({label for label in labels if labels.count(label) > 1})
            raise CommandError(f"each label names one device; given more than once: {twice}")
        try:
            # All or none: a refusal leaves no token behind that nobody was shown.
            with transaction.atomic():
                issued = [
                    join_token_issue(
                        label=label, ttl=timedelta(hours=hours), may_aggregate=aggregator
                    )
                    for label in labels
                ]
        except FlexError as exc:
            raise CommandError(exc.message) from exc
        # One raw token per line, in the order of the labels: a script reads them back by line.
        for one in issued:
            self.stdout.write(one.raw)
        until = issued[0].token.expires_at
        self.stderr.write(
            f"{len(issued)} join token(s) for {', '.join(map(repr, labels[:5]))}"
            f"{', ...' if len(labels) > 5 else ''}, valid until {until:%Y-%m-%d %H:%M} UTC"
            f"{' (may aggregate)' if aggregator else ''}; each is shown only once"
        )
