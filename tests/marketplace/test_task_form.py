"""The task form: exact ETH amounts, every bad input refused beside its field with nothing sent
to the chain, and task_create against the real contract."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from chain.client import FlexMarket
from chain.events import TaskState
from chain.launcher import free_port
from chain.node import chain_time
from chain.records import MinPrices
from core.units import AmountError, eth_to_wei, wei_to_eth, wei_to_eth_approx
from marketplace import lifecycle, services, wallets
from marketplace.estimates import CREATE_TASK_GAS
from marketplace.models import Task, TaskOrder, ValidationSet
from marketplace.sync import chain_sync
from marketplace.validation import validation_set_upload
from tests.marketplace.people import task_post
from training import validation
from training.catalogue import MODELS
from training.datasets import load_test
from training.spec import AggregationSpec, TaskSpec

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-enough-passphrase-42"
MIN_PRICE_WEI = 10**14  # tests/conftest.py deploys the platform market with these minimums
# More digits than a float (or Decimal's default 28-digit context) holds exactly.
BIG_WEI = 123456789012345678901234567890 * 10**18 + 123456789012345678


# ---------------------------------------------------------------- ETH amounts


@pytest.mark.parametrize(
    ("text", "wei"),
    [
        ("0.1", 10**17),
        ("1", 10**18),
        ("1.000000000000000001", 10**18 + 1),
        ("0.000000000000000001", 1),
        (".5", 5 * 10**17),
        ("2.", 2 * 10**18),
        (" 0.25 ", 25 * 10**16),
        ("123456789012345678901234567890.123456789012345678", BIG_WEI),
        ("0.30000000000000000", 3 * 10**17),
    ],
)
def test_eth_converts_to_exact_wei(text, wei):
    assert eth_to_wei(text) == wei


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("-1", "amount_not_positive"),
        ("-0.5", "amount_not_positive"),
        ("0", "amount_not_positive"),
        ("0.000", "amount_not_positive"),
        ("lots", "amount_invalid"),
        ("1e3", "amount_invalid"),
        ("NaN", "amount_invalid"),
        ("Infinity", "amount_invalid"),
        ("1,5", "amount_invalid"),
        ("0x10", "amount_invalid"),
        ("1 000", "amount_invalid"),
        ("0.0000000000000000001", "amount_too_precise"),
        ("1.0000000000000000000", "amount_too_precise"),
        ("9" * 80, "amount_too_large"),
    ],
)
def test_bad_amounts_are_refused(text, code):
    with pytest.raises(AmountError) as exc:
        eth_to_wei(text)
    assert exc.value.code == code


@given(st.integers(min_value=1, max_value=2**256 - 1))
def test_wei_survives_a_round_trip_through_eth_text(wei):
    assert eth_to_wei(wei_to_eth(wei)) == wei


def test_wei_shows_as_exact_eth():
    assert wei_to_eth(10**14) == "0.0001"
    assert wei_to_eth(10**18 + 1) == "1.000000000000000001"
    assert wei_to_eth(3 * 10**18) == "3"
    assert wei_to_eth("0") == "0"


def test_estimates_round_up_to_three_digits():
    assert wei_to_eth_approx(260_049_112_440_000) == "0.000261"
    assert wei_to_eth_approx(10**18) == "1"
    assert wei_to_eth_approx(999) == "0.000000000000000999"


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def buyer():
    user = services.user_signup(username="buyer", password=PASSWORD)
    services.wallet_fund(wallet=user.wallet)
    return user


@pytest.fixture
def logged_in(client, buyer):
    client.force_login(buyer)
    return client


def form_data(**overrides) -> dict[str, str]:
    ends = timezone.now() + timedelta(minutes=15)
    data = {
        "title": "Digits, five phones",
        "dataset": "digits-8x8",
        "model": "digits-mlp",
        "rounds": "2",
        "min_trainers": "1",
        "max_trainers": "3",
        "bidding_ends": ends.strftime("%Y-%m-%dT%H:%M"),
        "round_timeout_minutes": "10",
        "sample_cap": "250",
        "budget": "0.01",
        "local_epochs": "1",
        "batch_size": "32",
        "learning_rate": "0.05",
        "aggregation": "fedavg",
        "seed": "0",
    }
    return {**data, **{k: str(v) for k, v in overrides.items()}}


class ChainWatch:
    """What must not move when a form is refused: the task count and the wallet's nonce."""

    def __init__(self, market: FlexMarket, address: str) -> None:
        self.market, self.address = market, address
        self.before = self.now()

    def now(self) -> tuple[int, int]:
        return self.market.task_count(), self.market.w3.eth.get_transaction_count(self.address)

    def unchanged(self) -> bool:
        return self.now() == self.before


@pytest.fixture
def watch(platform_market, buyer) -> ChainWatch:
    return ChainWatch(platform_market, buyer.wallet.address)


def field_errors(response, field: str) -> list[tuple[str, str]]:
    """(code, message) of each error shown beside ``field``."""
    form = response.context["form"]
    return [(e.code, " ".join(e.messages)) for e in form.errors.as_data().get(field, [])]


# ---------------------------------------------------------------- refused inputs


@pytest.mark.parametrize(
    ("overrides", "field", "code"),
    [
        ({"budget": "-1"}, "budget", "amount_not_positive"),
        ({"budget": "0"}, "budget", "amount_not_positive"),
        ({"budget": "ten"}, "budget", "amount_invalid"),
        ({"budget": "0.0000000000000000001"}, "budget", "amount_too_precise"),
        ({"budget": ""}, "budget", "required"),
        ({"min_trainers": "4", "max_trainers": "3"}, "max_trainers", "trainer_range_invalid"),
        ({"min_trainers": "0"}, "min_trainers", "min_value"),
        ({"learning_rate": "0"}, "learning_rate", "learning_rate_invalid"),
        ({"rounds": "x"}, "rounds", "invalid"),
        ({"model": "gpt-5"}, "model", "invalid_choice"),
        ({"sample_cap": "0"}, "sample_cap", "min_value"),
        ({"sample_cap": str(2**24 + 1)}, "sample_cap", "max_value"),
        ({"dispute_window_minutes": "-1"}, "dispute_window_minutes", "min_value"),
        ({"dispute_window_minutes": str(30 * 24 * 60 + 1)}, "dispute_window_minutes", "max_value"),
        ({"dispute_window_minutes": "soon"}, "dispute_window_minutes", "invalid"),
    ],
)
def test_form_refuses_bad_input_beside_the_field(logged_in, watch, overrides, field, code):
    response = logged_in.post(reverse("task-create"), form_data(**overrides))

    assert response.status_code == 200
    assert [c for c, _ in field_errors(response, field)] == [code]
    assert f'id="errors-{field}"' in response.content.decode()
    assert watch.unchanged()
    assert not TaskOrder.objects.exists()


def test_bidding_window_in_the_past_is_refused(logged_in, watch):
    past = (timezone.now() - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M")

    response = logged_in.post(reverse("task-create"), form_data(bidding_ends=past))

    assert field_errors(response, "bidding_ends")[0][0] == "bidding_end_past"
    assert watch.unchanged()


def test_too_many_trainers_for_the_contract_is_refused(logged_in, watch, platform_market):
    cap = platform_market.limits().max_trainers

    response = logged_in.post(reverse("task-create"), form_data(max_trainers=cap + 1))

    [(code, message)] = field_errors(response, "max_trainers")
    assert code == "invalid_trainer_range"
    assert str(cap) in message
    assert watch.unchanged()


def test_too_many_rounds_for_the_contract_is_refused(logged_in, watch, platform_market):
    cap = platform_market.limits().max_rounds

    response = logged_in.post(reverse("task-create"), form_data(rounds=cap + 1))

    assert field_errors(response, "rounds") == [("invalid_rounds", f"Between 1 and {cap} rounds.")]
    assert watch.unchanged()


def test_budget_below_the_contract_minimum_is_refused(logged_in, watch):
    # 3 rounds x (2 trainers + the aggregator) at 0.0001 ETH each = 0.0009 ETH.
    data = form_data(rounds=3, min_trainers=2, max_trainers=2, budget="0.000899999999999999")

    response = logged_in.post(reverse("task-create"), data)

    [(code, message)] = field_errors(response, "budget")
    assert code == "budget_too_low"
    assert "0.0009 ETH" in message
    assert watch.unchanged()


def test_budget_above_the_wallet_balance_is_refused(logged_in, watch, buyer):
    balance = wallets.wallet_balance_wei(wallet=buyer.wallet)

    response = logged_in.post(reverse("task-create"), form_data(budget=wei_to_eth(balance)))

    [(code, message)] = field_errors(response, "budget")
    assert code == "insufficient_funds"
    assert f"needs {wei_to_eth(balance)} ETH and about " in message
    assert not re.search(r"\d\.\d{7,}", message)  # gas as an estimate, not to the wei
    assert watch.unchanged()


def test_a_contract_revert_becomes_an_error_beside_the_field(logged_in, watch, monkeypatch):
    # The website's own minimum check is fooled, so the contract itself must refuse the budget.
    monkeypatch.setattr(FlexMarket, "min_prices", lambda self: MinPrices(0, 0))

    response = logged_in.post(reverse("task-create"), form_data(budget="0.000000000000000001"))

    [(code, message)] = field_errors(response, "budget")
    assert code == "budget_too_low"
    assert "0.0004 ETH" in message  # the contract's own minimum: 2 rounds x (1 + 1) x 0.0001
    assert watch.unchanged()


def test_an_unreachable_chain_is_said_and_nothing_is_sent(logged_in, watch, settings):
    rpc_url = settings.ETH_RPC_URL
    settings.ETH_RPC_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    response = logged_in.post(reverse("task-create"), form_data())

    assert response.status_code == 200
    assert "cannot be reached" in " ".join(response.context["form"].non_field_errors())
    assert response.context["estimate"] is None
    settings.ETH_RPC_URL = rpc_url
    assert watch.unchanged()
    assert not TaskOrder.objects.exists()


def test_the_form_needs_a_login(client):
    response = client.get(reverse("task-create"))
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


# ---------------------------------------------------------------- creating


def test_valid_form_posts_the_task_on_chain(logged_in, buyer, platform_market):
    before = platform_market.task_count()

    response = logged_in.post(reverse("task-create"), form_data(budget="0.0123456789"))

    order = TaskOrder.objects.get()
    assert response.status_code == 302
    assert response.url == reverse("task-detail", args=[order.chain_task_id])
    assert platform_market.task_count() == before + 1
    assert order.buyer == buyer
    assert order.title == "Digits, five phones"
    assert order.budget_wei == 12_345_678_900_000_000
    on_chain = platform_market.task(task_id=order.chain_task_id)
    assert on_chain.state == TaskState.BIDDING
    assert on_chain.buyer == buyer.wallet.address == order.buyer_address
    assert on_chain.budget_wei == 12_345_678_900_000_000
    bundled = validation.validation_id(validation.bundled(schema="digits-8x8"))
    spec = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=2, validation=bundled)
    assert on_chain.spec_hash == order.spec_hash == spec.hash_hex
    assert TaskSpec.from_dict(order.spec) == spec
    assert (on_chain.rounds, on_chain.min_trainers, on_chain.max_trainers) == (2, 1, 3)
    assert on_chain.round_timeout == 600
    assert on_chain.dispute_window == order.dispute_window_s == 600  # left empty: the timeout
    assert on_chain.sample_cap == 250
    assert on_chain.bidding_ends == int(order.bidding_ends.timestamp())
    receipt = platform_market.w3.eth.get_transaction_receipt(order.created_tx)
    # The website records the order only; chain sync mirrors the task from its event.
    assert not Task.objects.exists()
    chain_sync()
    task = Task.objects.get(created_tx=order.created_tx)
    assert (task.chain_task_id, task.created_block) == (order.chain_task_id, receipt["blockNumber"])
    assert (task.order, task.buyer, task.state) == (order, buyer, "bidding")
    # The gas the estimate and the balance check assume covers what createTask needs.
    assert receipt["gasUsed"] * 12 // 10 <= CREATE_TASK_GAS
    # The page it lands on says so, with a deadline that stays true as the page goes live.
    page = logged_in.get(response.url).content.decode()
    ends = datetime.fromtimestamp(on_chain.bidding_ends, UTC)
    assert f"Devices may bid on it until {ends:%Y-%m-%d %H:%M} UTC." in page


def test_an_order_meets_a_task_sync_mirrored_first(buyer, platform_market, monkeypatch):
    """Sync may mirror TaskCreated before the website records the order: they still meet, by
    the creating transaction, and sync wrote the task's row alone."""
    spec = TaskSpec(model="digits-cnn", dataset="digits-8x8", rounds=1, seed=7)
    create_task = FlexMarket.create_task

    def create_then_sync(self, **kwargs):
        receipt = create_task(self, **kwargs)
        chain_sync()
        assert Task.objects.filter(created_tx=receipt.tx_hash).exists()
        assert not TaskOrder.objects.exists()
        return receipt

    monkeypatch.setattr(FlexMarket, "create_task", create_then_sync)

    order = services.task_create(
        buyer=buyer,
        title="CNN",
        spec=spec,
        min_trainers=1,
        max_trainers=1,
        bidding_window_s=120,
        round_timeout_s=60,
        budget_wei=10**16,
    )

    task = Task.objects.get(created_tx=order.created_tx)
    assert (task.chain_task_id, task.state, task.created_tx) == (
        order.chain_task_id,
        "bidding",
        order.created_tx,
    )
    assert task.order == order
    assert lifecycle.task_spec(task) == order.spec
    assert {**spec.as_dict(), "validation": order.spec["validation"]} == order.spec


def test_a_spec_that_does_not_hash_to_the_chains_is_never_sent(buyer, platform_market):
    order = services.task_create(
        buyer=buyer,
        title="CNN",
        spec=TaskSpec(model="digits-cnn", dataset="digits-8x8", rounds=1),
        min_trainers=1,
        max_trainers=1,
        bidding_window_s=120,
        round_timeout_s=60,
        budget_wei=10**16,
    )
    chain_sync()
    task = Task.objects.get(created_tx=order.created_tx)
    assert lifecycle.task_spec(task) == order.spec
    # An order whose spec is not the one the chain committed to is never sent to devices.
    TaskOrder.objects.filter(pk=order.pk).update(spec_hash="0x" + "00" * 32)

    assert lifecycle.task_spec(Task.objects.get(created_tx=order.created_tx)) is None


def test_the_bidding_window_runs_on_the_chains_clock(buyer, platform_market, w3):
    """A deadline is counted from the chain's clock, which after an evm_revert (as the browser
    test does) or on any other node can be far from this machine's: counted from the wall
    clock, bidding would close late and selection would find it still open."""
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    try:
        behind = int(timezone.now().timestamp()) - 3600
        w3.provider.make_request("evm_setTime", [behind])
        w3.provider.make_request("evm_mine", [])
        before = chain_time(w3)

        order = services.task_create(
            buyer=buyer,
            title="",
            spec=TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=1),
            min_trainers=1,
            max_trainers=1,
            bidding_window_s=60,
            round_timeout_s=60,
            budget_wei=10**16,
        )

        ends = platform_market.task(task_id=order.chain_task_id).bidding_ends
        assert before + 60 <= ends <= chain_time(w3) + 60
        assert ends < behind + 600  # an hour before what the wall clock would have given
    finally:
        w3.provider.make_request("evm_revert", [snapshot])


def test_task_create_needs_exactly_one_deadline(buyer):
    spec = TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=1)
    with pytest.raises(TypeError):
        services.task_create(
            buyer=buyer,
            title="",
            spec=spec,
            min_trainers=1,
            max_trainers=1,
            round_timeout_s=60,
            budget_wei=10**16,
        )


def test_hyper_parameters_reach_the_spec(logged_in, platform_market):
    data = form_data(local_epochs=3, batch_size=16, learning_rate="0.1", seed=42)
    data["aggregation"] = "fedmedian"

    logged_in.post(reverse("task-create"), data)

    task = TaskOrder.objects.get()
    spec = TaskSpec.from_dict(task.spec)
    assert (spec.local_epochs, spec.batch_size, spec.learning_rate, spec.seed) == (3, 16, 0.1, 42)
    assert spec.aggregation == AggregationSpec(strategy="fedmedian")
    assert platform_market.task(task_id=task.chain_task_id).spec_hash == spec.hash_hex


def validation_upload(name: str, x, y) -> SimpleUploadedFile:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return SimpleUploadedFile(name, buffer.getvalue(), content_type="application/octet-stream")


def test_an_uploaded_validation_set_is_stored_and_committed_in_the_spec(logged_in, platform_market):
    test = load_test(schema="digits-8x8")
    upload = validation_upload("mine.npz", test.x[:40], test.y[:40])

    response = logged_in.post(reverse("task-create"), {**form_data(), "validation_file": upload})

    assert response.status_code == 302
    order = TaskOrder.objects.get()
    stored = ValidationSet.objects.get()
    assert stored.samples == 40
    assert validation.validation_id(bytes(stored.data)) == stored.content_id
    assert order.spec["validation"] == stored.content_id
    assert platform_market.task(task_id=order.chain_task_id).spec_hash == order.spec_hash


@pytest.mark.parametrize(
    ("name", "make", "needle"),
    [
        ("mine.npz", lambda x, y: (x[:, :4, :4], y), "expects (8, 8, 1)"),
        ("mine.npz", lambda x, y: (x, y + 10), "classes 0 to 9"),
        ("mine.npz", lambda x, y: (x[:3], y[:3]), "holds 3 samples"),
        ("mine.json", lambda x, y: (x, y), "unsupported file type"),
    ],
)
def test_a_bad_validation_set_is_refused_beside_its_field_and_nothing_is_sent(
    logged_in, watch, name, make, needle
):
    test = load_test(schema="digits-8x8")
    upload = validation_upload(name, *make(test.x[:40], test.y[:40]))

    response = logged_in.post(reverse("task-create"), {**form_data(), "validation_file": upload})

    assert response.status_code == 200
    errors = field_errors(response, "validation_file")
    assert [code for code, _ in errors] == ["validation_set_invalid"]
    assert needle in errors[0][1]
    assert name in errors[0][1]
    assert b"errors-validation_file" in response.content
    assert watch.unchanged()
    assert not TaskOrder.objects.exists()
    assert not ValidationSet.objects.exists()


def test_form_page_shows_the_estimate_and_balance(logged_in, buyer):
    response = logged_in.get(reverse("task-create"))

    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="est-low"' in html
    assert wei_to_eth(wallets.wallet_balance_wei(wallet=buyer.wallet)) in html
    # Every catalogue model is offered.
    assert "digits-mlp" in html
    assert "digits-cnn" in html


def test_the_form_starts_at_the_first_models_preset_and_explains_each_hyper_parameter(
    logged_in,
):
    first = next(iter(MODELS.values()))
    form = logged_in.get(reverse("task-create")).context["form"]

    assert form["rounds"].initial == 5
    for name in ("local_epochs", "batch_size", "learning_rate"):
        assert form[name].initial == getattr(first.preset, name)
    for name in ("local_epochs", "batch_size", "learning_rate", "aggregation", "seed"):
        help_text = form.fields[name].help_text
        assert help_text, name
        assert "\n" not in help_text, name
        assert len(help_text) < 100, name


# ---------------------------------------------------------------- a task like another


def form_as_rendered(response) -> dict[str, str]:
    """What the browser would send back for a form page: each field's value as rendered."""
    form = response.context["form"]
    values = {name: form[name].value() for name in form.fields if name != "validation_file"}
    return {name: "" if value is None else str(value) for name, value in values.items()}


def test_a_task_like_another_starts_from_its_spec_terms_and_validation_set(
    logged_in, platform_market
):
    test = load_test(schema="digits-8x8")
    first = form_data(
        rounds=3,
        max_trainers=2,
        round_timeout_minutes=15,
        dispute_window_minutes=45,
        sample_cap=300,
        budget="0.0123",
    )
    first |= {"local_epochs": "2", "batch_size": "8", "learning_rate": "0.07", "seed": "7"}
    logged_in.post(
        reverse("task-create"),
        {**first, "validation_file": validation_upload("mine.npz", test.x[:40], test.y[:40])},
    )
    original = TaskOrder.objects.get()
    page = logged_in.get(reverse("task-detail", args=[original.chain_task_id])).content.decode()
    like = f"{reverse('task-create')}?like={original.chain_task_id}"
    assert f'href="{like}"' in page  # "Post a similar task", on the buyer's own task page

    response = logged_in.get(like)

    shown = form_as_rendered(response)
    kept = {k: shown[k] for k in first if k != "bidding_ends"}
    assert kept == {k: v for k, v in first.items() if k != "bidding_ends"}
    assert shown["validation"] == original.spec["validation"]
    assert 'id="validation-kept"' in response.content.decode()
    # Sent back as it is (a new bidding end, as the form starts): the same task again.
    again = logged_in.post(reverse("task-create"), shown)
    assert again.status_code == 302, field_errors(again, "validation_file")
    second = TaskOrder.objects.exclude(pk=original.pk).get()
    assert second.spec == original.spec
    assert (
        second.budget_wei,
        second.sample_cap,
        second.round_timeout_s,
        second.dispute_window_s,
    ) == (12_300_000_000_000_000, 300, 900, 2700)
    assert platform_market.task(task_id=second.chain_task_id).spec_hash == original.spec_hash


@pytest.mark.parametrize(
    ("seconds", "minutes", "posted_s"), [(0, "0", 0), (90, "2", 120), (None, "", 600)]
)
def test_a_dispute_window_is_copied_in_minutes_and_never_shorter(
    logged_in, buyer, seconds, minutes, posted_s
):
    """A task posted through the API may have a window of any seconds; the form's minutes
    round it up (a copy never gives trainers less time to challenge), and 0 stays 0. An order
    from before orders kept their window leaves the field empty: the round timeout."""
    order = task_post(buyer, dispute_window_s=seconds or 0)
    if seconds is None:
        TaskOrder.objects.filter(pk=order.pk).update(dispute_window_s=None)

    response = logged_in.get(reverse("task-create"), {"like": order.chain_task_id})

    assert form_as_rendered(response)["dispute_window_minutes"] == minutes
    posted = logged_in.post(reverse("task-create"), form_data(dispute_window_minutes=minutes))
    assert posted.status_code == 302
    assert TaskOrder.objects.latest("pk").dispute_window_s == posted_s


@pytest.mark.parametrize("like", ["other", "nope", "99999999999999999999999", "424242"])
def test_only_a_buyers_own_task_can_be_started_from(logged_in, like):
    others = services.user_signup(username="other", password=PASSWORD)
    services.wallet_fund(wallet=others.wallet)
    theirs = task_post(others).chain_task_id

    response = logged_in.get(reverse("task-create"), {"like": theirs if like == "other" else like})

    assert response.status_code == 404
    assert b"Digits" not in response.content  # nothing of the other buyer's task


def test_a_kept_validation_set_must_be_the_buyers_own(logged_in, watch):
    """A form sent back with another buyer's set in its hidden field (read in a spec every
    bidding device sees) is refused beside the validation field; nothing is sent."""
    others = services.user_signup(username="other", password=PASSWORD)
    test = load_test(schema="digits-8x8")
    theirs = validation_set_upload(
        data=validation_upload("x.npz", test.x[:40], test.y[:40]).read(),
        filename="x.npz",
        dataset="digits-8x8",
        buyer=others,
    ).content_id

    response = logged_in.post(reverse("task-create"), form_data(validation=theirs))

    assert response.status_code == 200
    [(code, message)] = field_errors(response, "validation_file")
    assert code == "validation_set_unknown"
    assert "not among your uploads" in message
    assert b"errors-validation_file" in response.content
    assert watch.unchanged()
    assert not TaskOrder.objects.exists()
