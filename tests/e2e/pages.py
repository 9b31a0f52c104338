"""Helpers for browser tests: work the test does beside the browser, and signing in."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from django.db import connections

PASSWORD = "a-long-enough-passphrase-42"
DESKTOP = {"viewport": {"width": 1366, "height": 768}}
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}
SIZES = {"desktop": DESKTOP, "phone": PHONE}


def off_the_loop(fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a plain thread: Playwright's sync API keeps an event loop
    running in the test's thread, where asgiref's async_to_sync (the channel-layer push after
    each mirror change) refuses to run."""

    def call():
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()  # this thread's connections only

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


def signed_in(browser, base_url: str, *, username: str, size: str, timeout_ms: int = 120_000):
    """A page of a new browser context at ``size`` ("desktop" or "phone"), signed in; it
    waits up to ``timeout_ms`` for anything (a busy machine is waited for, never timed)."""
    context = browser.new_context(**SIZES[size])
    page = context.new_page()
    page.set_default_timeout(timeout_ms)
    page.goto(base_url + "/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/login/" not in url)
    return page


def fits_the_width(page) -> bool:
    """Nothing on the page is wider than the window (no sideways scrolling)."""
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def tables_cut(page) -> list[str]:
    """The tables that do not show whole in their card (part hidden behind a sideways
    scroll), each as its first header and widths: none on a page that fits."""
    return page.evaluate(
        "[...document.querySelectorAll('.table-wrap')]"
        ".filter((w) => w.scrollWidth > w.clientWidth + 1)"
        ".map((w) => `${w.querySelector('th')?.textContent}: ${w.scrollWidth} > ${w.clientWidth}`)"
    )
