"""Data-plane test helpers: node certificates made once per session, pinned connections."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import urllib3

from dataplane.tls import NodeCertificate, node_certificate, pinned_pool
from training.store import ModelStore


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@functools.cache
def cert_for(name: str) -> NodeCertificate:
    """A node certificate named ``name``, the same one for the whole session."""
    directory = Path(tempfile.mkdtemp(prefix=f"flex-tls-{name}-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return node_certificate(directory, common_name=name)


def pinned(plane, url: str | None = None) -> urllib3.HTTPSConnectionPool:
    """Connections to ``url`` (else ``plane``'s own) that accept exactly ``plane``'s
    certificate."""
    return pinned_pool(url or plane.url, sha256=plane.certificate.sha256)
