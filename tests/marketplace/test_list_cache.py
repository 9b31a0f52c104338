"""The task lists are cached, and never stale: a task changed on chain and mirrored by chain
sync, or a new order, shows on the very next request of the page and of the API, for its buyer
and for staff; the API's ETag answers 304 only while nothing in the list changed. So does a
task's API detail, only while the task is unchanged."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from marketplace.selectors import task_view_get
from marketplace.services import task_cancel
from marketplace.sync import chain_sync
from tests.marketplace.buyers import client_for
from tests.marketplace.people import buyer_signup, task_post

# Committed transactions: the lists are renewed when chain sync's transaction commits.
pytestmark = pytest.mark.django_db(transaction=True)


def page_states(client: Client) -> dict[int, str]:
    """Task id -> state as the task list page shows them."""
    response = client.get(reverse("task-list"))
    assert response.status_code == 200
    rows = re.findall(
        r'data-task="(\d+)">.*?class="badge state-(\w+)"', response.content.decode(), re.S
    )
    return {int(task_id): state for task_id, state in rows}


def api_states(client) -> dict[int, str]:
    response = client.get("/api/tasks/")
    assert response.status_code == 200
    return {row["id"]: row["state"] for row in response.json()["results"]}


@pytest.fixture
def ada():
    return buyer_signup("ada")


def test_a_task_changed_on_chain_shows_on_the_next_request(ada, admin_user):
    page, staff_page = Client(), Client()
    page.force_login(ada)
    staff_page.force_login(admin_user)
    api = client_for(ada)
    task_id = task_post(ada, title="digits").chain_task_id
    ids = {task_id}

    def reads():
        """Each list's states of Ada's tasks, read twice (the second time from the cache);
        staff's list also shows tasks that earlier tests left on the chain."""
        for read in (lambda: page_states(page), lambda: page_states(staff_page)) * 2:
            yield {i: s for i, s in read().items() if i in ids}
        yield api_states(api)
        yield api_states(api)

    assert list(reads()) == [{task_id: "pending"}] * 6
    chain_sync()
    assert list(reads()) == [{task_id: "bidding"}] * 6
    task_cancel(task=task_view_get(user=ada, task_id=task_id), user=ada)
    chain_sync()
    assert list(reads()) == [{task_id: "cancelled"}] * 6
    newer = task_post(ada, title="another").chain_task_id
    ids.add(newer)
    assert list(reads()) == [{newer: "pending", task_id: "cancelled"}] * 6


def test_the_api_answers_304_while_the_list_is_unchanged(ada):
    api = client_for(ada)
    task_id = task_post(ada).chain_task_id
    chain_sync()
    etag = api.get("/api/tasks/")["ETag"]
    unchanged = api.get("/api/tasks/", HTTP_IF_NONE_MATCH=etag)
    assert (unchanged.status_code, unchanged.content, unchanged["ETag"]) == (304, b"", etag)
    # Ada's list, for her client only, which checks it again each time.
    assert set(unchanged["Cache-Control"].split(", ")) == {"private", "no-cache"}
    # Another buyer's task, mirrored: it is not in Ada's list, so her copy stays good.
    task_post(buyer_signup("bob"))
    chain_sync()
    assert api.get("/api/tasks/", HTTP_IF_NONE_MATCH=etag).status_code == 304
    # Each query of the list has a tag of its own.
    assert api.get("/api/tasks/?state=bidding", HTTP_IF_NONE_MATCH=etag).status_code == 200

    task_cancel(task=task_view_get(user=ada, task_id=task_id), user=ada)
    chain_sync()
    changed = api.get("/api/tasks/", HTTP_IF_NONE_MATCH=etag)
    assert changed.status_code == 200
    assert changed["ETag"] != etag
    assert changed.json()["results"][0]["state"] == "cancelled"


def test_each_user_is_served_their_own_list(ada):
    bob = buyer_signup("bob")
    mine, theirs = task_post(ada).chain_task_id, task_post(bob).chain_task_id
    chain_sync()
    assert api_states(client_for(ada)) == {mine: "bidding"}
    assert api_states(client_for(bob)) == {theirs: "bidding"}
    page = Client()
    page.force_login(bob)
    assert page_states(page) == {theirs: "bidding"}


def test_the_api_task_detail_answers_304_while_the_task_is_unchanged(ada, admin_user):
    api = client_for(ada)
    task_id = task_post(ada).chain_task_id
    detail = f"/api/tasks/{task_id}/"
    # An order chain sync has not mirrored yet is read afresh each time: no tag.
    assert "ETag" not in api.get(detail)
    chain_sync()
    etag = api.get(detail)["ETag"]
    unchanged = api.get(detail, HTTP_IF_NONE_MATCH=etag)
    assert (unchanged.status_code, unchanged.content, unchanged["ETag"]) == (304, b"", etag)
    assert set(unchanged["Cache-Control"].split(", ")) == {"private", "no-cache"}
    assert client_for(admin_user).get(detail, HTTP_IF_NONE_MATCH=etag).status_code == 304
    # The tag tells nothing to anyone else: the task is not theirs to see.
    stranger = client_for(buyer_signup("bob")).get(detail, HTTP_IF_NONE_MATCH=etag)
    assert (stranger.status_code, "ETag" in stranger) == (404, False)

    task_cancel(task=task_view_get(user=ada, task_id=task_id), user=ada)
    chain_sync()
    changed = api.get(detail, HTTP_IF_NONE_MATCH=etag)
    assert (changed.status_code, changed.json()["state"]) == (200, "cancelled")
    assert changed["ETag"] != etag
    assert api.get(detail, HTTP_IF_NONE_MATCH=changed["ETag"]).status_code == 304
