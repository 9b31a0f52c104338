"""Django app configuration for the marketplace."""

from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "FLEX marketplace"
