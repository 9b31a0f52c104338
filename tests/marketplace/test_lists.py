"""Lists a page at a time: the task list page by state and sort with page links that keep
both, a device's tasks, the API's page size; and a named error for what does not exist."""

from __future__ import annotations

import html
import re

import pytest
from django.urls import reverse

from marketplace import views
from marketplace.pagination import MAX_PAGE_SIZE
from marketplace.selectors import task_view_get
from marketplace.services import task_cancel
from marketplace.sync import chain_sync
from tests.marketplace.buyers import assert_error, client_for
from tests.marketplace.people import buyer_signup, task_post

pytestmark = pytest.mark.django_db


@pytest.fixture
def ada(client):
    user = buyer_signup("ada")
    client.force_login(user)
    return user


@pytest.fixture
def five(ada):
    """Ada's five tasks t0..t4 (t4 the newest, t0 the last to close bidding), t1 cancelled,
    all mirrored, and one more order that sync has not seen yet."""
    ids = [task_post(ada, title=f"t{i}", window_s=3600 - 600 * i).chain_task_id for i in range(5)]
    task_cancel(task=task_view_get(user=ada, task_id=ids[1]), user=ada)
    chain_sync()
    task_post(ada, title="pending")
    return ids


def titles(response) -> list[str]:
    return [t.title for t in response.context["tasks"]]


def page_links(response) -> list[str]:
    nav = response.content.decode().split('id="pager"', 1)[1].split("</nav>", 1)[0]
    return [html.unescape(href) for href in re.findall(r'href="([^"]+)"', nav)]


def test_the_task_list_is_a_page_at_a_time_with_links_to_the_others(client, five, monkeypatch):
    monkeypatch.setattr(views, "LIST_PAGE_SIZE", 2)

    first = client.get(reverse("task-list"))
    second = client.get(reverse("task-list"), {"page": 2})

    # Newest first; the order not mirrored yet before everything.
    assert titles(first) == ["pending", "t4"]
    assert titles(second) == ["t3", "t2"]
    assert first.context["page_obj"].paginator.count == 6
    assert "?page=2" in page_links(first)
    assert "?page=3" in page_links(first)
    assert "?page=1" in page_links(second)


def test_page_links_keep_the_state_filter_and_the_sort(client, five, monkeypatch):
    monkeypatch.setattr(views, "LIST_PAGE_SIZE", 2)
    query = {"state": "bidding", "sort": "oldest"}

    first = client.get(reverse("task-list"), query)
    second = client.get(reverse("task-list"), {**query, "page": 2})

    assert titles(first) == ["t0", "t2"]  # oldest first, t1 is cancelled, pending is not bidding
    assert titles(second) == ["t3", "t4"]
    assert page_links(first) == ["?state=bidding&sort=oldest&page=2"] * 2  # "2" and "Next"
    html_text = first.content.decode()
    assert '<option value="bidding" selected>' in html_text
    assert '<option value="oldest" selected>' in html_text


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"state": "cancelled"}, ["t1"]),
        ({"state": "pending"}, ["pending"]),
        ({"sort": "oldest"}, ["t0", "t1", "t2", "t3", "t4", "pending"]),
        # Soonest end of bidding first: t4 was posted with the shortest window.
        ({"sort": "bidding_ends", "state": "bidding"}, ["t4", "t3", "t2", "t0"]),
    ],
)
def test_the_task_list_filters_by_state_and_sorts(client, five, query, expected):
    response = client.get(reverse("task-list"), query)

    assert response.status_code == 200
    assert titles(response) == expected


@pytest.mark.parametrize(
    ("query", "field", "words"),
    [
        ({"state": "sold"}, "state", "sold is not one of the available choices"),
        ({"sort": "price"}, "sort", "price is not one of the available choices"),
        ({"page": "0"}, "page", "greater than or equal to 1"),
        ({"page": "two"}, "page", "whole number"),
    ],
)
def test_a_bad_filter_sort_or_page_is_refused_by_name(client, ada, query, field, words):
    response = client.get(reverse("task-list"), query)

    assert response.status_code == 400
    errors = response.content.decode().split(f'id="errors-{field}"', 1)[1].split("</ul>", 1)[0]
    assert words in html.unescape(errors)


def test_a_page_past_the_last_names_the_last(client, five, monkeypatch):
    monkeypatch.setattr(views, "LIST_PAGE_SIZE", 2)

    response = client.get(reverse("task-list"), {"state": "bidding", "page": 3})

    assert response.status_code == 404
    text = html.unescape(response.content.decode())
    assert "There is no page 3: the last is page 2." in text
    assert 'href="?state=bidding"' in text  # back to the first page, the filter kept


def test_an_empty_filter_says_nothing_matches(client, five):
    response = client.get(reverse("task-list"), {"state": "finalized"})

    assert response.status_code == 200
    assert titles(response) == []
    assert "No task matches" in response.content.decode()


# ---------------------------------------------------------------- the API


def test_api_clients_choose_a_page_size_up_to_the_bound(ada, five):
    api = client_for(ada)

    small = api.get("/api/tasks/", {"page_size": 2, "state": "bidding"}).json()
    largest = api.get("/api/tasks/", {"page_size": MAX_PAGE_SIZE}).json()

    assert [t["title"] for t in small["results"]] == ["t4", "t3"]
    assert small["count"] == 4
    assert "page_size=2" in small["next"]
    assert "state=bidding" in small["next"]
    assert len(largest["results"]) == 6


@pytest.mark.parametrize("size", [str(MAX_PAGE_SIZE + 1), "0", "-1", "ten", "2.5"])
def test_a_page_size_out_of_bounds_is_refused_by_name(ada, size):
    body = assert_error(client_for(ada).get("/api/tasks/", {"page_size": size}), 400, "invalid")

    assert list(body["fields"]) == ["page_size"]
    assert str(MAX_PAGE_SIZE) in body["fields"]["page_size"][0]


@pytest.mark.parametrize("path", ["/api/tasks/", "/api/bids/", "/api/open-tasks/", "/api/devices/"])
def test_every_api_list_is_paginated_with_the_bound(ada, path):
    api = client_for(ada)

    body = api.get(path).json()
    refused = api.get(path, {"page_size": MAX_PAGE_SIZE + 1})

    assert set(body) == {"count", "next", "previous", "results"}
    assert refused.status_code == 400


def test_a_page_past_the_last_is_refused_by_name_in_the_api(ada, five):
    body = assert_error(client_for(ada).get("/api/tasks/", {"page": 9}), 404, "not_found")

    assert "There is no page 9" in body["message"]


def test_an_unknown_sort_is_refused_by_name_in_the_api(ada):
    body = assert_error(client_for(ada).get("/api/tasks/", {"sort": "price"}), 400, "invalid")

    assert list(body["fields"]) == ["sort"]
