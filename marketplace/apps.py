"""Django app configuration for the marketplace."""

from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "FLEX marketplace"

    def ready(self) -> None:
        # Imported for what importing does: register the system checks, connect the receivers.
        from marketplace import checks, signals  # noqa: F401
