"""The data plane against an attacker on the network: pinned TLS, requests bound to one host
and good once, advertised URLs that can only name a host, and a deadline on every fetch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
import requests

from dataplane.access import AllowListPolicy
from dataplane.addresses import DataPlaneUrlError, authority, dataplane_url_check
from dataplane.client import fetch_model
from dataplane.protocol import FetchDeadlineError, FetchRefusedError, PeerCertificateError
from dataplane.server import DataPlaneServer
from dataplane.signing import MemoryNonces, sign_request
from dataplane.tls import CertificatePinError, pin_check
from tests.blobs import blob_of
from tests.dataplane.conftest import cert_for, pinned
from tests.dataplane.test_dataplane import (
    FAST,
    REQUESTER,
    SERVER,
    _CountingPolicy,
    _fetch,
    _get,
    _rogue,
    _signed,
)
from training.serialize import id_hex, model_id
from training.store import ModelStore


@pytest.fixture
def stored(store: ModelStore) -> str:
    return id_hex(store.put(blob_of([np.ones(3, np.float32)], task_id=1, round_number=1)))


@pytest.fixture
def policy() -> _CountingPolicy:
    return _CountingPolicy(AllowListPolicy(addresses=[REQUESTER.address]))


@pytest.fixture
def plane(store: ModelStore, policy: _CountingPolicy) -> Iterator[DataPlaneServer]:
    with DataPlaneServer(
        certificate=cert_for("server"), store=store, policy=policy, node_address=SERVER.address
    ) as server:
        yield server


# ---------------------------------------------------------------- single use, one host


def test_a_replayed_request_is_refused(plane: DataPlaneServer, stored: str) -> None:
    path = f"/models/{stored}"
    headers = _signed(plane, path)

    first = _get(plane, path, headers)
    replayed = _get(plane, path, headers)

    assert first.status == 200
    assert id_hex(model_id(first.data)) == stored
    assert replayed.status == 401
    assert replayed.json()["code"] == "auth_replayed"
    assert "already used" in replayed.json()["message"]


def test_a_request_signed_for_another_host_is_refused(plane: DataPlaneServer, stored: str) -> None:
    path = f"/models/{stored}"
    # Signed for the same node at another host (say, captured on its way there).
    headers = sign_request(
        account=REQUESTER,
        method="GET",
        url=f"https://elsewhere.example.org:{plane.port}{path}",
        server_address=SERVER.address,
    )
    response = _get(plane, path, headers)

    assert response.status == 401
    assert response.json()["code"] == "auth_bad_signature"


def test_a_node_checks_signatures_against_its_advertised_url(
    store: ModelStore, stored: str
) -> None:
    policy = AllowListPolicy(addresses=[REQUESTER.address])
    with DataPlaneServer(
        certificate=cert_for("server"),
        store=store,
        policy=policy,
        node_address=SERVER.address,
        public_url="https://device.example.org:8443",
    ) as plane:
        path = f"/models/{stored}"
        local = f"https://127.0.0.1:{plane.port}"
        to_bind = pinned(plane, local)
        for_public = sign_request(
            account=REQUESTER, method="GET", url=plane.url + path, server_address=SERVER.address
        )
        for_bind = sign_request(
            account=REQUESTER, method="GET", url=local + path, server_address=SERVER.address
        )
        # Sent to the bind address either way (as a port forward would deliver them).
        good = to_bind.request("GET", path, headers=for_public, timeout=5)
        bad = to_bind.request("GET", path, headers=for_bind, timeout=5)

    assert plane.authority == "device.example.org:8443"
    assert good.status == 200
    assert bad.json()["code"] == "auth_bad_signature"


def test_nonces_are_per_signer_and_forgotten_once_expired() -> None:
    nonces = MemoryNonces()
    later = time.time() + 60

    assert nonces.claim(signer="0xA", nonce="ab" * 16, expires_at=later)
    assert not nonces.claim(signer="0xa", nonce="ab" * 16, expires_at=later)
    assert nonces.claim(signer="0xB", nonce="ab" * 16, expires_at=later)
    assert nonces.claim(signer="0xC", nonce="cd" * 16, expires_at=time.time() - 1)
    assert nonces.claim(signer="0xC", nonce="cd" * 16, expires_at=later)  # the old one expired


# ---------------------------------------------------------------- pinned TLS


def test_a_peer_with_the_wrong_certificate_is_refused_before_the_request(
    store: ModelStore, stored: str, policy: _CountingPolicy
) -> None:
    # An impostor answers at the node's address with a certificate of its own.
    with (
        DataPlaneServer(
            certificate=cert_for("impostor"),
            store=store,
            policy=policy,
            node_address=SERVER.address,
        ) as impostor,
        pytest.raises(PeerCertificateError) as exc,
    ):
        _fetch(impostor, stored, cert_sha256=cert_for("server").sha256)

    assert exc.value.code == "peer_certificate_mismatch"
    assert exc.value.expected == cert_for("server").sha256
    assert policy.calls == 0  # not a byte of the signed request reached it


def test_plain_http_gets_nothing_from_a_node(plane: DataPlaneServer, stored: str) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{plane.port}/models/{stored}", timeout=5)


def test_the_client_refuses_a_plain_http_url(stored: str) -> None:
    with pytest.raises(FetchRefusedError, match="TLS only"):
        fetch_model(
            base_url="http://127.0.0.1:9",
            cert_sha256=cert_for("server").sha256,
            model_id=stored,
            server_address=SERVER.address,
            account=REQUESTER,
        )


@pytest.mark.parametrize("value", ["", "12ab", "zz" * 32, "ab" * 33, None])
def test_fingerprints_are_64_hex_digits(value) -> None:
    with pytest.raises(CertificatePinError):
        pin_check(value)


def test_fingerprints_forgive_colons_and_case() -> None:
    colons = ":".join(["AB"] * 32)
    assert pin_check(colons) == "ab" * 32


# ---------------------------------------------------------------- a total deadline


def test_a_peer_that_drips_bytes_is_cut_off_at_the_deadline() -> None:
    # A well-formed blob, sent a few bytes now and then: no single read ever times out, and
    # nothing that arrives is wrong, so only the deadline can stop it.
    blob = blob_of([np.zeros(250_000, np.float32)])

    def drip(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(blob)))
        handler.end_headers()
        for i in range(600):
            try:
                handler.wfile.write(blob[i * 10 : (i + 1) * 10])
                handler.wfile.flush()
            except OSError:
                return
            time.sleep(0.05)

    # Long enough for a busy machine to connect and take the first bytes, far short of the
    # 30 s the drip would take.
    with _rogue(drip) as rogue, pytest.raises(FetchDeadlineError) as exc:
        _fetch(rogue, "0x" + "00" * 32, deadline_s=5.0, **{**FAST, "retries": 0})

    assert exc.value.code == "fetch_deadline"
    assert 0 < exc.value.received_bytes < len(blob)


# ---------------------------------------------------------------- advertised URLs


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://device.example.org:8443/?next=evil", "no query"),
        ("https://device.example.org:8443/#frag", "no query (?) or fragment"),
        ("https://user:pw@device.example.org:8443", "no user name"),
        ("https://device.example.org:8443/models", "no path"),
        ("http://device.example.org:8443", "scheme must be https"),
        ("https://device.example.org:0", "port is not"),
        ("https://device.example.org:70000", "port is not"),
        ("https://dev ice.example.org", "spaces"),
        ("https://under_score.example.org", "not a DNS name"),
        ("https://0.0.0.0:8443", "not an address peers can reach"),
        ("https://10.1.2.3:8443", "private"),
        ("https://127.0.0.1:8443", "loopback"),
        ("https://[::1]:8443", "loopback"),
        ("https://169.254.169.254", "link-local"),
        ("https://localhost:8443", "loopback"),
    ],
)
def test_dataplane_urls_that_could_point_anywhere_are_refused(url: str, reason: str) -> None:
    with pytest.raises(DataPlaneUrlError) as exc:
        dataplane_url_check(url, allow_private=False)
    assert reason in exc.value.message
    assert exc.value.code == "dataplane_url_invalid"


def test_private_addresses_only_when_allowed() -> None:
    assert dataplane_url_check("https://10.1.2.3:8443/", allow_private=True) == (
        "https://10.1.2.3:8443"
    )
    assert dataplane_url_check("https://[::1]:9", allow_private=True) == "https://[::1]:9"
    with pytest.raises(DataPlaneUrlError):
        dataplane_url_check("https://0.0.0.0:1", allow_private=True)


def test_a_public_url_is_normalised_with_its_port() -> None:
    assert dataplane_url_check("HTTPS://Device.Example.ORG", allow_private=False) == (
        "https://device.example.org:443"
    )
    assert authority("https://Device.Example.org/models/x") == "device.example.org:443"
    assert authority("https://[::1]:8443") == "[::1]:8443"
