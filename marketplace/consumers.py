"""Live task pages over WebSockets: ``/ws/tasks/<id>/``, where ``id`` is the task's id on chain.

A task's group is ``task.<id>`` (marketplace.sync.push). The socket first sends the whole task
(``task.snapshot``, with the number ``seq`` of the last change it includes), then each change
as it is pushed (``task.delta``, numbered ``seq + 1``, ``seq + 2``, ...; a change that cannot be
told as a delta comes as a new ``task.snapshot``). A page that sees a number missing (changes
come from several processes, so they may cross) sends ``{"type": "resync"}`` and receives a
fresh snapshot; anything else it sends is answered with a ``task.error`` naming what was wrong.

A socket is let in by the session it opens with, and that session may end while it is open.
So when an account changes (a password changed, the account deactivated or demoted) or logs
out, every socket of the account (group ``account.<pk>``) is closed with
``CLOSE_SESSION_CHANGED`` and its page reconnects: a session that still holds follows on, and
one that ended is closed with ``CLOSE_FORBIDDEN`` (the page says "not signed in").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.db import transaction

from marketplace.sync.push import WATCH_RENEW_S, task_group, task_view_numbered, task_watch_mark
from marketplace.task_page import task_snapshot_message

log = logging.getLogger(__name__)

# WebSocket close code for "not yours" (4000-4999 are the application's own).
CLOSE_FORBIDDEN = 4403
# "Your session changed: connect again to be checked."
CLOSE_SESSION_CHANGED = 4401
RESYNC = "resync"
ERROR = "task.error"


def account_group(user_pk: int) -> str:
    """The group of every live socket one account has open."""
    return f"account.{user_pk}"


def account_sockets_recheck(*, user_pk: int) -> None:
    """Once the current transaction commits, close every live socket of the account, each to
    be let in again only by a session that still holds. Redis away: logged, and the change
    (already committed) stands."""
    layer = get_channel_layer()
    if layer is None:
        return

    def recheck() -> None:
        async_to_sync(layer.group_send)(account_group(user_pk), {"type": "session.changed"})

    transaction.on_commit(recheck, robust=True)


def _snapshot_for(*, user, task_id: int) -> dict[str, Any] | None:
    seq, view = task_view_numbered(user=user, task_id=task_id)
    return None if view is None else task_snapshot_message(view, seq=seq)


class TaskConsumer(AsyncJsonWebsocketConsumer):
    """The task's snapshot on connect and on request, and every change in between.

    Only those who may see the task (selectors.task_visible) may subscribe; anyone else's
    socket is closed as it opens (code 4403, as for a task that does not exist, so a stranger
    cannot even learn that the task exists), before it is sent anything. A right lost later
    (a staff account demoted, a session ended) closes the socket as the account changes
    (``session_changed``), and its page is let in again only if its session still holds.
    """

    group: str | None = None
    account: str | None = None
    task_id: int = 0
    seq: int = -1  # the number of the last change sent
    _renewal: asyncio.Task | None = None

    async def connect(self) -> None:
        self.task_id = self.scope["url_route"]["kwargs"]["task_id"]
        # Join and mark the task watched before reading the snapshot, so no change falls
        # between the two.
        group = task_group(self.task_id)
        await self.channel_layer.group_add(group, self.channel_name)
        await task_watch_mark(group)
        message = await self._snapshot()
        if message is None:
            await self.channel_layer.group_discard(group, self.channel_name)
            # Accepted to be closed: a browser is told the code only by an open socket (a
            # handshake refused reaches its page as 1006, as a server that is down does).
            await self.accept()
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.group = group
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            self.account = account_group(user.pk)
            await self.channel_layer.group_add(self.account, self.channel_name)
        self._renewal = asyncio.create_task(self._renew(group))
        await self.accept()
        await self._send(message, fresh=True)

    async def disconnect(self, code: int) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        for group in (self.group, self.account):
            if group is not None:
                await self.channel_layer.group_discard(group, self.channel_name)

    async def _renew(self, group: str) -> None:
        """Keep the task marked watched while this page is open."""
        while True:
            await asyncio.sleep(WATCH_RENEW_S)
            try:
                await task_watch_mark(group)
            except Exception as exc:  # Redis away: the next renewal tries again
                log.warning("live page of task %s: watch not renewed: %s", self.task_id, exc)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            content = json.loads(text_data if text_data is not None else bytes_data or b"")
        except (TypeError, ValueError, UnicodeDecodeError):
            await self._error('not JSON: send {"type": "resync"} for a fresh snapshot')
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The page asks for a fresh snapshot with ``{"type": "resync"}``; nothing else."""
        kind = content.get("type") if isinstance(content, dict) else None
        if kind != RESYNC:
            await self._error(
                f'unknown message type {kind!r}: send {{"type": "resync"}} for a fresh snapshot'
            )
            return
        message = await self._snapshot()
        if message is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self._send(message, fresh=True)

    async def task_delta(self, event: dict[str, Any]) -> None:
        await self._send(event)

    async def task_snapshot(self, event: dict[str, Any]) -> None:
        await self._send(event)

    async def session_changed(self, event: dict[str, Any]) -> None:
        await self.close(code=CLOSE_SESSION_CHANGED)

    async def _snapshot(self) -> dict[str, Any] | None:
        return await database_sync_to_async(_snapshot_for)(
            user=self.scope.get("user"), task_id=self.task_id
        )

    async def _send(self, message: dict[str, Any], *, fresh: bool = False) -> None:
        # A pushed change that the page already has (its snapshot was read after the change
        # committed) is dropped here; a ``fresh`` snapshot, read for this page, always goes.
        seq = message["seq"]
        if not fresh and seq <= self.seq:
            return
        self.seq = max(self.seq, seq)
        await self.send_json(message)

    async def _error(self, text: str) -> None:
        await self.send_json({"type": ERROR, "code": "message_invalid", "message": text})
