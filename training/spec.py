"""The task spec: what a buyer orders, validated per field, and its canonical hash for the chain."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import rfc8785

from core.hashing import keccak
from training.aggregation import STRATEGIES, Strategy
from training.catalogue import ModelEntry, Schema, get_model, get_schema
from training.errors import SpecError

SPEC_VERSION = 1

# Bounds keep a spec's cost estimable and its numbers exact in JSON (integers below 2**53).
LIMITS: dict[str, tuple[int, int]] = {
    "rounds": (1, 1000),
    "local_epochs": (1, 100),
    "batch_size": (1, 65536),
    "seed": (0, 2**32 - 1),
}
MAX_LEARNING_RATE = 10.0
REQUIRED = ("model", "dataset", "rounds")
_CONTENT_ID = re.compile(r"0x[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class AggregationSpec:
    """The aggregation strategy a task names, with all of its parameters (defaults filled in,
    so two spellings of the same settings hash alike)."""

    strategy: str = "fedavg"
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise SpecError(
                field="aggregation.strategy",
                reason=f"unknown strategy {self.strategy!r}; known: {sorted(STRATEGIES)}",
            )
        normal = STRATEGIES[self.strategy].from_params(dict(self.params)).params()
        object.__setattr__(self, "params", tuple(sorted(normal.items())))

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, **dict(self.params)}

    def build(self) -> Strategy:
        """The strategy object these settings describe."""
        return STRATEGIES[self.strategy].from_params(dict(self.params))

    @classmethod
    def from_value(cls, value: Any) -> AggregationSpec:
        """From a strategy key or a ``{"strategy": key, **params}`` object; raises SpecError."""
        if isinstance(value, str):
            value = {"strategy": value}
        if not isinstance(value, Mapping):
            raise SpecError(
                field="aggregation",
                reason=f'must be a strategy key or {{"strategy": key, ...}}, got {value!r}',
            )
        params = dict(value)
        key = params.pop("strategy", None)
        return cls(strategy=key, params=tuple(params.items()))


def _check_int(name: str, value: Any) -> None:
    low, high = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field=name, reason=f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SpecError(field=name, reason=f"must be between {low} and {high}, got {value}")


@dataclass(frozen=True)
class TaskSpec:
    """A training task: which model, on which data, for how many rounds, trained how.

    Built only valid: construction checks every field and raises SpecError(field, reason).
    ``as_json()`` is the canonical RFC 8785 text and ``hash`` its keccak256, the bytes32 that
    goes on chain; equal specs give equal hashes on any machine.
    """

    model: str
    dataset: str
    rounds: int
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    seed: int = 0
    # The content ID (training.validation) of the buyer's validation set, on which the
    # aggregator scores each update; None: updates are not scored (docs/scoring.md).
    validation: str | None = None
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.version != SPEC_VERSION or isinstance(self.version, bool):
            raise SpecError(
                field="version",
                reason=f"unsupported spec version {self.version!r}; this node reads {SPEC_VERSION}",
            )
        if not isinstance(self.dataset, str):
            raise SpecError(field="dataset", reason=f"must be a string, got {self.dataset!r}")
        if not isinstance(self.model, str):
            raise SpecError(field="model", reason=f"must be a string, got {self.model!r}")
        schema = get_schema(key=self.dataset)
        entry = get_model(key=self.model)
        if entry.schema != schema.key:
            raise SpecError(
                field="model",
                reason=f"model {entry.key!r} fits dataset {entry.schema!r}, not {schema.key!r}",
            )
        for name in LIMITS:
            _check_int(name, getattr(self, name))
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise SpecError(field="learning_rate", reason=f"must be a number, got {rate!r}")
        try:
            # One float representation whatever the input (1 and 1.0 are the same rate).
            rate = float(rate)
        except OverflowError:  # an integer past float's range
            rate = math.inf
        if not (math.isfinite(rate) and 0.0 < rate <= MAX_LEARNING_RATE):
            shown = f"{rate}" if math.isfinite(rate) else "a number out of range"
            raise SpecError(
                field="learning_rate",
                reason=f"must be greater than 0 and at most {MAX_LEARNING_RATE}, got {shown}",
            )
        object.__setattr__(self, "learning_rate", rate)
        if not isinstance(self.aggregation, AggregationSpec):
            raise SpecError(field="aggregation", reason="must be an AggregationSpec")
        if self.validation is not None:
            if not (isinstance(self.validation, str) and _CONTENT_ID.fullmatch(self.validation)):
                raise SpecError(
                    field="validation",
                    reason="must be a validation set's content ID, 0x and 64 hex digits, "
                    f"got {self.validation!r}",
                )
            object.__setattr__(self, "validation", self.validation.lower())

    @classmethod
    def from_dict(cls, data: Any) -> TaskSpec:
        """A spec from its JSON object; raises SpecError naming the first bad field."""
        if not isinstance(data, Mapping):
            raise SpecError(field="$", reason=f"must be a JSON object, got {type(data).__name__}")
        for name in data:
            if name not in cls.__dataclass_fields__:
                raise SpecError(field=str(name), reason="unknown field")
        for name in REQUIRED:
            if name not in data:
                raise SpecError(field=name, reason="is required")
        values = dict(data)
        if "aggregation" in values:
            values["aggregation"] = AggregationSpec.from_value(values["aggregation"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> TaskSpec:
        """A spec from JSON text; raises SpecError for bad JSON or a bad field."""

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    raise SpecError(field=key, reason="appears more than once")
                seen[key] = value
            return seen

        def no_constant(name: str) -> Any:
            raise SpecError(field="$", reason=f"not valid JSON: {name} is not a number")

        try:
            data = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
        except (ValueError, TypeError) as exc:
            raise SpecError(field="$", reason=f"not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def as_dict(self) -> dict[str, Any]:
        """The spec as a JSON object, every field present."""
        data = {
            "version": self.version,
            "model": self.model,
            "dataset": self.dataset,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "aggregation": self.aggregation.as_dict(),
            "seed": self.seed,
        }
        # Absent rather than null when unset, so specs written before it keep their hashes.
        if self.validation is not None:
            data["validation"] = self.validation
        return data

    def canonical_bytes(self) -> bytes:
        """The RFC 8785 (JCS) encoding of ``as_dict()``: sorted keys, no spaces, shortest floats."""
        return rfc8785.dumps(self.as_dict())

    def as_json(self) -> str:
        """The canonical JSON text, the one ``hash`` is taken over."""
        return self.canonical_bytes().decode("utf-8")

    @cached_property
    def hash(self) -> bytes:
        """keccak256 of the canonical encoding: the spec's bytes32 on chain."""
        return keccak(self.canonical_bytes())

    @property
    def hash_hex(self) -> str:
        return "0x" + self.hash.hex()

    @property
    def schema(self) -> Schema:
        return get_schema(key=self.dataset)

    @property
    def model_entry(self) -> ModelEntry:
        return get_model(key=self.model)

    def strategy(self) -> Strategy:
        """The aggregation strategy object the spec names."""
        return self.aggregation.build()
