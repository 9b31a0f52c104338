"""Give every enrolled, unrevoked device its broker user again (after the broker or this
stack's vhost was replaced); each keeps the credentials it was given at enrolment."""

from django.core.management.base import BaseCommand, CommandError

from core.errors import FlexError
from marketplace import lifecycle
from marketplace.device_broker import device_broker_grant


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options):
        devices = list(lifecycle.devices_eligible())
        try:
            for device in devices:
                device_broker_grant(device=device)
        except FlexError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"{len(devices)} device(s) have their broker users")
