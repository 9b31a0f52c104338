"""The contract's custom errors, and a lost or refusing node, as FLEX errors."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from core.errors import FlexError


class ChainUnavailableError(FlexError):
    """The Ethereum node could not be reached or did not answer in time."""

    code = "chain_unavailable"


class TransactionRejectedError(FlexError):
    """The node refused the transaction (e.g. the sender cannot pay for gas)."""

    code = "transaction_rejected"


class NoContractError(FlexError):
    """Nothing at the address answers as the contract: a wrong address, or another chain."""

    code = "no_contract"


class ContractError(FlexError):
    """The FlexMarket contract rejected the call.

    Raised as is for a revert that carries no known custom error (``fields`` then holds the
    raw ``data``); every ``FlexMarket<What>`` custom error has its own subclass below, named
    ``<What>Error``, whose fields are the error's arguments in snake_case.
    """

    code = "contract_error"
    # The Solidity custom error this class stands for; empty for the base class.
    solidity_name: ClassVar[str] = ""
    # The contract whose errors a subclass stands for: ``<prefix><What>`` is ``<What>Error``.
    solidity_prefix: ClassVar[str] = "FlexMarket"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only this module's classes stand for Solidity errors; a subclass elsewhere (say a
        # service's narrower error) must not take over the selector of its parent.
        if cls.__module__ == __name__ and not cls.__dict__.get("abstract", False):
            what = cls.__name__.removesuffix("Error")
            cls.solidity_name = cls.solidity_prefix + what
            if cls.solidity_prefix != "FlexMarket":
                cls.code = "challenge_" + re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", what).lower()
            CONTRACT_ERRORS[cls.solidity_name] = cls

    def default_message(self, **fields: Any) -> str:
        base = super().default_message(**fields)
        if not fields:
            return base
        shown = ", ".join(f"{name}={value}" for name, value in fields.items())
        return f"{base} ({shown})"


# Solidity error name -> Python class, filled as the classes below are defined; the client
# matches it against the selectors of the compiled ABI (tests check both sides agree).
CONTRACT_ERRORS: dict[str, type[ContractError]] = {}


# ---- access


class NotOwnerError(ContractError):
    """Only the contract owner may do this."""

    code = "not_owner"


class NotRegistrarError(ContractError):
    """Only the device registrar may do this."""

    code = "not_registrar"


class NotBuyerError(ContractError):
    """Only the task's buyer may do this."""

    code = "not_buyer"


class NotAggregatorError(ContractError):
    """Only the task's selected aggregator may do this."""

    code = "not_aggregator"


class NotSelectedTrainerError(ContractError):
    """The account is not a selected trainer of the task."""

    code = "not_selected_trainer"


class ZeroAddressError(ContractError):
    """The zero address is not allowed here."""

    code = "zero_address"


# ---- device registry


class DeviceAlreadyRegisteredError(ContractError):
    """The device is already registered and active."""

    code = "device_already_registered"


class DeviceNotRegisteredError(ContractError):
    """The device is not registered."""

    code = "device_not_registered"


class DeviceRevokedError(ContractError):
    """The device has been revoked."""

    code = "device_revoked"


class CannotAggregateError(ContractError):
    """The device is not registered as able to aggregate."""

    code = "cannot_aggregate"


# ---- tasks


class UnknownTaskError(ContractError):
    """There is no task with this id."""

    code = "unknown_task"


class InvalidTaskStateError(ContractError):
    """The task is not in a state that allows this."""

    code = "invalid_task_state"


class InvalidRoundsError(ContractError):
    """The number of rounds is zero or above the contract's maximum."""

    code = "invalid_rounds"


class InvalidTrainerRangeError(ContractError):
    """The trainer range is invalid: min is zero, above max, or max is above the cap."""

    code = "invalid_trainer_range"


class InvalidBiddingEndError(ContractError):
    """The bidding deadline is not in the future."""

    code = "invalid_bidding_end"


class InvalidRoundTimeoutError(ContractError):
    """The round timeout is zero or above the contract's maximum."""

    code = "invalid_round_timeout"


class BudgetTooLowError(ContractError):
    """The budget cannot pay the minimum number of trainers and the aggregator."""

    code = "budget_too_low"


# ---- bidding and selection


class BiddingClosedError(ContractError):
    """Bidding on this task has closed."""

    code = "bidding_closed"


class BiddingOpenError(ContractError):
    """Bidding on this task is still open."""

    code = "bidding_open"


class TooManyBidsError(ContractError):
    """The task has reached the maximum number of bids."""

    code = "too_many_bids"


class PriceBelowMinimumError(ContractError):
    """The price is below the platform minimum for this role."""

    code = "price_below_minimum"


class ZeroSamplesError(ContractError):
    """A trainer bid must offer at least one sample."""

    code = "zero_samples"


class InvalidHintLengthError(ContractError):
    """The selection hint does not list every trainer bid exactly once."""

    code = "invalid_hint_length"


class InvalidHintError(ContractError):
    """The selection hint is not the trainer bids sorted by price per sample."""

    code = "invalid_hint"


# ---- rounds


class RoundNotOpenError(ContractError):
    """No round is open for updates yet: the initial model is not published."""

    code = "round_not_open"


class WrongRoundError(ContractError):
    """The round is not the one the contract expects."""

    code = "wrong_round"


class ZeroModelIdError(ContractError):
    """A model ID must not be zero."""

    code = "zero_model_id"


class AlreadySubmittedError(ContractError):
    """The trainer already submitted an update for this round."""

    code = "already_submitted"


class SubmissionClosedError(ContractError):
    """The submission window of this round has closed."""

    code = "submission_closed"


class DeadlinePassedError(ContractError):
    """The aggregator's publish deadline has passed."""

    code = "deadline_passed"


class DeadlineNotPassedError(ContractError):
    """The aggregator's publish deadline has not passed yet."""

    code = "deadline_not_passed"


class EmptyAggregationError(ContractError):
    """A global model after round 0 must aggregate at least one update."""

    code = "empty_aggregation"


class UnsubmittedUpdatesError(ContractError):
    """The aggregated mask names trainers that did not submit an update."""

    code = "unsubmitted_updates"


class ScoresLengthMismatchError(ContractError):
    """There must be one score per aggregated trainer, or none."""

    code = "scores_length_mismatch"


class ZeroScoresError(ContractError):
    """Scores, when given, must not all be zero."""

    code = "zero_scores"


# ---- payments


class NothingToWithdrawError(ContractError):
    """Nothing is owed to this account."""

    code = "nothing_to_withdraw"


class TransferFailedError(ContractError):
    """The account did not accept the ether; its credit is kept."""

    code = "transfer_failed"


class ReentrantCallError(ContractError):
    """The contract was re-entered during a withdrawal."""

    code = "reentrant_call"


# ---- honest pay: claims, deposits, model IDs, round closing


class InvalidSampleCapError(ContractError):
    """A task's sample cap must be at least 1 (and fit 64 bits)."""

    code = "invalid_sample_cap"


class WrongDepositError(ContractError):
    """A bid must pay in exactly its stake (trainer) or bond (aggregator)."""

    code = "wrong_deposit"


class BuyerCannotAggregateError(ContractError):
    """A task's buyer may not bid to aggregate its own task."""

    code = "buyer_cannot_aggregate"


class NoBidError(ContractError):
    """The device has no bid on the task, or its deposit was already released."""

    code = "no_bid"


class NotBidderError(ContractError):
    """While bidding is open, only the bidder (or anyone, once it is revoked) may withdraw."""

    code = "not_bidder"


class BidSelectedError(ContractError):
    """A selected node's deposit is settled with the task, not withdrawn."""

    code = "bid_selected"


class ModelIdUsedError(ContractError):
    """The model ID was already used (an update, or a global model, of some task)."""

    code = "model_id_used"


class RoundStillOpenError(ContractError):
    """The round's submission window is open and not every trainer has submitted."""

    code = "round_still_open"


# ---- disputes


class InvalidDisputeTermsError(ContractError):
    """A dispute window over the limit, or a trim outside 0..499 (only a trimmed mean trims)."""

    code = "invalid_dispute_terms"


class NoAggregateError(ContractError):
    """Only a published global model of round 1 or later can be challenged."""

    code = "no_aggregate"


class DisputeWindowClosedError(ContractError):
    """The global model's dispute window is over (or the task has none)."""

    code = "dispute_window_closed"


class DisputeWindowOpenError(ContractError):
    """The final model may still be challenged: the task settles after its window."""

    code = "dispute_window_open"


class NotIncludedError(ContractError):
    """A challenge's update IDs are not the aggregated updates, in trainer-position order."""

    code = "not_included"


class ChallengeFailedError(ContractError):
    """The challenged value is what the task's strategy gives: the aggregate stands."""

    code = "challenge_failed"


class AggregatorCannotChallengeError(ContractError):
    """The aggregator may not challenge its own models (the bounty would be its own bond)."""

    code = "aggregator_cannot_challenge"


class StatementMismatchError(ContractError):
    """The exclusions given are not the statement published with the global model (or a
    round-0 model was published with one)."""

    code = "statement_mismatch"


class NotExcludedError(ContractError):
    """The global model aggregated the update a contest says it left out."""

    code = "not_excluded"


class NotVerifierError(ContractError):
    """Only the market's FlexVerifier may hand it the verdict of a contested exclusion."""

    code = "not_verifier"


# ---- FlexVerifier's errors: a challenge whose openings prove nothing


class FlexVerifierError(ContractError):
    """FlexVerifier refused a challenge that proves nothing; the Solidity error's name is the
    class's ``solidity_name`` and its arguments are the fields (``which``: 0 for the global
    model's opening, k + 1 for update k's)."""

    code = "challenge_refused"
    solidity_prefix = "FlexVerifier"
    abstract = True


class LengthMismatchError(FlexVerifierError):
    """The challenge opens a different number of updates than it includes."""


class TooManyUpdatesError(FlexVerifierError):
    """A challenge includes no update, or more than the market's 128 trainers."""


class IdMismatchError(FlexVerifierError):
    """An opening's header and root do not give the model's ID."""


class ChunkOutOfRangeError(FlexVerifierError):
    """The challenged chunk is past the model's last."""


class OffsetOutOfRangeError(FlexVerifierError):
    """The challenged value is past the chunk's last."""


class BadChunkError(FlexVerifierError):
    """An opened chunk holds a different number of bytes than the model's layout gives."""


class BadProofError(FlexVerifierError):
    """An opened chunk is not under its model's Merkle root by the path given."""


class BadTrimError(FlexVerifierError):
    """A trimmed mean's per-mille trim is outside 0..499."""


class ExclusionHoldsError(FlexVerifierError):
    """The excluded update does fail the rule the aggregator stated: the exclusion stands."""


class UncheckableError(FlexVerifierError):
    """The stated reason (not fetchable) cannot be checked on chain, so it cannot be contested."""


class NotRoundUpdateError(FlexVerifierError):
    """The contested ID is not an update of the round the global model closed."""
