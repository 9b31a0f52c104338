"""Data-plane test helpers: node certificates made once per session, pinned sessions."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import requests

from dataplane.tls import NodeCertificate, node_certificate, pin
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


def pinned(plane) -> requests.Session:
    """A session that accepts exactly ``plane``'s certificate (pass ``verify=False``)."""
    session = requests.Session()
    pin(session, base_url=plane.url, sha256=plane.certificate.sha256)
    return session
