"""The node's Celery tasks: thin, each named after the service it calls, each taking one typed
message (core.messages) that names the node and the deployment; safe to run twice.

A message that does not fit its schema is refused with MessageInvalidError (logged, never
retried); one for another deployment is dropped with a warning. What the node measured goes
back to the platform as a report signed with the node's key, published to the exchange
``reports`` (the only place a device's broker user may publish besides its own queue).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from celery import current_app, shared_task
from kombu.exceptions import OperationalError

from chain.errors import ChainUnavailableError, UnknownTaskError
from core.errors import dropped
from core.messages import (
    BidRequest,
    InitialModelRequest,
    MessageInvalidError,
    NodeWork,
    Report,
    RoundAggregateRequest,
    RoundReport,
    RoundTrainRequest,
    UpdateReport,
)
from core.queues import REPORTS_EXCHANGE, REPORTS_QUEUE
from dataplane.protocol import FetchFailedError, PolicyUnavailableError
from worker import aggregator, node, trainer

log = logging.getLogger(__name__)

W = TypeVar("W", bound=NodeWork)

# Worth another try later: the chain node or a peer's data plane was briefly unreachable.
TRANSIENT = (ChainUnavailableError, FetchFailedError, PolicyUnavailableError)
# How soon an aggregation tries again after such a failure (a restarting node is back soon).
AGGREGATE_TRANSIENT_RETRY_S = 2.0
# How often an aggregation waiting for updates looks again by itself. The node's round
# follower (worker.follow) sends it on as soon as the last update is mined; this look is for
# a round that closes at its deadline short of updates, or events the follower missed.
AGGREGATE_LOOK_S = 5.0
RETRY = {
    "acks_late": True,
    "autoretry_for": TRANSIENT,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "max_retries": 6,
    # Refusals: logged without a traceback, never retried.
    "throws": (MessageInvalidError, node.UnknownNodeError, trainer.SpecMismatchError),
}


# Work for a task this chain does not have: a job left in the broker by an earlier run.
GONE = dropped(UnknownTaskError, log=log, why="a job left by an earlier run of this stack?")


def received(kind: type[W], message: Any) -> tuple[node.Node, W] | None:
    """The node addressed and the message as ``kind``; None when the message belongs to
    another deployment (logged). Raises MessageInvalidError, UnknownNodeError."""
    work = kind.parse(message)
    served = node.get(work.node)
    return (served, work) if work.is_for(served.deployment) else None


def report_send(report: Report, *, signer: node.Node) -> None:
    """Sign ``report`` with the node's key and publish it to the platform. Best effort: what
    is on chain stands whether or not the report arrives."""
    signed = report.sign(signer.account)
    try:
        with current_app.producer_or_acquire() as producer:
            producer.publish(
                signed.dump(),
                exchange=REPORTS_EXCHANGE,
                routing_key=REPORTS_QUEUE,
                serializer="json",
                declare=[],  # the platform declares it; a device may not
                retry=True,
                retry_policy={"max_retries": 3},
            )
    except (OperationalError, OSError) as exc:
        log.warning("task %s: %s not reported: %s", report.task_id, type(report).__name__, exc)


def report_round(served: node.Node, published: dict | None) -> None:
    """Tell the platform what the global model just published measured."""
    if not published:
        return
    report = RoundReport.of(
        served.deployment,
        device=served.address,
        task_id=published["task_id"],
        round_number=published["round"],
        model_id=published["model_id"],
        tx_hash=published["tx_hash"],
        gas_used=published.get("gas_used"),
        accuracy=published.get("accuracy"),
        loss=published.get("loss"),
        updates=published.get("updates"),
        aggregate_s=published.get("aggregate_s"),
        left_out={who: why.split(":", 1)[0] for who, why in published.get("rejected", {}).items()},
    )
    report_send(report, signer=served)


def report_update(served: node.Node, trained: dict | None) -> None:
    """Tell the platform what the node measured on its own data for its update."""
    if not trained or "metrics" not in trained:
        return
    report = UpdateReport.of(
        served.deployment,
        device=served.address,
        task_id=trained["task_id"],
        round_number=trained["round"],
        model_id=trained["update_id"],
        tx_hash=trained["tx_hash"],
        num_examples=trained["num_examples"],
        loss=trained["metrics"].get("loss"),
        accuracy=trained["metrics"].get("accuracy"),
        train_s=trained["train_s"],
    )
    report_send(report, signer=served)


@shared_task(name="worker.bid", soft_time_limit=120, time_limit=150, **RETRY)
@GONE
def bid(message: dict) -> dict | None:
    if (got := received(BidRequest, message)) is None:
        return None
    served, work = got
    decision = trainer.bid(served, task_id=work.task_id, spec=work.spec)
    if decision is None:
        return None
    return {
        "role": decision.role.name.lower(),
        "price_per_round_wei": str(decision.price_per_round_wei),
        "samples": decision.samples,
    }


@shared_task(name="worker.publish_initial", soft_time_limit=300, time_limit=330, **RETRY)
@GONE
def publish_initial(message: dict) -> dict | None:
    if (got := received(InitialModelRequest, message)) is None:
        return None
    served, work = got
    published = aggregator.publish_initial(served, task_id=work.task_id, spec=work.spec)
    report_round(served, published)
    return published


@shared_task(name="worker.train", soft_time_limit=1800, time_limit=1860, **RETRY)
@GONE
def train(message: dict) -> dict | None:
    if (got := received(RoundTrainRequest, message)) is None:
        return None
    served, work = got
    trained = trainer.train(
        served,
        task_id=work.task_id,
        round_number=work.round_number,
        spec=work.spec,
        aggregator_url=work.aggregator_url,
        aggregator_cert=work.aggregator_cert_sha256,
    )
    report_update(served, trained)
    return trained


@shared_task(name="worker.aggregate", bind=True, soft_time_limit=1800, time_limit=1860, **RETRY)
@GONE
def aggregate(self, message: dict) -> dict | None:
    """Aggregates once every trainer submitted or the submission window closed.

    Until then it re-queues itself for when the window closes (or sooner, every
    AGGREGATE_LOOK_S, in case the follower missed the last submission), so it may be sent as
    soon as the round opens.
    """
    if (got := received(RoundAggregateRequest, message)) is None:
        return None
    served, work = got
    try:
        published = aggregator.aggregate(
            served,
            task_id=work.task_id,
            round_number=work.round_number,
            spec=work.spec,
            trainer_urls=work.trainer_urls,
            trainer_certs=work.trainer_certs_sha256,
        )
    except aggregator.RoundNotReadyError as exc:
        # The follower brings the round back the moment its last update is mined; this is
        # the slow look. The deadline bounds the retries (past it the round is ready).
        countdown = min(max(exc.seconds_left, 0.05), AGGREGATE_LOOK_S)
        raise self.retry(countdown=countdown, max_retries=self.request.retries + 1) from exc
    except TRANSIENT as exc:
        # Looking again above uses up Celery's count of retries, so a chain node or a peer
        # lost meanwhile (restarting) is retried on its own terms: until it is back, and the
        # contract refuses a publish that comes too late.
        log.warning("task %s round %s: %s; retrying", work.task_id, work.round_number, exc)
        raise self.retry(
            exc=exc, countdown=AGGREGATE_TRANSIENT_RETRY_S, max_retries=self.request.retries + 1
        ) from exc
    report_round(served, published)
    return published
