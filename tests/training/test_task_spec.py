"""TaskSpec: validation naming the bad field, canonical JSON and a hash stable across machines."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from training.aggregation import FedTrimmedAvg
from training.errors import SpecError
from training.spec import AggregationSpec, TaskSpec

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"model": "digits-mlp", "dataset": "digits-8x8", "rounds": 3}
# keccak256 of the canonical JSON of MINIMAL with defaults filled in. Specs already on chain
# carry this hash: if it changes, the canonical form changed and old tasks stop verifying.
MINIMAL_HASH = "0x8051718ab67aa9923c3c43ebcebbb3b573a94a1abe7c375ceed6f68885548216"


def test_minimal_spec_fills_defaults():
    spec = TaskSpec.from_dict(MINIMAL)
    assert spec.as_dict() == {
        "version": 1,
        "model": "digits-mlp",
        "dataset": "digits-8x8",
        "rounds": 3,
        "local_epochs": 1,
        "batch_size": 32,
        "learning_rate": 0.05,
        "aggregation": {"strategy": "fedavg"},
        "seed": 0,
    }


def test_canonical_json_is_sorted_and_compact():
    text = TaskSpec.from_dict(MINIMAL).as_json()
    assert text == (
        '{"aggregation":{"strategy":"fedavg"},"batch_size":32,"dataset":"digits-8x8",'
        '"learning_rate":0.05,"local_epochs":1,"model":"digits-mlp","rounds":3,"seed":0,'
        '"version":1}'
    )


def test_hash_is_pinned():
    spec = TaskSpec.from_dict(MINIMAL)
    assert spec.hash_hex == MINIMAL_HASH
    assert len(spec.hash) == 32


def test_hash_same_in_fresh_process():
    code = (
        "from training.spec import TaskSpec;"
        f"print(TaskSpec.from_json({json.dumps(json.dumps(MINIMAL))}).hash_hex)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == MINIMAL_HASH


def test_hash_ignores_key_order_whitespace_and_explicit_defaults():
    spelled_out = json.dumps(
        {
            "seed": 0,
            "aggregation": {"strategy": "fedavg"},
            "learning_rate": 0.05,
            "rounds": 3,
            "dataset": "digits-8x8",
            "model": "digits-mlp",
            "version": 1,
        },
        indent=4,
    )
    assert TaskSpec.from_json(spelled_out).hash == TaskSpec.from_dict(MINIMAL).hash


def test_hash_changes_with_any_field():
    base = TaskSpec.from_dict(MINIMAL)
    for change in (
        {"rounds": 4},
        {"seed": 1},
        {"learning_rate": 0.051},
        {"model": "digits-cnn"},
        {"aggregation": "fedmedian"},
    ):
        assert TaskSpec.from_dict({**MINIMAL, **change}).hash != base.hash, change


def test_round_trip_through_json():
    spec = TaskSpec.from_dict(
        {**MINIMAL, "aggregation": {"strategy": "fedtrimmedavg", "trim_per_mille": 250}}
    )
    again = TaskSpec.from_json(spec.as_json())
    assert again == spec
    assert again.hash == spec.hash


def test_integer_learning_rate_is_the_same_spec_as_float():
    assert (
        TaskSpec.from_dict({**MINIMAL, "learning_rate": 1}).hash
        == TaskSpec.from_dict({**MINIMAL, "learning_rate": 1.0}).hash
    )


def test_aggregation_defaults_are_explicit_in_the_canonical_form():
    spec = TaskSpec.from_dict({**MINIMAL, "aggregation": "fedtrimmedavg"})
    assert spec.as_dict()["aggregation"] == {"strategy": "fedtrimmedavg", "trim_per_mille": 200}
    strategy = spec.strategy()
    assert isinstance(strategy, FedTrimmedAvg)
    assert strategy.trim_per_mille == 200


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"model": "resnet-50"}, "model", "unknown model"),
        ({"model": 3}, "model", "must be a string"),
        ({"dataset": "mnist"}, "dataset", "unknown dataset"),
        ({"rounds": 0}, "rounds", "between 1 and 1000"),
        ({"rounds": 2.0}, "rounds", "must be an integer"),
        ({"rounds": True}, "rounds", "must be an integer"),
        ({"rounds": "3"}, "rounds", "must be an integer"),
        ({"local_epochs": 101}, "local_epochs", "between 1 and 100"),
        ({"batch_size": 0}, "batch_size", "between 1 and 65536"),
        ({"learning_rate": 0}, "learning_rate", "greater than 0"),
        ({"learning_rate": -0.1}, "learning_rate", "greater than 0"),
        ({"learning_rate": 11}, "learning_rate", "at most 10"),
        ({"learning_rate": "fast"}, "learning_rate", "must be a number"),
        ({"seed": -1}, "seed", "between 0 and"),
        ({"seed": 2**32}, "seed", "between 0 and"),
        ({"version": 2}, "version", "unsupported spec version"),
        ({"aggregation": "krum"}, "aggregation.strategy", "unknown strategy"),
        ({"aggregation": 5}, "aggregation", "strategy key"),
        ({"aggregation": {"strategy": ["fedavg"]}}, "aggregation.strategy", "unknown strategy"),
        ({"aggregation": {"trim_per_mille": 100}}, "aggregation.strategy", "unknown strategy"),
        (
            {"aggregation": {"strategy": "fedtrimmedavg", "trim_per_mille": 500}},
            "aggregation.trim_per_mille",
            "0..499",
        ),
        (
            {"aggregation": {"strategy": "fedtrimmedavg", "trim_ratio": 0.2}},
            "aggregation.trim_ratio",
            "trim_per_mille",
        ),
        (
            {"aggregation": {"strategy": "fedtrimmedavg", "trim": 0.1}},
            "aggregation.trim",
            "takes no",
        ),
        ({"aggregation": {"strategy": "fedavg", "mu": 0.1}}, "aggregation.mu", "takes no"),
        ({"epochs": 3}, "epochs", "unknown field"),
    ],
)
def test_bad_field_is_named(change, field, words):
    with pytest.raises(SpecError) as exc:
        TaskSpec.from_dict({**MINIMAL, **change})
    assert exc.value.field == field
    assert words in exc.value.reason
    assert field in str(exc.value)
    assert exc.value.code == "spec_invalid"


@pytest.mark.parametrize("missing", ["model", "dataset", "rounds"])
def test_required_field_missing(missing):
    data = {k: v for k, v in MINIMAL.items() if k != missing}
    with pytest.raises(SpecError) as exc:
        TaskSpec.from_dict(data)
    assert (exc.value.field, exc.value.reason) == (missing, "is required")


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"model": "digits-mlp", "dataset": "digits-8x8", "rounds": NaN}',
        '{"model": "digits-mlp", "model": "digits-cnn", "dataset": "digits-8x8", "rounds": 1}',
    ],
)
def test_bad_json_is_refused(text):
    with pytest.raises(SpecError):
        TaskSpec.from_json(text)


def test_duplicate_key_is_named():
    with pytest.raises(SpecError) as exc:
        TaskSpec.from_json('{"model": "digits-mlp", "model": "digits-cnn"}')
    assert exc.value.field == "model"


def test_direct_construction_is_validated_too():
    with pytest.raises(SpecError) as exc:
        TaskSpec(model="digits-mlp", dataset="digits-8x8", rounds=1, batch_size=-5)
    assert exc.value.field == "batch_size"


def test_aggregation_spec_built_directly_is_normalised_too():
    assert AggregationSpec(strategy="fedtrimmedavg").as_dict() == {
        "strategy": "fedtrimmedavg",
        "trim_per_mille": 200,
    }
    with pytest.raises(SpecError) as exc:
        AggregationSpec(strategy="fedavg", params=(("trim_per_mille", 100),))
    assert exc.value.field == "aggregation.trim_per_mille"


def test_aggregation_spec_from_value_normalises_params():
    assert AggregationSpec.from_value({"strategy": "fedtrimmedavg", "trim_per_mille": 0}) == (
        AggregationSpec(strategy="fedtrimmedavg", params=(("trim_per_mille", 0),))
    )


def test_spec_error_survives_pickling():
    with pytest.raises(SpecError) as exc:
        TaskSpec.from_dict({**MINIMAL, "rounds": 0})
    again = pickle.loads(pickle.dumps(exc.value))
    assert type(again) is SpecError
    assert again.fields == exc.value.fields
    assert str(again) == str(exc.value)
    assert again.as_dict()["code"] == "spec_invalid"
