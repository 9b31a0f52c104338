"""Browser-test fixtures: the real ASGI application served by uvicorn, and Debian's Chromium.

pytest-django's live_server is WSGI only, so it cannot carry the task page's WebSocket.
Uvicorn, the local stack's web server, runs here in a thread of the test process instead of a
subprocess: it then uses the very test database pytest-django set up (PostgreSQL, or SQLite's
shared in-memory database, which another process could not open), and the settings each test
overrides (the session's chain and contract). The server lives for the whole session; DB
access from it is allowed whenever the running test has it (``transactional_db``: a test's
own transaction would hide its rows from the server).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chain.launcher import free_port

CHROMIUM = Path(os.environ.get("FLEX_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots"


@pytest.fixture(scope="session")
def asgi_server(django_db_setup) -> Iterator[str]:
    """Base URL of flexsite.asgi.application (HTTP, static files and WebSockets) on uvicorn."""
    import uvicorn
    from channels.routing import get_default_application
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            # Static files as the local stack serves them; everything else goes to the real app.
            ASGIStaticFilesHandler(get_default_application()),
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start listening within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium driven by Playwright (no browser download: none is possible here).

    Playwright's sync API keeps an asyncio loop running in the main thread while it is open,
    and Django refuses ORM calls from a thread with a running loop; the test's own ORM calls
    are plain synchronous code, so that check is lifted, for this module only.
    """
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: install it with "
            "`apt-get install -y chromium` (make test does), or set FLEX_CHROMIUM."
        )
    from playwright.sync_api import sync_playwright

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM),
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            yield browser
            browser.close()


@pytest.fixture
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture
def devices_played_by_the_test(monkeypatch) -> list[tuple[str, dict]]:
    """The platform's messages to devices are kept, not queued: this test plays the devices
    itself, and nothing must be left in a broker queue for another test's worker."""
    from marketplace import lifecycle

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        lifecycle,
        "dispatch",
        lambda name, *, queue, message, countdown=None: sent.append((name, message.dump())),
    )
    return sent
