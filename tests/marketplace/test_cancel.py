"""A buyer cancels a task while it is bidding, from the website or the API: the whole budget
comes back as credit; nobody else can, and nobody once nodes are selected."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from eth_account import Account
from rest_framework.authtoken.models import Token

from chain.events import Role, TaskState
from marketplace.sync import chain_sync
from tests.marketplace.people import buyer_signup, device_enrol, task_post

pytestmark = pytest.mark.django_db

BUDGET_WEI = 10**16  # what people.task_post orders


@pytest.fixture
def ada(client):
    user = buyer_signup("ada")
    client.force_login(user)
    return user


def test_the_buyer_cancels_while_bidding_and_gets_the_budget_back(client, ada, platform_market):
    order = task_post(ada)
    chain_sync()
    page = client.get(reverse("task-detail", args=[order.chain_task_id])).content.decode()
    assert 'id="cancel-confirm"' in page

    response = client.post(reverse("task-cancel", args=[order.chain_task_id]))

    assert response.status_code == 302
    assert platform_market.task(task_id=order.chain_task_id).state == TaskState.CANCELLED
    assert platform_market.credit_of(account=ada.wallet.address) == BUDGET_WEI
    [note] = [str(m) for m in get_messages(response.wsgi_request)]
    assert "0.01 ETH is credited back to you" in note
    chain_sync()
    page = client.get(reverse("task-detail", args=[order.chain_task_id])).content.decode()
    assert 'data-state="cancelled"' in page
    assert 'class="cancel hidden"' in page


def test_no_cancel_once_nodes_are_selected(client, ada, platform_market, w3, chain_rewound):
    aggregator, trainer = Account.create(), Account.create()
    device_enrol(aggregator, name="gpu-box", may_aggregate=True)
    device_enrol(trainer, name="phone")
    order = task_post(ada, window_s=10)  # the bids follow at once
    tid = order.chain_task_id
    for device, role in ((aggregator, Role.AGGREGATOR), (trainer, Role.TRAINER)):
        platform_market.place_bid(
            sender=device, task_id=tid, price_per_round_wei=10**14, samples=100, role=role
        )
    w3.provider.make_request("evm_mine", [platform_market.task(task_id=tid).bidding_ends])
    platform_market.select_nodes(sender=aggregator, task_id=tid)

    response = client.post(reverse("task-cancel", args=[tid]))

    [note] = [str(m) for m in get_messages(response.wsgi_request)]
    assert note == "Not cancelled: The task is running: only a task still bidding can be cancelled."
    assert platform_market.task(task_id=tid).state == TaskState.RUNNING
    assert platform_market.credit_of(account=ada.wallet.address) == 0


def test_only_the_buyer_can_cancel(client, ada, platform_market):
    order = task_post(buyer_signup("bob"))
    chain_sync()

    assert client.post(reverse("task-cancel", args=[order.chain_task_id])).status_code == 404
    assert client.get(reverse("task-cancel", args=[order.chain_task_id])).status_code == 405
    assert platform_market.task(task_id=order.chain_task_id).state == TaskState.BIDDING


def test_cancel_through_the_api(client, ada, platform_market):
    order = task_post(ada)
    client.logout()
    token = Token.objects.create(user=ada)
    headers = {"Authorization": f"Token {token.key}"}
    path = reverse("api-task-cancel", args=[order.chain_task_id])

    response = client.post(path, headers=headers)

    assert response.status_code == 200
    assert response.json()["refund_wei"] == str(BUDGET_WEI)
    assert platform_market.credit_of(account=ada.wallet.address) == BUDGET_WEI
    again = client.post(path, headers=headers)
    assert again.status_code == 409
    assert again.json()["code"] == "invalid_task_state"
    other = Token.objects.create(user=buyer_signup("bob"))
    refused = client.post(path, headers={"Authorization": f"Token {other.key}"})
    assert refused.status_code == 404
