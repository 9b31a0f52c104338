"""Round coordination: who publishes and submits what, in which order, until when."""

from __future__ import annotations

import pytest

from chain.client import FlexMarket
from chain.errors import (
    AlreadySubmittedError,
    DeadlinePassedError,
    DeviceRevokedError,
    EmptyAggregationError,
    InvalidTaskStateError,
    NotAggregatorError,
    NotSelectedTrainerError,
    RoundNotOpenError,
    ScoresLengthMismatchError,
    SubmissionClosedError,
    UnsubmittedUpdatesError,
    WrongRoundError,
    ZeroModelIdError,
    ZeroScoresError,
)
from chain.events import GlobalModelPublished, TaskState, UpdateSubmitted
from chain.selection import mask_of
from tests.chain.conftest import ROUND_TIMEOUT, Accounts, Clock, Flow, Running, model_id

ZERO_ID = "0x" + "00" * 32


def publish(market: FlexMarket, running: Running, round_number: int, mask=0, scores=(), **kw):
    return market.publish_global_model(
        sender=kw.get("sender", running.aggregator),
        task_id=running.task_id,
        round_number=round_number,
        model_id=kw.get("model", model_id(f"global-{round_number}")),
        aggregated_mask=mask,
        scores=scores,
    )


def submit(market: FlexMarket, running: Running, position: int, round_number: int, **kw):
    return market.submit_update(
        sender=kw.get("sender", running.trainers[position] if position >= 0 else None),
        task_id=running.task_id,
        round_number=round_number,
        model_id=kw.get("model", model_id(f"update-{round_number}-{position}")),
    )


@pytest.fixture
def selected(flow: Flow) -> Running:
    """Selected, round 0 not yet published."""
    return flow.start(publish_round_zero=False)


# ---- publishing


def test_publish_round_zero(market: FlexMarket, selected: Running):
    result = publish(market, selected, 0, model=model_id("init"))
    event = result.first(GlobalModelPublished)
    assert (event.task_id, event.round, event.model_id) == (selected.task_id, 0, model_id("init"))
    assert (event.aggregated_mask, event.scores) == (0, ())
    assert market.global_model(task_id=selected.task_id, round_number=0) == model_id("init")
    assert market.global_model(task_id=selected.task_id, round_number=1) is None
    info = market.task(task_id=selected.task_id)
    assert info.published_rounds == 1
    assert info.current_round == 0
    assert info.submission_deadline == info.phase_start + ROUND_TIMEOUT
    assert info.publish_deadline == info.phase_start + 2 * ROUND_TIMEOUT


def test_publish_rejects_non_aggregator(market: FlexMarket, accounts: Accounts, selected: Running):
    for sender in (accounts.buyer, selected.trainers[0], accounts.aggregators[1]):
        with pytest.raises(NotAggregatorError) as exc:
            publish(market, selected, 0, sender=sender)
        assert (exc.value.task_id, exc.value.account) == (selected.task_id, sender.address)


def test_publish_rejects_revoked_aggregator(
    market: FlexMarket, accounts: Accounts, selected: Running
):
    market.revoke_device(sender=accounts.owner, device=selected.aggregator.address)
    with pytest.raises(DeviceRevokedError) as exc:
        publish(market, selected, 0)
    assert exc.value.device == selected.aggregator.address


def test_publish_out_of_order(market: FlexMarket, selected: Running):
    with pytest.raises(WrongRoundError) as exc:
        publish(market, selected, 1, mask=1)
    assert (exc.value.expected, exc.value.got) == (0, 1)
    publish(market, selected, 0)
    with pytest.raises(WrongRoundError) as exc:
        publish(market, selected, 0)
    assert (exc.value.expected, exc.value.got) == (1, 0)
    with pytest.raises(WrongRoundError) as exc:
        publish(market, selected, 2, mask=1)
    assert (exc.value.expected, exc.value.got) == (1, 2)


def test_publish_rejects_zero_model_id(market: FlexMarket, selected: Running):
    with pytest.raises(ZeroModelIdError):
        publish(market, selected, 0, model=ZERO_ID)


def test_round_zero_aggregates_nothing(market: FlexMarket, selected: Running):
    with pytest.raises(UnsubmittedUpdatesError) as exc:
        publish(market, selected, 0, mask=0b10)
    assert (exc.value.task_id, exc.value.round, exc.value.missing) == (selected.task_id, 0, 0b10)
    with pytest.raises(ScoresLengthMismatchError) as exc:
        publish(market, selected, 0, scores=[1])
    assert (exc.value.expected, exc.value.got) == (0, 1)


def test_publish_before_selection(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    with pytest.raises(InvalidTaskStateError) as exc:
        market.publish_global_model(
            sender=accounts.aggregators[0],
            task_id=task_id,
            round_number=0,
            model_id=model_id("x"),
        )
    assert exc.value.state == TaskState.BIDDING


def test_publish_with_aggregation_and_scores(market: FlexMarket, running: Running, flow: Flow):
    submit(market, running, 0, 0)
    submit(market, running, 2, 0)
    flow.close_submissions(running)
    result = publish(market, running, 1, mask=0b101, scores=[3, 65535])
    event = result.first(GlobalModelPublished)
    assert (event.round, event.aggregated_mask, event.scores) == (1, 0b101, (3, 65535))
    info = market.round_info(task_id=running.task_id, round_number=0)
    assert (info.submitted_mask, info.aggregated_mask, info.scores) == (0b101, 0b101, (3, 65535))
    assert info.global_model == running.published[0]


def test_publish_without_scores_reads_back_unscored(
    market: FlexMarket, running: Running, flow: Flow
):
    submit(market, running, 1, 0)
    flow.close_submissions(running)
    publish(market, running, 1, mask=0b10)
    assert market.round_info(task_id=running.task_id, round_number=0).scores == ()


def test_publish_rejects_empty_aggregation(market: FlexMarket, running: Running):
    submit(market, running, 0, 0)
    with pytest.raises(EmptyAggregationError) as exc:
        publish(market, running, 1, mask=0)
    assert (exc.value.task_id, exc.value.round) == (running.task_id, 1)


def test_publish_rejects_mask_naming_a_trainer_that_did_not_submit(
    market: FlexMarket, running: Running, flow: Flow
):
    submit(market, running, 0, 0)
    flow.close_submissions(running)
    with pytest.raises(UnsubmittedUpdatesError) as exc:
        publish(market, running, 1, mask=0b011)
    assert (exc.value.round, exc.value.missing) == (1, 0b010)
    # A bit beyond the selected trainers is just as unsubmitted.
    with pytest.raises(UnsubmittedUpdatesError) as exc:
        publish(market, running, 1, mask=0b1001)
    assert exc.value.missing == 0b1000


@pytest.mark.parametrize("scores", [[1], [1, 2, 3]])
def test_publish_rejects_wrong_number_of_scores(
    market: FlexMarket, running: Running, scores, flow: Flow
):
    submit(market, running, 0, 0)
    submit(market, running, 1, 0)
    flow.close_submissions(running)
    with pytest.raises(ScoresLengthMismatchError) as exc:
        publish(market, running, 1, mask=0b11, scores=scores)
    assert (exc.value.expected, exc.value.got) == (2, len(scores))


def test_publish_rejects_all_zero_scores(market: FlexMarket, running: Running, flow: Flow):
    submit(market, running, 0, 0)
    flow.close_submissions(running)
    with pytest.raises(ZeroScoresError):
        publish(market, running, 1, mask=0b1, scores=[0])


def test_publishing_the_final_round_ends_training(market: FlexMarket, flow: Flow, running: Running):
    flow.run_round(running, 0)
    flow.run_round(running, 1)
    info = market.task(task_id=running.task_id)
    assert info.state == TaskState.TRAINED
    assert info.published_rounds == running.rounds + 1
    assert market.global_model(task_id=running.task_id, round_number=2) == running.published[2]
    with pytest.raises(InvalidTaskStateError) as exc:
        publish(market, running, 3, mask=1)
    assert exc.value.state == TaskState.TRAINED
    with pytest.raises(InvalidTaskStateError):
        submit(market, running, 0, 2)


def test_publish_round_zero_deadline(market: FlexMarket, clock: Clock, selected: Running):
    deadline = market.task(task_id=selected.task_id).publish_deadline
    assert deadline == market.task(task_id=selected.task_id).phase_start + ROUND_TIMEOUT
    clock.next_block_at(deadline + 1)
    with pytest.raises(DeadlinePassedError) as exc:
        publish(market, selected, 0)
    assert (exc.value.task_id, exc.value.deadline) == (selected.task_id, deadline)


def test_publish_deadline_is_two_timeouts(market: FlexMarket, clock: Clock, running: Running):
    submit(market, running, 0, 0)
    deadline = market.task(task_id=running.task_id).publish_deadline
    clock.next_block_at(deadline)
    publish(market, running, 1, mask=1)  # exactly at the deadline is still in time
    submit(market, running, 0, 1)
    deadline = market.task(task_id=running.task_id).publish_deadline
    clock.next_block_at(deadline + 1)
    with pytest.raises(DeadlinePassedError) as exc:
        publish(market, running, 2, mask=1)
    assert exc.value.deadline == deadline


# ---- submitting


def test_submit_update(market: FlexMarket, running: Running):
    trainer = running.trainers[1]
    result = submit(market, running, 1, 0, model=model_id("u"))
    event = result.first(UpdateSubmitted)
    assert (event.task_id, event.round, event.trainer, event.position, event.model_id) == (
        running.task_id,
        0,
        trainer.address,
        1,
        model_id("u"),
    )
    assert market.update_of(
        task_id=running.task_id, round_number=0, trainer=trainer.address
    ) == model_id("u")
    assert (
        market.update_of(
            task_id=running.task_id, round_number=0, trainer=running.trainers[0].address
        )
        is None
    )
    assert market.round_info(task_id=running.task_id, round_number=0).submitted_mask == 0b10


def test_a_rounds_updates_are_read_by_trainer_and_no_other_rounds_or_tasks(
    market: FlexMarket, flow: Flow
):
    # Two tasks side by side, each two rounds in: a watcher of one round reads that round's
    # updates alone, by their authors.
    first = flow.start()
    flow.run_round(first, 0)
    flow.submit(first, 1, [0, 2])
    other = flow.start()
    flow.run_round(other, 0)
    flow.submit(other, 1, [0, 1, 2])
    trainers = [t.address for t in first.trainers]

    round_one = market.updates_of(task_id=first.task_id, round_number=1)
    assert round_one == {trainers[p]: model_id(f"{first.task_id}-update-1-{p}") for p in (0, 2)}
    assert market.updates_of(task_id=first.task_id, round_number=0) == {
        t: model_id(f"{first.task_id}-update-0-{p}") for p, t in enumerate(trainers)
    }
    assert market.updates_of(task_id=first.task_id, round_number=1, trainer=trainers[2]) == {
        trainers[2]: round_one[trainers[2]]
    }
    assert market.updates_of(task_id=first.task_id, round_number=1, trainer=trainers[1]) == {}
    assert market.updates_of(task_id=first.task_id, round_number=2) == {}  # not open
    # A reader that has just read where the round opened reads the same without re-reading.
    info = market.round_info(task_id=first.task_id, round_number=1)
    opened = market.model_origin(model_id=info.global_model)
    assert market.updates_of(task_id=first.task_id, round_number=1, opened=opened) == round_one


def test_submit_rejects_wrong_round(market: FlexMarket, running: Running):
    with pytest.raises(WrongRoundError) as exc:
        submit(market, running, 0, 1)
    assert (exc.value.expected, exc.value.got) == (0, 1)


def test_submit_rejects_a_past_round(market: FlexMarket, running: Running, flow: Flow):
    submit(market, running, 0, 0)
    flow.close_submissions(running)
    publish(market, running, 1, mask=1)
    with pytest.raises(WrongRoundError) as exc:
        submit(market, running, 1, 0)
    assert (exc.value.expected, exc.value.got) == (1, 0)


def test_submit_rejects_double_submit(market: FlexMarket, running: Running):
    submit(market, running, 0, 0)
    with pytest.raises(AlreadySubmittedError) as exc:
        submit(market, running, 0, 0, model=model_id("again"))
    assert (exc.value.task_id, exc.value.round, exc.value.trainer) == (
        running.task_id,
        0,
        running.trainers[0].address,
    )


def test_submit_rejects_not_selected(market: FlexMarket, accounts: Accounts, running: Running):
    for sender in (accounts.trainers[5], running.aggregator, accounts.unregistered):
        with pytest.raises(NotSelectedTrainerError) as exc:
            submit(market, running, -1, 0, sender=sender)
        assert exc.value.account == sender.address


def test_submit_rejects_revoked_trainer(market: FlexMarket, accounts: Accounts, running: Running):
    market.revoke_device(sender=accounts.owner, device=running.trainers[0].address)
    with pytest.raises(DeviceRevokedError):
        submit(market, running, 0, 0)


def test_submit_rejects_zero_model_id(market: FlexMarket, running: Running):
    with pytest.raises(ZeroModelIdError):
        submit(market, running, 0, 0, model=ZERO_ID)


def test_submit_before_round_zero(market: FlexMarket, selected: Running):
    with pytest.raises(RoundNotOpenError) as exc:
        submit(market, selected, 0, 0)
    assert exc.value.task_id == selected.task_id


def test_submit_before_selection(market: FlexMarket, accounts: Accounts, flow: Flow):
    task_id = flow.create_task()
    with pytest.raises(InvalidTaskStateError):
        market.submit_update(
            sender=accounts.trainers[0], task_id=task_id, round_number=0, model_id=model_id("x")
        )


def test_submission_window(market: FlexMarket, clock: Clock, running: Running):
    deadline = market.task(task_id=running.task_id).submission_deadline
    clock.next_block_at(deadline)
    submit(market, running, 0, 0)  # exactly at the deadline is in time
    clock.next_block_at(deadline + 1)
    with pytest.raises(SubmissionClosedError) as exc:
        submit(market, running, 1, 0)
    assert (exc.value.task_id, exc.value.round, exc.value.deadline) == (
        running.task_id,
        0,
        deadline,
    )
    # The aggregator still has its second timeout to publish what did arrive.
    publish(market, running, 1, mask=mask_of([0]))
