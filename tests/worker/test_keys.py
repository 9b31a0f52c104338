"""The device key: encrypted keystore round trip, refusals, permissions and atomic writes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from eth_account import Account

from worker.keys import (
    KeystoreCorruptError,
    KeystoreExistsError,
    KeystoreNotFoundError,
    PassphraseMissingError,
    WrongPassphraseError,
    key_create,
    key_load,
    key_load_or_create,
    key_save,
    passphrase_read,
)

# Cheap scrypt keeps the suite fast; the production default is exercised once below.
N = 2**4
PASS = "correct horse battery staple"


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "device.json"


def test_create_then_load_returns_same_key(keyfile: Path) -> None:
    created = key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    loaded = key_load(path=keyfile, passphrase=PASS)
    assert loaded.address == created.address
    assert loaded.key == created.key


def test_keystore_is_standard_v3_scrypt_without_plaintext_key(keyfile: Path) -> None:
    account = key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    text = keyfile.read_text()
    assert account.key.hex().removeprefix("0x") not in text
    doc = json.loads(text)
    assert doc["version"] == 3
    assert doc["crypto"]["kdf"] == "scrypt"
    assert doc["crypto"]["kdfparams"]["n"] == N
    # Any standard tool opens it: eth_account itself, without going through worker.keys.
    assert Account.decrypt(doc, PASS) == account.key


def test_default_kdf_is_standard_scrypt(keyfile: Path) -> None:
    key_create(path=keyfile, passphrase=PASS)
    assert json.loads(keyfile.read_text())["crypto"]["kdfparams"]["n"] == 2**18


def test_keystore_file_and_new_directory_are_private(keyfile: Path) -> None:
    key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(keyfile.parent.stat().st_mode) == 0o700
    assert [p.name for p in keyfile.parent.iterdir()] == ["device.json"]  # no temp file left


def test_wrong_passphrase_is_refused(keyfile: Path) -> None:
    key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    with pytest.raises(WrongPassphraseError) as exc:
        key_load(path=keyfile, passphrase="not it")
    assert exc.value.code == "keystore_wrong_passphrase"
    assert exc.value.path == str(keyfile)


def test_missing_keystore_is_refused(keyfile: Path) -> None:
    with pytest.raises(KeystoreNotFoundError):
        key_load(path=keyfile, passphrase=PASS)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda doc: "{not json", "not JSON"),
        (lambda doc: json.dumps({**doc, "version": 4}), "version 3"),
        (lambda doc: json.dumps({k: v for k, v in doc.items() if k != "crypto"}), "crypto"),
        (lambda doc: json.dumps(_set(doc, "kdf", "argon2")), "unsupported kdf"),
        (lambda doc: json.dumps(_set_kdf(doc, "n", 2**30)), "1 GiB"),
        (lambda doc: json.dumps(_set_kdf(doc, "n", 1000)), "invalid scrypt"),
        (lambda doc: json.dumps(_set(doc, "ciphertext", "zz")), "cannot decrypt"),
    ],
)
def test_corrupted_keystore_is_refused(keyfile: Path, damage, reason: str) -> None:
    key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    keyfile.write_text(damage(json.loads(keyfile.read_text())))
    with pytest.raises(KeystoreCorruptError, match=reason) as exc:
        key_load(path=keyfile, passphrase=PASS)
    assert exc.value.code == "keystore_corrupt"


def test_address_not_matching_decrypted_key_is_corrupt(keyfile: Path) -> None:
    key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    doc = json.loads(keyfile.read_text())
    doc["address"] = "00" * 20
    keyfile.write_text(json.dumps(doc))
    with pytest.raises(KeystoreCorruptError, match="file says"):
        key_load(path=keyfile, passphrase=PASS)


def test_flipped_ciphertext_bit_fails_the_mac(keyfile: Path) -> None:
    key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    doc = json.loads(keyfile.read_text())
    text = doc["crypto"]["ciphertext"]
    doc["crypto"]["ciphertext"] = ("1" if text[0] != "1" else "2") + text[1:]
    keyfile.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphraseError, match="altered"):
        key_load(path=keyfile, passphrase=PASS)


def test_create_never_overwrites_an_existing_key(keyfile: Path) -> None:
    first = key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    with pytest.raises(KeystoreExistsError):
        key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    assert key_load(path=keyfile, passphrase=PASS).address == first.address


def test_save_with_overwrite_changes_the_passphrase(keyfile: Path) -> None:
    account = key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    key_save(path=keyfile, account=account, passphrase="new", scrypt_n=N, overwrite=True)
    assert key_load(path=keyfile, passphrase="new").address == account.address
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    with pytest.raises(WrongPassphraseError):
        key_load(path=keyfile, passphrase=PASS)


def test_empty_passphrase_is_refused(keyfile: Path) -> None:
    with pytest.raises(PassphraseMissingError):
        key_create(path=keyfile, passphrase="", scrypt_n=N)
    assert not keyfile.exists()


def test_load_or_create_creates_once_then_loads(keyfile: Path) -> None:
    created = key_load_or_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    assert key_load_or_create(path=keyfile, passphrase=PASS, scrypt_n=N).address == created.address


def test_load_warns_when_others_can_read_the_file(
    keyfile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_create(path=keyfile, passphrase=PASS, scrypt_n=N)
    keyfile.chmod(0o644)
    key_load(path=keyfile, passphrase=PASS)
    assert "chmod 600" in caplog.text


def test_passphrase_comes_from_the_environment() -> None:
    assert passphrase_read(environ={"FLEX_DEVICE_PASSPHRASE": "s3cret"}) == "s3cret"


def test_passphrase_missing_without_env_or_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(PassphraseMissingError, match="FLEX_DEVICE_PASSPHRASE"):
        passphrase_read(environ={})


def _set(doc: dict, field: str, value: object) -> dict:
    doc["crypto"][field] = value
    return doc


def _set_kdf(doc: dict, field: str, value: object) -> dict:
    doc["crypto"]["kdfparams"][field] = value
    return doc
