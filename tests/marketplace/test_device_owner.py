"""A device's owner sees its work and pay: on the website through a link the device's key
signed, and through the API on a request the device signed; nobody else sees it."""

from __future__ import annotations

import html
import time

import numpy as np
import pytest
from django.urls import reverse
from eth_account import Account
from eth_account.messages import encode_defunct

from chain.events import Role
from chain.selection import mask_of
from core.enrolment import OWNER_PASS_MAX_S, owner_message
from core.units import wei_to_eth, wei_to_eth_short
from dataplane.signing import sign_request
from marketplace.sync import chain_sync
from tests.blobs import blob_of
from tests.marketplace.people import buyer_signup, device_enrol, task_post
from training.serialize import model_id

pytestmark = pytest.mark.django_db

PRICE_WEI = 3 * 10**14
AGGREGATOR_PRICE_WEI = 2 * 10**14


@pytest.fixture
def worked(platform_market, w3, chain_rewound):
    """Two rounds with two trainers, settled: ``steady`` delivered both, ``flaky`` the first
    only (round 2 closed at its timeout without it)."""
    aggregator, steady, flaky = (Account.create() for _ in range(3))
    device_enrol(aggregator, name="gpu-box", may_aggregate=True)
    device_enrol(steady, name="steady-phone")
    device_enrol(flaky, name="flaky-phone")
    order = task_post(buyer_signup("ada"), rounds=2, window_s=10, round_timeout_s=60)
    tid = order.chain_task_id
    for device, role, price in (
        (aggregator, Role.AGGREGATOR, AGGREGATOR_PRICE_WEI),
        (steady, Role.TRAINER, PRICE_WEI),
        (flaky, Role.TRAINER, PRICE_WEI),
    ):
        platform_market.place_bid(
            sender=device, task_id=tid, price_per_round_wei=price, samples=400, role=role
        )
    w3.provider.make_request("evm_mine", [platform_market.task(task_id=tid).bidding_ends])
    platform_market.select_nodes(sender=aggregator, task_id=tid)
    trainers = platform_market.selection(task_id=tid).trainers
    rng = np.random.default_rng(0)

    def blob():
        return model_id(blob_of([rng.standard_normal(4).astype(np.float32)]))

    platform_market.publish_global_model(
        sender=aggregator, task_id=tid, round_number=0, model_id=blob()
    )
    for device in (steady, flaky):
        platform_market.submit_update(sender=device, task_id=tid, round_number=0, model_id=blob())
    platform_market.publish_global_model(
        sender=aggregator,
        task_id=tid,
        round_number=1,
        model_id=blob(),
        aggregated_mask=mask_of(range(2)),
    )
    platform_market.submit_update(sender=steady, task_id=tid, round_number=1, model_id=blob())
    w3.provider.make_request("evm_increaseTime", [61])
    w3.provider.make_request("evm_mine", [])
    platform_market.publish_global_model(
        sender=aggregator,
        task_id=tid,
        round_number=2,
        model_id=blob(),
        aggregated_mask=mask_of([trainers.index(steady.address)]),
    )
    platform_market.finalize(sender=aggregator, task_id=tid)
    chain_sync()
    return {"task_id": tid, "steady": steady, "flaky": flaky, "aggregator": aggregator}


def owner_pass(account, market, *, expires: int | None = None, signer=None) -> dict[str, str]:
    expires = int(time.time()) + 600 if expires is None else expires
    text = owner_message(
        address=account.address,
        chain_id=market.w3.eth.chain_id,
        contract=market.address,
        expires=expires,
    )
    signature = (signer or account).sign_message(encode_defunct(text=text)).signature
    return {
        "address": account.address,
        "expires": str(expires),
        "signature": "0x" + bytes(signature).hex(),
    }


def test_the_owner_opens_the_device_page_with_a_link_its_key_signed(
    client, worked, platform_market
):
    flaky = worked["flaky"]

    response = client.get(reverse("device-owner-pass"), owner_pass(flaky, platform_market))

    assert response.status_code == 302
    assert response.url == reverse("device-page", args=[flaky.address])
    page = client.get(response.url)
    assert page.status_code == 200
    status = page.context["st"]
    assert (status["bids"], status["selected"]) == (1, 1)
    assert (status["rounds_done"], status["rounds_missed"]) == (1, 1)
    # Paid for the one round it delivered: half its price, its share of the unscored round's
    # pool (docs/contract.md); its stake, lost for the missed round, is no earning.
    assert status["earned_wei"] == PRICE_WEI // 2
    assert status["credit_wei"] == platform_market.credit_of(account=flaky.address)
    [task] = status["tasks"]
    assert (task["task_id"], task["state"], task["paid_wei"]) == (
        worked["task_id"],
        "finalized",
        PRICE_WEI // 2,
    )
    text = page.content.decode()
    assert "flaky-phone" in text
    # At a glance in the cards, as the wallet shows a balance; exact on hover and per task.
    for name, wei in (("earned", status["earned_wei"]), ("credit", status["credit_wei"])):
        exact, short = wei_to_eth(wei), wei_to_eth_short(wei)
        assert f'<span id="device-{name}" title="{exact} ETH exactly">{short}</span>' in text
    assert "0.0003" in text
    assert "no data plane is registered" in text.lower()
    # The pass opens this device's page only.
    steady = client.get(reverse("device-page", args=[worked["steady"].address]))
    assert steady.status_code == 404


def test_the_aggregator_sees_the_rounds_it_aggregated(client, worked, platform_market):
    aggregator = worked["aggregator"]
    client.get(reverse("device-owner-pass"), owner_pass(aggregator, platform_market))

    status = client.get(reverse("device-page", args=[aggregator.address])).context["st"]

    assert (status["rounds_done"], status["rounds_missed"]) == (2, 0)
    assert status["earned_wei"] == 2 * AGGREGATOR_PRICE_WEI


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"signer": Account.create()}, "not signed by the device's key"),
        ({"expires": int(time.time()) - 1}, "expired"),
        ({"expires": int(time.time()) + OWNER_PASS_MAX_S + 3600}, "longer than"),
    ],
)
def test_a_pass_not_made_by_the_device_now_opens_nothing(
    client, worked, platform_market, change, reason
):
    flaky = worked["flaky"]

    response = client.get(
        reverse("device-owner-pass"), owner_pass(flaky, platform_market, **change)
    )

    assert response.status_code == 403
    assert b'data-code="owner_pass_invalid"' in response.content
    assert reason in html.unescape(response.content.decode())
    assert client.get(reverse("device-page", args=[flaky.address])).status_code == 404


def test_a_pass_for_another_deployment_opens_nothing(client, worked, platform_market):
    flaky = worked["flaky"]
    text = owner_message(
        address=flaky.address, chain_id=1, contract=platform_market.address, expires=2**40
    )
    forged = {
        "address": flaky.address,
        "expires": str(int(time.time()) + 600),
        "signature": "0x" + bytes(flaky.sign_message(encode_defunct(text=text)).signature).hex(),
    }

    assert client.get(reverse("device-owner-pass"), forged).status_code == 403


def test_bad_pass_fields_are_named(client, worked):
    for query, words in (
        ({"address": "nope", "expires": "1", "signature": "0x"}, "not an Ethereum address"),
        ({"address": worked["flaky"].address, "expires": "soon"}, "no valid expiry"),
        (
            {"address": worked["flaky"].address, "expires": str(int(time.time()) + 60)},
            "malformed",
        ),
    ):
        response = client.get(reverse("device-owner-pass"), query)
        assert response.status_code == 403
        assert words in html.unescape(response.content.decode())


def test_staff_see_any_device_page_and_buyers_none(client, worked, admin_user):
    address = worked["steady"].address
    client.force_login(buyer_signup("bob"))
    assert client.get(reverse("device-page", args=[address])).status_code == 404
    client.force_login(admin_user)
    assert client.get(reverse("device-page", args=[address])).status_code == 200


def test_a_device_reads_its_own_status_through_the_api(client, worked, platform_market):
    steady = worked["steady"]
    path = reverse("api-device-status")
    headers = sign_request(
        account=steady,
        method="GET",
        url=f"http://testserver{path}",
        server_address=platform_market.address,
    )

    response = client.get(path, headers=headers)

    assert response.status_code == 200
    body = response.json()
    assert body["address"] == steady.address
    assert (body["rounds_done"], body["rounds_missed"]) == (2, 0)
    # Half its price in each of two rounds; exact: wei as a string of digits.
    assert body["earned_wei"] == str(PRICE_WEI)
    assert body["tasks"][0]["paid_wei"] == str(PRICE_WEI)
    # The same signature again is a replay; no signature is no device.
    assert client.get(path, headers=headers).status_code == 401
    assert client.get(path).status_code == 401
    client.force_login(buyer_signup("bob"))
    assert client.get(path).status_code in (401, 403)
