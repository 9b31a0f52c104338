"""What an account's change ends, whichever way it is made (the website's forms, the admin,
``manage.py changepassword``): a new password ends the API token made with the old one, and any
change or log-out sends the account's live pages to be let in again (marketplace.consumers)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import post_save
from django.dispatch import receiver

from marketplace import services
from marketplace.consumers import account_sockets_recheck


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def account_changed(
    sender, instance, created: bool, update_fields: frozenset | None, **kwargs
) -> None:
    if created:
        return
    # set_password() keeps the new password in _password until save() has stored it: Django's
    # own mark of a change (a hash upgraded at login clears it first, and is no change).
    if getattr(instance, "_password", None) is not None:
        services.user_tokens_revoke(user=instance)
    # A login stamps last_login and changes nothing a session is checked by.
    if update_fields != frozenset({"last_login"}):
        account_sockets_recheck(user_pk=instance.pk)


@receiver(user_logged_out)
def logged_out(sender, request, user, **kwargs) -> None:
    if user is not None:
        account_sockets_recheck(user_pk=user.pk)
