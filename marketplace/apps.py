"""Django app configuration for the marketplace."""

from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "FLEX marketplace"

    def ready(self) -> None:
        from marketplace import checks  # noqa: F401  (registers the system checks)
