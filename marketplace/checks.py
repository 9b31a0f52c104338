"""System checks for settings a deployment must get right before it serves anyone."""

from __future__ import annotations

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.security)
def wallet_key_check(app_configs, **kwargs) -> list[checks.CheckMessage]:
    """Buyers' wallet keys need FLEX_WALLET_KEY outside the dev chain (see marketplace.wallets)."""
    if settings.FLEX_WALLET_KEY.strip() or settings.FLEX_DEV_CHAIN:
        return []
    return [
        checks.Error(
            "FLEX_WALLET_KEY is not set.",
            hint=(
                "Generate one with `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'` and keep it apart from the database; "
                "only the dev chain (FLEX_DEV_CHAIN=true) runs without one."
            ),
            id="flex.E001",
        )
    ]
