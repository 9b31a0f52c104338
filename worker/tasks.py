"""The node's Celery tasks: thin, addressed to a node by address, safe to run twice."""

from __future__ import annotations

from celery import shared_task

from chain.dataplane import FetchFailedError, PolicyUnavailableError
from chain.errors import ChainUnavailableError
from worker import aggregator, node, trainer

# Worth another try later: the chain node or a peer's data plane was briefly unreachable.
TRANSIENT = (ChainUnavailableError, FetchFailedError, PolicyUnavailableError)
RETRY = {
    "acks_late": True,
    "autoretry_for": TRANSIENT,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "max_retries": 6,
}


@shared_task(name="worker.place_bid", soft_time_limit=120, time_limit=150, **RETRY)
def place_bid(*, node_address: str, task_id: int, spec: dict) -> dict | None:
    decision = trainer.bid(node.get(node_address), task_id=task_id, spec=spec)
    return (
        None
        if decision is None
        else {
            "role": decision.role.name.lower(),
            "price_per_round_wei": str(decision.price_per_round_wei),
            "samples": decision.samples,
        }
    )


@shared_task(name="worker.publish_initial_model", soft_time_limit=300, time_limit=330, **RETRY)
def publish_initial_model(*, node_address: str, task_id: int, spec: dict) -> dict | None:
    return aggregator.publish_initial(node.get(node_address), task_id=task_id, spec=spec)


@shared_task(name="worker.train_round", soft_time_limit=1800, time_limit=1860, **RETRY)
def train_round(
    *, node_address: str, task_id: int, round_number: int, spec: dict, aggregator_url: str
) -> dict | None:
    return trainer.train(
        node.get(node_address),
        task_id=task_id,
        round_number=round_number,
        spec=spec,
        aggregator_url=aggregator_url,
    )


@shared_task(
    name="worker.aggregate_round", bind=True, soft_time_limit=1800, time_limit=1860, **RETRY
)
def aggregate_round(
    self,
    *,
    node_address: str,
    task_id: int,
    round_number: int,
    spec: dict,
    trainer_urls: dict[str, str],
) -> dict | None:
    """Aggregates once every trainer submitted or the submission window closed.

    Until then it re-queues itself for when the window closes (or sooner, to catch the
    last submission), so it may be sent as soon as the round opens.
    """
    try:
        return aggregator.aggregate(
            node.get(node_address),
            task_id=task_id,
            round_number=round_number,
            spec=spec,
            trainer_urls=trainer_urls,
        )
    except aggregator.RoundNotReadyError as exc:
        raise self.retry(countdown=min(max(exc.seconds_left, 0.2), 2.0), max_retries=None) from exc
