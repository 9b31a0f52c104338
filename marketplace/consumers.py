"""Live task pages over WebSockets: the TaskConsumer and the push of mirror changes to it.

A task's group is ``task.<pk>``, keyed by the Task row's primary key like the website's
task pages (a task posted from the website has a row before it has a chain id). Each change
sends the whole snapshot (selectors.task_snapshot) as
``{"type": "task.update", "snapshot": {...}}``, the same JSON the socket forwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer

from marketplace.models import Task
from marketplace.selectors import task_get_for_viewer, task_snapshot

log = logging.getLogger(__name__)

# WebSocket close code for "not yours" (4000-4999 are the application's own).
CLOSE_FORBIDDEN = 4403


def task_group(task_pk: int) -> str:
    return f"task.{task_pk}"


def task_update_message(task: Task) -> dict[str, Any]:
    return {"type": "task.update", "snapshot": task_snapshot(task)}


def task_updates_push(*, task_ids: Iterable[int]) -> int:
    """Send each task's fresh snapshot to its group (by Task pk); returns how many went."""
    layer = get_channel_layer()
    if layer is None:
        return 0
    messages = [
        (task_group(task.pk), task_update_message(task))
        for task in Task.objects.filter(pk__in=list(task_ids))
    ]

    async def send_all() -> None:
        for group, message in messages:
            await layer.group_send(group, message)

    if messages:
        async_to_sync(send_all)()
    return len(messages)


class TaskConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/tasks/<pk>/``: the task's snapshot on connect, then every update; read-only.

    Only the task's buyer (or staff) may subscribe; anyone else is refused at the handshake
    (close code 4403), so a stranger cannot even learn that the task exists.
    """

    group: str | None = None
    as_of: float = 0.0

    async def connect(self) -> None:
        task_id = self.scope["url_route"]["kwargs"]["task_id"]
        task = await database_sync_to_async(task_get_for_viewer)(
            task_id=task_id, user=self.scope.get("user")
        )
        if task is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        # Join before reading the snapshot, so no change falls between the two.
        self.group = task_group(task.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.task_update(await database_sync_to_async(task_update_message)(task))

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The page only listens; anything it sends is ignored."""

    async def task_update(self, event: dict[str, Any]) -> None:
        snapshot = event["snapshot"]
        # A snapshot taken before the one already sent may arrive after it: skip it.
        if snapshot.get("as_of", 0.0) < self.as_of:
            return
        self.as_of = snapshot.get("as_of", 0.0)
        await self.send_json({"type": "task.update", "snapshot": snapshot})
