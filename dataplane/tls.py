"""TLS between nodes: each node's self-signed certificate, and clients that pin its fingerprint.

No certificate authority is involved. A node makes its own certificate when it enrols and
registers the certificate's SHA-256 fingerprint with the platform; whoever fetches from it (a
peer, the web server) is told that fingerprint with the node's URL and accepts no other
certificate. The name in the certificate is not checked: the pin is the whole identity.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from urllib3.util.ssl_ import create_urllib3_context

from core.errors import FlexError
from core.proxies import proxy_manager

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
# Long-lived: the pin, not the dates, is what peers check; a node re-enrols to change it.
VALID_DAYS = 10 * 365
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CertificatePinError(FlexError):
    """Not a certificate fingerprint: 64 hex digits of SHA-256 are expected."""

    code = "cert_fingerprint_invalid"


class CertificateMissingError(FlexError):
    """The node's TLS certificate is missing."""

    code = "cert_missing"


def cert_sha256(der: bytes) -> str:
    """The fingerprint peers pin: SHA-256 of the certificate's DER bytes, 64 lowercase hex."""
    return hashlib.sha256(der).hexdigest()


def pin_check(value: str) -> str:
    """``value`` as a fingerprint (colons and case forgiven); CertificatePinError otherwise."""
    text = value.strip().lower().replace(":", "") if isinstance(value, str) else ""
    if not _SHA256.fullmatch(text):
        raise CertificatePinError(
            f"{str(value)[:100]!r} is not a SHA-256 certificate fingerprint (64 hex digits).",
            value=str(value)[:100],
        )
    return text


@dataclass(frozen=True)
class NodeCertificate:
    """A node's certificate and key files, and the fingerprint its peers pin."""

    cert_path: Path
    key_path: Path
    sha256: str

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def node_certificate_load(directory: Path) -> NodeCertificate:
    """The certificate kept in ``directory``; CertificateMissingError when there is none."""
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if not (cert_path.exists() and key_path.exists()):
        raise CertificateMissingError(
            f"no TLS certificate in {directory}: enrol the node again to make one",
            path=str(directory),
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return NodeCertificate(
        cert_path=cert_path,
        key_path=key_path,
        sha256=cert_sha256(cert.public_bytes(serialization.Encoding.DER)),
    )


def node_certificate(directory: Path, *, common_name: str) -> NodeCertificate:
    """The node's certificate in ``directory``, made on first use: a P-256 key (readable by
    the node's user only, like an SSH host key) and a self-signed certificate for it."""
    if (directory / CERT_FILE).exists():
        return node_certificate_load(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(directory / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    (directory / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return node_certificate_load(directory)


def pinned_pool(base_url: str, *, sha256: str) -> urllib3.HTTPSConnectionPool:
    """Connections to the node at ``base_url`` that accept exactly the certificate
    ``sha256``: urllib3 checks its fingerprint right after the handshake, before a byte of a
    request is sent. Through the proxy the environment names for that URL (HTTPS_PROXY,
    NO_PROXY, read now), if any: the tunnel's TLS is the node's own, pinned the same.

    Their TLS context is made once and trusts no CA: left to make one per connection,
    urllib3 would load the system's CA bundle each time (about 20 ms of CPU) only for the
    pin to replace it. Requests go to paths (``pool.urlopen("GET", "/health")``), are not
    retried and follow no redirect unless asked."""
    options: dict = {
        "assert_fingerprint": pin_check(sha256),
        "ssl_context": create_urllib3_context(cert_reqs=ssl.CERT_NONE),
        "retries": False,
        "maxsize": 1,
    }
    proxied = proxy_manager(base_url, **options)
    if proxied is not None:
        pool = proxied.connection_from_url(base_url)
    else:
        pool = urllib3.connection_from_url(base_url, **options)
    if not isinstance(pool, urllib3.HTTPSConnectionPool):
        raise ValueError(f"{base_url} is not an https URL: nodes speak TLS only")
    return pool
