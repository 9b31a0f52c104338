"""The buyer website: pages, who may see what, and the task page from the mirror."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.templatetags.static import static
from django.test import Client
from django.urls import reverse
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from eth_account import Account

from chain.events import Role
from chain.launcher import free_port
from core.units import wei_to_eth
from marketplace import selectors, services
from marketplace.models import Device, Payout, Task
from marketplace.sync import chain_sync
from marketplace.task_page import page_view, round_wait
from tests.marketplace.people import PASSWORD, buyer_signup, device_enrol, task_post
from tests.marketplace.test_admin import task_run_to_the_end

pytestmark = pytest.mark.django_db

PRICE_WEI = 2 * 10**14


@pytest.fixture
def ada(client):
    user = buyer_signup("ada")
    client.force_login(user)
    return user


# ---------------------------------------------------------------- pages


def test_home_explains_flex_and_links_to_sign_up(client):
    response = client.get(reverse("home"))

    html = response.content.decode()
    assert response.status_code == 200
    assert "federated learning" in html
    assert reverse("signup") in html
    assert reverse("login") in html


def test_the_icon_browsers_ask_for_is_the_logo(client):
    response = client.get("/favicon.ico")

    assert response.status_code == 301
    assert response.url == static("flex/logo.svg")
    assert f'href="{static("flex/logo.svg")}"' in client.get(reverse("home")).content.decode()


def test_log_in_and_out(client):
    services.user_signup(username="bea", password=PASSWORD)

    response = client.post(reverse("login"), {"username": "bea", "password": PASSWORD})
    assert response.status_code == 302
    assert response.url == reverse("task-list")
    assert client.get(reverse("task-list")).status_code == 200

    response = client.post(reverse("logout"))
    assert response.url == reverse("home")
    assert client.get(reverse("task-list")).status_code == 302


def test_wrong_password_is_refused(client):
    services.user_signup(username="cy", password=PASSWORD)

    response = client.post(reverse("login"), {"username": "cy", "password": "nope"})

    assert response.status_code == 200
    assert response.context["form"].errors
    assert "_auth_user_id" not in client.session


NEW_PASSWORD = "a different passphrase 42"


def test_changing_the_password_ends_every_other_session_and_the_api_token(client):
    services.user_signup(username="bo", password=PASSWORD)
    client.post(reverse("login"), {"username": "bo", "password": PASSWORD})
    elsewhere = Client()  # the same account on another machine, or in a thief's hands
    elsewhere.post(reverse("login"), {"username": "bo", "password": PASSWORD})
    token = client.post(reverse("api-auth-token"), {"username": "bo", "password": PASSWORD})
    api = {"HTTP_AUTHORIZATION": f"Token {token.json()['token']}"}
    url = reverse("password-change")
    assert reverse("password-change") in client.get(reverse("wallet")).content.decode()

    # A wrong old password, or two new ones that differ: said beside the field, and nothing
    # changes.
    for data, field, code in (
        ({"old_password": "guess"}, "old_password", "password_incorrect"),
        ({"old_password": PASSWORD, "new_password2": "typo"}, "new_password2", "password_mismatch"),
    ):
        refused = client.post(
            url, {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD} | data
        )
        assert refused.status_code == 200
        assert refused.context["form"].errors.as_data()[field][0].code == code
        assert f'id="errors-{field}"' in refused.content.decode()
    assert elsewhere.get(reverse("task-list")).status_code == 200
    assert client.get(reverse("api-task-list"), **api).status_code == 200

    changed = client.post(
        url,
        {"old_password": PASSWORD, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
        follow=True,
    )

    assert changed.redirect_chain == [(reverse("wallet"), 302)]
    assert "Your password is changed." in changed.content.decode()
    assert client.get(reverse("task-list")).status_code == 200  # this session goes on
    assert elsewhere.get(reverse("task-list")).status_code == 302  # to the login page
    assert Client().get(reverse("api-task-list"), **api).status_code == 401
    assert not Client().login(username="bo", password=PASSWORD)
    assert Client().login(username="bo", password=NEW_PASSWORD)


# ---------------------------------------------------------------- a forgotten password


def _reset_link(mail) -> str:
    """The path of the one link in a password-reset mail."""
    [link] = re.findall(r"https?://testserver(/\S+)", mail.body)
    return link


def test_a_forgotten_password_is_reset_through_a_link_mailed_to_the_account(
    client, mailoutbox, settings
):
    signed_up = client.post(
        reverse("signup"),
        {
            "username": "rae",
            "email": "rae@example.com",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )
    assert signed_up.status_code == 302
    token = client.post(reverse("api-auth-token"), {"username": "rae", "password": PASSWORD})
    api = {"HTTP_AUTHORIZATION": f"Token {token.json()['token']}"}
    client.post(reverse("logout"))
    login_page = client.get(reverse("login")).content.decode()
    assert f'href="{reverse("password-reset")}"' in login_page

    asked = client.post(reverse("password-reset"), {"email": "RAE@example.com"}, follow=True)

    assert asked.redirect_chain == [(reverse("password-reset-done"), 302)]
    assert "It works once, for 60 minutes." in asked.content.decode()
    [mail] = mailoutbox
    assert mail.to == ["rae@example.com"]
    assert "the FLEX account rae." in mail.body
    assert "within 60 minutes" in mail.body
    link = _reset_link(mail)
    form = client.get(link, follow=True)  # Django moves the token out of the address first
    set_at = form.redirect_chain[-1][0]
    assert 'id="set-password"' in form.content.decode()
    mismatched = client.post(set_at, {"new_password1": NEW_PASSWORD, "new_password2": "typo"})
    assert mismatched.status_code == 200
    assert not Client().login(username="rae", password=NEW_PASSWORD)

    done = client.post(
        set_at, {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}, follow=True
    )

    assert done.redirect_chain == [(reverse("password-reset-complete"), 302)]
    assert Client().login(username="rae", password=NEW_PASSWORD)
    assert not Client().login(username="rae", password=PASSWORD)
    assert Client().get(reverse("api-task-list"), **api).status_code == 401
    # The link worked once.
    again = Client().get(link, follow=True).content.decode()
    assert 'id="reset-link-invalid"' in again
    assert 'id="set-password"' not in again


def test_the_email_page_needs_a_login_and_sign_up_refuses_a_malformed_address(client):
    assert client.get(reverse("account-email")).status_code == 302  # to the login page
    stranger = client.post(reverse("account-email"), {"email": "x@example.com", "password": "?"})
    assert stranger.status_code == 302

    refused = client.post(
        reverse("signup"),
        {"username": "zed", "email": "zed@", "password1": PASSWORD, "password2": PASSWORD},
    )

    assert refused.status_code == 200
    assert [e.code for e in refused.context["form"].errors.as_data()["email"]] == ["invalid"]
    assert not get_user_model().objects.filter(username="zed").exists()


def test_a_reset_link_opens_only_the_account_it_was_mailed_for(client, mailoutbox):
    """Mallory asks for a link to her own account and puts the victim's user ID in it: the
    token is bound to her account (and its password), so the link opens nothing."""
    services.user_signup(username="mallory", password=PASSWORD, email="m@example.com")
    victim = services.user_signup(username="victim", password=PASSWORD, email="v@example.com")
    client.post(reverse("password-reset"), {"email": "m@example.com"})
    token = _reset_link(mailoutbox[0]).strip("/").split("/")[-1]
    forged = reverse(
        "password-reset-confirm", args=[urlsafe_base64_encode(force_bytes(victim.pk)), token]
    )

    page = client.get(forged, follow=True).content.decode()

    assert 'id="reset-link-invalid"' in page
    assert 'id="set-password"' not in page
    victim.refresh_from_db()
    assert victim.check_password(PASSWORD)


def test_a_reset_link_expires(client, mailoutbox, settings):
    user = services.user_signup(username="old", password=PASSWORD, email="old@example.com")
    client.post(reverse("password-reset"), {"email": "old@example.com"})
    link = _reset_link(mailoutbox[0])
    # The link's timestamp is in seconds; a timeout of -1 makes it stale whenever it was made.
    settings.PASSWORD_RESET_TIMEOUT = -1

    page = client.get(link, follow=True).content.decode()

    assert 'id="reset-link-invalid"' in page
    user.refresh_from_db()
    assert user.check_password(PASSWORD)


def test_a_mail_server_that_refuses_loses_nothing_and_tells_nobody(client, settings, caplog):
    """The page answers as for any address (it says nothing of the account), and the failure
    is logged for the operators."""
    user = services.user_signup(username="unlucky", password=PASSWORD, email="u@example.com")
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nothing listens
    settings.EMAIL_USE_TLS = False

    asked = client.post(reverse("password-reset"), {"email": "u@example.com"})

    assert asked.status_code == 302
    assert asked.url == reverse("password-reset-done")
    assert f"Failed to send password reset email to {user.pk}" in caplog.text
    user.refresh_from_db()
    assert user.check_password(PASSWORD)


@pytest.mark.parametrize("email", ["nobody@example.com", ""])
def test_asking_for_an_address_no_account_has_answers_the_same_and_sends_nothing(
    client, mailoutbox, email
):
    """Nobody learns which addresses have accounts; an account without an address (the
    empty one) is reset only by an admin."""
    services.user_signup(username="noaddr", password=PASSWORD)
    known = services.user_signup(username="known", password=PASSWORD, email="k@example.com")
    known.is_active = False  # a deactivated account gets no link either
    known.save()

    for address in (email, "k@example.com"):
        asked = client.post(reverse("password-reset"), {"email": address})
        if address:
            assert asked.status_code == 302
            assert asked.url == reverse("password-reset-done")
        else:
            assert asked.status_code == 200  # required: said beside the field
    assert mailoutbox == []


def test_the_email_address_changes_only_with_the_password(client, mailoutbox):
    user = services.user_signup(username="eve", password=PASSWORD)
    client.force_login(user)  # a session left open on a shared machine
    wallet = client.get(reverse("wallet")).content.decode()
    assert 'id="account-email-missing"' in wallet

    guessed = client.post(
        reverse("account-email"), {"email": "thief@example.com", "password": "guess"}
    )

    assert guessed.status_code == 200
    assert guessed.context["form"].errors.as_data()["password"][0].code == "password_incorrect"
    user.refresh_from_db()
    assert user.email == ""
    client.post(reverse("password-reset"), {"email": "thief@example.com"})
    assert mailoutbox == []

    malformed = client.post(
        reverse("account-email"), {"email": "eve at home", "password": PASSWORD}
    )
    assert malformed.status_code == 200
    assert [e.code for e in malformed.context["form"].errors.as_data()["email"]] == ["invalid"]
    assert 'id="errors-email"' in malformed.content.decode()
    user.refresh_from_db()
    assert user.email == ""

    saved = client.post(
        reverse("account-email"), {"email": "eve@example.com", "password": PASSWORD}
    )

    assert saved.status_code == 302
    user.refresh_from_db()
    assert user.email == "eve@example.com"
    assert 'id="account-email">eve@example.com<' in client.get(reverse("wallet")).content.decode()
    removed = client.post(reverse("account-email"), {"email": "", "password": PASSWORD})
    assert removed.status_code == 302
    user.refresh_from_db()
    assert user.email == ""


def test_a_password_set_anywhere_revokes_the_api_token_and_a_rehash_at_login_does_not(
    client, admin_client, settings
):
    settings.PASSWORD_HASHERS = [
        *settings.PASSWORD_HASHERS,
        "django.contrib.auth.hashers.MD5PasswordHasher",
    ]
    user = services.user_signup(username="di", password=PASSWORD)

    def token() -> str:
        answer = client.post(reverse("api-auth-token"), {"username": "di", "password": PASSWORD})
        return answer.json()["token"]

    def api_answers(key: str) -> int:
        return Client().get(reverse("api-task-list"), HTTP_AUTHORIZATION=f"Token {key}").status_code

    # A hash from an older hasher is upgraded at the next login: not a change of password.
    user.password = make_password(PASSWORD, hasher="md5")
    user.save()
    key = token()
    assert Client().login(username="di", password=PASSWORD)
    user.refresh_from_db()
    assert not user.password.startswith("md5$")  # upgraded
    assert api_answers(key) == 200

    # Staff set a new password in the admin (an account reported stolen).
    changed = admin_client.post(
        reverse("admin:auth_user_password_change", args=[user.pk]),
        {"usable_password": "true", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD},
    )
    assert changed.status_code == 302
    assert api_answers(key) == 401

    # Or in code, as manage.py changepassword does.
    user.refresh_from_db()
    user.set_password(PASSWORD)
    user.save()
    key = token()
    user.set_password(NEW_PASSWORD)
    user.save()
    assert api_answers(key) == 401


def test_a_buyer_makes_and_revokes_an_api_token_on_the_wallet_page(client, ada):
    api = reverse("api-task-list")
    assert 'id="api-token-make"' in client.get(reverse("wallet")).content.decode()
    assert client.get(reverse("api-token")).status_code == 405  # only a form's POST

    made = client.post(reverse("api-token"), follow=True)

    page = made.content.decode()
    key = re.search(r'<code class="hash" id="api-token">(\w+)</code>', page).group(1)
    assert made.redirect_chain == [(reverse("wallet") + "#api-access", 302)]
    assert "Your API token is ready" in page
    assert Client().get(api, HTTP_AUTHORIZATION=f"Token {key}").status_code == 200
    # Asked again, it is the same token (as POST /api/auth/token/ answers).
    client.post(reverse("api-token"))
    assert key in client.get(reverse("wallet")).content.decode()

    revoked = client.post(reverse("api-token"), {"revoke": "1"}, follow=True)

    assert "Your API token is revoked" in revoked.content.decode()
    assert 'id="api-token-make"' in revoked.content.decode()
    assert Client().get(api, HTTP_AUTHORIZATION=f"Token {key}").status_code == 401
    # Nobody else's: a stranger's post makes nothing.
    stranger = Client().post(reverse("api-token"))
    assert stranger.status_code == 302
    assert stranger.url.startswith(reverse("login"))


def test_task_list_shows_only_the_buyers_own_tasks(client, ada):
    mine = task_post(ada, title="Mine")
    theirs = task_post(buyer_signup("bob"), title="Theirs")

    response = client.get(reverse("task-list"))

    html = response.content.decode()
    assert [t.id for t in response.context["tasks"]] == [mine.chain_task_id]
    assert "Mine" in html
    assert "Theirs" not in html
    assert reverse("task-detail", args=[theirs.chain_task_id]) not in html
    assert 'class="badge state-pending"' in html  # ordered; chain sync has not seen it yet

    chain_sync()
    html = client.get(reverse("task-list")).content.decode()
    assert 'class="badge state-bidding"' in html
    assert "Mine" in html
    assert "Theirs" not in html


def test_staff_see_every_buyers_tasks_and_the_list_says_so(client, ada, admin_user):
    task_post(ada, title="Mine")
    task_post(buyer_signup("bob"), title="Theirs")
    own = client.get(reverse("task-list")).content.decode()
    client.force_login(admin_user)

    every = client.get(reverse("task-list")).content.decode()

    assert "<h1>My tasks</h1>" in own
    assert "Everything you have posted: 1 task." in own
    assert "<h1>All tasks</h1>" in every
    assert "Every buyer's, as staff see them: 2 tasks." in every
    assert "Mine" in every
    assert "Theirs" in every


def test_markup_in_what_a_buyer_typed_shows_as_text(client, ada):
    task = task_post(ada, title="<img src=x onerror=alert(1)>")
    for html in (
        client.get(reverse("task-list")).content.decode(),
        client.get(reverse("task-detail", args=[task.chain_task_id])).content.decode(),
    ):
        assert "<img src=x" not in html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_markup_in_a_devices_name_shows_as_text_to_the_buyers_it_bids_to(
    client, ada, platform_market
):
    """A device names itself (or is named by its token's label) with whatever text: put in
    markup, it would run in the page of every buyer whose task it bids on."""
    task = task_post(ada)
    device = Account.create()
    device_enrol(device, name="<img src=x onerror=alert(1)>", may_aggregate=True)
    platform_market.place_bid(
        sender=device,
        task_id=task.chain_task_id,
        price_per_round_wei=10**14,
        samples=1,
        role=Role.AGGREGATOR,
    )
    chain_sync()

    page = client.get(reverse("task-detail", args=[task.chain_task_id])).content.decode()

    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


@pytest.mark.parametrize("name", ["task-detail", "task-model", "task-model-download"])
def test_another_buyer_cannot_see_a_task(client, ada, name):
    theirs = task_post(buyer_signup("bob"), title="Secret")

    response = client.get(reverse(name, args=[theirs.chain_task_id]))

    assert response.status_code == 404
    assert b"Secret" not in response.content


@pytest.mark.parametrize(
    "name",
    ["task-list", "task-detail", "task-model", "task-model-download", "wallet", "password-change"],
)
def test_pages_need_a_login(client, name):
    args = [1] if name.startswith("task-") and name != "task-list" else []
    response = client.get(reverse(name, args=args))
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


def test_task_page_renders_the_mirror(client, ada, platform_market):
    task = task_post(ada, title="Digits MLP")
    trainer = Account.create()
    device_enrol(trainer, name="pixel-7")
    platform_market.place_bid(
        sender=trainer,
        task_id=task.chain_task_id,
        price_per_round_wei=PRICE_WEI,
        samples=300,
        role=Role.TRAINER,
    )
    path = reverse("task-detail", args=[task.chain_task_id])
    pending = client.get(path).content.decode()
    assert 'data-state="pending"' in pending  # the order, before chain sync sees the task
    assert "Digits MLP" in pending
    chain_sync()

    response = client.get(path)

    html = response.content.decode()
    assert response.status_code == 200
    assert 'data-state="bidding"' in html
    assert "Digits MLP" in html  # the order's title beside the chain's mirror
    assert task.created_tx in html  # the createTask transaction, in full
    assert "pixel-7" in html  # the bid, by the device's name
    assert "0.0002 ETH" in html  # its price per round
    assert f'data-ws-path="/ws/tasks/{task.chain_task_id}/"' in html
    assert 'data-ws-port=""' in html  # no live server of its own: the page's origin
    assert 'id="task-data"' in html  # what the page script starts from
    message = response.context["message"]
    assert [b["device"] for b in message["snapshot"]["bids"]] == [trainer.address]
    assert message["view"]["device_names"] == {trainer.address: "pixel-7"}
    assert json.loads(json.dumps(message)) == message  # what the socket sends is plain JSON
    # The page and the API show one representation of the task.
    api = client.get(f"/api/tasks/{task.chain_task_id}/").json()
    assert api == json.loads(json.dumps(message["snapshot"]))


def test_task_page_opens_its_socket_on_the_live_servers_port(client, ada, settings):
    task = task_post(ada, title="Digits MLP")
    settings.FLEX_LIVE_PORT = "8123"

    html = client.get(reverse("task-detail", args=[task.chain_task_id])).content.decode()

    assert 'data-ws-port="8123"' in html


def test_task_page_shows_each_trainers_score_and_pay(client, ada, platform_market):
    with task_run_to_the_end(platform_market, platform_market.w3, buyer=ada) as rows:
        trainer = rows["trainer"]
        Device.objects.filter(address=trainer.address).update(name="<b>pixel</b>")
        path = reverse("task-detail", args=[rows[Task].chain_task_id])

        html = client.get(path).content.decode()

        assert "Contribution and pay" in html
        assert "100.00 % (7)" in html  # its share of round 0's scores, and the score
        # Headed by the global model those updates went into, as the rounds table counts.
        assert '<th class="num">Round 1</th>' in html
        assert '<th class="num">Round 0</th>' not in html
        assert "shares a pool of half the aggregated trainers" in html
        assert "&lt;b&gt;pixel&lt;/b&gt;" in html
        assert "<b>pixel</b>" not in html
        # The page holds what its script draws before the socket's first message, the
        # chart's points, not the whole task a second time: the socket brings that.
        message = client.get(path).context["message"]
        [start] = re.findall(r'<script id="task-data" type="application/json">(.*?)</script>', html)
        rounds = message["snapshot"]["rounds_published"]
        assert len(rounds) >= 2
        assert json.loads(start) == {
            "snapshot": {
                "rounds_published": [
                    {"number": r["number"], "accuracy": r["accuracy"], "loss": r["loss"]}
                    for r in rounds
                ]
            },
            # Finished: no late-round note, so no device named in one.
            "view": {"round_wait": None, "device_names": {}},
        }
        assert all(t["tx_hash"] not in start for t in message["snapshot"]["transactions"])
        paid = Payout.objects.get(account=trainer.address, reason="trainer").amount_wei
        assert f"{wei_to_eth(paid)} ETH" in html


def test_task_page_view_model(monkeypatch):
    snapshot = {
        "state": "running",
        "rounds": 3,
        "published_rounds": 3,
        "current_round": 2,
        "rounds_published": [
            {"number": 0, "accuracy": None, "loss": None},
            {"number": 1, "accuracy": 0.61, "loss": 1.2},
            {"number": 2, "accuracy": 0.8, "loss": 0.7},
        ],
        "transactions": [
            {"name": "TaskCreated", "tx_hash": "0xa", "block_number": 3},
            {"name": "TaskFinalized", "tx_hash": "0xb", "block_number": 9},
            {"name": "PaymentCredited", "tx_hash": "0xb", "block_number": 9},
            {"name": "PaymentCredited", "tx_hash": "0xb", "block_number": 9},
        ],
        "refund_wei": None,
        "bids": [],
        "selected": [],
        "payouts": [],
        "contributions": [
            {
                "trainer": "0xT0",
                "rounds": [
                    {"round": 0, "aggregated": True, "score": None, "share_bp": None},
                    {"round": 1, "aggregated": True, "score": 65535, "share_bp": 9845},
                ],
                "rounds_aggregated": 2,
                "paid_wei": None,
            },
            {
                "trainer": "0xT1",
                "rounds": [
                    {"round": 0, "aggregated": False, "score": None, "share_bp": None},
                    {"round": 1, "aggregated": True, "score": 1023, "share_bp": 155},
                ],
                "rounds_aggregated": 1,
                "paid_wei": "5",
            },
        ],
    }

    page = page_view(snapshot)

    assert [s["status"] for s in page["steps"]] == ["done", "done", "now", "", ""]
    assert (page["done_rounds"], page["round_note"]) == (2, "training round 3 of 3")
    assert (page["latest_accuracy"], page["latest_loss"]) == (0.8, 0.7)
    assert not page["model_ready"]
    assert [(r["tx_hash"], r["label"]) for r in page["tx_rows"]] == [
        ("0xa", "Task created"),
        ("0xb", "Task finalized · 2\u00d7 payment credited"),
    ]
    assert not page["refunded"]
    assert page["contribution_rounds"] == [0, 1]
    assert page["contribution_rows"] == [
        {
            "trainer": "0xT0",
            "cells": ["unscored", "98.45 % (65535)"],
            "rounds_aggregated": 2,
            "paid_wei": None,
        },
        {
            "trainer": "0xT1",
            "cells": ["left out", "1.55 % (1023)"],
            "rounds_aggregated": 1,
            "paid_wei": "5",
        },
    ]
    assert "shares" in page["pay_note"]
    # A long task shows its last judged rounds, and how often each trainer was aggregated.
    monkeypatch.setattr(selectors, "CONTRIBUTION_ROUNDS_SHOWN", 1)
    last = {
        **snapshot,
        "contributions": [{**c, "rounds": c["rounds"][-1:]} for c in snapshot["contributions"]],
    }
    page = page_view(last)
    assert page["contribution_rounds"] == [1]
    assert [(r["cells"], r["rounds_aggregated"]) for r in page["contribution_rows"]] == [
        (["98.45 % (65535)"], 2),
        (["1.55 % (1023)"], 1),
    ]
    # Trained: settled once the final model's dispute window has passed.
    final = {"number": 3, "accuracy": 0.9, "loss": 0.3, "published_at": "2026-01-01T10:58:30Z"}
    trained = {
        **snapshot,
        "state": "trained",
        "current_round": None,
        "published_rounds": 4,
        "rounds_published": [*snapshot["rounds_published"], final],
        "dispute_window_s": 600,
    }
    assert page_view(trained)["round_note"] == (
        "all rounds done; settled after 2026-01-01 11:08 UTC, when the final model's dispute "
        "window closes"
    )
    assert page_view({**trained, "state": "finalized"})["round_note"] == "all rounds done"
    cancelled = page_view(
        {**snapshot, "state": "cancelled", "current_round": None, "refund_wei": "10"}
    )
    assert cancelled["refunded"]
    assert [s["status"] for s in cancelled["steps"]] == ["done", "bad", "", "", ""]
    assert cancelled["steps"][1]["label"] == "Cancelled"


def test_round_wait_names_the_selected_trainers_without_an_update():
    snapshot = {
        "state": "running",
        "current_round": 1,
        "round_timeout_s": 60,
        "aggregator": "0xA",
        "rounds_published": [
            {"number": 0, "published_at": "2026-01-01T00:00:00Z"},
            {"number": 1, "published_at": "2026-01-01T00:01:00Z"},
        ],
        "selected": [
            {"device": "0xA", "role": "aggregator"},
            {"device": "0xT0", "role": "trainer"},
            {"device": "0xT1", "role": "trainer"},
        ],
        "updates": [
            {"round": 0, "trainer": "0xT1"},  # last round's: does not count
            {"round": 1, "trainer": "0xT0"},
        ],
    }
    start = 1767225660.0  # 2026-01-01T00:01:00Z

    wait = round_wait(snapshot)

    assert wait == {
        "round": 2,
        "started_at": start,
        "expected_by": start + 30,
        "deadline": start + 60,
        "publish_due": start + 120,
        "aggregator": "0xA",
        "missing": ["0xT1"],
    }
    assert round_wait({**snapshot, "state": "trained"}) is None
    done = round_wait(
        {**snapshot, "updates": [*snapshot["updates"], {"round": 1, "trainer": "0xT1"}]}
    )
    assert done["missing"] == []


def test_hashes_copy_and_link_to_the_block_explorer_a_setting_names(client, ada, settings):
    task = task_post(ada)
    chain_sync()
    path = reverse("task-detail", args=[task.chain_task_id])

    plain = client.get(path).content.decode()
    settings.FLEX_EXPLORER_URL = "https://explorer.example"
    linked = client.get(path).content.decode()

    assert f'data-copy="{task.created_tx}"' in plain
    assert "explorer.example" not in plain  # a local chain has no explorer
    assert f'href="https://explorer.example/tx/{task.created_tx}"' in linked
    assert 'data-explorer="https://explorer.example"' in linked  # for rows pushed live
