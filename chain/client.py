"""The typed Python client of FlexMarket: deploy, every transaction, every view, the hint."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3._utils.error_formatters_utils import raise_contract_logic_error_on_revert

from chain import events as ev
from chain.build import compiler_metadata, load_artifact
from chain.errors import InvalidHintError, NoContractError
from chain.events import DeviceClass, Role, Strategy, TaskState
from chain.fraud import VERIFIER_NAME, Challenge, Contest, Exclusion
from chain.node import at_once, batching
from chain.records import (
    BidInfo,
    DeviceInfo,
    Limits,
    MinPrices,
    ModelOrigin,
    RoundInfo,
    SelectionInfo,
    TaskInfo,
    TxResult,
)
from chain.selection import selection_order, selection_seed
from chain.transactions import (
    CONTRACT_NAME,
    RECEIPT_TIMEOUT_SECONDS,
    PendingTx,
    abi_functions,
    deploy_artifact,
    rpc,
    struct_of,
    submit,
    tx_result,
)

R = TypeVar("R")
E = TypeVar("E", bound=ev.ChainEvent)

# The most samples a trainer's claim counts for unless the buyer says otherwise.
DEFAULT_SAMPLE_CAP = 1000
# selectNodes' tie seed depends on the block it lands in; a hint computed for one block is
# recomputed when another block came first.
SELECTION_ATTEMPTS = 5


def _bytes32(value: bytes | str) -> bytes:
    raw = bytes(HexBytes(value))
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}")
    return raw


def _optional_id(raw: bytes) -> str | None:
    return None if raw == bytes(32) else "0x" + bytes(raw).hex()


@dataclass(frozen=True)
class PendingCall:
    """A FlexMarket transaction the node has taken, not yet known to be mined."""

    pending: PendingTx
    market: str
    timeout: float

    def result(self) -> TxResult:
        """Waits until it is mined; raises the contract's error if it reverted there."""
        return tx_result(self.pending.receipt(timeout=self.timeout), market=self.market)


class FlexMarket:
    """One deployed FlexMarket: typed, keyword-only calls; senders sign locally."""

    def __init__(
        self,
        *,
        w3: Web3,
        address: str,
        deploy_block: int | None = None,
        receipt_timeout: float = RECEIPT_TIMEOUT_SECONDS,
    ) -> None:
        artefact = load_artifact(CONTRACT_NAME)
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.deploy_block = deploy_block
        self.receipt_timeout = receipt_timeout
        self.abi: list[dict[str, Any]] = artefact["abi"]
        self._outputs = {e["name"]: e["outputs"] for e in self.abi if e["type"] == "function"}
        self._functions = abi_functions(self.abi)

    def __repr__(self) -> str:
        return f"FlexMarket(address={self.address!r})"

    # ------------------------------------------------------------ deploy

    @classmethod
    def deploy(
        cls,
        *,
        w3: Web3,
        sender: LocalAccount,
        min_trainer_price_wei: int = 0,
        min_aggregator_price_wei: int = 0,
        verifier: str | None = None,
    ) -> FlexMarket:
        """Deploys a new market owned by ``sender`` (also its first registrar), checking
        challenges with the FlexVerifier at ``verifier`` (by default one deployed first)."""
        if verifier is None:
            verifier = deploy_artifact(w3=w3, sender=sender, name=VERIFIER_NAME).address
        deployed = deploy_artifact(
            w3=w3,
            sender=sender,
            name=CONTRACT_NAME,
            args=(min_trainer_price_wei, min_aggregator_price_wei, to_checksum_address(verifier)),
        )
        return cls(w3=w3, address=deployed.address, deploy_block=deployed.block_number)

    def built_from_artefact(self) -> bool:
        """Whether the code at this address was compiled from the sources of the artefact
        this client speaks (contracts/build/), by the metadata solc appends to it: a market
        deployed before the contract changed answers the new ABI wrongly or not at all."""
        with rpc():
            code = bytes(self.w3.eth.get_code(self.address))
        ours = compiler_metadata(load_artifact(CONTRACT_NAME)["deployedBytecode"])
        return bool(ours) and compiler_metadata(code) == ours

    # ------------------------------------------------------------ owner and registrar

    def transfer_ownership(self, *, sender: LocalAccount, new_owner: str) -> TxResult:
        return self._transact(sender, "transferOwnership", to_checksum_address(new_owner))

    def set_registrar(self, *, sender: LocalAccount, registrar: str) -> TxResult:
        return self._transact(sender, "setRegistrar", to_checksum_address(registrar))

    def set_min_prices(
        self,
        *,
        sender: LocalAccount,
        min_trainer_price_wei: int,
        min_aggregator_price_wei: int,
    ) -> TxResult:
        """Platform minimum prices per round for tasks created from now on."""
        return self._transact(
            sender, "setMinPrices", min_trainer_price_wei, min_aggregator_price_wei
        )

    def register_device(
        self,
        *,
        sender: LocalAccount,
        device: str,
        device_class: DeviceClass,
        can_aggregate: bool,
    ) -> TxResult:
        return self.register_device_submit(
            sender=sender, device=device, device_class=device_class, can_aggregate=can_aggregate
        ).result()

    def register_device_submit(
        self,
        *,
        sender: LocalAccount,
        device: str,
        device_class: DeviceClass,
        can_aggregate: bool,
        sending: AbstractContextManager[Any] | None = None,
    ) -> PendingCall:
        """Sends the registration without waiting for it to be mined (PendingCall.result
        waits); ``sending`` is held only while the nonce is taken and the transaction sent."""
        return self._submit(
            sender,
            "registerDevice",
            to_checksum_address(device),
            int(device_class),
            can_aggregate,
            sending=sending,
        )

    def revoke_device(self, *, sender: LocalAccount, device: str) -> TxResult:
        return self._transact(sender, "revokeDevice", to_checksum_address(device))

    # ------------------------------------------------------------ tasks

    def create_task(
        self,
        *,
        sender: LocalAccount,
        spec_hash: bytes | str,
        rounds: int,
        min_trainers: int,
        max_trainers: int,
        bidding_ends: int,
        round_timeout: int,
        budget_wei: int,
        sample_cap: int = DEFAULT_SAMPLE_CAP,
        dispute_window: int = 0,
        strategy: Strategy = Strategy.FED_AVG,
        trim_per_mille: int = 0,
    ) -> TxResult:
        """Creates a task with ``budget_wei`` in escrow; ``bidding_ends`` is a unix time,
        ``round_timeout`` seconds; trainer claims count for at most ``sample_cap`` samples.
        Each global model may be challenged for ``dispute_window`` seconds after it is
        published (0: never), recomputed by ``strategy`` (``trim_per_mille`` for a trimmed
        mean). The new id is ``result.first(TaskCreated).task_id``."""
        return self._transact(
            sender,
            "createTask",
            _bytes32(spec_hash),
            rounds,
            min_trainers,
            max_trainers,
            bidding_ends,
            round_timeout,
            (sample_cap, dispute_window, int(strategy), trim_per_mille),
            value=budget_wei,
        )

    def cancel_task(self, *, sender: LocalAccount, task_id: int) -> TxResult:
        return self._transact(sender, "cancelTask", task_id)

    def place_bid(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        price_per_round_wei: int,
        samples: int,
        role: Role,
        deposit_wei: int | None = None,
    ) -> TxResult:
        """Places, or replaces, ``sender``'s bid on the task, paying in its stake or bond
        (``deposit_wei``; by default what the task asks, less what a replaced bid holds)."""
        if deposit_wei is None:
            deposit_wei = self.deposit_due(task_id=task_id, device=sender.address, role=role)
        return self._transact(
            sender,
            "placeBid",
            task_id,
            price_per_round_wei,
            samples,
            int(role),
            value=deposit_wei,
        )

    def withdraw_bid(
        self, *, sender: LocalAccount, task_id: int, device: str | None = None
    ) -> TxResult:
        """Withdraws ``device``'s bid (the sender's own by default) and credits its deposit
        back to it: the bidder while bidding is open (anyone once it is revoked), anyone for
        a bid that was not selected once bidding is over."""
        target = to_checksum_address(device or sender.address)
        return self._transact(sender, "withdrawBid", task_id, target)

    def select_nodes(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        order: Sequence[int] | None = None,
    ) -> TxResult:
        """Runs selection; without ``order`` the hint is computed from the chain's bids for
        the next block (and again if another block came first)."""
        if order is not None:
            return self._transact(sender, "selectNodes", task_id, list(order))
        bids = self.bids(task_id=task_id)
        for attempt in range(SELECTION_ATTEMPTS):
            seed = self.next_selection_seed(task_id=task_id)
            try:
                return self._transact(
                    sender, "selectNodes", task_id, selection_order(bids, seed=seed)
                )
            except InvalidHintError:
                if attempt == SELECTION_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def next_selection_seed(self, *, task_id: int) -> bytes:
        """The tie seed selectNodes draws if it is mined in the block after the latest."""
        with rpc():
            parent = self.w3.eth.get_block("latest")["hash"]
        return selection_seed(parent_hash=parent, task_id=task_id)

    # ------------------------------------------------------------ rounds

    def publish_global_model(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        round_number: int,
        model_id: bytes | str,
        aggregated_mask: int = 0,
        scores: Sequence[int] = (),
        exclusions: Sequence[Exclusion] = (),
    ) -> TxResult:
        """Publishes global model ``round_number``; for rounds >= 1, ``aggregated_mask``
        (see mask_of) names the round-1 updates used, ``scores`` one per set bit or none,
        ``exclusions`` why each submitted update outside the mask was left out."""
        return self._transact(
            sender,
            "publishGlobalModel",
            task_id,
            round_number,
            _bytes32(model_id),
            aggregated_mask,
            list(scores),
            Exclusion.encode_all(exclusions),
        )

    def submit_update(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        round_number: int,
        model_id: bytes | str,
    ) -> TxResult:
        return self._transact(sender, "submitUpdate", task_id, round_number, _bytes32(model_id))

    # ------------------------------------------------------------ settlement

    def challenge(
        self, *, sender: LocalAccount, task_id: int, round_number: int, challenge: Challenge
    ) -> TxResult:
        """Proves global model ``round_number`` wrong by ``challenge`` (chain.fraud): the
        aggregator's bond is slashed and the task aborted, or the call reverts with
        ChallengeFailedError (the value is right), a FlexVerifier error (an opening that does
        not hold), DisputeWindowClosedError, NotIncludedError, ..."""
        return self._transact(sender, "challenge", task_id, round_number, challenge.dispute())

    def contest_exclusion(
        self,
        *,
        sender: LocalAccount,
        task_id: int,
        round_number: int,
        statement: bytes,
        contest: Contest,
    ) -> TxResult:
        """Shows that global model ``round_number`` left ``contest.update_id`` out for no
        stated reason or a false one (``statement``: the one published with the model, see
        exclusions_of): sent to the market's FlexVerifier, which judges it and has the market
        slash the aggregator; or reverts with ExclusionHoldsError, UncheckableError,
        DisputeWindowClosedError, StatementMismatchError, NotExcludedError, ..."""
        verifier = self.w3.eth.contract(
            address=to_checksum_address(self.verifier()), abi=load_artifact(VERIFIER_NAME)["abi"]
        )
        data = verifier.encode_abi(
            "contestExclusion",
            args=[self.address, task_id, round_number, statement, contest.encoded()],
        )
        pending = submit(
            self.w3, sender, {"to": verifier.address, "data": data, "value": 0}, wait=True
        )
        return PendingCall(
            pending=pending, market=self.address, timeout=self.receipt_timeout
        ).result()

    def finalize(self, *, sender: LocalAccount, task_id: int) -> TxResult:
        return self._transact(sender, "finalize", task_id)

    def abort(self, *, sender: LocalAccount, task_id: int) -> TxResult:
        return self._transact(sender, "abort", task_id)

    def withdraw(self, *, sender: LocalAccount) -> TxResult:
        return self._transact(sender, "withdraw")

    # ------------------------------------------------------------ views

    def owner(self) -> str:
        return self._call("owner")

    def registrar(self) -> str:
        return self._call("registrar")

    def min_prices(self) -> MinPrices:
        trainer, aggregator = self._call("minPrices")
        return MinPrices(trainer, aggregator)

    def limits(self) -> Limits:
        return Limits(
            max_trainers=self._call("MAX_TRAINERS"),
            max_rounds=self._call("MAX_ROUNDS"),
            max_bids=self._call("MAX_BIDS"),
            max_round_timeout=self._call("MAX_ROUND_TIMEOUT"),
            max_dispute_window=self._call("MAX_DISPUTE_WINDOW"),
        )

    def device(self, *, device: str) -> DeviceInfo:
        return self._record(DeviceInfo, "deviceInfo", to_checksum_address(device))

    def task_count(self) -> int:
        return self._call("taskCount")

    def task(self, *, task_id: int) -> TaskInfo:
        return self._record(TaskInfo, "task", task_id)

    def bids(self, *, task_id: int) -> list[BidInfo]:
        raw = self._call("bids", task_id)
        components = self._outputs["bids"][0]["components"]
        return [BidInfo(index=i, **struct_of(components, values)) for i, values in enumerate(raw)]

    def bid_index_of(self, *, task_id: int, device: str) -> int | None:
        found, index = self._call("bidIndexOf", task_id, to_checksum_address(device))
        return index if found else None

    def selection(self, *, task_id: int, task: TaskInfo | None = None) -> SelectionInfo | None:
        """The aggregator and trainers, or None before a successful selection. ``task``: the
        task as the caller just read it (what selection wrote there never changes after);
        with it, a selection that was made can be read in an at_once batch."""
        info = self.task(task_id=task_id) if task is None else task
        if not _selected(info):
            return None

        def selected(found: Any) -> SelectionInfo:
            devices, prices, samples = found
            return SelectionInfo(
                aggregator=info.aggregator,
                aggregator_price_wei=info.aggregator_price_wei,
                trainers=tuple(to_checksum_address(d) for d in devices),
                trainer_prices_wei=tuple(prices),
                trainer_samples=tuple(samples),
            )

        return self._call("trainers", task_id, then=selected)

    def round_opening(
        self, *, task_id: int, task: TaskInfo, global_id: str
    ) -> tuple[SelectionInfo | None, ModelOrigin | None]:
        """The task's selection (``task``: the task as just read) and where the round whose
        global model is ``global_id`` opened, in one request: what a round's aggregation and
        each check of it read before the round's updates (updates_of's ``opened``)."""
        if not _selected(task):
            return None, self.model_origin(model_id=global_id)
        selection, opened = self.at_once(
            lambda: self.selection(task_id=task_id, task=task),
            lambda: self.model_origin(model_id=global_id),
        )
        return selection, opened

    def trainer_position(self, *, task_id: int, device: str) -> int | None:
        return self._call(
            "trainerPosition",
            task_id,
            to_checksum_address(device),
            then=lambda found: found[1] if found[0] else None,
        )

    def verifier(self) -> str:
        """The FlexVerifier the market checks challenges with."""
        return self._call("verifier")

    def dispute_closes_at(self, *, task_id: int, round_number: int) -> int:
        """When global model ``round_number``'s dispute window closes (0: not published)."""
        return self._call("disputeClosesAt", task_id, round_number)

    def global_model(self, *, task_id: int, round_number: int) -> str | None:
        """The global model ID of the round as ``0x`` hex, None if not published."""
        return _optional_id(self._call("globalModel", task_id, round_number))

    def update_of(self, *, task_id: int, round_number: int, trainer: str) -> str | None:
        """The update ID ``trainer`` submitted in the round, None if it did not (updates_of)."""
        trainer = to_checksum_address(trainer)
        return self.updates_of(task_id=task_id, round_number=round_number, trainer=trainer).get(
            trainer
        )

    def updates_of(
        self,
        *,
        task_id: int,
        round_number: int,
        trainer: str | None = None,
        opened: ModelOrigin | None = None,
    ) -> dict[str, str]:
        """The update IDs submitted in the round, by checksummed trainer address (only
        ``trainer``'s when given), from the round's UpdateSubmitted events (from the block its
        global model was published in; ``opened``: that model's origin, when the caller has
        read it). The contract emits one only for a selected trainer's first update of the
        round under a model ID never used before, so each names its author: one read of the
        events answers for the whole round."""
        if opened is None:
            global_id = self.global_model(task_id=task_id, round_number=round_number)
            if global_id is None:
                return {}
            opened = self.model_origin(model_id=global_id)
        if opened is None:
            return {}
        found = self._events(
            ev.UpdateSubmitted,
            task_id,
            round_number,
            None if trainer is None else to_checksum_address(trainer),
            from_block=opened.block_number,
        )
        return {e.trainer: e.model_id for e in found}

    def exclusions_of(self, *, task_id: int, round_number: int) -> bytes:
        """The statement published with global model ``round_number`` of why it left out
        round-1 updates (decode with Exclusion.decode_all); empty when it gave none or the
        model is not published."""
        model_id = self.global_model(task_id=task_id, round_number=round_number)
        origin = self.model_origin(model_id=model_id) if model_id else None
        if origin is None or round_number == 0:
            return b""
        found = self._events(
            ev.UpdatesExcluded,
            task_id,
            round_number,
            from_block=origin.block_number,
            to_block=origin.block_number,
        )
        return bytes(HexBytes(found[0].statement)) if found else b""

    def _events(
        self,
        kind: type[E],
        *indexed: int | str | None,
        from_block: int,
        to_block: int | str = "latest",
    ) -> list[E]:
        """This market's ``kind`` events in the blocks given whose indexed arguments, in
        order, are ``indexed`` (None: any): read with eth_getLogs and decoded here, not
        through web3's contract events (which look the event up in the ABI on every read)."""
        topics: list[str | None] = [ev.event_topics()[kind.__name__]]
        topics += [None if v is None else "0x" + _topic(v).hex() for v in indexed]
        with rpc():
            logs = ev.get_logs(
                self.w3,
                address=self.address,
                from_block=from_block,
                to_block=to_block,
                topics=topics,
            )
        return [e for e in ev.decode_logs(logs, address=self.address) if isinstance(e, kind)]

    def model_origin(self, *, model_id: bytes | str) -> ModelOrigin | None:
        """Where the contract first saw ``model_id`` (each ID is accepted once), or None."""

        def origin(found: dict[str, Any]) -> ModelOrigin | None:
            return ModelOrigin(**found) if found.pop("known") else None

        return self._struct_of("modelOrigin", _bytes32(model_id), then=origin)

    def deposit_due(self, *, task_id: int, device: str, role: Role) -> int:
        """What ``device``'s bid in ``role`` must pay in now: the task's stake or bond, less
        the deposit its current bid already holds."""
        info = self.task(task_id=task_id)
        held = 0
        index = self.bid_index_of(task_id=task_id, device=device)
        if index is not None:
            held = info.deposit_wei(self.bids(task_id=task_id)[index].role)
        return max(info.deposit_wei(role) - held, 0)

    def round_info(self, *, task_id: int, round_number: int) -> RoundInfo:
        """Round r's global model (None if unpublished), the updates submitted in it, and
        which of them (with which scores) global model r+1 aggregated."""
        return self._struct_of(
            "roundInfo",
            task_id,
            round_number,
            then=lambda found: RoundInfo(
                **{**found, "global_model": _optional_id(bytes(HexBytes(found["global_model"])))}
            ),
        )

    def credit_of(self, *, account: str) -> int:
        """Wei ``account`` may withdraw now."""
        return self._call("creditOf", to_checksum_address(account))

    def credits_owed(self) -> int:
        return self._call("creditsOwed")

    def escrow_locked(self) -> int:
        return self._call("escrowLocked")

    def balance_wei(self) -> int:
        """The contract's ether balance (creditsOwed + escrowLocked, barring forced sends)."""
        with rpc():
            return self.w3.eth.get_balance(self.address)

    def scan(
        self, *, from_block: int | None = None, to_block: int, chunk: int = 2000
    ) -> Iterator[ev.ScannedChunk]:
        """This market's events, chunk by chunk (see chain.events.scan)."""
        start = (self.deploy_block or 0) if from_block is None else from_block
        return ev.scan(self.w3, self.address, start, to_block, chunk=chunk)

    # ------------------------------------------------------------ plumbing

    def at_once(self, *reads: Callable[[], Any]) -> list[Any]:
        """The answers of ``reads``, views of this market (``lambda: market.task(task_id=1)``)
        that each ask the node once, in one request to it (chain.node.at_once); errors as
        each read raises them alone."""
        with rpc():
            return at_once(self.w3, *reads)

    def _call(self, name: str, *args: Any, then: Callable[[Any], Any] | None = None) -> Any:
        """Function ``name``'s answer to ``args``, decoded and passed through ``then``; inside
        at_once, the request that asks it."""
        function = self._functions[name]
        call = {"to": self.address, "data": "0x" + function.encode(args).hex()}

        def answer(raw: Any) -> Any:
            data = HexBytes(raw)
            if not data and function.outputs:
                # No code there: the node runs the call against an empty account.
                raise NoContractError(address=self.address, function=name)
            decoded = function.decode(data)
            return decoded if then is None else then(decoded)

        # Past web3's own eth.call, whose request formatters walk the call's fields through
        # the ABI again; a revert still raises web3's typed error for rpc().
        request = ("eth_call", [call, "latest"])
        if batching(self.w3):
            return (request, (answer, raise_contract_logic_error_on_revert, None))
        with rpc():
            raw = self.w3.manager.request_blocking(
                *request, error_formatters=raise_contract_logic_error_on_revert
            )
        return answer(raw)

    def _struct_of(
        self, name: str, *args: Any, then: Callable[[dict[str, Any]], Any] | None = None
    ) -> Any:
        components = self._outputs[name][0]["components"]

        def fields(values: Any) -> Any:
            found = struct_of(components, values)
            return found if then is None else then(found)

        return self._call(name, *args, then=fields)

    def _record(self, cls: type[R], name: str, *args: Any) -> R:
        return self._struct_of(name, *args, then=lambda found: cls(**found))

    def _transact(self, sender: LocalAccount, name: str, *args: Any, value: int = 0) -> TxResult:
        return self._submit(sender, name, *args, value=value, wait=True).result()

    def _submit(
        self,
        sender: LocalAccount,
        name: str,
        *args: Any,
        value: int = 0,
        sending: AbstractContextManager[Any] | None = None,
        wait: bool = False,
    ) -> PendingCall:
        call = {"to": self.address, "data": self._functions[name].encode(args), "value": value}
        pending = submit(self.w3, sender, call, sending=sending, wait=wait)
        return PendingCall(pending=pending, market=self.address, timeout=self.receipt_timeout)


def _selected(task: TaskInfo) -> bool:
    """Whether ``task`` (as read) had its aggregator and trainers selected."""
    return task.state not in (TaskState.BIDDING, TaskState.CANCELLED) and task.trainer_count > 0


def _topic(value: int | str) -> bytes:
    """An indexed uint256 or address argument as its 32-byte log topic."""
    if isinstance(value, str):
        return bytes(12) + bytes(HexBytes(value))
    return value.to_bytes(32, "big")
