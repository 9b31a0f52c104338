"""The contract's settlement rule written plainly, for tests to compare the chain against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from chain.events import CreditReason
from chain.selection import mask_of


def round_pay(prices: Sequence[int], mask: int, scores: Sequence[int] | None) -> list[int]:
    """One aggregated round: the trainers in ``mask`` share a pool of half their prices.
    Unscored, each gets half its price; scored, each its score's share capped at its price,
    and what the caps held back goes to the others in proportion to their headroom."""
    pay = [0] * len(prices)
    used = [p for p in range(len(prices)) if mask >> p & 1]
    if scores is None:
        for p in used:
            pay[p] = prices[p] // 2
        return pay
    pool = sum(prices[p] for p in used) // 2
    total = sum(scores)
    shares = {p: min(prices[p], pool * s // total) for p, s in zip(used, scores, strict=True)}
    capped = any(pool * s // total > prices[p] for p, s in zip(used, scores, strict=True))
    if capped:
        rest = pool - sum(shares.values())
        headroom = sum(prices[p] - shares[p] for p in used)
        shares = {p: shares[p] + rest * (prices[p] - shares[p]) // headroom for p in used}
    for p in used:
        pay[p] = shares[p]
    return pay


def trainers_pay(contributions: dict[str, dict]) -> dict[str, int]:
    """What each trainer of a whole run is owed by the rule above, from its summary's
    ``contributions`` (stack.demo: each trainer's position, price, and per round whether it
    was aggregated and its score): each round's pay over the trainers aggregated in it."""
    trainers = sorted(contributions, key=lambda a: contributions[a]["position"])
    line = [int(contributions[a]["price_wei"]) for a in trainers]  # as selected on chain
    owed = dict.fromkeys(trainers, 0)
    for r in range(len(contributions[trainers[0]]["aggregated"])):
        used = [a for a in trainers if contributions[a]["aggregated"][r]]
        mask = mask_of(contributions[a]["position"] for a in used)
        scores = [contributions[a]["scores"][r] for a in used]
        scores = None if None in scores else scores  # an unscored round
        for a, wei in zip(trainers, round_pay(line, mask, scores), strict=True):
            owed[a] += wei
    return owed


@dataclass
class Settlement:
    """Who is credited what (by account and reason) when a task is settled."""

    credits: dict[tuple[str, CreditReason], int] = field(default_factory=dict)

    def add(self, account: str, reason: CreditReason, amount: int) -> None:
        if amount:
            key = (account, reason)
            self.credits[key] = self.credits.get(key, 0) + amount

    def total(self) -> int:
        return sum(self.credits.values())

    def of(self, account: str) -> int:
        return sum(v for (a, _), v in self.credits.items() if a == account)


def settle(
    *,
    budget: int,
    buyer: str,
    aggregator: str,
    aggregator_price: int,
    trainers: Sequence[str],
    prices: Sequence[int],
    stake: int,
    bond: int,
    aggregated: Sequence[tuple[int, Sequence[int] | None]],
    submitted: Sequence[int],
    aborted: bool,
    challenger: str | None = None,
    aggregator_rounds: int | None = None,
) -> Settlement:
    """``aggregated``: per round whose updates a later global model used, the mask and
    scores; ``submitted``: per round whose submission window is over, who submitted (at an
    abort the open round counts only if someone submitted in it). A
    ``challenger`` that proved an aggregate wrong gets a quarter of the bond, and half of
    the rest goes to the trainers; the aggregator is paid for ``aggregator_rounds`` rounds
    (by default every aggregated one)."""
    n = len(trainers)
    if aborted and not challenger and submitted and submitted[-1] == 0:
        # An open round nobody submitted in (its model may have been withheld) costs no stake.
        submitted = submitted[:-1]
    pay = [0] * n
    for mask, scores in aggregated:
        for p, amount in enumerate(round_pay(prices, mask, scores)):
            pay[p] += amount
    kept = [all(m >> p & 1 for m in submitted) for p in range(n)]
    if aggregator_rounds is None:
        aggregator_rounds = len(aggregated)
    aggregator_pay = aggregator_price * aggregator_rounds
    out = Settlement()
    slashed = sum(stake for p in range(n) if not kept[p])
    bond_share = 0
    bounty = bond * 250 // 1000 if challenger else 0
    if aborted:
        slashed += bond
        if any(kept):
            bond_share = (bond - bounty) // 2 // sum(kept)
    for p, trainer in enumerate(trainers):
        out.add(trainer, CreditReason.TRAINER_PAY, pay[p])
        if kept[p]:
            out.add(trainer, CreditReason.STAKE_RETURNED, stake)
            out.add(trainer, CreditReason.STAKE_SLASHED, bond_share)
    out.add(aggregator, CreditReason.AGGREGATOR_PAY, aggregator_pay)
    if not aborted:
        out.add(aggregator, CreditReason.STAKE_RETURNED, bond)
    if challenger:
        out.add(challenger, CreditReason.CHALLENGE_BOUNTY, bounty)
    out.add(buyer, CreditReason.REFUND, budget - sum(pay) - aggregator_pay)
    out.add(buyer, CreditReason.STAKE_SLASHED, slashed - bond_share * sum(kept) - bounty)
    return out
