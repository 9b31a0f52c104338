"""Task lists served from the cache until one of their tasks changes.

Each viewer's lists have a version: a buyer's (their own tasks) and staff's (every task). A
version is a random token in the cache, replaced once a transaction that changes one of those
tasks commits (chain sync's mirror, through the push; a buyer's new order). A list page or
API page is cached under its viewer's version and its URL, so the first request after a
change reads the database again and every later one is served from the cache: a list is
never older than its tasks. Entries also expire after LIST_CACHE_S, which bounds how stale a
relative time ("5 minutes ago") can be.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from django.core.cache import cache
from django.db import connection, transaction

from marketplace.models import Task, TaskOrder
from marketplace.selectors import viewer

LIST_CACHE_S = 60
# The scope of staff's lists, which show every task.
EVERY_TASK = "all"


def _key(*parts: object) -> str:
    # The database's name keeps apart the stacks (tests, benches) that share one Redis.
    return ":".join(["flex:task-lists", connection.settings_dict["NAME"], *map(str, parts)])


def _scope(user) -> str:
    staff, pk = viewer(user)
    return EVERY_TASK if staff else str(pk)


def task_list_version(*, user) -> str:
    """The current version of the lists ``user`` sees; a new one if the cache lost it, so
    that nothing cached under an older one is read again."""
    key = _key("version", _scope(user))
    version = cache.get(key)
    if version is None:
        cache.add(key, secrets.token_hex(8), timeout=None)
        version = cache.get(key)
    return version


def task_list_cache_key(*, user, kind: str, url: str) -> str:
    """Where the list ``kind`` ("page", "api") at ``url`` is cached for ``user`` now."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:32]
    return _key(kind, _scope(user), task_list_version(user=user), digest)


def task_lists_changed(*, chain_task_ids: Iterable[int] = (), buyer_ids: Iterable[int] = ()):
    """New versions for the lists that show these tasks (by id on chain) or these buyers'
    orders, and for staff's: now, so that the changing transaction reads its own change, and
    again once it commits, so that no list read before the commit outlives it."""
    ids = list(chain_task_ids)
    buyers = {*buyer_ids}
    if ids:
        # Read now, inside the transaction: a task deleted by it still has its order.
        buyers |= set(
            Task.objects.filter(chain_task_id__in=ids, buyer__isnull=False).values_list(
                "buyer_id", flat=True
            )
        )
        buyers |= set(
            TaskOrder.objects.filter(chain_task_id__in=ids).values_list("buyer_id", flat=True)
        )
    keys = [_key("version", scope) for scope in (EVERY_TASK, *sorted(buyers))]

    def task_lists_renew() -> None:
        cache.set_many({key: secrets.token_hex(8) for key in keys}, timeout=None)

    task_lists_renew()
    transaction.on_commit(task_lists_renew, robust=True)
