"""Buyers' validation sets: stored by content ID, named in task specs, served to the task's
aggregator only (docs/scoring.md)."""

from __future__ import annotations

import dataclasses
import functools

from eth_utils import to_checksum_address

from core.errors import FlexError
from marketplace import contract
from marketplace.models import TaskOrder, ValidationSet
from training import validation
from training.errors import DatasetError
from training.spec import TaskSpec


class ValidationSetUnknownError(FlexError):
    """The spec names a validation set this platform does not hold."""

    code = "validation_set_unknown"

    def default_message(self, *, content_id: str = "?", reason: str = "", **_) -> str:
        return f"validation set {content_id}: {reason or 'not among your uploads; upload it first'}"


class NotTaskAggregatorError(FlexError):
    """Only the task's selected aggregator may fetch its validation set."""

    code = "not_task_aggregator"


def validation_set_store(*, blob: bytes, dataset: str) -> ValidationSet:
    """Keep canonical validation bytes under their content ID (once; storing again returns
    the same row). Raises ValidationSetError when they do not decode in ``dataset``."""
    samples = validation.decode(blob, schema=dataset)
    row, _ = ValidationSet.objects.get_or_create(
        content_id=validation.validation_id(blob),
        defaults={"dataset": dataset, "samples": len(samples), "data": bytes(blob)},
    )
    return row


def validation_set_upload(*, data: bytes, filename: str, dataset: str, buyer) -> ValidationSet:
    """``buyer``'s uploaded .npz or .csv as a stored validation set of schema ``dataset``,
    which ``buyer`` may then name in a task (a set uploaded by several buyers is stored once).
    Raises ValidationSetError naming the file and what is wrong with it, SpecError for an
    unknown schema."""
    row = validation_set_store(
        blob=validation.from_upload(data=data, filename=filename, schema=dataset), dataset=dataset
    )
    row.uploaded_by.add(buyer)
    return row


@functools.cache
def bundled_id(schema: str) -> str | None:
    """The content ID of ``schema``'s bundled held-out split (None: it has none)."""
    try:
        return validation.validation_id(validation.bundled(schema=schema))
    except DatasetError:
        return None


def task_spec_validated(*, spec: TaskSpec, buyer) -> TaskSpec:
    """``spec`` committed to a validation set this platform holds: the one it names (``buyer``'s
    own upload, or the bundled split by its ID), or else the bundled held-out split of its
    schema. Raises ValidationSetUnknownError for a set ``buyer`` has not uploaded (whether or
    not another buyer has: the answer does not tell) or of another schema, and when the schema
    has no bundled split to default to."""
    if spec.validation is None:
        try:
            blob = validation.bundled(schema=spec.dataset)
        except DatasetError:
            raise ValidationSetUnknownError(
                content_id="(none)",
                reason=f"schema {spec.dataset!r} has no bundled held-out split; upload one",
            ) from None
        row = validation_set_store(blob=blob, dataset=spec.dataset)
        return dataclasses.replace(spec, validation=row.content_id)
    row = ValidationSet.objects.filter(content_id=spec.validation).only("dataset").first()
    if row is None and spec.validation == bundled_id(spec.dataset):
        # The bundled split, named outright: the platform holds it without an upload.
        row = validation_set_store(
            blob=validation.bundled(schema=spec.dataset), dataset=spec.dataset
        )
    bundled = row is not None and spec.validation == bundled_id(row.dataset)
    if not bundled and (row is None or not row.uploaded_by.filter(pk=buyer.pk).exists()):
        raise ValidationSetUnknownError(
            content_id=spec.validation, reason="not among your uploads; upload it first"
        )
    if row.dataset != spec.dataset:
        raise ValidationSetUnknownError(
            content_id=spec.validation,
            reason=f"its samples fit {row.dataset!r}, the task's data is {spec.dataset!r}",
        )
    return spec


def validation_set_for_aggregator(*, task_id: int, device: str) -> ValidationSet:
    """The validation set task ``task_id``'s spec commits to, for ``device`` if the chain
    names it the task's aggregator. Raises NotTaskAggregatorError, ValidationSetUnknownError."""
    market = contract.market()
    task = market.task(task_id=task_id)
    selection = market.selection(task_id=task_id)
    if selection is None or to_checksum_address(selection.aggregator) != device:
        raise NotTaskAggregatorError(task_id=task_id, device=device)
    # The order whose spec the chain committed to (its hash is the task's spec hash).
    order = TaskOrder.objects.filter(
        chain_task_id=task_id, spec_hash__iexact=task.spec_hash
    ).first()
    content_id = (order.spec or {}).get("validation") if order else None
    row = ValidationSet.objects.filter(content_id=content_id).first() if content_id else None
    if row is None:
        raise ValidationSetUnknownError(content_id=content_id or "(none)")
    return row
