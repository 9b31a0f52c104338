"""The node's Ethereum key, kept on the device as an encrypted Web3 Secret Storage (v3) file."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_keyfile.exceptions import EthKeyfileValueError

from core.errors import FlexError

log = logging.getLogger(__name__)

PASSPHRASE_ENV = "FLEX_DEVICE_PASSPHRASE"
# geth's "standard" scrypt cost (n=2^18, r=8, p=1): 256 MiB and about a second per guess, which
# is what makes a stolen keystore expensive to brute-force. Tests pass a tiny n to stay fast.
STANDARD_SCRYPT_N = 2**18
# geth's "light" cost, for devices that cannot spare 256 MiB for a moment at start-up.
LIGHT_SCRYPT_N = 2**12
# The KDF parameters come from the file, so a damaged or hostile file must not make us
# allocate gigabytes or spin for hours before the MAC check can even fail.
_MAX_SCRYPT_BYTES = 1 << 30
_MAX_SCRYPT_P = 16
_MAX_PBKDF2_ROUNDS = 10_000_000


class KeystoreError(FlexError):
    """The device keystore could not be used."""

    code = "keystore_error"


class KeystoreNotFoundError(KeystoreError):
    """There is no keystore file at this path."""

    code = "keystore_not_found"

    def default_message(self, *, path: str = "?", **_: Any) -> str:
        return f"no device keystore at {path}"


class KeystoreExistsError(KeystoreError):
    """A keystore file is already there; refusing to overwrite the key it holds."""

    code = "keystore_exists"

    def default_message(self, *, path: str = "?", **_: Any) -> str:
        return f"a device keystore already exists at {path}; refusing to overwrite its key"


class KeystoreCorruptError(KeystoreError):
    """The keystore file is not a valid Web3 Secret Storage v3 file."""

    code = "keystore_corrupt"

    def default_message(self, *, path: str = "?", reason: str = "invalid", **_: Any) -> str:
        return f"device keystore {path} is corrupt: {reason}"


class WrongPassphraseError(KeystoreError):
    """The passphrase does not open this keystore."""

    code = "keystore_wrong_passphrase"

    def default_message(self, *, path: str = "?", **_: Any) -> str:
        # A flipped bit in the ciphertext or MAC fails the same check as a wrong passphrase:
        # the format cannot tell them apart, so say both.
        return f"wrong passphrase for device keystore {path} (or its ciphertext was altered)"


class PassphraseMissingError(KeystoreError):
    """No usable passphrase was given."""

    code = "passphrase_missing"


def key_create(*, path: Path, passphrase: str, scrypt_n: int = STANDARD_SCRYPT_N) -> LocalAccount:
    """Generate a new key and save it encrypted at ``path``. Raises KeystoreExistsError."""
    account: LocalAccount = Account.create()
    key_save(path=path, account=account, passphrase=passphrase, scrypt_n=scrypt_n)
    log.info("created device key %s in %s", account.address, path)
    return account


def key_save(
    *,
    path: Path,
    account: LocalAccount,
    passphrase: str,
    scrypt_n: int = STANDARD_SCRYPT_N,
    overwrite: bool = False,
) -> None:
    """Encrypt ``account``'s key with ``passphrase`` (scrypt) and write it atomically, mode 0600.

    Without ``overwrite`` an existing file is never replaced (KeystoreExistsError): losing a
    device's key loses what the chain owes it.
    """
    if not passphrase:
        raise PassphraseMissingError("refusing to encrypt the device key with an empty passphrase")
    if scrypt_n < 2 or scrypt_n & (scrypt_n - 1):
        raise ValueError(f"scrypt_n must be a power of two >= 2, not {scrypt_n}")
    keystore = Account.encrypt(account.key, passphrase, kdf="scrypt", iterations=scrypt_n)
    _write_private(path=Path(path), data=json.dumps(keystore).encode(), overwrite=overwrite)


def key_load(*, path: Path, passphrase: str) -> LocalAccount:
    """Decrypt the keystore at ``path``.

    Raises KeystoreNotFoundError, KeystoreCorruptError, WrongPassphraseError.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeystoreNotFoundError(path=str(path)) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "device keystore %s is accessible to other users (mode %o); run chmod 600 on it",
            path,
            stat.S_IMODE(mode),
        )
    keystore = _parse_keystore(path=path, raw=raw)
    try:
        key = Account.decrypt(keystore, passphrase)
    except EthKeyfileValueError as exc:
        if "MAC mismatch" in str(exc):
            raise WrongPassphraseError(path=str(path)) from None
        raise KeystoreCorruptError(path=str(path), reason=str(exc)) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise KeystoreCorruptError(path=str(path), reason=f"cannot decrypt: {exc}") from None
    account: LocalAccount = Account.from_key(key)
    stored = keystore.get("address")
    if stored and account.address.lower() != "0x" + str(stored).lower().removeprefix("0x"):
        raise KeystoreCorruptError(
            path=str(path), reason=f"decrypted key is {account.address}, file says 0x{stored}"
        )
    return account


def key_load_or_create(
    *, path: Path, passphrase: str, scrypt_n: int = STANDARD_SCRYPT_N
) -> LocalAccount:
    """The device's key: loaded from ``path`` if it exists, otherwise created there."""
    try:
        account = key_load(path=path, passphrase=passphrase)
    except KeystoreNotFoundError:
        return key_create(path=path, passphrase=passphrase, scrypt_n=scrypt_n)
    log.info("loaded device key %s from %s", account.address, path)
    return account


def passphrase_read(*, confirm: bool = False, environ: Mapping[str, str] | None = None) -> str:
    """The keystore passphrase from FLEX_DEVICE_PASSPHRASE, else from a terminal prompt.

    ``confirm`` asks twice (when creating a key). Raises PassphraseMissingError when neither
    source gives one, e.g. a service started without the variable and without a terminal.
    """
    env = os.environ if environ is None else environ
    if env.get(PASSPHRASE_ENV):
        return env[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise PassphraseMissingError(
            f"set {PASSPHRASE_ENV} or run from a terminal to enter the device key passphrase",
            env=PASSPHRASE_ENV,
        )
    passphrase = getpass.getpass("Device key passphrase: ")
    if not passphrase:
        raise PassphraseMissingError("the device key passphrase may not be empty")
    if confirm and getpass.getpass("Repeat the passphrase: ") != passphrase:
        raise PassphraseMissingError("the two passphrases differ")
    return passphrase


def _parse_keystore(*, path: Path, raw: bytes) -> dict[str, Any]:
    """The keystore's JSON, checked for shape and for KDF costs we are willing to pay."""

    def corrupt(reason: str) -> KeystoreCorruptError:
        return KeystoreCorruptError(path=str(path), reason=reason)

    try:
        keystore = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"not JSON ({exc})") from None
    if not isinstance(keystore, dict) or keystore.get("version") != 3:
        raise corrupt("not a version 3 keystore")
    crypto = keystore.get("crypto", keystore.get("Crypto"))
    if not isinstance(crypto, dict):
        raise corrupt("no crypto section")
    for field in ("cipher", "cipherparams", "ciphertext", "kdf", "kdfparams", "mac"):
        if field not in crypto:
            raise corrupt(f"crypto.{field} is missing")
    params = crypto["kdfparams"]
    if not isinstance(params, dict):
        raise corrupt("crypto.kdfparams is not an object")
    try:
        if crypto["kdf"] == "scrypt":
            n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
            if n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= _MAX_SCRYPT_P:
                raise corrupt(f"invalid scrypt parameters n={n} r={r} p={p}")
            if 128 * n * r > _MAX_SCRYPT_BYTES:
                raise corrupt(f"scrypt parameters n={n} r={r} would need over 1 GiB")
        elif crypto["kdf"] == "pbkdf2":
            rounds = int(params["c"])
            if not 1 <= rounds <= _MAX_PBKDF2_ROUNDS:
                raise corrupt(f"invalid pbkdf2 round count {rounds}")
        else:
            raise corrupt(f"unsupported kdf {crypto['kdf']!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise corrupt(f"invalid kdf parameters ({exc!r})") from None
    if crypto["cipher"] != "aes-128-ctr":
        raise corrupt(f"unsupported cipher {crypto['cipher']!r}")
    return keystore


def _write_private(*, path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` readable by its owner only, all or nothing, durably."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp creates the file 0600 from the start: there is no moment when the key is readable.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the name exists, so two concurrent creators cannot both win.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeystoreExistsError(path=str(path)) from None
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
