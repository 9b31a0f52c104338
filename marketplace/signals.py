"""An account's API token does not outlive the password it was made with, whichever way the
password changes: the website's form, the admin's, or ``manage.py changepassword``."""

from __future__ import annotations

from django.conf import settings
from django.db.models.signals import post_save
from django.dispatch import receiver

from marketplace import services


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def api_token_revoke_on_password_change(sender, instance, created: bool, **kwargs) -> None:
    # set_password() keeps the new password in _password until save() has stored it: Django's
    # own mark of a change (a hash upgraded at login clears it first, and is no change).
    if not created and getattr(instance, "_password", None) is not None:
        services.user_tokens_revoke(user=instance)
