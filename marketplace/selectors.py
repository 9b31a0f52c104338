"""Marketplace reads: who may see a task, a task as the website shows it, lists of tasks, bids
and devices a page at a time, and sync status."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Exists, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone
from eth_utils import is_hex_address, to_checksum_address
from rest_framework.authtoken.models import Token

from marketplace.models import (
    SETTLED_STATES,
    Bid,
    ChainCursor,
    ChainEventRecord,
    Device,
    ExclusionReason,
    PayoutReason,
    Task,
    TaskOrder,
    TaskState,
    Update,
)

# How much of a task's long lists its page and API show with the task: at the contract's
# limits (1,000 bids, 128 trainers, 100 rounds) it has 1,000 bids, 12,800 updates and scores,
# and as many transactions. Whole, they are read a page at a time (bid_list, update_list,
# transaction_list); every score is in the rounds' scores.
BIDS_SHOWN = 50
UPDATE_ROUNDS_SHOWN = 2
TRANSACTIONS_SHOWN = 50
CONTRIBUTION_ROUNDS_SHOWN = 10

# ---------------------------------------------------------------- who may see a task


def viewer(user) -> tuple[bool, int | None]:
    """(is staff, account pk) of a signed-in account; (False, None) for anyone else, a
    device-signed request included (it has no account, so it owns no task)."""
    if user is None or not user.is_authenticated or getattr(user, "pk", None) is None:
        return False, None
    return bool(user.is_staff), user.pk


def task_visible(*, user) -> QuerySet[Task]:
    """The one rule for who may see a task: the account whose wallet posted it, and staff."""
    staff, pk = viewer(user)
    if staff:
        return Task.objects.all()
    return Task.objects.filter(buyer_id=pk) if pk is not None else Task.objects.none()


def _orders_pending(*, user) -> QuerySet[TaskOrder]:
    """Orders the viewer may see (by the same rule) whose task is not mirrored yet."""
    staff, pk = viewer(user)
    # NOT EXISTS: an anti-join on the task's created_tx index, not a scan of every task.
    orders = TaskOrder.objects.filter(
        ~Exists(Task.objects.filter(created_tx=OuterRef("created_tx")))
    )
    if staff:
        return orders
    return orders.filter(buyer_id=pk) if pk is not None else TaskOrder.objects.none()


# ---------------------------------------------------------------- a task as the website shows it


@dataclass
class TaskView:
    """A task as the website shows it: the chain's mirror row beside the buyer's order.

    Either may be missing: an order whose task sync has not mirrored yet (state "pending",
    terms as ordered), or a task posted on chain outside the website (no title, no spec).
    Chain fields come from the mirror whenever it has the task. ``id`` is the task's id on
    chain, the one id of a task in URLs, the API, the live push and device messages.
    """

    task: Task | None
    order: TaskOrder | None

    def _terms(self, name: str) -> Any:
        return getattr(self.task if self.task is not None else self.order, name)

    def _chain(self, name: str, default: Any = None) -> Any:
        return default if self.task is None else getattr(self.task, name)

    @property
    def id(self) -> int:
        return self._terms("chain_task_id")

    @property
    def title(self) -> str:
        return self.order.title if self.order is not None else ""

    @property
    def spec(self) -> dict | None:
        return self.order.spec if self.order is not None else None

    @property
    def state(self) -> str:
        return self.task.state if self.task is not None else TaskState.PENDING

    @property
    def state_label(self) -> str:
        return TaskState(self.state).label

    @property
    def buyer(self):
        return self.task.buyer if self.task is not None else self.order.buyer

    buyer_address = property(lambda self: self._terms("buyer_address"))
    spec_hash = property(lambda self: self._terms("spec_hash"))
    budget_wei = property(lambda self: self._terms("budget_wei"))
    rounds = property(lambda self: self._terms("rounds"))
    min_trainers = property(lambda self: self._terms("min_trainers"))
    max_trainers = property(lambda self: self._terms("max_trainers"))
    bidding_ends = property(lambda self: self._terms("bidding_ends"))
    round_timeout_s = property(lambda self: self._terms("round_timeout_s"))
    sample_cap = property(lambda self: self._terms("sample_cap"))
    created_tx = property(lambda self: self._terms("created_tx"))
    created_block = property(lambda self: self._chain("created_block"))
    published_rounds = property(lambda self: self._chain("published_rounds", 0))
    aggregator = property(lambda self: self._chain("aggregator", ""))
    aggregator_price_wei = property(lambda self: self._chain("aggregator_price_wei"))
    trainers_paid_wei = property(lambda self: self._chain("trainers_paid_wei"))
    aggregator_paid_wei = property(lambda self: self._chain("aggregator_paid_wei"))
    refunded_wei = property(lambda self: self._chain("refunded_wei"))
    failure_reason = property(lambda self: self._chain("failure_reason", ""))
    dispute_window_s = property(lambda self: self._terms("dispute_window_s"))
    challenged_round = property(lambda self: self._chain("challenged_round"))
    challenged_by = property(lambda self: self._chain("challenged_by", ""))
    challenge_bounty_wei = property(lambda self: self._chain("challenge_bounty_wei"))

    @property
    def created_at(self):
        return (self.order or self.task).created_at

    @property
    def current_round(self) -> int | None:
        """The round trainers work on now, while the task runs."""
        running = self.state == TaskState.RUNNING and self.published_rounds > 0
        return self.published_rounds - 1 if running else None

    def _rows(self, name: str, *order: str) -> list:
        return [] if self.task is None else list(getattr(self.task, name).order_by(*order))

    @functools.cached_property
    def bids(self) -> list:
        """The task's latest BIDS_SHOWN bids, in bid order."""
        if self.task is None:
            return []
        return self.task.bids.order_by("-bid_index")[:BIDS_SHOWN][::-1]

    @functools.cached_property
    def selected(self) -> list:
        return self._rows("selected", "role", "position")

    @functools.cached_property
    def rounds_published(self) -> list:
        if self.task is None:
            return []
        return list(self.task.round_set.select_related("report").order_by("number"))

    @functools.cached_property
    def updates(self) -> list:
        """The updates of the task's last UPDATE_ROUNDS_SHOWN rounds (the round under way and
        the one its global model closed); every update, a page at a time: update_list."""
        if self.task is None:
            return []
        since = max(self.published_rounds - UPDATE_ROUNDS_SHOWN, 0)
        return list(update_list(task=self.task).filter(round_number__gte=since))

    @functools.cached_property
    def update_count(self) -> int:
        return 0 if self.task is None else self.task.updates.count()

    @functools.cached_property
    def payouts(self) -> list:
        return self._rows("payouts", "block_number", "log_index")

    @functools.cached_property
    def transactions(self) -> list[ChainEventRecord]:
        """The contract events of the task's latest TRANSACTIONS_SHOWN transactions, in chain
        order; every event, a page at a time: transaction_list."""
        if self.task is None:
            return []
        events = transaction_list(task=self.task)
        latest = (
            events.order_by("-block_number", "tx_hash")
            .values_list("tx_hash", flat=True)
            .distinct()[:TRANSACTIONS_SHOWN]
        )
        return list(events.filter(tx_hash__in=latest))

    @functools.cached_property
    def transaction_count(self) -> int:
        if self.task is None:
            return 0
        return transaction_list(task=self.task).values("tx_hash").distinct().count()

    @functools.cached_property
    def contributions(self) -> list[dict[str, Any]]:
        """Each selected trainer's score and share in each of the last
        CONTRIBUTION_ROUNDS_SHOWN rounds of ``rounds_published`` that its aggregator closed
        (from the GlobalModelPublished masks and scores), in how many of all the task's closed
        rounds it was aggregated, and the pay credited to it (from PaymentCredited; None
        before settlement). The pay rule itself is the contract's."""
        trainers = [n for n in self.selected if n.position is not None]
        paid: dict[str, int] = {}
        for p in self.payouts:
            if p.reason == PayoutReason.TRAINER_PAY:
                paid[p.account.lower()] = paid.get(p.account.lower(), 0) + p.amount_wei
        settled = self.state in SETTLED_STATES
        closed = [r for r in self.rounds_published if r.number >= 1][-CONTRIBUTION_ROUNDS_SHOWN:]
        masks = (
            [
                int(m)
                for m in self.task.round_set.filter(number__gte=1).values_list(
                    "aggregated_mask", flat=True
                )
            ]
            if trainers
            else []
        )
        # Submitted updates a closed round left out, with the reason stated on chain.
        submitted = {
            (number, position): ExclusionReason(reason or ExclusionReason.UNSTATED).label
            for number, position, reason in Update.objects.filter(
                task=self.task, round_number__in=[r.number - 1 for r in closed]
            ).values_list("round_number", "position", "exclusion_reason")
        }
        out = []
        for node in trainers:
            rounds = []
            for row in closed:
                mask = int(row.aggregated_mask)
                aggregated = bool(mask >> node.position & 1)
                score = share = None
                if aggregated and row.scores:
                    # Scores follow the mask's set bits in position order.
                    score = row.scores[(mask & ((1 << node.position) - 1)).bit_count()]
                    share = score * 10_000 // max(sum(row.scores), 1)
                rounds.append(
                    {
                        "round": row.number - 1,
                        "aggregated": aggregated,
                        "left_out": None
                        if aggregated
                        else submitted.get((row.number - 1, node.position)),
                        "score": score,
                        "share_bp": share,
                    }
                )
            out.append(
                {
                    "trainer": node.device,
                    "position": node.position,
                    "price_per_round_wei": node.price_per_round_wei,
                    "rounds": rounds,
                    "rounds_aggregated": sum(m >> node.position & 1 for m in masks),
                    "paid_wei": paid.get(node.device.lower(), 0) if settled else None,
                }
            )
        return out

    @functools.cached_property
    def bid_count(self) -> int:
        if self.task is None:
            return 0
        counted = getattr(self.task, "bid_total", None)  # annotated by open_task_list
        return counted if counted is not None else self.task.bids.count()

    @property
    def refund_wei(self) -> int | None:
        """Everything credited back to the buyer (also for cancelled and failed tasks)."""
        refunds = [p.amount_wei for p in self.payouts if p.reason == PayoutReason.REFUND]
        return sum(refunds) if refunds else None


def task_views_of(tasks: Iterable[Task]) -> list[TaskView]:
    """Views of these tasks with their orders, in one query for the orders."""
    tasks = list(tasks)
    orders = {
        o.created_tx: o
        for o in TaskOrder.objects.filter(created_tx__in=[t.created_tx for t in tasks])
    }
    return [TaskView(task=t, order=orders.get(t.created_tx)) for t in tasks]


def task_view_get(*, user, task_id: int) -> TaskView | None:
    """The task with chain id ``task_id`` if ``user`` may see it (task_visible), or the
    user's order for it while sync has not mirrored it; None otherwise."""
    task = task_visible(user=user).select_related("buyer").filter(chain_task_id=task_id).first()
    if task is not None:
        return TaskView(task=task, order=task.order)
    order = _orders_pending(user=user).filter(chain_task_id=task_id).first()
    return TaskView(task=None, order=order) if order is not None else None


def task_views_by_id(*, chain_task_ids: Iterable[int]) -> list[TaskView]:
    """The views of these tasks (or of the orders waiting for them), for the live push."""
    ids = set(chain_task_ids)
    views = task_views_of(Task.objects.select_related("buyer").filter(chain_task_id__in=ids))
    missing = ids - {v.id for v in views}
    if missing:
        orders = TaskOrder.objects.filter(chain_task_id__in=missing).exclude(
            created_tx__in=Task.objects.values("created_tx")
        )
        views += [TaskView(task=None, order=o) for o in orders.order_by("created_at")]
    return views


# How a task list may be sorted: the key a page or API call names -> the mirrored tasks'
# ordering. Orders not mirrored yet are the newest: first, except oldest first.
TASK_LIST_SORTS: dict[str, tuple[str, ...]] = {
    "newest": ("-chain_task_id",),
    "oldest": ("chain_task_id",),
    "bidding_ends": ("bidding_ends", "chain_task_id"),
}


class TaskViewPages(Sequence):
    """Tasks of a queryset as TaskViews, read one slice at a time (a paginator's page): a
    count, then per slice the tasks with their buyers and their orders, two queries."""

    def __init__(self, tasks: QuerySet[Task]) -> None:
        self.tasks = tasks.select_related("buyer")

    @functools.cached_property
    def _count(self) -> int:
        return self.tasks.count()

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if not isinstance(index, slice):
            return self[index : index + 1][0]
        start, stop, _ = index.indices(len(self))
        return task_views_of(self.tasks[start:stop]) if stop > start else []


class TaskViewList(Sequence):
    """The tasks a user may see as TaskViews, for a paginator: the orders not mirrored yet
    (few, and the newest: first, or last when sorted oldest first) beside the mirrored tasks,
    which are read one page at a time."""

    def __init__(self, *, user, state: str | None = None, sort: str = "newest") -> None:
        self.pending: list[TaskOrder] = []
        if state in (None, TaskState.PENDING):
            newest_first = sort != "oldest"
            orders = _orders_pending(user=user).select_related("buyer")
            self.pending = list(
                orders.order_by("-created_at" if newest_first else "created_at", "-pk")
            )
        tasks = task_visible(user=user).order_by(*TASK_LIST_SORTS[sort])
        if state == TaskState.PENDING:
            tasks = tasks.none()
        elif state is not None:
            tasks = tasks.filter(state=state)
        self.mirrored = TaskViewPages(tasks)
        self.pending_first = sort != "oldest"

    def __len__(self) -> int:
        return len(self.pending) + len(self.mirrored)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            return self[index : index + 1][0]
        start, stop, _ = index.indices(len(self))
        # The two parts one after the other: each is sliced at the offset of the first.
        parts = [
            [TaskView(task=None, order=o) for o in self.pending],
            self.mirrored,
        ]
        if not self.pending_first:
            parts.reverse()
        views: list[TaskView] = []
        offset = 0
        for part in parts:
            first, last = max(start - offset, 0), min(max(stop - offset, 0), len(part))
            if last > first:
                views += part[first:last]
            offset += len(part)
        return views


def task_view_list(*, user, state: str | None = None, sort: str = "newest") -> TaskViewList:
    """The tasks ``user`` may see (task_visible), optionally in one state, sorted by one of
    TASK_LIST_SORTS; sliced by a paginator, each page costs a fixed number of queries."""
    if sort not in TASK_LIST_SORTS:
        raise ValueError(f"sort must be one of {sorted(TASK_LIST_SORTS)}, not {sort!r}")
    return TaskViewList(user=user, state=state, sort=sort)


def open_task_list() -> TaskViewPages:
    """Tasks open for bids now, soonest deadline first, each with its number of bids."""
    tasks = Task.objects.filter(state=TaskState.BIDDING, bidding_ends__gt=timezone.now())
    # A subquery per listed task, run for the page's rows only (a join would count the bids
    # of every open task, and the page's count() leaves an unused subquery out).
    bids = Bid.objects.filter(task=OuterRef("pk")).order_by().values("task")
    counted = Coalesce(Subquery(bids.annotate(n=Count("pk")).values("n")), 0)
    tasks = tasks.annotate(bid_total=counted).order_by("bidding_ends", "chain_task_id")
    return TaskViewPages(tasks)


# ---------------------------------------------------------------- bids and devices


def bid_list(*, user, task_id: int | None = None) -> QuerySet[Bid]:
    """Bids on the tasks ``user`` may see (task_visible), optionally on one task (its id on
    chain), newest task first and in bid order within a task."""
    bids = Bid.objects.filter(task__in=task_visible(user=user))
    if task_id is not None:
        bids = bids.filter(task__chain_task_id=task_id)
    return bids.select_related("task").order_by("-task__chain_task_id", "bid_index")


def update_list(*, task: Task) -> QuerySet[Update]:
    """Every update submitted to ``task``, by round and selection position, with what its
    trainer reported."""
    return task.updates.select_related("report").order_by("round_number", "position")


def transaction_list(*, task: Task) -> QuerySet[ChainEventRecord]:
    """Every contract event of ``task``, in chain order."""
    records = ChainEventRecord.objects.filter(task_id=task.chain_task_id)
    return records.order_by("block_number", "log_index")


def bid_get_queryset(*, user) -> QuerySet[Bid]:
    """The bids ``user`` may see one by one (by primary key)."""
    return Bid.objects.filter(task__in=task_visible(user=user)).select_related("task")


def device_list() -> QuerySet[Device]:
    """Enrolled devices in enrolment order, with the join token each used."""
    return Device.objects.select_related("join_token").order_by("id")


def device_get(*, address: str) -> Device | None:
    """The enrolled device at ``address`` (any letter case), or None."""
    if not is_hex_address(address):
        return None
    return Device.objects.filter(address=to_checksum_address(address)).first()


def api_token_get(*, user) -> Token | None:
    """``user``'s API token, if it has one."""
    return Token.objects.filter(user=user).first()


def chain_cursor_get(*, contract_address: str) -> ChainCursor | None:
    """How far chain sync has mirrored the contract, if it has started."""
    return ChainCursor.objects.filter(contract_address=contract_address).first()
