"""Bad input gets a clear answer, never a 500: the whole API fuzzed from its own OpenAPI schema,
and the requests that once broke it, each refused with an error naming what was wrong."""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from chain.launcher import free_port
from marketplace import api_urls
from marketplace.contract import Deployment, deployment_save
from marketplace.models import TaskOrder
from tests.marketplace.buyers import SPEC, assert_error, client_for, make_buyer
from tests.marketplace.test_task_form import form_data

pytestmark = pytest.mark.django_db


def task_input(**overrides) -> dict:
    data = {
        "title": "digits",
        "spec": SPEC,
        "budget_wei": str(10**16),
        "min_trainers": 1,
        "max_trainers": 2,
        "round_timeout_s": 600,
        "bidding_window_s": 3600,
    }
    return {**data, **overrides}


@pytest.fixture
def alice(platform_settings):
    return make_buyer("alice")


# ---------------------------------------------------------------- the known 500s


def test_a_400_digit_learning_rate_is_refused_by_name(alice, platform_market):
    before = platform_market.task_count()
    rate = int("9" * 400)

    response = client_for(alice).post(
        "/api/tasks/create/", task_input(spec={**SPEC, "learning_rate": rate}), format="json"
    )

    body = assert_error(response, 400, "invalid")
    assert "learning_rate" in str(body["fields"]["spec"])
    assert platform_market.task_count() == before
    assert not TaskOrder.objects.exists()


@pytest.mark.parametrize("window", [2**40, 2**256, 10**400])
def test_a_bidding_window_past_what_the_contract_stores_is_refused_by_name(
    alice, platform_market, window
):
    before = platform_market.task_count()

    response = client_for(alice).post(
        "/api/tasks/create/", task_input(bidding_window_s=window), format="json"
    )

    body = assert_error(response, 400, "invalid")
    assert list(body["fields"]) == ["bidding_window_s"]
    assert platform_market.task_count() == before


def test_a_bidding_end_past_the_contract_range_is_refused_before_any_gas(alice, platform_market):
    """The largest window the API takes still ends past the contract's uint40 clock: the
    service refuses it with the contract's own error, before sending anything."""
    nonce = platform_market.w3.eth.get_transaction_count(alice.wallet.address)

    response = client_for(alice).post(
        "/api/tasks/create/", task_input(bidding_window_s=2**40 - 1), format="json"
    )

    body = assert_error(response, 409, "invalid_bidding_end")
    assert body["fields"]["bidding_ends"] > 2**40 - 1
    assert platform_market.w3.eth.get_transaction_count(alice.wallet.address) == nonce


@pytest.mark.parametrize("address_from", ["settings", "deployment file"])
def test_the_task_form_says_the_chain_is_down_and_keeps_what_was_typed(
    client, alice, platform_settings, platform_market, address_from
):
    if address_from == "deployment file":  # as `make run` finds its contract
        deployment_save(
            Deployment(chain_id=31337, address=platform_market.address, block=0),
            platform_settings.FLEX_DEPLOYMENT_FILE,
        )
        platform_settings.FLEX_CONTRACT_ADDRESS = ""
    platform_settings.ETH_RPC_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens
    client.force_login(alice)

    response = client.post(reverse("task-create"), form_data(title="kept while down"))

    # The form comes back with what was typed and the reason beside it.
    assert response.status_code == 200
    assert response.context["form"].errors == {
        "__all__": ["The chain cannot be reached right now; nothing was sent."]
    }
    page = response.content.decode()
    assert "The chain cannot be reached right now; nothing was sent." in page
    assert "kept while down" in page
    assert not TaskOrder.objects.exists()
    assert client.get(reverse("task-create")).status_code == 200


# ---------------------------------------------------------------- the whole API, fuzzed


# Bounded: each operation gets this many valid and this many invalid requests (bodies,
# parameters, headers), derandomized so that a run repeats; the test's timeout bounds the time.
EXAMPLES = 50


@pytest.fixture
def api_schema(alice):
    """The API's own OpenAPI schema, served by the real WSGI application.

    As Django's test client does, requests leave the database connection open: closing it
    would end the test's transaction.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def auth(alice) -> dict[str, str]:
    from rest_framework.authtoken.models import Token

    token, _ = Token.objects.get_or_create(user=alice)
    return {"Authorization": f"Token {token.key}"}


@pytest.mark.timeout(1200)
def test_no_request_makes_the_api_answer_5xx(api_schema, auth):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    # The whole API: every path under /api/ but the schema and its docs page.
    assert len({o.path for o in operations}) == len(api_urls.urlpatterns) - 2
    answered: dict[str, set[int]] = {}

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def call(case) -> None:
                response = case.call(headers=auth)
                answered.setdefault(case.operation.label, set()).add(response.status_code)
                assert response.status_code < 500, (
                    f"{case.operation.label} answered {response.status_code}: "
                    f"{response.text[:300]}\n{case.as_curl_command()}"
                )

            try:
                call()
            except Unsatisfiable:
                # An operation with no input of its own has no invalid form to send.
                assert mode is GenerationMode.NEGATIVE, operation.label
                print(f"nothing invalid to send to {operation.label}")

    # The fuzzing got past authentication and validation somewhere, not only 401s.
    assert any(code < 300 for codes in answered.values() for code in codes), answered
    assert any(code == 400 for codes in answered.values() for code in codes), answered
