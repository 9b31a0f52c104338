"""A buyer in a real browser: sign up, fund the wallet, post a task, find it in the list, and
watch its page follow the chain live over the WebSocket, from bids to payouts; markup in any
text the page shows (the buyer's title, a device's name, any field pushed) stays text."""

from __future__ import annotations

import re
from datetime import timedelta

import numpy as np
import pytest
from django.db import transaction
from eth_account import Account
from eth_account.messages import encode_defunct

from chain.events import Role
from chain.selection import mask_of
from core.enrolment import join_message
from marketplace import reports, selectors, services
from marketplace.models import Task, TaskOrder
from marketplace.sync import chain_sync
from marketplace.sync.push import task_push_next
from tests.blobs import blob_of
from tests.e2e.pages import off_the_loop
from training.serialize import id_hex, model_id

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "a-long-enough-passphrase-42"
PRICE_WEI = 10**15
ROUNDS = 3
# What the aggregator reports for rounds 1..3: a plausible learning curve.
METRICS = [(0.62, 1.31), (0.81, 0.74), (0.9, 0.41)]
TX_SHOWN = 4
# Generous: on a busy machine posting a task (a mined transaction) can take a while; a live
# page is waited for, never timed.
UPDATE_TIMEOUT_MS = 120_000
# Text that would run script if a page ever put it into HTML unescaped.
MARKUP = "<img src=x onerror=alert(1)>"
TITLE = f"Digits on three phones {MARKUP}"
# A device's name as long as enrolment allows (100 characters), markup and all.
PRANK = f"{MARKUP} " + "x" * (100 - len(MARKUP) - 1)
# True when the table holding an element fits its box (no sideways scroll).
FITS_JS = (
    "(sel) => { const w = document.querySelector(sel).closest('.table-wrap');"
    " return w.scrollWidth <= w.clientWidth; }"
)
# The empty tables' notes, and those whose note does not span every column of its table.
EMPTY_ROWS_JS = """() => {
  const rows = [...document.querySelectorAll("#task-page td.empty")];
  const cols = (td) => td.closest("table").tHead.rows[0].cells.length;
  return [rows.length, rows.filter((td) => td.colSpan !== cols(td)).map((td) => td.textContent)];
}"""
# Replaces every string of a task's message with MARKUP, renders it whole and applies it as a
# delta, and counts what markup became elements in the page (none may).
POISON_JS = """(markup) => {
  const msg = window.FlexTask.message();  // the whole task, as the socket sent it
  const poison = (v) => typeof v === "string" ? markup
    : Array.isArray(v) ? v.map(poison)
    : v && typeof v === "object"
      ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, poison(x)]))
    : v;
  const bad = poison(msg);
  const addresses = Object.keys(msg.view.device_names);
  bad.view.device_names = Object.fromEntries(addresses.map((a) => [a, markup]));
  bad.snapshot.bids = msg.snapshot.bids.map((b) => ({ ...poison(b), device: b.device }));
  window.FlexTask.render(bad);
  // The same strings arriving as a delta, whose rows are merged and drawn in place.
  const delta = poison({ ...msg, type: "task.delta" });
  delta.view.device_names = bad.view.device_names;
  window.FlexTask.apply(delta);
  return document.querySelectorAll("#task-page img, #task-page script").length;
}"""


def _enrol(account, *, name: str, may_aggregate: bool = False) -> None:
    issued = services.join_token_issue(
        label=name, ttl=timedelta(hours=1), may_aggregate=may_aggregate
    )
    token = services.join_challenge_issue(raw_token=issued.raw)
    text = join_message(challenge=token.challenge, address=account.address)
    services.device_enrol(
        raw_token=issued.raw,
        address=account.address,
        signature="0x" + bytes(account.sign_message(encode_defunct(text=text)).signature).hex(),
        name=name,
        device_class="gpu" if may_aggregate else "cpu",
    )


def test_buyer_posts_a_task_and_watches_it_live(
    asgi_server,
    browser,
    screenshots,
    platform_settings,
    platform_market,
    w3,
    chain_rewound,
    devices_played_by_the_test,
    monkeypatch,
):
    # A long task's page keeps its latest transactions and its last rounds' contributions as
    # they come: windows this short make this task a long one.
    monkeypatch.setattr(selectors, "TRANSACTIONS_SHOWN", TX_SHOWN)
    monkeypatch.setattr(selectors, "CONTRIBUTION_ROUNDS_SHOWN", ROUNDS - 1)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UPDATE_TIMEOUT_MS)
    dialogs: list[str] = []  # an alert() would mean markup ran as script
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    errors: list[str] = []  # the page's own script failing on a message
    page.on("pageerror", lambda error: errors.append(str(error)))

    # Sign up: the wallet comes with the account.
    page.goto(asgi_server + "/")
    page.get_by_role("link", name="Create an account").click()
    page.fill("#id_username", "ada")
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    page.wait_for_url(re.compile(r"/wallet/$"))
    assert page.inner_text("#wallet-balance").startswith("0 ")

    # Fund it from the dev chain's faucet.
    page.click("#faucet")
    page.wait_for_url(re.compile(r"/wallet/$"))
    assert page.inner_text("#wallet-balance").startswith("10 ")

    # Post a task through the form (the other fields keep their defaults).
    page.get_by_role("link", name="New task").click()
    page.fill("#id_title", TITLE)
    page.fill("#id_rounds", str(ROUNDS))
    page.fill("#id_min_trainers", "1")
    page.fill("#id_max_trainers", "2")
    page.fill("#id_budget", "0.05")
    page.wait_for_function("document.getElementById('est-high').textContent === '0.0009'")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(
        path=str(screenshots / "task-form-desktop.png"), full_page=True, animations="disabled"
    )
    page.click("#submit-task")
    page.wait_for_url(re.compile(r"/tasks/\d+/$"))
    task = TaskOrder.objects.get(title=TITLE)
    assert task.chain_task_id == platform_market.task_count()
    assert platform_market.task(task_id=task.chain_task_id).budget_wei == 5 * 10**16

    # It is listed among the buyer's tasks, and its page opens from there.
    page.get_by_role("link", name="My tasks").click()
    page.get_by_role("link", name=re.compile("Digits on three phones")).click()
    page.wait_for_url(re.compile(rf"/tasks/{task.chain_task_id}/$"))
    page.wait_for_selector("#live.on")  # the socket is open
    assert page.get_attribute("#task-state", "data-state") == "pending"
    assert MARKUP in page.inner_text("h1")  # the title, as the buyer typed it: text
    page.evaluate("window.__sameDocument = true")

    def sync_and_wait(js_condition: str) -> None:
        off_the_loop(chain_sync)
        page.wait_for_function(js_condition)

    # Chain sync sees TaskCreated: the page turns to bidding by itself.
    sync_and_wait("document.getElementById('task-state').dataset.state === 'bidding'")
    assert page.inner_text("#task-state") == "BIDDING"
    # Drawn again from the socket's message: each empty table's note spans the table.
    assert page.evaluate(EMPTY_ROWS_JS) == [5, []]

    # Three devices enrol and bid.
    aggregator, *trainers = (Account.create() for _ in range(4))
    _enrol(aggregator, name=PRANK, may_aggregate=True)  # a device named by a prankster
    for i, trainer in enumerate(trainers):
        _enrol(trainer, name=f"pixel-{i + 1}")
    tid = task.chain_task_id
    platform_market.place_bid(
        sender=aggregator,
        task_id=tid,
        price_per_round_wei=PRICE_WEI,
        samples=0,
        role=Role.AGGREGATOR,
    )
    for i, trainer in enumerate(trainers):
        platform_market.place_bid(
            sender=trainer,
            task_id=tid,
            price_per_round_wei=PRICE_WEI * (i + 1),
            samples=400 + 100 * i,
            role=Role.TRAINER,
        )
    # A change that another process numbered and committed but never sent (it died): the
    # page sees the gap at the next change, asks again and shows the whole task.
    with transaction.atomic():
        task_push_next(chain_task_id=tid)
    sync_and_wait("document.querySelectorAll('#bids-body tr').length === 4")
    assert page.get_attribute("#task-page", "data-resyncs") == "1"
    page.wait_for_function("document.getElementById('bids-body').textContent.includes('pixel-3')")
    assert MARKUP in page.inner_text("#bids-body")  # the device's name arrived live: as text
    # Cut short to keep the table in its box, and whole where the pointer rests on it.
    assert page.evaluate(FITS_JS, "#bids-body")
    assert page.get_attribute("#bids-body .dev strong[title^='<img']", "title") == PRANK

    # Bidding closes, the contract selects: running, with the two cheapest trainers.
    w3.provider.make_request("evm_mine", [platform_market.task(task_id=tid).bidding_ends])
    platform_market.select_nodes(sender=aggregator, task_id=tid)
    sync_and_wait("document.getElementById('task-state').dataset.state === 'running'")
    page.wait_for_function("document.querySelectorAll('#selected-body tr').length === 3")

    # Rounds: each published model, and the aggregator's metrics, reach the chart.
    rng = np.random.default_rng(0)
    weights = lambda: blob_of([rng.standard_normal((8, 4)).astype(np.float32)])  # noqa: E731
    publish = platform_market.publish_global_model(
        sender=aggregator, task_id=tid, round_number=0, model_id=model_id(weights())
    )
    selection = platform_market.selection(task_id=tid)
    by_address = {t.address: t for t in trainers}
    for number, (accuracy, loss) in enumerate(METRICS, start=1):
        for trainer in selection.trainers:
            platform_market.submit_update(
                sender=by_address[trainer],
                task_id=tid,
                round_number=number - 1,
                model_id=model_id(weights()),
            )
        global_id = id_hex(model_id(weights()))
        publish = platform_market.publish_global_model(
            sender=aggregator,
            task_id=tid,
            round_number=number,
            model_id=global_id,
            aggregated_mask=mask_of(range(len(selection.trainers))),
        )
        off_the_loop(chain_sync)
        off_the_loop(
            reports.round_metrics_record,
            task_id=tid,
            round_number=number,
            model_id=global_id,
            tx_hash=publish.tx_hash,
            accuracy=accuracy,
            loss=loss,
            gas_used=publish.gas_used,
        )
        page.wait_for_function(
            f"document.querySelectorAll('#chart circle.acc-dot').length === {number}"
        )
        assert page.inner_text("#stat-accuracy") == f"{accuracy * 100:.1f}%"
    # Each round's contributions arrived as a column of the live table, one row per trainer,
    # the oldest round's column leaving as the last came; each counts the rounds aggregated.
    page.wait_for_function(
        f"document.querySelectorAll('#contrib-head th').length === 3 + {ROUNDS - 1}"
    )
    # Headed as the rounds table numbers the global models the updates went into.
    heads = page.eval_on_selector_all(
        "#contrib-head th", "(ths) => ths.map((th) => th.textContent)"
    )
    assert heads == ["Trainer", "Round 2", "Round 3", "Aggregated", "Paid"]
    assert page.evaluate(FITS_JS, "#contrib-body")  # a column a round: in the wide column
    rows = page.query_selector_all("#contrib-body tr")
    assert [r.inner_text().count(f"{ROUNDS} of {ROUNDS}") for r in rows] == [1, 1]
    assert page.get_attribute("#task-state", "data-state") == "trained"
    assert page.is_visible("#model-link")

    # Settlement once the final model's dispute window has closed: payouts and the refund appear.
    closes_at = platform_market.task(task_id=tid).dispute_closes_at
    platform_market.w3.provider.make_request("evm_mine", [closes_at + 1])
    platform_market.finalize(sender=aggregator, task_id=tid)
    sync_and_wait("document.getElementById('task-state').dataset.state === 'finalized'")
    page.wait_for_function(
        "document.getElementById('refund-note').textContent.includes('Refunded')"
    )
    page.wait_for_function("document.getElementById('contrib-body').textContent.includes('ETH')")
    # Pay of the aggregator and 2 trainers, the refund, and the bond and 2 stakes returned.
    assert len(page.query_selector_all("#payouts-body tr")) == 1 + 2 + 1 + 1 + 2
    said = page.inner_text("#payouts-body")
    for label in ("Aggregator pay", "Trainer pay", "Refund", "Stake returned"):
        assert label in said
    # Every table fits its card at 1280 px, the prankster's name and 18 decimals included.
    for body in ("#rounds-body", "#contrib-body", "#bids-body", "#tx-body", "#selected-body"):
        assert page.evaluate(FITS_JS, body), body
    assert page.evaluate(FITS_JS, "#payouts-body")  # beside the name, 18 decimals
    # The latest transactions, the oldest gone as new ones came; all of them in the API.
    tx_text = page.inner_text("#tx-body")
    assert task.created_tx not in tx_text
    assert publish.tx_hash in tx_text
    assert len(page.query_selector_all("#tx-body tr")) == TX_SHOWN
    total = selectors.transaction_list(task=Task.objects.get(chain_task_id=tid))
    total = total.values("tx_hash").distinct().count()
    assert page.inner_text("#tx-note").strip() == f"the latest {TX_SHOWN} of {total} ·"

    # All of it arrived over the socket: the page was never reloaded.
    assert page.evaluate("window.__sameDocument") is True
    assert int(page.get_attribute("#task-page", "data-updates")) >= 6
    page.screenshot(
        path=str(screenshots / "task-desktop.png"), full_page=True, animations="disabled"
    )

    # The model card: the final model's ID, who contributed and what each was paid.
    page.click("#model-link")
    page.wait_for_url(re.compile(rf"/tasks/{task.chain_task_id}/model/$"))
    assert page.inner_text("#final-model-id") == global_id
    assert "pixel-2" in page.inner_text("#contributors")
    page.screenshot(path=str(screenshots / "model-card-desktop.png"), full_page=True)
    page.go_back()

    phone = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        storage_state=context.storage_state(),
    )
    phone_page = phone.new_page()
    phone_page.set_default_timeout(UPDATE_TIMEOUT_MS)
    phone_page.goto(page.url)
    phone_page.wait_for_selector("#chart circle.acc-dot")
    assert phone_page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # Whole tables: the prankster's name wraps rather than push the prices off screen.
    assert phone_page.evaluate(FITS_JS, "#bids-body")
    assert phone_page.evaluate(FITS_JS, "#selected-body")
    phone_page.screenshot(
        path=str(screenshots / "task-phone.png"), full_page=True, animations="disabled"
    )
    phone_page.goto(asgi_server + "/tasks/")
    phone_page.screenshot(
        path=str(screenshots / "task-list-phone.png"), full_page=True, animations="disabled"
    )
    phone.close()

    # With no socket (a proxy that does not pass /ws/ on), the page still draws its chart
    # from the points it holds; the rest the server rendered.
    socketless = browser.new_context(storage_state=context.storage_state())
    socketless.add_init_script("window.WebSocket = class { send() {} close() {} };")
    alone = socketless.new_page()
    alone.set_default_timeout(UPDATE_TIMEOUT_MS)
    alone.goto(page.url)
    alone.wait_for_selector("#chart circle.acc-dot")
    assert alone.locator("#chart circle.acc-dot").count() == ROUNDS
    assert "pixel-2" in alone.inner_text("#contrib-body")
    assert alone.get_attribute("#task-page", "data-updates") is None  # no message came
    socketless.close()

    # Whatever text any field of a pushed message holds, the page renders it as text.
    page.goto(asgi_server + f"/tasks/{task.chain_task_id}/")
    page.wait_for_selector("#live.on")
    assert page.locator("#task-page img, #task-page script").count() == 0
    assert page.evaluate(POISON_JS, MARKUP) == 0
    assert MARKUP in page.inner_text("#bids-body")

    # Logged out in another window of the same session: the live page says so at once.
    elsewhere = browser.new_context(storage_state=context.storage_state())
    other = elsewhere.new_page()
    other.goto(asgi_server + "/wallet/")
    other.get_by_role("button", name="Log out").click()
    other.wait_for_url(re.compile(r"/$"))
    elsewhere.close()
    page.wait_for_selector("#live.off")
    page.wait_for_function(
        "document.getElementById('live-text').textContent.startsWith('not signed in')"
    )
    assert dialogs == []
    assert errors == []
    context.close()
