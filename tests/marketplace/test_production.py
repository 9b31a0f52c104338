"""Production-safe settings: DEBUG and dev-chain behaviour only when set, the wallet key
required, the doors outsiders knock on throttled, chain-sending admin actions guarded."""

from __future__ import annotations

import io
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.fernet import Fernet
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from eth_account import Account

from chain.events import DeviceStatus
from marketplace import contract, services, wallets
from marketplace.errors import ContractNotDeployedError
from marketplace.models import ValidationSet
from tests.marketplace.test_admin import enrol_device
from training.datasets import load_test

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "a-long-enough-passphrase-42"


def _documented_production_env() -> dict[str, str]:
    """The variables README's "Production settings" block sets, placeholders filled in."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Production settings.*?```sh\n(.*?)```", readme, re.S)
    assert block, "README.md has no Production settings block"
    filled = {
        "FLEX_SECRET_KEY": secrets.token_urlsafe(50),
        "FLEX_WALLET_KEY": Fernet.generate_key().decode(),
        "FLEX_REGISTRAR_KEY": "0x" + secrets.token_hex(32),
    }
    env = {}
    for line in block.group(1).splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and name.isupper():
            env[name] = filled.get(name, value) if value.startswith("<") else value
    return env


def _check_deploy(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_")}
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**clean, "FLEX_VAR_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_check_deploy_is_clean_under_the_documented_production_settings(tmp_path):
    env = _documented_production_env()
    assert env["FLEX_PUBLIC_URL"].startswith("https://")
    assert "FLEX_DEBUG" not in env  # off by default
    assert "FLEX_DEV_CHAIN" not in env

    done = _check_deploy(env, tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_check_deploy_fails_without_the_wallet_key_or_with_debug_and_warns_without_mail(
    tmp_path,
):
    env = _documented_production_env()
    del env["FLEX_WALLET_KEY"]
    done = _check_deploy(env, tmp_path)
    assert done.returncode != 0
    assert "flex.E001" in done.stderr + done.stdout

    env = {**_documented_production_env(), "FLEX_DEBUG": "true"}
    done = _check_deploy(env, tmp_path)
    assert done.returncode != 0
    assert "security.W018" in done.stderr + done.stdout

    # No mail server: said, since a buyer's reset link would never arrive.
    env = _documented_production_env()
    del env["FLEX_EMAIL_HOST"]
    done = _check_deploy(env, tmp_path)
    assert "flex.W001" in done.stderr + done.stdout


def test_debug_and_dev_chain_are_off_unless_set():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_")}
    code = (
        "import django; from django.conf import settings; django.setup(); "
        "print(settings.DEBUG, settings.FLEX_DEV_CHAIN, settings.FLEX_DATAPLANE_ALLOW_PRIVATE)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "flexsite.settings"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split() == ["False", "False", "False"], done.stderr


@pytest.mark.parametrize("value", ["80a", "0", "65536"])
def test_a_live_port_that_is_not_a_port_stops_start_up_naming_it(value):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_")}
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "flexsite.settings", "FLEX_LIVE_PORT": value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"FLEX_LIVE_PORT must be a port number, not {value!r}" in done.stderr


# ---------------------------------------------------------------- dev chain only when set


def test_the_dev_chain_id_alone_turns_on_no_dev_behaviour(settings, w3, platform_market):
    # The session's chain is Anvil with its public keys and chain id 31337.
    assert w3.eth.chain_id == 31337
    settings.FLEX_DEV_CHAIN = False
    settings.FLEX_REGISTRAR_KEY = ""
    device = Account.create().address

    with pytest.raises(ContractNotDeployedError):
        contract.registrar()
    assert contract.fund_gas_on_dev_chain(address=device) == 0
    assert w3.eth.get_balance(device) == 0
    assert wallets.faucet_available() is False


def test_wallets_need_the_wallet_key_off_the_dev_chain(settings):
    settings.FLEX_DEV_CHAIN = False
    settings.FLEX_WALLET_KEY = ""

    with pytest.raises(wallets.WalletKeyError) as exc:
        services.user_signup(username="nokey", password=PASSWORD)

    assert "FLEX_WALLET_KEY" in exc.value.message
    assert not get_user_model().objects.filter(username="nokey").exists()  # both or neither


# ---------------------------------------------------------------- throttles


@pytest.fixture
def low_rates(settings):
    settings.FLEX_THROTTLE_RATES = {"login": "2/min", "token": "2/min", "signup": "2/min"} | {
        "faucet": "1/min",
        "upload": "2/min",
        "reset": "2/min",
    }
    return settings


def test_asking_for_reset_links_is_throttled_so_no_inbox_is_flooded(client, low_rates, mailoutbox):
    services.user_signup(username="flood", password=PASSWORD, email="victim@example.com")
    for _ in range(2):
        assert (
            client.post(reverse("password-reset"), {"email": "victim@example.com"}).status_code
            == 302
        )

    refused = client.post(reverse("password-reset"), {"email": "victim@example.com"})

    assert refused.status_code == 429
    assert len(mailoutbox) == 2


def test_login_is_throttled_per_client(client, low_rates):
    services.user_signup(username="lou", password=PASSWORD)
    wrong = {"username": "lou", "password": "guess"}
    assert client.post(reverse("login"), wrong).status_code == 200
    assert client.post(reverse("login"), wrong).status_code == 200

    refused = client.post(reverse("login"), {"username": "lou", "password": PASSWORD})

    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0
    assert b"Too many attempts" in refused.content
    assert "_auth_user_id" not in client.session  # even the right password waits
    # A made-up X-Forwarded-For does not make a new client.
    spoofed = client.post(reverse("login"), wrong, HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert spoofed.status_code == 429
    # Another client address has its own count.
    other = client.post(
        reverse("login"), {"username": "lou", "password": PASSWORD}, REMOTE_ADDR="10.9.8.7"
    )
    assert other.status_code == 302


def test_guessing_the_old_password_on_the_change_form_is_throttled(client, low_rates):
    user = services.user_signup(username="cha", password=PASSWORD)
    client.force_login(user)  # a session left open on a shared machine
    url = reverse("password-change")
    guess = {"old_password": "guess", "new_password1": "taken over 99"}
    guess["new_password2"] = guess["new_password1"]
    assert client.post(url, guess).status_code == 200
    assert client.post(url, guess).status_code == 200

    refused = client.post(url, guess | {"old_password": PASSWORD})

    assert refused.status_code == 429
    user.refresh_from_db()
    assert user.check_password(PASSWORD)  # even the right old password waits


def test_uploading_validation_sets_is_throttled_per_buyer_and_the_refused_one_is_not_kept(
    client, low_rates
):
    """Each set is kept (up to 8 MiB): a buyer must not fill the platform's database."""
    user = services.user_signup(username="up", password=PASSWORD)
    client.force_login(user)
    test = load_test(schema="digits-8x8")

    def npz(n: int) -> SimpleUploadedFile:
        buffer = io.BytesIO()
        np.savez(buffer, x=test.x[:n], y=test.y[:n])
        return SimpleUploadedFile("v.npz", buffer.getvalue())

    def upload(n: int):
        body = {"dataset": "digits-8x8", "file": npz(n)}
        return client.post(reverse("api-validation-set-upload"), body)

    assert [upload(n).status_code for n in (20, 21)] == [201, 201]
    refused = upload(22)
    assert refused.status_code == 429
    assert refused.json()["code"] == "throttled"
    assert ValidationSet.objects.count() == 2
    # The task form's file counts against the same limit; the form without one does not.
    form = {"title": "t", "validation_file": npz(23)}
    assert client.post(reverse("task-create"), form).status_code == 429
    assert ValidationSet.objects.count() == 2
    assert client.post(reverse("task-create"), {"title": "t"}).status_code == 200


def test_token_endpoint_is_throttled(client, low_rates):
    services.user_signup(username="tok", password=PASSWORD)
    url = reverse("api-auth-token")
    for _ in range(2):
        client.post(url, {"username": "tok", "password": "guess"}, content_type="application/json")

    refused = client.post(
        url, {"username": "tok", "password": PASSWORD}, content_type="application/json"
    )

    assert refused.status_code == 429
    assert refused.json()["code"] == "throttled"
    assert "token" not in refused.json()


def test_signup_is_throttled_and_the_refused_one_creates_nothing(client, low_rates):
    def sign_up(name: str):
        form = {"username": name, "password1": PASSWORD, "password2": PASSWORD}
        client.logout()
        return client.post(reverse("signup"), form)

    assert sign_up("s1").status_code == 302
    assert sign_up("s2").status_code == 302
    refused = sign_up("s3")

    assert refused.status_code == 429
    assert not get_user_model().objects.filter(username="s3").exists()


def test_faucet_is_throttled_per_account(client, low_rates):
    user = services.user_signup(username="fau", password=PASSWORD)
    client.force_login(user)
    assert client.post(reverse("wallet-fund")).status_code == 302
    funded = wallets.wallet_balance_wei(wallet=user.wallet)

    refused = client.post(reverse("wallet-fund"))

    assert refused.status_code == 429
    assert wallets.wallet_balance_wei(wallet=user.wallet) == funded


# ---------------------------------------------------------------- admin actions


def test_device_chain_actions_need_the_change_permission(client, platform_market):
    device = enrol_device(name="viewer-box")
    viewer = get_user_model().objects.create_user("viewer", password=PASSWORD, is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_device"))
    client.force_login(viewer)
    changelist = reverse("admin:marketplace_device_changelist")

    page = client.get(changelist)
    client.post(changelist, {"action": "revoke_devices", "_selected_action": [str(device.pk)]})

    assert page.status_code == 200
    assert b"revoke_devices" not in page.content
    assert b"approve_devices" not in page.content
    assert platform_market.device(device=device.address).status == DeviceStatus.ACTIVE
