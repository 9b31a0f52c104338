"""The aggregator's copy of a task's validation set: kept by content ID, fetched once from the
platform with a request signed by the node's key, checked against the ID the spec commits to."""

from __future__ import annotations

import logging
import os
import tempfile

import requests

from dataplane.protocol import FetchFailedError
from dataplane.signing import sign_request
from training import validation
from training.datasets import Dataset
from training.errors import DatasetError
from training.spec import TaskSpec
from worker.node import Node

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
FETCH_TIMEOUT_S = 60


class ValidationUnavailableError(validation.ValidationSetError):
    """The platform refused the task's validation set or sent one that does not verify."""

    code = "validation_unavailable"


def _fetch(node: Node, *, task_id: int) -> bytes:
    url = f"{node.config.server_url.rstrip('/')}/api/tasks/{task_id}/validation/"
    headers = sign_request(
        account=node.account,
        method="GET",
        url=url,
        server_address=node.config.contract_address,
    )
    try:
        response = requests.get(url, headers=headers, timeout=FETCH_TIMEOUT_S)
    except requests.RequestException as exc:
        raise FetchFailedError(url=url, attempts=1, reason=str(exc)) from None
    if response.status_code >= 500:
        raise FetchFailedError(url=url, attempts=1, reason=f"HTTP {response.status_code}")
    if response.status_code != 200:
        raise ValidationUnavailableError(
            source=url, reason=f"HTTP {response.status_code}: {response.text[:200]}"
        )
    if len(response.content) > validation.MAX_UPLOAD_BYTES:
        raise ValidationUnavailableError(source=url, reason="larger than any validation set")
    return response.content


def validation_set(node: Node, *, spec: TaskSpec, task_id: int) -> Dataset:
    """The spec's validation set: from this node's copy, else the bundled held-out split when
    the ID is that split's, else the platform (FetchFailedError while it is unreachable).
    Raises ValidationUnavailableError when what arrives is not the set the spec names."""
    content_id = spec.validation
    path = node.home / VALIDATION_DIR / f"{content_id}.bin"
    if path.is_file():
        try:
            return validation.decode(path.read_bytes(), schema=spec.schema, expected_id=content_id)
        except DatasetError as exc:
            log.warning("task %s: kept validation set dropped: %s", task_id, exc.message)
            path.unlink()
    try:
        bundled = validation.bundled(schema=spec.schema)
    except DatasetError:
        bundled = None
    if bundled is not None and validation.validation_id(bundled) == content_id:
        blob = bundled
    else:
        blob = _fetch(node, task_id=task_id)
    try:
        data = validation.decode(blob, schema=spec.schema, expected_id=content_id)
    except DatasetError as exc:
        raise ValidationUnavailableError(source=content_id, reason=exc.message) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(blob)
    os.replace(tmp, path)
    log.info("task %s: validation set %s (%d samples) kept", task_id, content_id, len(data))
    return data
