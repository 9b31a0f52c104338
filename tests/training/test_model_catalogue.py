"""The model catalogue: structures computed without TF agree with Keras; round-0 weights pinned."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.blobs import blob_of
from training.catalogue import MODELS, SCHEMAS, build_model, get_model, get_schema, initial_weights
from training.errors import SpecError
from training.serialize import Kind, id_hex, model_id
from training.spec import TaskSpec

# Round-0 model of digits-mlp with seed 0. Drawn from raw PCG64 bits, so it must not change
# with numpy or TF upgrades: every node derives this ID on its own.
MLP_SEED0_ID = "0xb8ee7e7900f7fd5659536463ea31dee711df958f906122b7d594d0289def4bc7"


def spec_for(model: str, seed: int = 0) -> TaskSpec:
    return TaskSpec(model=model, dataset=MODELS[model].schema, rounds=1, seed=seed)


def test_catalogue_has_an_mlp_and_a_cnn_for_digits():
    kinds = {entry.kind for entry in MODELS.values() if entry.schema == "digits-8x8"}
    assert kinds == {"mlp", "cnn"}
    assert all(entry.schema in SCHEMAS for entry in MODELS.values())


def test_param_counts_by_hand():
    # MLP: 64*64 + 64 + 64*10 + 10; CNN: 3*3*1*16 + 16 + 3*3*16*32 + 32 + (2*2*32)*10 + 10
    assert get_model(key="digits-mlp").param_count == 4810
    assert get_model(key="digits-cnn").param_count == 160 + 4640 + 1290


@pytest.mark.parametrize("key", sorted(MODELS))
def test_keras_model_matches_the_catalogue(key):
    model = build_model(spec=spec_for(key))
    entry = MODELS[key]
    assert [w.shape for w in model.get_weights()] == entry.weight_shapes()
    assert model.count_params() == entry.param_count
    assert model.input_shape[1:] == SCHEMAS[entry.schema].input_shape
    assert model.output_shape[1:] == (SCHEMAS[entry.schema].num_classes,)
    built = model.get_weights()
    for got, want in zip(built, initial_weights(spec=spec_for(key)), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_initial_weights_are_glorot_uniform_and_zero_biases(key):
    for weight in initial_weights(spec=spec_for(key)):
        assert weight.dtype == np.float32
        if weight.ndim == 1:
            assert not weight.any()
            continue
        receptive = math.prod(weight.shape[:-2])
        limit = math.sqrt(6 / (receptive * (weight.shape[-2] + weight.shape[-1])))
        assert np.abs(weight).max() <= limit
        assert np.abs(weight).max() > 0.9 * limit
        assert abs(float(weight.mean())) < 0.1 * limit


def initial_blob(spec: TaskSpec) -> bytes:
    return blob_of(initial_weights(spec=spec), kind=Kind.GLOBAL, round_number=0)


def test_initial_weights_depend_on_the_seed_only():
    first = initial_blob(spec_for("digits-mlp", seed=0))
    again = initial_blob(spec_for("digits-mlp", seed=0))
    other = initial_blob(spec_for("digits-mlp", seed=1))
    assert first == again
    assert first != other


def test_initial_model_id_is_pinned():
    # The round-0 model of task 1 on chain 31337, contract 0xc0c0...: quantized, then written.
    assert id_hex(model_id(initial_blob(spec_for("digits-mlp")))) == MLP_SEED0_ID


def test_unknown_keys_are_spec_errors():
    with pytest.raises(SpecError) as exc:
        get_model(key="gpt")
    assert exc.value.field == "model"
    with pytest.raises(SpecError) as exc:
        get_schema(key="imagenet")
    assert exc.value.field == "dataset"
