"""Pages for people when something is not there or breaks, and the API's tokens as clients
send them."""

from __future__ import annotations

import pytest
from django.test import RequestFactory
from django.views.defaults import server_error
from rest_framework.authtoken.models import Token

from tests.marketplace.people import buyer_signup

pytestmark = pytest.mark.django_db


def test_a_missing_page_is_flexs_own_404(client, settings):
    settings.DEBUG = False

    response = client.get("/no/such/page/")

    assert response.status_code == 404
    html = response.content.decode()
    assert 'id="not-found"' in html
    assert "Nothing here" in html
    assert "Traceback" not in html
    assert "urlpatterns" not in html  # not Django's debug page


def test_a_task_that_is_not_yours_is_the_same_404(client, settings):
    settings.DEBUG = False
    client.force_login(buyer_signup("ada"))

    response = client.get("/tasks/999999/")

    assert response.status_code == 404
    assert 'id="not-found"' in response.content.decode()


def test_a_server_error_is_flexs_own_500_page():
    response = server_error(RequestFactory().get("/tasks/"))

    assert response.status_code == 500
    html = response.content.decode()
    assert 'id="server-error"' in html
    assert "Something went wrong on our side" in html


@pytest.mark.parametrize("keyword", ["Token", "Bearer", "bearer"])
def test_the_api_takes_a_token_as_token_or_bearer(client, keyword):
    token = Token.objects.create(user=buyer_signup("bo"))

    response = client.get("/api/tasks/", headers={"Authorization": f"{keyword} {token.key}"})

    assert response.status_code == 200


def test_a_wrong_bearer_token_is_refused_by_name(client):
    response = client.get("/api/tasks/", headers={"Authorization": "Bearer " + "0" * 40})

    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"
