"""Contract events as the mirror stores and replays them (ChainEventRecord rows)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from chain import events as ev
from marketplace.models import ChainEventRecord


def hex_of(value: Any) -> str:
    return value if isinstance(value, str) else "0x" + bytes(value).hex()


def when(timestamp: int | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=UTC)


def _json_arg(name: str, value: Any) -> Any:
    """One event argument as JSON: wei amounts and masks as decimal strings (exact in any
    JSON reader, browsers included), the contract's enums by lower-case name."""
    if isinstance(value, tuple | list):
        return [_json_arg(name, v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, int) and not isinstance(value, bool) and name.endswith(("_wei", "_mask")):
        return str(value)
    return value


def event_args(event: ev.ChainEvent) -> dict[str, Any]:
    """The event's own arguments as ChainEventRecord.args holds them."""
    return {name: _json_arg(name, getattr(event, name)) for name in ev.event_fields(type(event))}


@dataclass(frozen=True)
class MirrorEvent:
    """An event as the mirror stores and replays it: where it is on chain, and its args."""

    name: str
    args: dict[str, Any]
    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.tx_hash, self.log_index)

    @property
    def task_id(self) -> int | None:
        return self.args.get("task_id")

    @classmethod
    def from_chain(cls, event: ev.ChainEvent) -> MirrorEvent:
        return cls(
            name=event.name,
            args=event_args(event),
            tx_hash=event.tx_hash,
            log_index=event.log_index,
            block_number=event.block_number,
            block_hash=event.block_hash,
        )

    @classmethod
    def from_record(cls, record: ChainEventRecord) -> MirrorEvent:
        return cls(
            name=record.name,
            args=record.args,
            tx_hash=record.tx_hash,
            log_index=record.log_index,
            block_number=record.block_number,
            block_hash=record.block_hash,
        )

    def as_record(self) -> ChainEventRecord:
        return ChainEventRecord(
            name=self.name,
            args=self.args,
            task_id=self.task_id,
            tx_hash=self.tx_hash,
            log_index=self.log_index,
            block_number=self.block_number,
            block_hash=self.block_hash,
        )
