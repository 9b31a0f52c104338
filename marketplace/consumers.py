"""Live task pages over WebSockets: ``/ws/tasks/<id>/``, where ``id`` is the task's id on chain.

A task's group is ``task.<id>`` (marketplace.sync.push); every change sends the page's whole
message (task_page.task_update_message), which the socket forwards as it is.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from marketplace.selectors import task_view_get
from marketplace.sync.push import task_group
from marketplace.task_page import task_update_message

log = logging.getLogger(__name__)

# WebSocket close code for "not yours" (4000-4999 are the application's own).
CLOSE_FORBIDDEN = 4403


def _message_for(*, user, task_id: int) -> dict[str, Any] | None:
    view = task_view_get(user=user, task_id=task_id)
    return None if view is None else task_update_message(view)


class TaskConsumer(AsyncJsonWebsocketConsumer):
    """The task's message on connect, then every update; read-only.

    Only those who may see the task (selectors.task_visible) may subscribe; anyone else is
    refused at the handshake (close code 4403), so a stranger cannot even learn that the task
    exists.
    """

    group: str | None = None
    as_of: float = 0.0

    async def connect(self) -> None:
        task_id = self.scope["url_route"]["kwargs"]["task_id"]
        # Join before reading the message, so no change falls between the two.
        group = task_group(task_id)
        await self.channel_layer.group_add(group, self.channel_name)
        message = await database_sync_to_async(_message_for)(
            user=self.scope.get("user"), task_id=task_id
        )
        if message is None:
            await self.channel_layer.group_discard(group, self.channel_name)
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.group = group
        await self.accept()
        await self.task_update(message)

    async def disconnect(self, code: int) -> None:
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The page only listens; anything it sends is ignored."""

    async def task_update(self, event: dict[str, Any]) -> None:
        # A message taken before the one already sent may arrive after it: skip it.
        as_of = event.get("as_of", 0.0)
        if as_of < self.as_of:
            return
        self.as_of = as_of
        await self.send_json(event)
