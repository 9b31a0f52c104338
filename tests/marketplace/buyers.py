"""Buyers and their API client for the API tests: sign-up with a funded wallet, a task,
and the error shape every refusal has."""

from __future__ import annotations

from rest_framework.test import APIClient

from marketplace.models import TaskOrder
from marketplace.services import task_create, user_signup, wallet_fund
from marketplace.wallets import wallet_of
from training.spec import TaskSpec

BUDGET_WEI = 10**16
SPEC = {"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 2}
PASSWORD = "a-long-test-passphrase"


def make_buyer(username: str):
    user = user_signup(username=username, password=PASSWORD)
    wallet_fund(wallet=wallet_of(user=user))
    return user


def make_task(buyer, *, title: str = "digits", window_s: int = 3600) -> TaskOrder:
    return task_create(
        buyer=buyer,
        title=title,
        spec=TaskSpec.from_dict(SPEC),
        min_trainers=1,
        max_trainers=3,
        round_timeout_s=600,
        # No disputes unless a test is about them: it may finalize right after the last round.
        dispute_window_s=0,
        budget_wei=BUDGET_WEI,
        bidding_window_s=window_s,
    )


def client_for(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content[:500]
    body = response.json()
    assert set(body) == {"code", "message", "fields"}
    assert body["code"] == code
    assert body["message"]
    return body
