"""The fraud proof on the real chain: a correct aggregate survives every challenge, a wrong
value or an update the aggregator had to leave out is always shown, and a challenge that
proves nothing reverts with its named error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3 import Web3

from chain.fraud import (
    BadChunkError,
    BadProofError,
    ChunkOutOfRangeError,
    FlexVerifier,
    IdMismatchError,
    OffsetOutOfRangeError,
    Verdict,
)
from dataplane.audit import IncludedBlob, challenge, context_of, first_difference, recompute
from tests.blobs import CONTRACT, blob_of
from tests.chain.conftest import Accounts
from training.serialize import Kind, decode, id_hex

TASK, ROUND, PER_CHUNK = 7, 2, 4
TRAINERS = ["0x" + f"{k + 1:02x}" * 20 for k in range(8)]
INT32 = st.integers(-(2**31), 2**31 - 1)
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def verifier(w3: Web3, accounts: Accounts) -> FlexVerifier:
    return FlexVerifier.deploy(w3=w3, sender=accounts.owner)


def update(values: list[np.ndarray], k: int, weight: int, **header: object) -> IncludedBlob:
    fields = {"task_id": TASK, "round_number": ROUND, "trainer": TRAINERS[k]} | header
    blob = decode(blob_of(values, chunk_values=PER_CHUNK, **fields))
    return IncludedBlob(blob=blob, trainer=TRAINERS[k], weight=weight)


def global_of(values: list[np.ndarray], **header: object):
    fields = {"kind": Kind.GLOBAL, "task_id": TASK, "round_number": ROUND + 1} | header
    return decode(blob_of(values, chunk_values=PER_CHUNK, **fields))


def prove(verifier: FlexVerifier, published, included, index: int, strategy: str = "fedavg"):
    context = context_of(published, strategy=strategy)
    return verifier.check(
        challenge(context=context, published=published, included=included, index=index)
    )


@st.composite
def rounds(draw):
    """A round: a strategy, 1..6 updates of one random layout, their weights, a coordinate."""
    strategy = draw(st.sampled_from(["fedavg", "fedmedian", "fedtrimmedavg"]))
    shapes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    count = draw(st.integers(1, 6))
    included = []
    for k in range(count):
        values = [np.array(draw(st.lists(INT32, min_size=n, max_size=n)), np.int32) for n in shapes]
        included.append(update(values, k, draw(st.integers(1, 2**24))))
    index = draw(st.integers(0, sum(shapes) - 1))
    return strategy, included, index


@SETTINGS
@given(case=rounds())
def test_a_correct_aggregate_survives_a_challenge_of_any_coordinate(verifier, case):
    strategy, included, index = case
    published = global_of(recompute(included, strategy=strategy))
    finding = prove(verifier, published, included, index, strategy)
    assert finding.verdict == Verdict.CORRECT
    assert (
        finding.claimed
        == finding.expected
        == np.concatenate([np.ravel(v) for v in published.values])[index]
    )


@SETTINGS
@given(case=rounds(), delta=st.integers(-(2**31), 2**31 - 1).filter(bool))
def test_a_wrong_value_is_always_shown(verifier, case, delta):
    strategy, included, index = case
    honest = recompute(included, strategy=strategy)
    flat = np.concatenate([np.ravel(v) for v in honest]).astype(np.int64)
    flat[index] = (flat[index] + delta + 2**31) % 2**32 - 2**31  # any other int32
    sizes = np.cumsum([v.size for v in honest])[:-1]
    parts = zip(np.split(flat, sizes), honest, strict=True)
    lied = [p.astype(np.int32).reshape(v.shape) for p, v in parts]
    published = global_of(lied)
    assert first_difference(published.values, honest) == index
    finding = prove(verifier, published, included, index, strategy)
    assert finding.verdict == Verdict.WRONG_VALUE
    assert (finding.claimed, finding.expected) == (
        flat[index],
        np.ravel(np.concatenate([np.ravel(v) for v in honest]))[index],
    )


def _round(weights=(3, 5, 2)) -> list[IncludedBlob]:
    rng = np.random.default_rng(1)
    return [
        update([rng.integers(-(2**20), 2**20, size=(3, 3), dtype=np.int32)], k, w)
        for k, w in enumerate(weights)
    ]


@pytest.mark.parametrize(
    "header",
    [
        {"trainer": TRAINERS[0]},  # a copy of trainer 0's update handed in by trainer 1
        {"round_number": ROUND - 1},  # a stale update of its own
        {"task_id": TASK + 1},  # an update made for another task
        {"contract": "0x" + "d0" * 20},  # ... or another deployment
        {"kind": Kind.GLOBAL, "trainer": "0x" + "00" * 20},  # a global model as an update
    ],
)
def test_an_update_the_aggregator_had_to_leave_out_is_shown(verifier, header):
    included = _round()
    values = [np.array(included[1].blob.values[0])]
    bad = update(values, 1, 5, **header)
    included[1] = dataclasses.replace(bad, trainer=TRAINERS[1])
    published = global_of(recompute(included, strategy="fedavg"))
    finding = prove(verifier, published, included, 4)
    assert (finding.verdict, finding.which) == (Verdict.INVALID_UPDATE, 1)


def test_a_weight_outside_the_recorded_range_is_shown(verifier):
    included = _round()
    published = global_of(recompute(included, strategy="fedavg"))
    included[2] = dataclasses.replace(included[2], weight=2**24 + 1)
    finding = prove(verifier, published, included, 0)
    assert (finding.verdict, finding.which) == (Verdict.INVALID_UPDATE, 2)


@pytest.mark.parametrize("header", [{"task_id": TASK + 1}, {"round_number": ROUND}])
def test_a_global_model_of_another_task_or_round_is_shown(verifier, header):
    included = _round()
    published = global_of(recompute(included, strategy="fedavg"), **header)
    context = context_of(global_of(published.values), strategy="fedavg")
    finding = verifier.check(
        challenge(context=context, published=published, included=included, index=0)
    )
    assert finding.verdict == Verdict.INVALID_GLOBAL


def _honest_challenge():
    included = _round()
    published = global_of(recompute(included, strategy="fedavg"))
    return challenge(
        context=context_of(published, strategy="fedavg"),
        published=published,
        included=included,
        index=5,
    ), included


def test_a_bad_proof_reverts_with_its_name(verifier):
    sent, _ = _honest_challenge()
    opened = sent.updates[1]
    forged = dataclasses.replace(opened, siblings=(bytes(32), *opened.siblings[1:]))
    with pytest.raises(BadProofError) as exc:
        verifier.check(
            dataclasses.replace(sent, updates=(sent.updates[0], forged, sent.updates[2]))
        )
    assert exc.value.which == 2


def test_an_opening_of_another_model_reverts_with_its_name(verifier):
    sent, included = _honest_challenge()
    with pytest.raises(IdMismatchError) as exc:
        verifier.check(dataclasses.replace(sent, updates=(sent.updates[1], *sent.updates[1:])))
    assert exc.value.which == 1
    assert exc.value.expected == id_hex(included[0].blob.model_id)


def test_changed_values_revert_with_their_name(verifier):
    sent, _ = _honest_challenge()
    opened = sent.global_opening
    other = bytes([opened.values[0] ^ 1]) + opened.values[1:]
    with pytest.raises(BadProofError) as exc:
        verifier.check(
            dataclasses.replace(sent, global_opening=dataclasses.replace(opened, values=other))
        )
    assert exc.value.which == 0
    with pytest.raises(BadChunkError):
        verifier.check(
            dataclasses.replace(
                sent, global_opening=dataclasses.replace(opened, values=opened.values[:-4])
            )
        )


def test_a_coordinate_outside_the_model_reverts_with_its_name(verifier):
    sent, _ = _honest_challenge()  # 9 values in chunks of 4: the last chunk holds one
    with pytest.raises(ChunkOutOfRangeError) as exc:
        verifier.check(dataclasses.replace(sent, chunk=3))
    assert (exc.value.chunk, exc.value.chunks) == (3, 3)
    with pytest.raises(OffsetOutOfRangeError) as exc:
        verifier.check(dataclasses.replace(sent, chunk=2, offset=1))
    assert (exc.value.offset, exc.value.values) == (1, 1)


def test_the_context_comes_from_the_global_models_header():
    published = global_of([np.zeros(3, np.int32)])
    context = context_of(published, strategy="fedtrimmedavg")
    assert (context.task_id, context.round_number) == (TASK, ROUND)
    assert context.market.lower() == CONTRACT
    assert context.trim_per_mille == 200  # the strategy's default, as the spec fills it in
