"""The admin on a laptop's screen (1366x768): the pages an admin watches fit its width."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from eth_account import Account

from marketplace.sync import chain_sync
from tests.e2e.pages import DESKTOP, PASSWORD, fits_the_width, off_the_loop
from tests.marketplace.people import buyer_signup, device_enrol, task_post

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_admins_lists_fit_a_laptop_screen(
    asgi_server, browser, screenshots, platform_settings, platform_market
):
    get_user_model().objects.create_superuser("root", password=PASSWORD)
    device_enrol(Account.create(), name="phone-with-a-rather-long-name", may_aggregate=True)
    off_the_loop(task_post, buyer_signup("buyer"))
    off_the_loop(chain_sync)
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    page.set_default_timeout(120_000)  # a busy machine is waited for, never timed
    page.goto(asgi_server + "/admin/login/")
    page.fill("#id_username", "root")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(lambda url: "/login/" not in url)

    for model in ("chaincursor", "device", "task", "wallet", "bid"):
        page.goto(f"{asgi_server}/admin/marketplace/{model}/")
        assert fits_the_width(page), model
        page.screenshot(path=str(screenshots / f"admin-{model}.png"), full_page=True)
    # The cursor's lag reads as time, not as a raw float.
    page.goto(f"{asgi_server}/admin/marketplace/chaincursor/")
    lag = page.inner_text("td.field-lag")
    assert lag == "-" or lag.endswith((" ms", " s"))
    context.close()
