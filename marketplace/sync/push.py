"""The push to browsers: each changed task's representation to its live pages' group."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from marketplace.selectors import task_views_by_id
from marketplace.task_page import task_update_message


def task_group(chain_task_id: int) -> str:
    """The Channels group of a task's live pages, named by the task's id on chain."""
    return f"task.{chain_task_id}"


def task_updates_push(*, chain_task_ids: Iterable[int]) -> int:
    """Send each task's fresh message (task_page.task_update_message) to its group; returns
    how many went. A task the mirror no longer has is sent as its buyer's order, if any."""
    layer = get_channel_layer()
    if layer is None:
        return 0
    messages = [
        (task_group(view.id), task_update_message(view))
        for view in task_views_by_id(chain_task_ids=chain_task_ids)
    ]

    async def send_all() -> None:
        for group, message in messages:
            await layer.group_send(group, message)

    if messages:
        async_to_sync(send_all)()
    return len(messages)


def push_on_commit(*, chain_task_ids: Iterable[int]) -> None:
    """Push these tasks once the current transaction commits (not at all if it rolls back)."""
    ids = sorted(set(chain_task_ids))
    if ids:
        transaction.on_commit(functools.partial(task_updates_push, chain_task_ids=ids), robust=True)
