"""The broker's administration: vhosts (one per stack) and device users, through RabbitMQ's
management HTTP API, the broker URLs built from them, and whether queues have consumers.

The platform holds the administrator's API URL (FLEX_BROKER_API_URL); a device only ever gets
an AMQP URL with its own user, whose permissions are ``core.queues.device_permissions``.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import kombu
import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from core.errors import FlexError
from core.queues import REPORTS_EXCHANGE

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
# The management API of a RabbitMQ on this machine, with its default administrator.
DEFAULT_BROKER_API_URL = "http://guest:guest@127.0.0.1:15672/"


def _http() -> requests.Session:
    """Calls to the management API; every one FLEX makes is idempotent (GET, PUT, DELETE),
    so one the broker failed with a 5xx (seen while other clients add and remove users) is
    sent again a few times, backing off, before it counts as refused. One session per
    process: a forked child must not share its parent's connections."""
    return _http_of(os.getpid())


@functools.cache
def _http_of(pid: int) -> requests.Session:
    session = requests.Session()
    retry = Retry(total=4, backoff_factor=0.5, status_forcelist=(500, 502, 503, 504))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


class BrokerUnavailableError(FlexError):
    """The broker's management API cannot be reached or refused the change."""

    code = "broker_unavailable"


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names ("/" when it names none)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def url_with(
    url: str,
    *,
    vhost: str | None = None,
    user: str | None = None,
    password: str | None = None,
    host: str | None = None,
) -> str:
    """``url`` with its vhost, credentials or host:port replaced."""
    parts = urlsplit(url)
    netloc = host or parts.netloc.rpartition("@")[2]
    old_user, _, old_password = parts.netloc.rpartition("@")[0].partition(":")
    user = quote(user, safe="") if user is not None else old_user
    password = quote(password, safe="") if password is not None else old_password
    if user:
        netloc = f"{user}:{password}@{netloc}" if password else f"{user}@{netloc}"
    path = parts.path if vhost is None else "/" + quote(vhost, safe="")
    return urlunsplit((parts.scheme, netloc, path, "", ""))


# How a throwaway vhost's description starts: "FLEX throwaway <host> <pid>".
THROWAWAY = "FLEX throwaway"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def new_vhost_name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(6)}"


def device_user_prefix(vhost: str) -> str:
    """What the broker users of one vhost's devices are named with ("/" reads "default")."""
    return f"{vhost.strip('/') or 'default'}.device-"


def device_user_name(*, vhost: str, device_id: int) -> str:
    """A device's broker user: named after its stack's vhost, so stacks never share one."""
    return f"{device_user_prefix(vhost)}{device_id}"


@dataclass(frozen=True)
class BrokerAdmin:
    """RabbitMQ's management API at ``api_url`` (with an administrator's credentials)."""

    api_url: str

    def _call(
        self, method: str, path: str, *, json: dict | None = None, ok_missing: bool = False
    ) -> requests.Response:
        parts = urlsplit(self.api_url)
        base = urlunsplit(
            (parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", "")
        )
        user, _, password = parts.netloc.rpartition("@")[0].partition(":")
        try:
            response = _http().request(
                method,
                f"{base}/api/{path}",
                json=json,
                auth=(unquote(user), unquote(password)) if user else None,
                timeout=TIMEOUT_S,
            )
        except requests.exceptions.RetryError as exc:
            raise BrokerUnavailableError(
                f"the broker refused {method} {path}: {exc}", api=base
            ) from exc
        except requests.RequestException as exc:
            raise BrokerUnavailableError(
                f"cannot reach the broker's management API: {exc}", api=base
            ) from exc
        if response.status_code == 404 and ok_missing:
            return response
        if response.status_code >= 400:
            raise BrokerUnavailableError(
                f"the broker refused {method} {path}: HTTP {response.status_code} "
                f"{response.text[:200]}",
                status=response.status_code,
            )
        return response

    @staticmethod
    def _q(name: str) -> str:
        return quote(name, safe="")

    def answers(self) -> bool:
        try:
            self._call("GET", "overview")
        except BrokerUnavailableError:
            return False
        return True

    def vhost_create(self, vhost: str, *, throwaway: bool = False) -> None:
        """The vhost, with the exchange devices report to (both idempotent). A ``throwaway``
        one (a benchmark's or a test run's, deleted by its owner at the end) is marked with
        this host and process, so that once they are gone (a killed run) sweep_throwaway
        can delete it."""
        description = f"{THROWAWAY} {socket.gethostname()} {os.getpid()}" if throwaway else "FLEX"
        self._call("PUT", f"vhosts/{self._q(vhost)}", json={"description": description})
        self._call(
            "PUT",
            f"exchanges/{self._q(vhost)}/{self._q(REPORTS_EXCHANGE)}",
            json={"type": "direct", "durable": True},
        )

    def sweep_throwaway(self) -> list[str]:
        """Delete the throwaway vhosts of this host whose process is gone (a run killed before
        it could delete its own), with their messages and device users; returns their names.
        A vhost of another host, of a live process, or not throwaway is never touched."""
        swept = []
        for entry in self._call("GET", "vhosts").json():
            marker, _, owner = (entry.get("description") or "").rpartition(" ")
            mine = marker == f"{THROWAWAY} {socket.gethostname()}" and owner.isdigit()
            if not mine or _alive(int(owner)):
                continue
            self.vhost_delete(entry["name"])
            swept.append(entry["name"])
        if swept:
            log.info("deleted %d broker vhost(s) left by killed runs: %s", len(swept), swept)
        return swept

    def vhost_exists(self, vhost: str) -> bool:
        return self._call("GET", f"vhosts/{self._q(vhost)}", ok_missing=True).status_code == 200

    def vhost_delete(self, vhost: str) -> None:
        """The vhost, its queues and messages, and every device user named after it."""
        prefix = device_user_prefix(vhost)
        granted = self._call("GET", f"vhosts/{self._q(vhost)}/permissions", ok_missing=True)
        for permission in granted.json() if granted.status_code == 200 else ():
            if permission["user"].startswith(prefix):
                self.user_delete(permission["user"])
        self._call("DELETE", f"vhosts/{self._q(vhost)}", ok_missing=True)

    def user_grant(self, *, user: str, password: str, vhost: str, permissions: dict) -> None:
        """Create (or reset) ``user`` with no tags and only ``permissions`` in ``vhost``."""
        self._call("PUT", f"users/{self._q(user)}", json={"password": password, "tags": ""})
        self._call("PUT", f"permissions/{self._q(vhost)}/{self._q(user)}", json=permissions)

    def user_delete(self, user: str) -> None:
        """Delete ``user`` (idempotent); the broker closes its open connections at once."""
        self._call("DELETE", f"users/{self._q(user)}", ok_missing=True)


def queues_consumed(broker_url: str, queues: Iterable[str]) -> bool:
    """Whether every one of ``queues`` has a consumer now, asked over AMQP at ``broker_url``
    (a passive declare, which the broker answers from the queue itself; the management API's
    count lags by its statistics interval, five seconds). A queue not declared yet has none."""
    with kombu.Connection(broker_url) as connection:
        for queue in queues:
            try:
                with connection.channel() as channel:
                    if not channel.queue_declare(queue=queue, passive=True).consumer_count:
                        return False
            except connection.channel_errors:  # no such queue: the broker closed the channel
                return False
    return True
