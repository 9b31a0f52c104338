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


@checks.register(checks.Tags.security, deploy=True)
def email_check(app_configs, **kwargs) -> list[checks.CheckMessage]:
    """A deployment mails password-reset links; without a mail server they go to the log."""
    if settings.FLEX_DEV_CHAIN or not settings.EMAIL_BACKEND.endswith("console.EmailBackend"):
        return []
    return [
        checks.Warning(
            "FLEX_EMAIL_HOST is not set: password-reset links are written to the web "
            "server's log, not mailed.",
            hint="Set FLEX_EMAIL_HOST (and FLEX_EMAIL_USER, FLEX_EMAIL_PASSWORD, FLEX_EMAIL_FROM).",
            id="flex.W001",
        )
    ]
