"""The node's Celery tasks: thin, addressed to a node by address, safe to run twice."""

from __future__ import annotations

import logging

from celery import current_app, shared_task
from kombu.exceptions import OperationalError

from chain.errors import ChainUnavailableError
from core.queues import PLATFORM_QUEUE
from dataplane.protocol import FetchFailedError, PolicyUnavailableError
from worker import aggregator, node, trainer

log = logging.getLogger(__name__)

# Worth another try later: the chain node or a peer's data plane was briefly unreachable.
TRANSIENT = (ChainUnavailableError, FetchFailedError, PolicyUnavailableError)
RETRY = {
    "acks_late": True,
    "autoretry_for": TRANSIENT,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "max_retries": 6,
}
# The platform's tasks that store what a round measured. Addressed by name: the worker
# never imports the marketplace.
ROUND_METRICS_TASK = "marketplace.record_round_metrics"
UPDATE_METRICS_TASK = "marketplace.record_update_metrics"


def _report(name: str, kwargs: dict) -> None:
    """Best effort: what is on chain stands whether or not the report arrives."""
    try:
        current_app.send_task(name, kwargs=kwargs, queue=PLATFORM_QUEUE)
    except (OperationalError, OSError) as exc:
        log.warning("task %s: %s not reported: %s", kwargs["task_id"], name, exc)


def report_round(published: dict | None) -> None:
    """Tell the platform what the global model just published measured (accuracy, loss,
    updates, gas)."""
    if not published:
        return
    _report(
        ROUND_METRICS_TASK,
        {
            "task_id": published["task_id"],
            "round_number": published["round"],
            "model_id": published["model_id"],
            "tx_hash": published["tx_hash"],
            "gas_used": published.get("gas_used"),
            "accuracy": published.get("accuracy"),
            "loss": published.get("loss"),
            "updates": published.get("updates"),
            "aggregate_s": published.get("aggregate_s"),
        },
    )


def report_update(trained: dict | None) -> None:
    """Tell the platform what a trainer measured on its own data for its update."""
    if not trained or "metrics" not in trained:
        return
    _report(
        UPDATE_METRICS_TASK,
        {
            "task_id": trained["task_id"],
            "round_number": trained["round"],
            "trainer": trained["device"],
            "model_id": trained["update_id"],
            "tx_hash": trained["tx_hash"],
            "num_examples": trained["num_examples"],
            "loss": trained["metrics"].get("loss"),
            "accuracy": trained["metrics"].get("accuracy"),
            "train_s": trained["train_s"],
        },
    )


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
    published = aggregator.publish_initial(node.get(node_address), task_id=task_id, spec=spec)
    report_round(published)
    return published


@shared_task(name="worker.train_round", soft_time_limit=1800, time_limit=1860, **RETRY)
def train_round(
    *,
    node_address: str,
    task_id: int,
    round_number: int,
    spec: dict,
    aggregator_url: str,
    aggregator_cert_sha256: str = "",
) -> dict | None:
    trained = trainer.train(
        node.get(node_address),
        task_id=task_id,
        round_number=round_number,
        spec=spec,
        aggregator_url=aggregator_url,
        aggregator_cert=aggregator_cert_sha256,
    )
    report_update(trained)
    return trained


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
    trainer_certs_sha256: dict[str, str] | None = None,
) -> dict | None:
    """Aggregates once every trainer submitted or the submission window closed.

    Until then it re-queues itself for when the window closes (or sooner, to catch the
    last submission), so it may be sent as soon as the round opens.
    """
    try:
        published = aggregator.aggregate(
            node.get(node_address),
            task_id=task_id,
            round_number=round_number,
            spec=spec,
            trainer_urls=trainer_urls,
            trainer_certs=trainer_certs_sha256 or {},
        )
    except aggregator.RoundNotReadyError as exc:
        # Look again soon: the last update usually lands well before the deadline. The
        # deadline bounds the retries (past it the round is ready), not a count.
        countdown = min(max(exc.seconds_left, 0.05), 0.1)
        raise self.retry(countdown=countdown, max_retries=self.request.retries + 1) from exc
    report_round(published)
    return published
