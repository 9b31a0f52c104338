"""The push to browsers: each change of a task, numbered, to its live pages' group.

A change is numbered in the transaction that makes it (models_platform.TaskPush, whichever
process makes it: chain sync or a node's report), and sent once that commits: as a delta
(task_page.task_delta_message) when it can be told as one, else as a fresh snapshot. A page
that sees a number missing asks for a snapshot (marketplace.consumers).

Only a watched task's changes are built and sent: an open page marks its task as watched and
renews the mark while it stays open (``task_watch_mark``). A change of a task nobody watches is
numbered all the same, so a page opened later starts from a snapshot that holds it and follows
on from its number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import DatabaseError, connection, transaction

from marketplace.models_platform import TaskPush
from marketplace.selectors import TaskView, task_view_get, task_views_by_id
from marketplace.task_lists import task_lists_changed
from marketplace.task_page import task_delta_message, task_snapshot_message

# Events that remove or renumber rows, which a delta (rows added or changed) cannot tell.
SNAPSHOT_EVENTS = frozenset({"BidWithdrawn"})


@dataclass
class TaskChange:
    """What one transaction changed in a task: the blocks of the new chain events it mirrored,
    the rounds whose reports it recorded; ``whole`` when history was rewritten (a re-org) or
    rows went away, so only a snapshot tells it."""

    blocks: set[int] = field(default_factory=set)
    rounds: set[int] = field(default_factory=set)
    whole: bool = False

    @classmethod
    def of_events(cls, *, names: Iterable[str], blocks: Iterable[int]) -> TaskChange:
        """The change that mirroring these new events made; none new (the task re-derived
        from its records) or one that removes rows: the whole task."""
        names, blocks = set(names), set(blocks)
        return cls(blocks=blocks, whole=not blocks or bool(names & SNAPSHOT_EVENTS))


def task_group(chain_task_id: int) -> str:
    """The Channels group of a task's live pages: the task's id on chain, within this
    platform's database, so that stacks sharing one Redis (each with its own chain, whose
    task ids start at 1 too) never reach each other's pages."""
    space = hashlib.sha256(str(connection.settings_dict["NAME"]).encode()).hexdigest()[:16]
    return f"task.{space}.{chain_task_id}"


# How long a page's mark outlives its last renewal (a page that vanished without closing its
# socket), and how often an open page renews it.
WATCHED_S = 60
WATCH_RENEW_S = 20


def _watched_key(group: str) -> str:
    return f"live-watched:{group}"


async def task_watch_mark(group: str) -> None:
    """Mark the task of ``group`` as watched by an open page for the next WATCHED_S."""
    await cache.aset(_watched_key(group), 1, timeout=WATCHED_S)


def task_watched(group: str) -> bool:
    """Whether a page has the task of ``group`` open (marked it within WATCHED_S)."""
    return cache.get(_watched_key(group)) is not None


def task_push_seq(*, chain_task_id: int) -> int:
    """The number of the task's last change (0 before its first)."""
    row = TaskPush.objects.filter(chain_task_id=chain_task_id).first()
    return 0 if row is None else row.seq


def task_view_numbered(*, user, task_id: int) -> tuple[int, TaskView | None]:
    """The number of the task's last change, then the task as ``user`` may see it
    (selectors.task_view_get; None if not theirs): in that order, so that a snapshot of the
    view holds at least that change (task_page.task_snapshot)."""
    seq = task_push_seq(chain_task_id=task_id)
    return seq, task_view_get(user=user, task_id=task_id)


def task_push_next(*, chain_task_id: int) -> int:
    """Number the task's next change, in the current transaction."""
    # The row lock orders the processes that change one task; the number commits with the
    # change, or neither does.
    row, _ = TaskPush.objects.select_for_update().get_or_create(chain_task_id=chain_task_id)
    row.seq += 1
    row.save(update_fields=["seq"])
    return row.seq


def push_on_commit(*, changes: Mapping[int, TaskChange]) -> None:
    """Number these changes (by the task's id on chain) in the current transaction and push
    them once it commits (not at all if it rolls back); the lists that show the tasks are
    renewed then too."""
    numbered = {
        chain_task_id: (task_push_next(chain_task_id=chain_task_id), changes[chain_task_id])
        for chain_task_id in sorted(changes)
    }
    if numbered:
        task_lists_changed(chain_task_ids=numbered)

        def push() -> None:
            # A named function, not a partial: Django names the callback when it logs a
            # failure (Redis away), and a partial has no name to give.
            try:
                task_changes_push(numbered=numbered)
            except DatabaseError:
                # The connection was cut since the commit (a database restart): the change
                # is committed, and may be a task's last, after which no push would tell a
                # watching page it missed one. Read it again on a new connection.
                connection.close()
                task_changes_push(numbered=numbered)

        transaction.on_commit(push, robust=True)


def task_change_message(*, chain_task_id: int, seq: int, change: TaskChange) -> dict | None:
    """Change ``seq`` as its pages receive it: a delta, or a snapshot when the change is
    ``whole`` or the mirror does not have the task (its buyer's order, pending); None when
    neither exists."""
    views = task_views_by_id(chain_task_ids=[chain_task_id])
    if not views:
        return None
    [view] = views
    if change.whole or view.task is None:
        return task_snapshot_message(view, seq=seq)
    return task_delta_message(view, seq=seq, blocks=change.blocks, rounds=change.rounds)


def task_changes_push(*, numbered: Mapping[int, tuple[int, TaskChange]]) -> list[dict[str, Any]]:
    """Send each numbered change of a watched task to its task's group; returns the messages
    sent. Each is read after its change committed, so it holds at least that change (maybe a
    later one too, whose own message repeats it: a page merges rows by key, so that is
    harmless). A page marks its task before it reads its snapshot, so a change this skips as
    unwatched committed before that read and is in the snapshot."""
    layer = get_channel_layer()
    if layer is None:
        return []
    messages = []
    for chain_task_id, (seq, change) in sorted(numbered.items()):
        group = task_group(chain_task_id)
        if not task_watched(group):
            continue
        message = task_change_message(chain_task_id=chain_task_id, seq=seq, change=change)
        if message is not None:
            messages.append((group, message))

    async def send_all() -> None:
        for group, message in messages:
            await layer.group_send(group, message)

    if messages:
        async_to_sync(send_all)()
    return [message for _, message in messages]
