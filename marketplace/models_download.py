"""Fetching a task's final model from its aggregator's data plane, checked against the chain.

The web server fetches on the buyer's behalf, signing the data-plane request with the buyer's
custodial key (the aggregator's policy lets a task's buyer fetch its global models), over TLS
pinned to the certificate the aggregator registered. The blob is streamed to a temporary file
(never held whole in memory) under a total deadline, and verified against the ID the contract
holds before a byte of it reaches the buyer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from eth_account.signers.local import LocalAccount

from chain.events import TaskState
from core.errors import FlexError
from dataplane.client import fetch_model_to
from marketplace import contract
from marketplace.models import Device

# The web request waits for the fetch: keep retries short, a buyer can click again. Each read
# waits FETCH_TIMEOUT_S at most; the whole fetch FLEX_MODEL_DOWNLOAD_DEADLINE_S.
FETCH_TIMEOUT_S = 30.0
FETCH_RETRIES = 1
# Converting imports TensorFlow, which has taken over a minute on a busy machine.
EXPORT_TIMEOUT_S = 600
# The formats a final model downloads in: the canonical blob, and the views training.export
# makes of it (file in the export's directory, extension).
EXPORTS = {"keras": ("model.keras", "keras"), "npz": ("weights.npz", "npz")}
FORMATS = ("flexmodel", *EXPORTS)


class ModelNotReadyError(FlexError):
    """The task has no final model yet."""

    code = "model_not_ready"


class NotTaskBuyerError(FlexError):
    """Only the task's buyer may do this."""

    code = "not_task_buyer"


class ModelUnavailableError(FlexError):
    """The aggregator's model store cannot be reached."""

    code = "model_unavailable"


class ModelExportError(FlexError):
    """The model could not be converted to a standard format."""

    code = "model_export_failed"


class UnknownFormatError(FlexError):
    """The model downloads as .flexmodel, .keras or .npz."""

    code = "unknown_format"


@dataclass(frozen=True)
class FinalModel:
    chain_task_id: int
    round_number: int
    model_id: str
    aggregator: str
    file: BinaryIO  # verified bytes, at their start; closing it deletes them (a blob's)
    size: int
    extension: str = "flexmodel"
    check: str = "checked chunk by chunk against the model ID on chain as it was fetched"

    @property
    def filename(self) -> str:
        return (
            f"flex-task-{self.chain_task_id}-round-{self.round_number}-{self.model_id}"
            f".{self.extension}"
        )


def final_model_id(*, chain_task_id: int) -> tuple[int, str, str]:
    """(round, model ID, aggregator) of the task's final global model as the chain holds it."""
    market = contract.market()
    info = market.task(task_id=chain_task_id)
    if info.state not in (TaskState.TRAINED, TaskState.FINALIZED):
        raise ModelNotReadyError(
            f"The task is {info.state.name.lower()}; its model is ready once it is trained.",
            state=info.state.name.lower(),
        )
    model_id = market.global_model(task_id=chain_task_id, round_number=info.rounds)
    if model_id is None:  # a trained task always has it; guard against a contract change
        raise ModelNotReadyError(round_number=info.rounds)
    return info.rounds, model_id, info.aggregator


def final_model_fetch(*, chain_task_id: int, account: LocalAccount) -> FinalModel:
    """The final model, fetched as ``account`` into a temporary file and checked against its
    on-chain ID; the caller closes ``file``.

    Raises ModelNotReadyError, ModelUnavailableError, or the data plane's own errors
    (AccessDeniedError, PeerCertificateError, FetchDeadlineError, ModelIdMismatchError, ...),
    all FlexErrors.
    """
    round_number, model_id, aggregator = final_model_id(chain_task_id=chain_task_id)
    device = (
        Device.objects.filter(address=aggregator)
        .exclude(dataplane_url="")
        .exclude(dataplane_cert_sha256="")
        .first()
    )
    if device is None:
        raise ModelUnavailableError(
            "The aggregator has not told the platform where its model store is.",
            aggregator=aggregator,
        )
    spool = tempfile.TemporaryFile(prefix="flex-model-")  # noqa: SIM115  (handed to the caller)
    try:
        size = fetch_model_to(
            sink=spool,
            base_url=device.dataplane_url,
            cert_sha256=device.dataplane_cert_sha256,
            model_id=model_id,
            server_address=aggregator,
            account=account,
            timeout=FETCH_TIMEOUT_S,
            deadline_s=settings.FLEX_MODEL_DOWNLOAD_DEADLINE_S,
            retries=FETCH_RETRIES,
        )
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return FinalModel(
        chain_task_id=chain_task_id,
        round_number=round_number,
        model_id=model_id,
        aggregator=aggregator,
        file=spool,
        size=size,
    )


def export_dir(model_id: str) -> Path:
    """Where the standard-format files of a model are kept, by its content ID."""
    return Path(settings.FLEX_MODEL_EXPORT_DIR) / model_id.lower().removeprefix("0x")


def export_record(*, model_id: str) -> dict | None:
    """The check record of a model's converted files (training.export), None before the first
    conversion; one that names another model is not this model's."""
    try:
        record = json.loads((export_dir(model_id) / "check.json").read_text())
    except (OSError, ValueError):
        return None
    return record if str(record.get("model_id", "")).lower() == model_id.lower() else None


def final_model_export(
    *, chain_task_id: int, account: LocalAccount, spec: dict | None, fmt: str
) -> FinalModel:
    """The final model as ``fmt`` ("keras" or "npz"): converted once per model ID, in a
    subprocess that may import TensorFlow, from the blob checked against the chain, and each
    file read back and re-encoded to that ID (training.export); later calls serve the cache.

    Raises UnknownFormatError, ModelExportError, and final_model_fetch's errors.
    """
    if fmt not in EXPORTS:
        raise UnknownFormatError(format=fmt, formats=list(FORMATS))
    round_number, model_id, aggregator = final_model_id(chain_task_id=chain_task_id)
    record = export_record(model_id=model_id)
    if record is None:
        if spec is None:
            raise ModelExportError(
                "The task was posted outside the website: its model's structure is unknown.",
                task_id=chain_task_id,
            )
        fetched = final_model_fetch(chain_task_id=chain_task_id, account=account)
        work = Path(tempfile.mkdtemp(prefix="flex-export-"))
        try:
            with fetched.file, (work / "model.flexmodel").open("wb") as blob:
                shutil.copyfileobj(fetched.file, blob)
            (work / "spec.json").write_text(json.dumps(spec))
            _convert(work=work, model_id=model_id)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        record = export_record(model_id=model_id)
        if record is None:
            raise ModelExportError(model_id=model_id)
    name, extension = EXPORTS[fmt]
    path = export_dir(model_id) / name
    return FinalModel(
        chain_task_id=chain_task_id,
        round_number=round_number,
        model_id=model_id,
        aggregator=aggregator,
        file=path.open("rb"),
        size=path.stat().st_size,
        extension=extension,
        check=record["files"][fmt]["check"],
    )


def _convert(*, work: Path, model_id: str) -> None:
    cmd = [
        sys.executable, "-m", "training.export", str(work / "model.flexmodel"),
        "--spec", str(work / "spec.json"), "--id", model_id, "--out", str(export_dir(model_id)),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            cmd,
            cwd=settings.BASE_DIR,
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ModelExportError(
            f"Converting the model took over {EXPORT_TIMEOUT_S} s; try again later.",
            model_id=model_id,
        ) from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise ModelExportError(
            f"The model could not be converted: {lines[-1].removeprefix('error: ')}",
            model_id=model_id,
        )
