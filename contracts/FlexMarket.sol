// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {FlexVerifier} from "./FlexVerifier.sol";

/**
 * @title FlexMarket
 * @notice Control plane of the FLEX federated-learning marketplace: task escrow, device
 * registry, bidding, node selection, round coordination by model IDs and pull payments.
 *
 * Model weights never touch the chain: a model ID is the keccak256 of the model's canonical
 * bytes, kept in the data plane's content-addressed stores. The rules this contract enforces
 * are written down in docs/contract.md.
 *
 * Invariant: `address(this).balance == creditsOwed() + escrowLocked()`, where escrow holds
 * the budgets and the bidders' stakes of unsettled tasks (it can only be larger if someone
 * force-sends ether, which the contract never counts as anyone's).
 */
contract FlexMarket {
    // ------------------------------------------------------------------ types

    /// @notice Hardware class of a registered device (informational: it routes work off chain).
    enum DeviceClass {
        Cpu,
        Gpu,
        Jetson
    }

    /// @notice Registry status of a device address.
    enum DeviceStatus {
        None,
        Active,
        Revoked
    }

    /// @notice What a bid offers to do.
    enum Role {
        Trainer,
        Aggregator
    }

    /// @notice Life cycle of a task; `None` means the id does not exist.
    enum TaskState {
        None,
        Bidding,
        Running,
        Trained,
        Finalized,
        Failed,
        Cancelled,
        Aborted
    }

    /// @notice Why node selection failed a task.
    enum FailureReason {
        NoAggregator,
        AggregatorOverBudget,
        TooFewTrainers
    }

    /// @notice Why an account was credited.
    enum CreditReason {
        TrainerPay,
        AggregatorPay,
        Refund,
        StakeReturned,
        StakeSlashed,
        ChallengeBounty
    }

    struct Device {
        DeviceStatus status;
        DeviceClass deviceClass;
        bool canAggregate;
    }

    /// @dev Two slots: the selection key (price, samples) is read together with the device.
    struct Bid {
        address device;
        uint96 pricePerRoundWei;
        uint64 samples;
        Role role;
    }

    struct Trainer {
        address device;
        uint96 pricePerRoundWei;
    }

    /// @dev Slot 1 holds everything submitUpdate and publishGlobalModel need, so each of them
    /// reads one task slot and writes at most that one.
    struct Task {
        // slot 0
        address buyer;
        uint40 biddingEnds;
        uint16 rounds;
        uint8 minTrainers;
        uint8 maxTrainers;
        uint8 trainerCount;
        // slot 1
        address aggregator;
        TaskState state;
        uint16 publishedRounds;
        uint40 phaseStart;
        uint32 roundTimeout;
        // slot 2
        bytes32 specHash;
        // slot 3
        uint256 budget;
        // slot 4: the platform minimums when the task was created, so a later change by the
        // owner never changes the rules of a task that is already open.
        uint96 aggregatorPrice;
        uint96 minTrainerPrice;
        // slot 5
        uint96 minAggregatorPrice;
        uint64 sampleCap;
        uint32 disputeWindow;
        FlexVerifier.Strategy strategy;
        uint16 trimPerMille;
        // slot 6: stakes and bonds paid in with bids and not yet returned or slashed
        uint256 stakesHeld;
    }

    /// @dev `masks` packs the round's submitted updates (bits 0..127, one per trainer
    /// position) and the ones the aggregator used for the next round (bits 128..255), so a
    /// submission and the aggregation that checks it touch one slot. `exclusions` is the
    /// keccak256 of the statement of why the next round left updates out (0: none stated).
    struct Round {
        bytes32 globalModel;
        uint256 masks;
        bytes32 exclusions;
    }

    /// @dev What settlement credits, computed before anything is credited.
    struct Payout {
        uint256[] pay;
        uint256 trainersPaid;
        uint256 aggregatorPaid;
        uint256 kept;
    }

    /// @dev Per-round working arrays of settlement: one entry per trainer position, and the
    /// round's score words.
    struct Scratch {
        uint256[] prices;
        uint256[] shares;
        uint256[] words;
    }

    /// @dev Working state of {selectNodes}, kept in memory so the stack stays shallow.
    struct Selection {
        uint256 trainerBids;
        bool hasAggregator;
        bool aggregatorFits;
        uint256 aggregatorIndex;
        uint256 aggregatorPrice;
        uint256 rounds;
        uint256 budget;
        uint256 maxTrainers;
        uint256 committed;
        uint256 selected;
        address[] trainers;
        uint256[] prices;
        bytes32 seed;
    }

    /// @notice Everything about a task, as returned by {task}.
    struct TaskInfo {
        address buyer;
        TaskState state;
        bytes32 specHash;
        uint256 budgetWei;
        uint256 rounds;
        uint256 minTrainers;
        uint256 maxTrainers;
        uint256 biddingEnds;
        uint256 roundTimeout;
        uint256 minTrainerPriceWei;
        uint256 minAggregatorPriceWei;
        uint256 bidCount;
        address aggregator;
        uint256 aggregatorPriceWei;
        uint256 trainerCount;
        uint256 publishedRounds;
        uint256 phaseStart;
        uint256 submissionDeadline;
        uint256 publishDeadline;
        uint256 sampleCap;
        uint256 trainerStakeWei;
        uint256 aggregatorBondWei;
        uint256 stakesHeldWei;
        uint256 disputeWindow;
        FlexVerifier.Strategy strategy;
        uint256 trimPerMille;
        uint256 disputeClosesAt;
    }

    /// @notice How a task's global models are computed and may be disputed (see {createTask}).
    struct Terms {
        uint256 sampleCap;
        uint256 disputeWindow;
        FlexVerifier.Strategy strategy;
        uint256 trimPerMille;
    }

    /// @notice What a challenge of one global model opens: the IDs of the updates the model
    /// aggregated (ascending trainer position), the coordinate, and one chunk of each model.
    struct Dispute {
        bytes32[] updateIds;
        FlexVerifier.Point at;
        FlexVerifier.Opening global;
        FlexVerifier.Opening[] updates;
    }

    /// @notice Where a model ID was used first, as returned by {modelOrigin}.
    struct ModelOrigin {
        bool known;
        bool isGlobal;
        uint256 taskId;
        uint256 round;
        address author;
        uint256 blockNumber;
    }

    /// @notice One round as returned by {roundInfo}.
    struct RoundInfo {
        bytes32 globalModel;
        uint256 submittedMask;
        uint256 aggregatedMask;
        uint16[] scores;
    }

    // -------------------------------------------------------------- constants

    /// @notice Most trainers a task may select: one bit each in a 128-bit half of a slot.
    uint256 public constant MAX_TRAINERS = 128;
    /// @notice Most rounds a task may have; bounds the settlement loop.
    uint256 public constant MAX_ROUNDS = 100;
    /// @notice Most bids a task accepts; bounds the selection loops.
    uint256 public constant MAX_BIDS = 1000;
    /// @notice Longest round timeout a task may ask for.
    uint256 public constant MAX_ROUND_TIMEOUT = 30 days;
    /// @notice Longest dispute window a task may ask for.
    uint256 public constant MAX_DISPUTE_WINDOW = 30 days;
    /// @notice Share of a slashed bond that goes to the challenger who proved the aggregate
    /// wrong, in per mille (a quarter).
    uint256 public constant CHALLENGE_BOUNTY_PER_MILLE = 250;

    uint256 private constant _LOW_128 = type(uint128).max;
    uint256 private constant _BID_SLOT_MASK = 0xffffffff;
    uint256 private constant _POSITION_SHIFT = 32;
    uint256 private constant _SCORES_PER_WORD = 16;
    uint256 private constant _SCORE_BITS = 16;
    uint256 private constant _RELEASED = 1 << 40;
    uint256 private constant _PUBLISHED_AT_SHIFT = 152;

    // ------------------------------------------------------------------ state

    FlexVerifier private immutable _verifier;
    address private _owner;
    address private _registrar;
    uint96 private _minTrainerPrice;
    uint96 private _minAggregatorPrice;
    uint256 private _taskCount;
    uint256 private _escrowLocked;
    uint256 private _creditsOwed;

    mapping(address device => Device) private _devices;
    mapping(uint256 taskId => Task) private _tasks;
    mapping(uint256 taskId => Bid[]) private _bids;
    /// @dev Per task and device: bits 0..31 the bid index + 1, bits 32..39 the trainer
    /// position + 1 once selected; written at bid time so selection only updates it.
    mapping(uint256 taskId => mapping(address device => uint256)) private _participants;
    mapping(uint256 taskId => mapping(uint256 position => Trainer)) private _trainers;
    mapping(uint256 taskId => mapping(uint256 round => Round)) private _rounds;
    /// @dev Every model ID ever submitted or published, so none is accepted twice: bits 0..7
    /// the trainer position + 1 (0 for a global model), 8..23 the round, 24..87 the task,
    /// 88..151 the block, 152..191 the block's timestamp. Written once per ID; it also answers
    /// who submitted an update and when a global model's dispute window opened.
    mapping(bytes32 modelId => uint256) private _models;
    /// @dev Scores of round r's aggregated trainers, sixteen uint16 per word in ascending
    /// position order after a marker lane (see _storeScores); unscored rounds have none.
    mapping(uint256 taskId => mapping(uint256 round => mapping(uint256 word => uint256)))
        private _scoreWords;
    mapping(address account => uint256) private _credits;

    bool private transient _entered;

    // ----------------------------------------------------------------- events

    /// @notice Ownership moved from `previousOwner` to `newOwner`.
    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);
    /// @notice The registrar role moved from `previousRegistrar` to `newRegistrar`.
    event RegistrarChanged(address indexed previousRegistrar, address indexed newRegistrar);
    /// @notice The platform minimum prices per round (wei) for tasks created from now on.
    event MinPricesChanged(uint256 minTrainerPriceWei, uint256 minAggregatorPriceWei);
    /// @notice `device` was registered (or re-registered after a revocation).
    event DeviceRegistered(address indexed device, DeviceClass deviceClass, bool canAggregate);
    /// @notice `device` was revoked: it may no longer bid, submit or publish.
    event DeviceRevoked(address indexed device);
    /// @notice A task was created with `budget` wei locked in escrow; trainer bids' sample
    /// counts are capped at `sampleCap`.
    event TaskCreated(
        uint256 indexed taskId,
        address indexed buyer,
        bytes32 specHash,
        uint256 budgetWei,
        uint256 rounds,
        uint256 minTrainers,
        uint256 maxTrainers,
        uint256 biddingEnds,
        uint256 roundTimeout,
        uint256 minTrainerPriceWei,
        uint256 minAggregatorPriceWei,
        uint256 sampleCap
    );
    /// @notice The task's global models may be challenged for `disputeWindow` seconds after
    /// each is published, and are recomputed by `strategy` (with `trimPerMille`).
    event DisputeTermsSet(
        uint256 indexed taskId,
        uint256 disputeWindow,
        FlexVerifier.Strategy strategy,
        uint256 trimPerMille
    );
    /// @notice `device` placed (or, when `replaced`, replaced) its bid at `bidIndex`, with
    /// `samples` already capped by the task and `depositWei` its stake (trainer) or bond
    /// (aggregator) now held.
    event BidPlaced(
        uint256 indexed taskId,
        address indexed device,
        uint256 bidIndex,
        Role role,
        uint256 pricePerRoundWei,
        uint256 samples,
        bool replaced,
        uint256 depositWei
    );
    /// @notice `device` withdrew its bid while bidding was open; the bid that was last,
    /// `movedDevice`'s (zero if none), now sits at `bidIndex`.
    event BidWithdrawn(
        uint256 indexed taskId,
        address indexed device,
        uint256 bidIndex,
        address movedDevice
    );
    /// @notice Selection succeeded; `trainers[i]` is the trainer at position i; `seed`
    /// broke ties between bids of equal price (per sample).
    event NodesSelected(
        uint256 indexed taskId,
        address indexed aggregator,
        uint256 aggregatorPriceWei,
        address[] trainers,
        uint256[] trainerPricesWei,
        bytes32 seed
    );
    /// @notice Selection failed; the whole budget is credited back to the buyer.
    event TaskFailed(uint256 indexed taskId, FailureReason reason, uint256 selectableTrainers);
    /// @notice The buyer cancelled the task before selection; the budget is credited back.
    event TaskCancelled(uint256 indexed taskId);
    /// @notice The aggregator published the global model of `round`, built from the
    /// round-1 updates in `aggregatedMask` (bit i = trainer position i) with optional scores.
    event GlobalModelPublished(
        uint256 indexed taskId,
        uint256 indexed round,
        bytes32 modelId,
        uint256 aggregatedMask,
        uint16[] scores
    );
    /// @notice Global model `round` left round-1 updates out, for the reasons `statement`
    /// gives: 34 bytes per position (position ‖ FlexVerifier.Reason ‖ evidence model ID).
    event UpdatesExcluded(uint256 indexed taskId, uint256 indexed round, bytes statement);
    /// @notice `challenger` showed that global model `round` left out the update of trainer
    /// `position` for a false or missing `reason`: the aggregator's bond is slashed as for a
    /// wrong aggregate, `bountyWei` of it to the challenger ({TaskAborted} follows).
    event ExclusionContested(
        uint256 indexed taskId,
        uint256 indexed round,
        address indexed challenger,
        uint256 position,
        FlexVerifier.Reason reason,
        uint256 bountyWei
    );
    /// @notice The trainer at `position` submitted its update for `round`.
    event UpdateSubmitted(
        uint256 indexed taskId,
        uint256 indexed round,
        address indexed trainer,
        uint256 position,
        bytes32 modelId
    );
    /// @notice The task was settled after its final round; `slashedWei` is the stakes of
    /// trainers that missed a round (credited to the buyer).
    event TaskFinalized(
        uint256 indexed taskId,
        uint256 trainersPaidWei,
        uint256 aggregatorPaidWei,
        uint256 refundedWei,
        uint256 slashedWei
    );
    /// @notice The task was aborted after its aggregator missed a deadline; `slashedWei` is
    /// its bond plus the stakes of trainers that missed a round.
    event TaskAborted(
        uint256 indexed taskId,
        uint256 publishedRounds,
        uint256 trainersPaidWei,
        uint256 aggregatorPaidWei,
        uint256 refundedWei,
        uint256 slashedWei
    );
    /// @notice `challenger` proved global model `round` wrong (`verdict`, at value `offset` of
    /// chunk `chunk`) within its dispute window: the aggregator's bond is slashed, `bountyWei`
    /// of it to the challenger, and the task ends aborted ({TaskAborted} follows).
    event AggregateChallenged(
        uint256 indexed taskId,
        uint256 indexed round,
        address indexed challenger,
        FlexVerifier.Verdict verdict,
        uint256 chunk,
        uint256 offset,
        uint256 bountyWei
    );
    /// @notice `amount` wei became withdrawable by `account`.
    event PaymentCredited(
        address indexed account,
        uint256 indexed taskId,
        uint256 amountWei,
        CreditReason reason
    );
    /// @notice `account` withdrew `amount` wei.
    event Withdrawn(address indexed account, uint256 amountWei);

    // ----------------------------------------------------------------- errors

    error FlexMarketNotOwner(address account);
    error FlexMarketNotRegistrar(address account);
    error FlexMarketNotBuyer(uint256 taskId, address account);
    error FlexMarketNotAggregator(uint256 taskId, address account);
    error FlexMarketNotSelectedTrainer(uint256 taskId, address account);
    error FlexMarketZeroAddress();
    error FlexMarketDeviceAlreadyRegistered(address device);
    error FlexMarketDeviceNotRegistered(address device);
    error FlexMarketDeviceRevoked(address device);
    error FlexMarketCannotAggregate(address device);
    error FlexMarketUnknownTask(uint256 taskId);
    error FlexMarketInvalidTaskState(uint256 taskId, TaskState state);
    error FlexMarketInvalidRounds(uint256 rounds, uint256 maxRounds);
    error FlexMarketInvalidTrainerRange(uint256 minTrainers, uint256 maxTrainers, uint256 cap);
    error FlexMarketInvalidBiddingEnd(uint256 biddingEnds, uint256 nowTimestamp);
    error FlexMarketInvalidRoundTimeout(uint256 roundTimeout, uint256 maxRoundTimeout);
    error FlexMarketBudgetTooLow(uint256 budgetWei, uint256 minimumWei);
    error FlexMarketBiddingClosed(uint256 taskId, uint256 biddingEnds);
    error FlexMarketBiddingOpen(uint256 taskId, uint256 biddingEnds);
    error FlexMarketTooManyBids(uint256 taskId, uint256 maxBids);
    error FlexMarketPriceBelowMinimum(uint256 priceWei, uint256 minimumWei);
    error FlexMarketZeroSamples();
    error FlexMarketInvalidHintLength(uint256 expected, uint256 got);
    error FlexMarketInvalidHint(uint256 position, uint256 bidIndex);
    error FlexMarketRoundNotOpen(uint256 taskId);
    error FlexMarketWrongRound(uint256 expected, uint256 got);
    error FlexMarketZeroModelId();
    error FlexMarketAlreadySubmitted(uint256 taskId, uint256 round, address trainer);
    error FlexMarketSubmissionClosed(uint256 taskId, uint256 round, uint256 deadline);
    error FlexMarketDeadlinePassed(uint256 taskId, uint256 deadline);
    error FlexMarketDeadlineNotPassed(uint256 taskId, uint256 deadline);
    error FlexMarketEmptyAggregation(uint256 taskId, uint256 round);
    error FlexMarketUnsubmittedUpdates(uint256 taskId, uint256 round, uint256 missing);
    error FlexMarketScoresLengthMismatch(uint256 expected, uint256 got);
    error FlexMarketZeroScores();
    error FlexMarketNothingToWithdraw(address account);
    error FlexMarketTransferFailed(address account, uint256 amountWei);
    error FlexMarketReentrantCall();
    error FlexMarketInvalidSampleCap(uint256 sampleCap);
    error FlexMarketWrongDeposit(uint256 expectedWei, uint256 gotWei);
    error FlexMarketBuyerCannotAggregate(uint256 taskId, address account);
    error FlexMarketNoBid(uint256 taskId, address device);
    error FlexMarketNotBidder(uint256 taskId, address account);
    error FlexMarketBidSelected(uint256 taskId, address device);
    error FlexMarketModelIdUsed(bytes32 modelId);
    error FlexMarketRoundStillOpen(uint256 taskId, uint256 round, uint256 deadline);
    error FlexMarketInvalidDisputeTerms(uint256 disputeWindow, uint8 strategy, uint256 trimPerMille);
    error FlexMarketNoAggregate(uint256 taskId, uint256 round);
    error FlexMarketDisputeWindowClosed(uint256 taskId, uint256 round, uint256 closedAt);
    error FlexMarketDisputeWindowOpen(uint256 taskId, uint256 closesAt);
    error FlexMarketNotIncluded(uint256 index, bytes32 modelId);
    error FlexMarketChallengeFailed(uint256 taskId, uint256 round);
    error FlexMarketAggregatorCannotChallenge(uint256 taskId, address account);
    error FlexMarketStatementMismatch(uint256 taskId, uint256 round);
    error FlexMarketNotExcluded(uint256 taskId, uint256 round, uint256 position);
    error FlexMarketNotVerifier(address account);

    // -------------------------------------------------------------- modifiers

    modifier onlyOwner() {
        if (msg.sender != _owner) revert FlexMarketNotOwner(msg.sender);
        _;
    }

    modifier onlyRegistrar() {
        if (msg.sender != _registrar) revert FlexMarketNotRegistrar(msg.sender);
        _;
    }

    modifier nonReentrant() {
        if (_entered) revert FlexMarketReentrantCall();
        _entered = true;
        _;
        _entered = false;
    }

    // ------------------------------------------------------------ constructor

    /**
     * @notice Deploys the market; the deployer becomes owner and registrar.
     * @param minTrainerPriceWei Platform minimum trainer price per round, in wei.
     * @param minAggregatorPriceWei Platform minimum aggregator price per round, in wei.
     * @param verifier_ The FlexVerifier that checks challenges (stateless; its code is fixed).
     * @dev Emits {OwnershipTransferred}, {RegistrarChanged} and {MinPricesChanged} so an
     * event mirror starts from the same state as the contract. Reverts with
     * {FlexMarketZeroAddress} for a zero verifier.
     */
    constructor(uint96 minTrainerPriceWei, uint96 minAggregatorPriceWei, FlexVerifier verifier_) {
        if (address(verifier_) == address(0)) revert FlexMarketZeroAddress();
        _verifier = verifier_;
        _owner = msg.sender;
        emit OwnershipTransferred(address(0), msg.sender);
        _registrar = msg.sender;
        emit RegistrarChanged(address(0), msg.sender);
        _minTrainerPrice = minTrainerPriceWei;
        _minAggregatorPrice = minAggregatorPriceWei;
        emit MinPricesChanged(minTrainerPriceWei, minAggregatorPriceWei);
    }

    // ------------------------------------------------------------ owner admin

    /**
     * @notice Hands ownership to `newOwner`.
     * @param newOwner The new owner; not the zero address.
     * @dev Emits {OwnershipTransferred}. Reverts with {FlexMarketNotOwner} unless called by
     * the owner, {FlexMarketZeroAddress} for the zero address.
     */
    function transferOwnership(address newOwner) external onlyOwner {
        if (newOwner == address(0)) revert FlexMarketZeroAddress();
        address previous = _owner;
        _owner = newOwner;
        emit OwnershipTransferred(previous, newOwner);
    }

    /**
     * @notice Gives the registrar role (device registration and revocation) to `newRegistrar`.
     * @param newRegistrar The new registrar; not the zero address.
     * @dev Emits {RegistrarChanged}. Reverts with {FlexMarketNotOwner} unless called by the
     * owner, {FlexMarketZeroAddress} for the zero address.
     */
    function setRegistrar(address newRegistrar) external onlyOwner {
        if (newRegistrar == address(0)) revert FlexMarketZeroAddress();
        address previous = _registrar;
        _registrar = newRegistrar;
        emit RegistrarChanged(previous, newRegistrar);
    }

    /**
     * @notice Sets the platform minimum prices per round for tasks created from now on.
     * @param minTrainerPriceWei Minimum trainer price per round, in wei.
     * @param minAggregatorPriceWei Minimum aggregator price per round, in wei.
     * @dev Emits {MinPricesChanged}. Reverts with {FlexMarketNotOwner} unless called by the
     * owner. Open tasks keep the minimums they were created with.
     */
    function setMinPrices(uint96 minTrainerPriceWei, uint96 minAggregatorPriceWei)
        external
        onlyOwner
    {
        _minTrainerPrice = minTrainerPriceWei;
        _minAggregatorPrice = minAggregatorPriceWei;
        emit MinPricesChanged(minTrainerPriceWei, minAggregatorPriceWei);
    }

    // -------------------------------------------------------- device registry

    /**
     * @notice Registers `device`, or re-registers a revoked one with a new profile.
     * @param device The device's own address (it signs its own transactions).
     * @param deviceClass Its hardware class.
     * @param canAggregate Whether it may bid as aggregator.
     * @dev Emits {DeviceRegistered}. Reverts with {FlexMarketNotRegistrar} unless called by
     * the registrar, {FlexMarketZeroAddress}, {FlexMarketDeviceAlreadyRegistered} if active.
     */
    function registerDevice(address device, DeviceClass deviceClass, bool canAggregate)
        external
        onlyRegistrar
    {
        if (device == address(0)) revert FlexMarketZeroAddress();
        if (_devices[device].status == DeviceStatus.Active) {
            revert FlexMarketDeviceAlreadyRegistered(device);
        }
        _devices[device] = Device(DeviceStatus.Active, deviceClass, canAggregate);
        emit DeviceRegistered(device, deviceClass, canAggregate);
    }

    /**
     * @notice Revokes `device`: it can no longer bid, be selected, submit or publish. What it
     * already delivered is still paid at settlement.
     * @param device The device to revoke.
     * @dev Emits {DeviceRevoked}. Reverts with {FlexMarketNotRegistrar} unless called by the
     * registrar, {FlexMarketDeviceNotRegistered} if never registered,
     * {FlexMarketDeviceRevoked} if already revoked.
     */
    function revokeDevice(address device) external onlyRegistrar {
        DeviceStatus status = _devices[device].status;
        if (status == DeviceStatus.None) revert FlexMarketDeviceNotRegistered(device);
        if (status == DeviceStatus.Revoked) revert FlexMarketDeviceRevoked(device);
        _devices[device].status = DeviceStatus.Revoked;
        emit DeviceRevoked(device);
    }

    // ------------------------------------------------------------------ tasks

    /**
     * @notice Creates a training task and locks `msg.value` as its budget.
     * @param specHash Hash of the off-chain task spec.
     * @param rounds Number of training rounds R (global models 0..R), 1..MAX_ROUNDS.
     * @param minTrainers Fewest trainers the task may run with, at least 1.
     * @param maxTrainers Most trainers selection may pick, minTrainers..MAX_TRAINERS.
     * @param biddingEnds Unix time at which bidding closes; must be in the future.
     * @param roundTimeout Seconds trainers have to submit in each round, 1..MAX_ROUND_TIMEOUT.
     * @param terms `sampleCap`: most samples a trainer bid may claim (larger claims are
     * stored as the cap, so no claim ranks or weighs more than it), at least 1;
     * `disputeWindow`: seconds after each global model's publication in which anyone may
     * {challenge} it, 0..MAX_DISPUTE_WINDOW (0: no disputes); `strategy` and `trimPerMille`
     * (0..499, FedTrimmedAvg only): the aggregation rule the spec names, which a challenge
     * recomputes.
     * @return taskId The new task's id (sequential from 1).
     * @dev Emits {TaskCreated} then {DisputeTermsSet}. Reverts with {FlexMarketInvalidRounds},
     * {FlexMarketInvalidTrainerRange}, {FlexMarketInvalidBiddingEnd},
     * {FlexMarketInvalidRoundTimeout}, {FlexMarketInvalidSampleCap},
     * {FlexMarketInvalidDisputeTerms}, {FlexMarketBudgetTooLow}
     * when `msg.value < rounds * (minTrainers * minTrainerPrice + minAggregatorPrice)`.
     */
    function createTask(
        bytes32 specHash,
        uint256 rounds,
        uint256 minTrainers,
        uint256 maxTrainers,
        uint256 biddingEnds,
        uint256 roundTimeout,
        Terms calldata terms
    ) external payable returns (uint256 taskId) {
        uint256 sampleCap = terms.sampleCap;
        if (rounds == 0 || rounds > MAX_ROUNDS) revert FlexMarketInvalidRounds(rounds, MAX_ROUNDS);
        if (minTrainers == 0 || minTrainers > maxTrainers || maxTrainers > MAX_TRAINERS) {
            revert FlexMarketInvalidTrainerRange(minTrainers, maxTrainers, MAX_TRAINERS);
        }
        if (biddingEnds <= block.timestamp || biddingEnds > type(uint40).max) {
            revert FlexMarketInvalidBiddingEnd(biddingEnds, block.timestamp);
        }
        if (roundTimeout == 0 || roundTimeout > MAX_ROUND_TIMEOUT) {
            revert FlexMarketInvalidRoundTimeout(roundTimeout, MAX_ROUND_TIMEOUT);
        }
        if (sampleCap == 0 || sampleCap > type(uint64).max) {
            revert FlexMarketInvalidSampleCap(sampleCap);
        }
        _checkTerms(terms);
        uint96 minTrainerPrice = _minTrainerPrice;
        uint96 minAggregatorPrice = _minAggregatorPrice;
        uint256 minimum = rounds * (minTrainers * minTrainerPrice + minAggregatorPrice);
        if (msg.value < minimum) revert FlexMarketBudgetTooLow(msg.value, minimum);

        taskId = ++_taskCount;
        Task storage t = _tasks[taskId];
        t.buyer = msg.sender;
        t.biddingEnds = uint40(biddingEnds);
        t.rounds = uint16(rounds);
        t.minTrainers = uint8(minTrainers);
        t.maxTrainers = uint8(maxTrainers);
        t.state = TaskState.Bidding;
        t.roundTimeout = uint32(roundTimeout);
        t.specHash = specHash;
        t.budget = msg.value;
        t.minTrainerPrice = minTrainerPrice;
        t.minAggregatorPrice = minAggregatorPrice;
        t.sampleCap = uint64(sampleCap);
        t.disputeWindow = uint32(terms.disputeWindow);
        t.strategy = terms.strategy;
        t.trimPerMille = uint16(terms.trimPerMille);
        _escrowLocked += msg.value;
        _emitTaskCreated(taskId, t);
        emit DisputeTermsSet(taskId, terms.disputeWindow, terms.strategy, terms.trimPerMille);
    }

    function _checkTerms(Terms calldata terms) private pure {
        bool trims = terms.strategy == FlexVerifier.Strategy.FedTrimmedAvg;
        if (
            terms.disputeWindow > MAX_DISPUTE_WINDOW || terms.trimPerMille > 499
                || (!trims && terms.trimPerMille != 0)
        ) {
            revert FlexMarketInvalidDisputeTerms(
                terms.disputeWindow, uint8(terms.strategy), terms.trimPerMille
            );
        }
    }

    function _emitTaskCreated(uint256 taskId, Task storage t) private {
        emit TaskCreated(
            taskId,
            t.buyer,
            t.specHash,
            t.budget,
            t.rounds,
            t.minTrainers,
            t.maxTrainers,
            t.biddingEnds,
            t.roundTimeout,
            t.minTrainerPrice,
            t.minAggregatorPrice,
            t.sampleCap
        );
    }

    /**
     * @notice Cancels a task before node selection and credits the whole budget to the buyer.
     * @param taskId The task.
     * @dev Emits {TaskCancelled} then {PaymentCredited}. Reverts with
     * {FlexMarketUnknownTask}, {FlexMarketNotBuyer}, {FlexMarketInvalidTaskState} unless
     * the task is still bidding.
     */
    function cancelTask(uint256 taskId) external {
        Task storage t = _existingTask(taskId);
        if (msg.sender != t.buyer) revert FlexMarketNotBuyer(taskId, msg.sender);
        _requireState(taskId, t, TaskState.Bidding);
        t.state = TaskState.Cancelled;
        emit TaskCancelled(taskId);
        uint256 budget = t.budget;
        _escrowLocked -= budget;
        _credit(t.buyer, taskId, budget, CreditReason.Refund);
    }

    // ---------------------------------------------------------------- bidding

    /**
     * @notice Places the caller's bid on a task, or replaces its earlier bid on that task,
     * paying in its deposit: a trainer's stake or an aggregator's bond (see {task}). A bid
     * replacing one of another role pays (or is credited) the difference.
     * @param taskId The task.
     * @param pricePerRoundWei Price asked per round, in wei; at least the task's minimum for
     * `role`.
     * @param samples Number of local training samples; non-zero for a trainer bid; stored
     * capped at the task's sampleCap.
     * @param role Trainer, or Aggregator (only for devices registered as able to aggregate,
     * never the task's buyer).
     * @dev Emits {BidPlaced} (and {PaymentCredited} when a replaced bid's deposit shrinks).
     * Reverts with {FlexMarketUnknownTask}, {FlexMarketInvalidTaskState},
     * {FlexMarketBiddingClosed}, {FlexMarketDeviceNotRegistered}, {FlexMarketDeviceRevoked},
     * {FlexMarketCannotAggregate}, {FlexMarketBuyerCannotAggregate}, {FlexMarketZeroSamples},
     * {FlexMarketPriceBelowMinimum}, {FlexMarketTooManyBids}, {FlexMarketWrongDeposit}.
     */
    function placeBid(uint256 taskId, uint96 pricePerRoundWei, uint64 samples, Role role)
        external
        payable
    {
        Task storage t = _existingTask(taskId);
        _requireState(taskId, t, TaskState.Bidding);
        if (block.timestamp >= t.biddingEnds) revert FlexMarketBiddingClosed(taskId, t.biddingEnds);
        Device memory entry = _devices[msg.sender];
        _requireActive(msg.sender, entry.status);
        uint256 minimum;
        if (role == Role.Aggregator) {
            if (!entry.canAggregate) revert FlexMarketCannotAggregate(msg.sender);
            if (msg.sender == t.buyer) revert FlexMarketBuyerCannotAggregate(taskId, msg.sender);
            minimum = t.minAggregatorPrice;
        } else {
            if (samples == 0) revert FlexMarketZeroSamples();
            minimum = t.minTrainerPrice;
        }
        if (pricePerRoundWei < minimum) {
            revert FlexMarketPriceBelowMinimum(pricePerRoundWei, minimum);
        }
        if (samples > t.sampleCap) samples = t.sampleCap;
        (uint256 bidIndex, bool replaced, uint256 held) =
            _storeBid(taskId, t, Bid(msg.sender, pricePerRoundWei, samples, role));
        uint256 deposit = _deposit(t, role);
        emit BidPlaced(
            taskId, msg.sender, bidIndex, role, pricePerRoundWei, samples, replaced, deposit
        );
        uint256 due = deposit > held ? deposit - held : 0;
        if (msg.value != due) revert FlexMarketWrongDeposit(due, msg.value);
        if (due != 0) {
            t.stakesHeld += due;
            _escrowLocked += due;
        } else if (held > deposit) {
            _releaseStake(taskId, t, msg.sender, held - deposit);
        }
    }

    /// @dev Stores a new bid or replaces the sender's; returns where, and the deposit the
    /// replaced bid held.
    function _storeBid(uint256 taskId, Task storage t, Bid memory bid)
        private
        returns (uint256 bidIndex, bool replaced, uint256 held)
    {
        Bid[] storage taskBids = _bids[taskId];
        uint256 slot = _participants[taskId][bid.device] & _BID_SLOT_MASK;
        replaced = slot != 0;
        if (replaced) {
            bidIndex = slot - 1;
            held = _deposit(t, taskBids[bidIndex].role);
            taskBids[bidIndex] = bid;
        } else {
            bidIndex = taskBids.length;
            if (bidIndex >= MAX_BIDS) revert FlexMarketTooManyBids(taskId, MAX_BIDS);
            taskBids.push(bid);
            _participants[taskId][bid.device] = bidIndex + 1;
        }
    }

    /**
     * @notice Withdraws `device`'s bid and credits its stake or bond back to it. While the
     * task is bidding, the device itself may withdraw (anyone, once the device is revoked):
     * the bid is removed and its slot freed. After bidding (selection done or failed, or the
     * task cancelled) anyone may release the deposit of a bid that was not selected.
     * @param taskId The task.
     * @param device The bidder.
     * @dev Emits {BidWithdrawn} (while bidding), then {PaymentCredited} (StakeReturned) for a
     * non-zero deposit. Reverts with {FlexMarketUnknownTask}, {FlexMarketNoBid} (no bid, or
     * its deposit already released), {FlexMarketNotBidder}, {FlexMarketBidSelected}.
     */
    function withdrawBid(uint256 taskId, address device) external {
        Task storage t = _existingTask(taskId);
        uint256 word = _participants[taskId][device];
        uint256 slot = word & _BID_SLOT_MASK;
        if (slot == 0 || word & _RELEASED != 0) revert FlexMarketNoBid(taskId, device);
        Bid[] storage taskBids = _bids[taskId];
        uint256 bidIndex = slot - 1;
        uint256 deposit = _deposit(t, taskBids[bidIndex].role);
        if (t.state == TaskState.Bidding) {
            if (msg.sender != device && _devices[device].status == DeviceStatus.Active) {
                revert FlexMarketNotBidder(taskId, msg.sender);
            }
            uint256 last = taskBids.length - 1;
            address moved;
            if (bidIndex != last) {
                Bid memory lastBid = taskBids[last];
                moved = lastBid.device;
                taskBids[bidIndex] = lastBid;
                _participants[taskId][moved] = bidIndex + 1;
            }
            taskBids.pop();
            delete _participants[taskId][device];
            emit BidWithdrawn(taskId, device, bidIndex, moved);
        } else {
            if (word >> _POSITION_SHIFT != 0 || (device == t.aggregator && device != address(0)))
            {
                revert FlexMarketBidSelected(taskId, device);
            }
            _participants[taskId][device] = word | _RELEASED;
        }
        _releaseStake(taskId, t, device, deposit);
    }

    // -------------------------------------------------------------- selection

    /**
     * @notice Selects the task's aggregator and trainers once bidding has closed; anyone may
     * call it. Ties between bids of equal price (per sample) go to the lower tie key
     * `keccak256(abi.encode(seed, bidIndex))`, where `seed = keccak256(abi.encode(
     * blockhash(block.number - 1), taskId))` is fixed only by the block selection runs in, so
     * bidding first wins nothing. The aggregator is the cheapest eligible aggregator bid.
     * Trainers are taken greedily by ascending price per sample: a
     * trainer is selected when fewer than maxTrainers are selected, its device is active, and
     * `(aggregatorPrice + sum of selected prices + its price) * rounds <= budget`; otherwise it
     * is skipped and the scan goes on. If no aggregator is eligible or affordable, or fewer
     * than minTrainers are selected, the task fails and the buyer is credited the budget.
     * @param taskId The task.
     * @param order Every trainer bid index, sorted by (price/samples, bid index) ascending:
     * compute it off chain for the block it will be mined in (chain.selection
     * .selection_order). It is checked in one pass.
     * @dev Emits {NodesSelected}, or {TaskFailed} then {PaymentCredited}. Reverts with
     * {FlexMarketUnknownTask}, {FlexMarketInvalidTaskState}, {FlexMarketBiddingOpen},
     * {FlexMarketInvalidHintLength}, {FlexMarketInvalidHint}.
     */
    function selectNodes(uint256 taskId, uint256[] calldata order) external {
        Task storage t = _existingTask(taskId);
        _requireState(taskId, t, TaskState.Bidding);
        if (block.timestamp < t.biddingEnds) revert FlexMarketBiddingOpen(taskId, t.biddingEnds);

        Bid[] storage taskBids = _bids[taskId];
        bytes32 seed = keccak256(abi.encode(blockhash(block.number - 1), taskId));
        Selection memory s = _findAggregator(taskBids, seed);
        if (order.length != s.trainerBids) {
            revert FlexMarketInvalidHintLength(s.trainerBids, order.length);
        }
        s.rounds = t.rounds;
        s.budget = t.budget;
        s.committed = s.aggregatorPrice * s.rounds;
        s.aggregatorFits = s.hasAggregator && s.committed <= s.budget;
        uint256 maxTrainers = t.maxTrainers;
        s.trainers = new address[](maxTrainers);
        s.prices = new uint256[](maxTrainers);
        s.maxTrainers = maxTrainers;
        _pickTrainers(taskBids, order, s);

        if (!s.hasAggregator) return _failSelection(taskId, t, FailureReason.NoAggregator, 0);
        if (!s.aggregatorFits) {
            return _failSelection(taskId, t, FailureReason.AggregatorOverBudget, 0);
        }
        uint256 selected = s.selected;
        if (selected < t.minTrainers) {
            return _failSelection(taskId, t, FailureReason.TooFewTrainers, selected);
        }

        address[] memory chosen = s.trainers;
        uint256[] memory prices = s.prices;
        // Shrink the memory arrays to the selected length so the event carries no padding.
        assembly ("memory-safe") {
            mstore(chosen, selected)
            mstore(prices, selected)
        }
        for (uint256 p = 0; p < selected; ++p) {
            address device = chosen[p];
            _trainers[taskId][p] = Trainer(device, uint96(prices[p]));
            _participants[taskId][device] |= (p + 1) << _POSITION_SHIFT;
        }
        address aggregator = taskBids[s.aggregatorIndex].device;
        t.trainerCount = uint8(selected);
        t.aggregatorPrice = uint96(s.aggregatorPrice);
        t.aggregator = aggregator;
        t.state = TaskState.Running;
        t.phaseStart = uint40(block.timestamp);
        emit NodesSelected(taskId, aggregator, s.aggregatorPrice, chosen, prices, seed);
    }

    // ----------------------------------------------------------------- rounds

    /**
     * @notice The selected aggregator publishes the global model of `round`. Round 0 is the
     * initial model (no aggregation); round r >= 1 states which round r-1 updates it
     * aggregated, with an optional contribution score per aggregated trainer. Publishing
     * round `rounds` (the final model) ends training.
     * @param taskId The task.
     * @param round The round whose global model this is; must be the next one.
     * A round r >= 1 closes only when its submission window has passed or every selected
     * trainer has submitted.
     * @param modelId The model's ID; non-zero, never used before as any model's ID.
     * @param aggregatedMask Bit i set = the update of trainer position i in round-1 was used;
     * an update left out earns nothing.
     * @param scores Empty, or one score per set bit in ascending position order (sum > 0);
     * they share out that round's fixed trainer pool (see {finalize}).
     * @param exclusions Why each submitted update left out of the mask was left out: 34 bytes
     * per position (position ‖ FlexVerifier.Reason ‖ evidence), empty when none was (and for
     * round 0). Not checked here: an exclusion with no or a false checkable reason is
     * slashed by {contestExclusion}.
     * @dev Emits {UpdatesExcluded} when `exclusions` is not empty, then {GlobalModelPublished}. Reverts with {FlexMarketUnknownTask},
     * {FlexMarketInvalidTaskState}, {FlexMarketNotAggregator}, {FlexMarketDeviceRevoked},
     * {FlexMarketZeroModelId}, {FlexMarketModelIdUsed}, {FlexMarketWrongRound},
     * {FlexMarketDeadlinePassed}, {FlexMarketRoundStillOpen}, {FlexMarketEmptyAggregation},
     * {FlexMarketUnsubmittedUpdates}, {FlexMarketScoresLengthMismatch},
     * {FlexMarketZeroScores}, {FlexMarketStatementMismatch} for exclusions in round 0.
     */
    function publishGlobalModel(
        uint256 taskId,
        uint256 round,
        bytes32 modelId,
        uint256 aggregatedMask,
        uint16[] calldata scores,
        bytes calldata exclusions
    ) external {
        Task storage t = _existingTask(taskId);
        _requireState(taskId, t, TaskState.Running);
        if (msg.sender != t.aggregator) revert FlexMarketNotAggregator(taskId, msg.sender);
        _requireActive(msg.sender, _devices[msg.sender].status);
        if (modelId == bytes32(0)) revert FlexMarketZeroModelId();
        uint256 expected = t.publishedRounds;
        if (round != expected) revert FlexMarketWrongRound(expected, round);
        uint256 deadline = _publishDeadline(t);
        if (block.timestamp > deadline) revert FlexMarketDeadlinePassed(taskId, deadline);

        if (round == 0) {
            if (aggregatedMask != 0) revert FlexMarketUnsubmittedUpdates(taskId, 0, aggregatedMask);
            if (scores.length != 0) revert FlexMarketScoresLengthMismatch(0, scores.length);
            if (exclusions.length != 0) revert FlexMarketStatementMismatch(taskId, 0);
        } else {
            _closeRound(taskId, t, round, aggregatedMask, scores, exclusions);
        }
        _useModelId(modelId, taskId, round, 0);
        _rounds[taskId][round].globalModel = modelId;
        t.publishedRounds = uint16(round + 1);
        t.phaseStart = uint40(block.timestamp);
        if (round == t.rounds) t.state = TaskState.Trained;
        emit GlobalModelPublished(taskId, round, modelId, aggregatedMask, scores);
    }

    /// @dev Round `round - 1` closes by the rules with the updates `aggregatedMask` names.
    function _closeRound(
        uint256 taskId,
        Task storage t,
        uint256 round,
        uint256 aggregatedMask,
        uint16[] calldata scores,
        bytes calldata exclusions
    ) private {
        if (aggregatedMask == 0) revert FlexMarketEmptyAggregation(taskId, round);
        Round storage previous = _rounds[taskId][round - 1];
        uint256 masks = previous.masks;
        uint256 closes = uint256(t.phaseStart) + t.roundTimeout;
        if (block.timestamp <= closes && masks & _LOW_128 != (1 << t.trainerCount) - 1) {
            revert FlexMarketRoundStillOpen(taskId, round, closes);
        }
        uint256 missing = aggregatedMask & ~(masks & _LOW_128);
        if (missing != 0) revert FlexMarketUnsubmittedUpdates(taskId, round, missing);
        if (scores.length != 0) _storeScores(taskId, round - 1, aggregatedMask, scores);
        previous.masks = masks | (aggregatedMask << 128);
        if (exclusions.length != 0) {
            previous.exclusions = keccak256(exclusions);
            emit UpdatesExcluded(taskId, round, exclusions);
        }
    }

    /**
     * @notice A selected trainer submits the ID of its update for the current round, trained
     * from that round's global model. One update per trainer per round, within roundTimeout
     * of the round's global model being published; later updates are rejected.
     * @param taskId The task.
     * @param round The current round (the latest published global model's round).
     * @param modelId The update's ID; non-zero and never used before as any model's ID
     * (another trainer's update, an old update, a global model), so it names its author.
     * @dev Emits {UpdateSubmitted}. Reverts with {FlexMarketUnknownTask},
     * {FlexMarketInvalidTaskState}, {FlexMarketZeroModelId}, {FlexMarketNotSelectedTrainer},
     * {FlexMarketDeviceRevoked}, {FlexMarketRoundNotOpen}, {FlexMarketWrongRound},
     * {FlexMarketSubmissionClosed}, {FlexMarketAlreadySubmitted}, {FlexMarketModelIdUsed}.
     */
    function submitUpdate(uint256 taskId, uint256 round, bytes32 modelId) external {
        Task storage t = _existingTask(taskId);
        _requireState(taskId, t, TaskState.Running);
        if (modelId == bytes32(0)) revert FlexMarketZeroModelId();
        uint256 position = (_participants[taskId][msg.sender] >> _POSITION_SHIFT) & 0xff;
        if (position == 0) revert FlexMarketNotSelectedTrainer(taskId, msg.sender);
        unchecked {
            --position;
        }
        _requireActive(msg.sender, _devices[msg.sender].status);
        uint256 published = t.publishedRounds;
        if (published == 0) revert FlexMarketRoundNotOpen(taskId);
        uint256 current = published - 1;
        if (round != current) revert FlexMarketWrongRound(current, round);
        uint256 deadline = uint256(t.phaseStart) + t.roundTimeout;
        if (block.timestamp > deadline) revert FlexMarketSubmissionClosed(taskId, round, deadline);

        Round storage r = _rounds[taskId][round];
        uint256 masks = r.masks;
        uint256 bit = 1 << position;
        if (masks & bit != 0) revert FlexMarketAlreadySubmitted(taskId, round, msg.sender);
        r.masks = masks | bit;
        _useModelId(modelId, taskId, round, position + 1);
        emit UpdateSubmitted(taskId, round, msg.sender, position, modelId);
    }

    // ------------------------------------------------------------- settlement

    /**
     * @notice Settles a task whose final global model is published; anyone may call it.
     * For each round r < rounds, the trainers whose updates global model r+1 aggregated
     * share a fixed pool, half the sum of their prices: unscored, each gets half its price;
     * scored, each gets `pool * score / sum(scores)` capped at its price, and what the caps
     * held back goes to the uncapped ones in proportion to their headroom (price - share),
     * so the whole pool is paid out whatever the scores. An update left out of the mask earns
     * nothing. The aggregator earns its price for each of rounds 1..R and gets its bond back;
     * each trainer gets its stake back unless it missed a round (then it goes to the buyer);
     * the buyer gets the rest of the budget. Only once the final model's dispute window
     * has passed.
     * @param taskId The task.
     * @dev Emits {TaskFinalized}, then {PaymentCredited} per non-zero credit. Reverts with
     * {FlexMarketUnknownTask}, {FlexMarketInvalidTaskState} unless the task is Trained,
     * {FlexMarketDisputeWindowOpen} while the final model may still be challenged.
     */
    function finalize(uint256 taskId) external {
        Task storage t = _existingTask(taskId);
        _requireState(taskId, t, TaskState.Trained);
        uint256 closes = uint256(t.phaseStart) + t.disputeWindow;
        if (block.timestamp <= closes && t.disputeWindow != 0) {
            revert FlexMarketDisputeWindowOpen(taskId, closes);
        }
        uint256 rounds = t.rounds;
        Payout memory out = _trainerPay(taskId, t, rounds, rounds);
        out.aggregatorPaid = uint256(t.aggregatorPrice) * rounds;
        t.state = TaskState.Finalized;
        _settle(taskId, t, out, false, address(0));
    }

    /**
     * @notice Aborts a running task whose aggregator missed its publish deadline; anyone may
     * call it. Trainers are paid as in {finalize} for the rounds aggregated so far; an update
     * of the open round was never acknowledged and is not paid from the budget. The
     * aggregator is paid for the rounds >= 1 it published and loses its bond: half of it is
     * shared equally by the trainers that missed no round (the whole of it goes to the buyer
     * when there are none), the rest goes to the buyer. Stakes as in {finalize}, the open
     * round included unless nobody submitted in it (its model may have been withheld).
     * @param taskId The task.
     * @dev Emits {TaskAborted}, then {PaymentCredited} per non-zero credit. Reverts with
     * {FlexMarketUnknownTask}, {FlexMarketInvalidTaskState} unless Running,
     * {FlexMarketDeadlineNotPassed} while the aggregator is still in time.
     */
    function abort(uint256 taskId) external {
        Task storage t = _existingTask(taskId);
        _requireState(taskId, t, TaskState.Running);
        uint256 deadline = _publishDeadline(t);
        if (block.timestamp <= deadline) revert FlexMarketDeadlineNotPassed(taskId, deadline);
        uint256 published = t.publishedRounds;
        uint256 aggregated = published == 0 ? 0 : published - 1;
        // An open round nobody submitted in counts against no stake: its global model may
        // have been withheld, and a trainer that could not fetch it cannot train.
        uint256 checked = published;
        if (published != 0 && _rounds[taskId][aggregated].masks & _LOW_128 == 0) {
            checked = aggregated;
        }
        Payout memory out = _trainerPay(taskId, t, aggregated, checked);
        out.aggregatorPaid = uint256(t.aggregatorPrice) * aggregated;
        t.state = TaskState.Aborted;
        _settle(taskId, t, out, true, address(0));
    }

    // -------------------------------------------------------------- disputes

    /**
     * @notice Proves global model `round` (>= 1) of a running or trained task wrong, within
     * its dispute window, by opening one chunk of it and of every update it aggregated (see
     * FlexVerifier.check, which recomputes one value by the task's strategy). On a wrong
     * value, a global model that is not this task's, or an included update the aggregator
     * had to leave out, the task ends aborted: the aggregator's bond is slashed, a quarter
     * (CHALLENGE_BOUNTY_PER_MILLE) to the caller, half of the rest shared equally by the
     * trainers that missed no closed round, the remainder to the buyer; trainers are paid as
     * in {finalize} for every round whose updates a published model aggregated; the
     * aggregator is paid for the rounds before `round`; the buyer gets the rest of the budget.
     * Anyone but the aggregator may challenge; a challenge that shows nothing reverts.
     * @param taskId The task.
     * @param round The global model's round.
     * @param dispute The IDs of the updates global `round` aggregated (ascending position),
     * the coordinate, and the openings.
     * @dev Emits {AggregateChallenged}, {TaskAborted}, then {PaymentCredited} per non-zero
     * credit. Reverts with {FlexMarketUnknownTask}, {FlexMarketInvalidTaskState} unless
     * Running or Trained, {FlexMarketAggregatorCannotChallenge}, {FlexMarketNoAggregate} for
     * round 0 or an unpublished round, {FlexMarketDisputeWindowClosed},
     * {FlexMarketNotIncluded} when `updateIds` are not the aggregated updates in position
     * order, any FlexVerifier error for an opening that does not hold, and
     * {FlexMarketChallengeFailed} when the value is correct.
     */
    function challenge(uint256 taskId, uint256 round, Dispute calldata dispute) external {
        (Task storage t, bytes32 globalId) = _disputable(taskId, round, msg.sender);
        (FlexVerifier.Verdict verdict,,,) = _verifier.check(
            _roundOf(taskId, t, round),
            globalId,
            _included(taskId, round - 1, dispute.updateIds),
            dispute.at,
            dispute.global,
            dispute.updates
        );
        if (verdict == FlexVerifier.Verdict.Correct) revert FlexMarketChallengeFailed(taskId, round);
        emit AggregateChallenged(
            taskId, round, msg.sender, verdict, dispute.at.chunk, dispute.at.offset, _bounty(t)
        );
        _slash(taskId, t, round, msg.sender);
    }

    /**
     * @notice Called by the verifier once it has judged a contest of an exclusion
     * ({FlexVerifier.contestExclusion}): global model `round` (>= 1) left out the update of
     * trainer `position` for no stated reason or a false one. Ends the task as a successful
     * {challenge} does: the aggregator's bond is slashed, a quarter to `challenger`.
     * @param taskId The task.
     * @param round The global model that left the update out.
     * @param challenger Who contested (anyone but the aggregator).
     * @param position The excluded update's trainer position in round `round - 1`.
     * @param statementHash keccak256 of the statement the contest was judged on (0 for none).
     * @param reason The stated reason that was shown false (`Unstated` when there was none).
     * @dev Emits {ExclusionContested}, {TaskAborted}, then {PaymentCredited} per non-zero
     * credit. Reverts with {FlexMarketNotVerifier} unless called by the verifier, as
     * {challenge} does for the task, challenger, round and window,
     * {FlexMarketStatementMismatch} when the statement is not the one published with the
     * model, {FlexMarketNotExcluded} when the model aggregated that position.
     */
    function exclusionContested(
        uint256 taskId,
        uint256 round,
        address challenger,
        uint256 position,
        bytes32 statementHash,
        FlexVerifier.Reason reason
    ) external {
        if (msg.sender != address(_verifier)) revert FlexMarketNotVerifier(msg.sender);
        (Task storage t,) = _disputable(taskId, round, challenger);
        Round storage r = _rounds[taskId][round - 1];
        if (statementHash != r.exclusions) revert FlexMarketStatementMismatch(taskId, round);
        if ((r.masks >> (128 + position)) & 1 == 1) revert FlexMarketNotExcluded(taskId, round, position);
        emit ExclusionContested(taskId, round, challenger, position, reason, _bounty(t));
        _slash(taskId, t, round, challenger);
    }

    /// @dev The task and global model `round`, when `challenger` may still dispute it.
    function _disputable(uint256 taskId, uint256 round, address challenger)
        private
        view
        returns (Task storage t, bytes32 globalId)
    {
        t = _existingTask(taskId);
        TaskState state = t.state;
        if (state != TaskState.Running && state != TaskState.Trained) {
            revert FlexMarketInvalidTaskState(taskId, state);
        }
        if (challenger == t.aggregator) revert FlexMarketAggregatorCannotChallenge(taskId, challenger);
        if (round == 0 || round >= t.publishedRounds) revert FlexMarketNoAggregate(taskId, round);
        globalId = _rounds[taskId][round].globalModel;
        uint256 closes = (_models[globalId] >> _PUBLISHED_AT_SHIFT) + t.disputeWindow;
        if (block.timestamp > closes || t.disputeWindow == 0) {
            revert FlexMarketDisputeWindowClosed(taskId, round, closes);
        }
    }

    function _roundOf(uint256 taskId, Task storage t, uint256 round)
        private
        view
        returns (FlexVerifier.Round memory)
    {
        return FlexVerifier.Round(
            uint64(block.chainid), address(this), uint64(taskId), uint32(round - 1), t.strategy, t.trimPerMille
        );
    }

    function _bounty(Task storage t) private view returns (uint256) {
        return _deposit(t, Role.Aggregator) * CHALLENGE_BOUNTY_PER_MILLE / 1000;
    }

    /// @dev Ends a task whose global model `round` was proven wrong: trainers paid for every
    /// aggregated round, the aggregator for the rounds before `round`, its bond slashed with
    /// the bounty to `challenger`.
    function _slash(uint256 taskId, Task storage t, uint256 round, address challenger) private {
        uint256 published = t.publishedRounds;
        Payout memory out = _trainerPay(taskId, t, published - 1, published - 1);
        out.aggregatorPaid = uint256(t.aggregatorPrice) * (round - 1);
        t.state = TaskState.Aborted;
        _settle(taskId, t, out, true, challenger);
    }

    /// @dev The updates of `round` that its successor aggregated, from their IDs: each must
    /// be the submitted update of the next aggregated position, with its author and weight:
    /// its capped sample count, scaled by its score in a scored round
    /// (`max(1, samples * score / 65535)`, docs/verifiable.md).
    function _included(uint256 taskId, uint256 round, bytes32[] calldata ids)
        private
        view
        returns (FlexVerifier.Included[] memory included)
    {
        uint256 mask = _rounds[taskId][round].masks >> 128;
        bool scored = _scoreWords[taskId][round][0] != 0;
        included = new FlexVerifier.Included[](ids.length);
        for (uint256 k = 0; k < ids.length; ++k) {
            uint256 word = _models[ids[k]];
            uint256 slot = word & 0xff;
            if (
                slot == 0 || (mask >> (slot - 1)) & 1 == 0 || (mask & ((1 << (slot - 1)) - 1)) != 0
                    || (word >> 8) & 0xffff != round || (word >> 24) & type(uint64).max != taskId
            ) revert FlexMarketNotIncluded(k, ids[k]);
            mask &= ~(uint256(1) << (slot - 1));
            address device = _trainers[taskId][slot - 1].device;
            uint256 bidIndex = (_participants[taskId][device] & _BID_SLOT_MASK) - 1;
            uint256 weight = _bids[taskId][bidIndex].samples;
            if (scored) {
                weight = weight * _scoreAt(taskId, round, k) / type(uint16).max;
                if (weight == 0) weight = 1;
            }
            included[k] = FlexVerifier.Included(ids[k], device, weight);
        }
        if (mask != 0) revert FlexMarketNotIncluded(ids.length, bytes32(0));
    }

    /**
     * @notice Sends the caller everything credited to it.
     * @dev Emits {Withdrawn}. Reverts with {FlexMarketNothingToWithdraw} when nothing is owed,
     * {FlexMarketTransferFailed} when the caller does not accept the ether (the credit stays),
     * {FlexMarketReentrantCall} when re-entered.
     */
    function withdraw() external nonReentrant {
        uint256 amount = _credits[msg.sender];
        if (amount == 0) revert FlexMarketNothingToWithdraw(msg.sender);
        _credits[msg.sender] = 0;
        _creditsOwed -= amount;
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert FlexMarketTransferFailed(msg.sender, amount);
    }

    // ------------------------------------------------------------------ views

    /// @notice The owner (sets min prices and the registrar).
    function owner() external view returns (address) {
        return _owner;
    }

    /// @notice The registrar (registers and revokes devices).
    function registrar() external view returns (address) {
        return _registrar;
    }

    /// @notice The platform minimum prices per round, in wei, for new tasks.
    function minPrices()
        external
        view
        returns (uint256 minTrainerPriceWei, uint256 minAggregatorPriceWei)
    {
        return (_minTrainerPrice, _minAggregatorPrice);
    }

    /// @notice A device's registry entry (status None if never registered).
    /// @param device The device address.
    function deviceInfo(address device) external view returns (Device memory) {
        return _devices[device];
    }

    /// @notice Number of tasks created; ids run 1..taskCount.
    function taskCount() external view returns (uint256) {
        return _taskCount;
    }

    /// @notice Everything about a task, with its current deadlines (0 when not applicable).
    /// @param taskId The task; reverts with {FlexMarketUnknownTask} if it does not exist.
    function task(uint256 taskId) external view returns (TaskInfo memory info) {
        Task storage t = _existingTask(taskId);
        info.buyer = t.buyer;
        info.state = t.state;
        info.specHash = t.specHash;
        info.budgetWei = t.budget;
        info.rounds = t.rounds;
        info.minTrainers = t.minTrainers;
        info.maxTrainers = t.maxTrainers;
        info.biddingEnds = t.biddingEnds;
        info.roundTimeout = t.roundTimeout;
        info.minTrainerPriceWei = t.minTrainerPrice;
        info.minAggregatorPriceWei = t.minAggregatorPrice;
        info.bidCount = _bids[taskId].length;
        info.aggregator = t.aggregator;
        info.aggregatorPriceWei = t.aggregatorPrice;
        info.trainerCount = t.trainerCount;
        info.publishedRounds = t.publishedRounds;
        info.phaseStart = t.phaseStart;
        if (t.state == TaskState.Running) {
            if (t.publishedRounds != 0) {
                info.submissionDeadline = uint256(t.phaseStart) + t.roundTimeout;
            }
            info.publishDeadline = _publishDeadline(t);
        }
        info.sampleCap = t.sampleCap;
        info.trainerStakeWei = _deposit(t, Role.Trainer);
        info.aggregatorBondWei = _deposit(t, Role.Aggregator);
        info.stakesHeldWei = t.stakesHeld;
        info.disputeWindow = t.disputeWindow;
        info.strategy = t.strategy;
        info.trimPerMille = t.trimPerMille;
        if (t.state == TaskState.Trained) {
            info.disputeClosesAt = uint256(t.phaseStart) + t.disputeWindow;
        }
    }

    /// @notice The FlexVerifier that checks challenges.
    function verifier() external view returns (address) {
        return address(_verifier);
    }

    /// @notice When the dispute window of global model `round` closes (0 if unpublished).
    /// @param taskId The task.
    /// @param round The round.
    function disputeClosesAt(uint256 taskId, uint256 round) external view returns (uint256) {
        bytes32 id = _rounds[taskId][round].globalModel;
        if (id == 0) return 0;
        return (_models[id] >> _PUBLISHED_AT_SHIFT) + _tasks[taskId].disputeWindow;
    }

    /// @notice Every bid on a task, in bid-index order.
    /// @param taskId The task.
    function bids(uint256 taskId) external view returns (Bid[] memory) {
        _existingTask(taskId);
        return _bids[taskId];
    }

    /// @notice The bid index of `device` on a task and whether it has one.
    /// @param taskId The task.
    /// @param device The device.
    function bidIndexOf(uint256 taskId, address device)
        external
        view
        returns (bool found, uint256 bidIndex)
    {
        uint256 slot = _participants[taskId][device] & _BID_SLOT_MASK;
        return (slot != 0, slot == 0 ? 0 : slot - 1);
    }

    /// @notice The selected trainers in position order with their prices per round and
    /// their bids' (capped) sample counts, which weigh their updates: what a round's checks
    /// need, without reading every bid of the task.
    /// @param taskId The task; empty before selection.
    function trainers(uint256 taskId)
        external
        view
        returns (address[] memory devices, uint256[] memory pricesWei, uint256[] memory samples)
    {
        Task storage t = _existingTask(taskId);
        uint256 n = t.trainerCount;
        devices = new address[](n);
        pricesWei = new uint256[](n);
        samples = new uint256[](n);
        for (uint256 p = 0; p < n; ++p) {
            Trainer storage tr = _trainers[taskId][p];
            devices[p] = tr.device;
            pricesWei[p] = tr.pricePerRoundWei;
            uint256 bidIndex = (_participants[taskId][tr.device] & _BID_SLOT_MASK) - 1;
            samples[p] = _bids[taskId][bidIndex].samples;
        }
    }

    /// @notice Whether `device` is a selected trainer of a task, and its position.
    /// @param taskId The task.
    /// @param device The device.
    function trainerPosition(uint256 taskId, address device)
        external
        view
        returns (bool selected, uint256 position)
    {
        uint256 p = (_participants[taskId][device] >> _POSITION_SHIFT) & 0xff;
        return (p != 0, p == 0 ? 0 : p - 1);
    }

    /// @notice The global model ID of `round` (zero if not published).
    /// @param taskId The task.
    /// @param round The round.
    function globalModel(uint256 taskId, uint256 round) external view returns (bytes32) {
        return _rounds[taskId][round].globalModel;
    }

    /// @notice Where `modelId` was first used: a global model (author: the aggregator) or a
    /// trainer's update, of which task and round, in which block. Unknown IDs have known false.
    /// @param modelId The model ID.
    function modelOrigin(bytes32 modelId) external view returns (ModelOrigin memory origin) {
        uint256 word = _models[modelId];
        if (word == 0) return origin;
        origin.known = true;
        uint256 slot = word & 0xff;
        origin.isGlobal = slot == 0;
        origin.round = (word >> 8) & 0xffff;
        origin.taskId = (word >> 24) & type(uint64).max;
        origin.blockNumber = (word >> 88) & type(uint64).max;
        origin.author = origin.isGlobal
            ? _tasks[origin.taskId].aggregator
            : _trainers[origin.taskId][slot - 1].device;
    }

    /// @notice A round: its global model, submitted and aggregated updates and scores.
    /// @param taskId The task.
    /// @param round The round; the aggregated mask and scores are of its updates.
    function roundInfo(uint256 taskId, uint256 round)
        external
        view
        returns (RoundInfo memory info)
    {
        Round storage r = _rounds[taskId][round];
        info.globalModel = r.globalModel;
        uint256 masks = r.masks;
        info.submittedMask = masks & _LOW_128;
        info.aggregatedMask = masks >> 128;
        if (_scoreWords[taskId][round][0] != 0) {
            uint256 count = _popcount(info.aggregatedMask);
            info.scores = new uint16[](count);
            for (uint256 k = 0; k < count; ++k) {
                info.scores[k] = _scoreAt(taskId, round, k);
            }
        }
    }

    /// @notice Wei withdrawable by `account`.
    /// @param account The account.
    function creditOf(address account) external view returns (uint256) {
        return _credits[account];
    }

    /// @notice Sum of all credits not yet withdrawn, in wei.
    function creditsOwed() external view returns (uint256) {
        return _creditsOwed;
    }

    /// @notice Sum of the budgets of tasks not yet settled, in wei.
    function escrowLocked() external view returns (uint256) {
        return _escrowLocked;
    }

    // -------------------------------------------------------------- internals

    function _existingTask(uint256 taskId) private view returns (Task storage t) {
        t = _tasks[taskId];
        if (t.state == TaskState.None) revert FlexMarketUnknownTask(taskId);
    }

    function _requireState(uint256 taskId, Task storage t, TaskState state) private view {
        TaskState actual = t.state;
        if (actual != state) revert FlexMarketInvalidTaskState(taskId, actual);
    }

    function _requireActive(address account, DeviceStatus status) private pure {
        if (status == DeviceStatus.None) revert FlexMarketDeviceNotRegistered(account);
        if (status == DeviceStatus.Revoked) revert FlexMarketDeviceRevoked(account);
    }

    /// @dev Round 0 is due roundTimeout after selection; round r+1 is due 2*roundTimeout
    /// after round r: one timeout for the trainers, one for the aggregation.
    function _publishDeadline(Task storage t) private view returns (uint256) {
        uint256 timeout = t.roundTimeout;
        return uint256(t.phaseStart) + (t.publishedRounds == 0 ? timeout : 2 * timeout);
    }

    /// @dev First selection pass over every bid: counts trainer bids and finds the cheapest
    /// aggregator bid (ties: lower tie key) whose device is active and may aggregate.
    function _findAggregator(Bid[] storage taskBids, bytes32 seed)
        private
        view
        returns (Selection memory s)
    {
        s.seed = seed;
        uint256 bidCount = taskBids.length;
        for (uint256 i = 0; i < bidCount; ++i) {
            Bid storage b = taskBids[i];
            if (b.role == Role.Trainer) {
                ++s.trainerBids;
                continue;
            }
            uint256 price = b.pricePerRoundWei;
            if (
                s.hasAggregator
                    && (
                        price > s.aggregatorPrice
                            || (
                                price == s.aggregatorPrice
                                    && _tieKey(seed, i) > _tieKey(seed, s.aggregatorIndex)
                            )
                    )
            ) continue;
            Device storage d = _devices[b.device];
            if (d.status == DeviceStatus.Active && d.canAggregate) {
                s.hasAggregator = true;
                s.aggregatorIndex = i;
                s.aggregatorPrice = price;
            }
        }
    }

    function _tieKey(bytes32 seed, uint256 bidIndex) private pure returns (uint256) {
        return uint256(keccak256(abi.encode(seed, bidIndex)));
    }

    /// @dev Second pass, over the hint: checks it and picks trainers greedily. Strictly
    /// increasing (price/samples, index) over exactly `trainerBids` entries that are all
    /// trainer bids proves `order` is a permutation of them without a seen-set.
    function _pickTrainers(Bid[] storage taskBids, uint256[] calldata order, Selection memory s)
        private
        view
    {
        uint256 bidCount = taskBids.length;
        uint256 prevPrice;
        uint256 prevSamples;
        uint256 prevIndex;
        for (uint256 k = 0; k < order.length; ++k) {
            uint256 index = order[k];
            if (index >= bidCount) revert FlexMarketInvalidHint(k, index);
            Bid storage b = taskBids[index];
            if (b.role != Role.Trainer) revert FlexMarketInvalidHint(k, index);
            uint256 price = b.pricePerRoundWei;
            uint256 samples = b.samples;
            if (
                k > 0
                    && !_ranksAfter(s.seed, price, samples, index, prevPrice, prevSamples, prevIndex)
            ) {
                revert FlexMarketInvalidHint(k, index);
            }
            (prevPrice, prevSamples, prevIndex) = (price, samples, index);
            if (s.aggregatorFits && s.selected < s.maxTrainers) {
                uint256 cost = price * s.rounds;
                if (
                    s.committed + cost <= s.budget
                        && _devices[b.device].status == DeviceStatus.Active
                ) {
                    s.committed += cost;
                    s.trainers[s.selected] = b.device;
                    s.prices[s.selected] = price;
                    ++s.selected;
                }
            }
        }
    }

    /// @dev Whether bid (price, samples, index) comes strictly after the previous one:
    /// price per sample compared by cross-multiplication (no rounding), then tie key.
    function _ranksAfter(
        bytes32 seed,
        uint256 price,
        uint256 samples,
        uint256 index,
        uint256 prevPrice,
        uint256 prevSamples,
        uint256 prevIndex
    ) private pure returns (bool) {
        uint256 lhs = price * prevSamples;
        uint256 rhs = prevPrice * samples;
        return lhs > rhs || (lhs == rhs && _tieKey(seed, index) > _tieKey(seed, prevIndex));
    }

    function _failSelection(
        uint256 taskId,
        Task storage t,
        FailureReason reason,
        uint256 selectable
    ) private {
        t.state = TaskState.Failed;
        emit TaskFailed(taskId, reason, selectable);
        uint256 budget = t.budget;
        _escrowLocked -= budget;
        _credit(t.buyer, taskId, budget, CreditReason.Refund);
    }

    /// @dev Lane 0 of word 0 holds a marker (1) and score k sits in lane k + 1, so a scored
    /// round's first word is never zero: settlement tells scored from unscored rounds with
    /// one read. Up to 15 scores fit the first word.
    function _storeScores(
        uint256 taskId,
        uint256 round,
        uint256 aggregatedMask,
        uint16[] calldata scores
    ) private {
        uint256 count = _popcount(aggregatedMask);
        if (scores.length != count) revert FlexMarketScoresLengthMismatch(count, scores.length);
        mapping(uint256 word => uint256) storage words = _scoreWords[taskId][round];
        uint256 sum;
        uint256 word = 1;
        for (uint256 k = 0; k < count; ++k) {
            uint256 s = scores[k];
            uint256 lane = k + 1;
            sum += s;
            word |= s << (_SCORE_BITS * (lane % _SCORES_PER_WORD));
            if (lane % _SCORES_PER_WORD == _SCORES_PER_WORD - 1 || k == count - 1) {
                if (word != 0) words[lane / _SCORES_PER_WORD] = word;
                word = 0;
            }
        }
        if (sum == 0) revert FlexMarketZeroScores();
    }

    function _scoreAt(uint256 taskId, uint256 round, uint256 k) private view returns (uint16) {
        uint256 lane = k + 1;
        uint256 word = _scoreWords[taskId][round][lane / _SCORES_PER_WORD];
        return uint16(word >> (_SCORE_BITS * (lane % _SCORES_PER_WORD)));
    }

    /// @dev Trainer pay per position for rounds 0..aggregatedRounds-1 (an update of round r
    /// is paid when the global model of r+1 aggregated it), and which trainers submitted in
    /// every one of rounds 0..checkedRounds-1. Bounded by MAX_ROUNDS * MAX_TRAINERS steps;
    /// the scratch arrays are allocated once, so memory stays linear in the trainers.
    function _trainerPay(
        uint256 taskId,
        Task storage t,
        uint256 aggregatedRounds,
        uint256 checkedRounds
    ) private view returns (Payout memory out) {
        uint256 n = t.trainerCount;
        out.pay = new uint256[](n);
        Scratch memory s;
        s.prices = new uint256[](n);
        s.shares = new uint256[](n);
        s.words = new uint256[](MAX_TRAINERS / _SCORES_PER_WORD + 1);
        for (uint256 p = 0; p < n; ++p) {
            s.prices[p] = _trainers[taskId][p].pricePerRoundWei;
        }
        uint256 kept = (1 << n) - 1;
        for (uint256 r = 0; r < checkedRounds; ++r) {
            uint256 masks = _rounds[taskId][r].masks;
            kept &= masks;
            if (r < aggregatedRounds) {
                out.trainersPaid += _roundPay(_scoreWords[taskId][r], masks >> 128, s, out.pay);
            }
        }
        out.kept = kept;
    }

    /// @dev Adds one aggregated round's trainer pay to `pay`; returns the round's total (the
    /// rule is {finalize}'s). The scored path is the settlement's inner loop, up to
    /// MAX_ROUNDS * MAX_TRAINERS times, so it runs in assembly over the scratch arrays: no
    /// bounds checks (every index is a position below n), each score word read from storage
    /// once. No overflow: the pool is at most 128 prices of 2^96 and a score 2^16; every share
    /// is at most its price, so the sums stay within the budget.
    function _roundPay(
        mapping(uint256 word => uint256) storage words,
        uint256 mask,
        Scratch memory s,
        uint256[] memory pay
    ) private view returns (uint256 total) {
        uint256[] memory prices = s.prices;
        uint256 n = prices.length;
        if (words[0] == 0) {
            unchecked {
                for (uint256 p = 0; p < n; ++p) {
                    if ((mask >> p) & 1 == 1) {
                        uint256 half = prices[p] / 2;
                        pay[p] += half;
                        total += half;
                    }
                }
            }
            return total;
        }
        (uint256 pool, uint256 scoreSum) = _poolAndScoreSum(words, mask, prices, s.words);
        return _shareOut(mask, pool, scoreSum, s, pay);
    }

    /// @dev Pass 1 of a scored round: the pool (half the valid prices) and the score sum;
    /// lane k + 1 of the words holds the score of the k-th valid update (lane 0 is the
    /// marker). Each word is read from storage once, into `cache`.
    function _poolAndScoreSum(
        mapping(uint256 word => uint256) storage words,
        uint256 mask,
        uint256[] memory prices,
        uint256[] memory cache
    ) private view returns (uint256 pool, uint256 scoreSum) {
        uint256 n = prices.length;
        assembly ("memory-safe") {
            let priceAt := add(prices, 0x20)
            let wordAt := add(cache, 0x20)
            mstore(0x00, 0)
            mstore(0x20, words.slot)
            let word := sload(keccak256(0x00, 0x40))
            mstore(wordAt, word)
            let lane := 1
            for { let p := 0 } lt(p, n) { p := add(p, 1) } {
                if and(shr(p, mask), 1) {
                    if iszero(and(lane, 15)) {
                        mstore(0x00, shr(4, lane))
                        word := sload(keccak256(0x00, 0x40))
                        mstore(add(wordAt, shl(5, shr(4, lane))), word)
                    }
                    scoreSum := add(scoreSum, and(shr(shl(4, and(lane, 15)), word), 0xffff))
                    pool := add(pool, mload(add(priceAt, shl(5, p))))
                    lane := add(lane, 1)
                }
            }
            pool := shr(1, pool)
        }
    }

    /// @dev Passes 2 and 3 of a scored round: each share of the pool by score, capped at its
    /// price, added to `pay`; then, if a cap held something back, the rest by headroom.
    function _shareOut(
        uint256 mask,
        uint256 pool,
        uint256 scoreSum,
        Scratch memory s,
        uint256[] memory pay
    ) private pure returns (uint256 total) {
        uint256[] memory prices = s.prices;
        uint256[] memory shares = s.shares;
        uint256[] memory cache = s.words;
        uint256 headroom;
        bool capped;
        assembly ("memory-safe") {
            let n := mload(prices)
            let lane := 1
            for { let p := 0 } lt(p, n) { p := add(p, 1) } {
                if and(shr(p, mask), 1) {
                    let word := mload(add(add(cache, 0x20), shl(5, shr(4, lane))))
                    let share := div(mul(pool, and(shr(shl(4, and(lane, 15)), word), 0xffff)), scoreSum)
                    let price := mload(add(add(prices, 0x20), shl(5, p)))
                    if gt(share, price) {
                        share := price
                        capped := 1
                    }
                    mstore(add(add(shares, 0x20), shl(5, p)), share)
                    let at := add(add(pay, 0x20), shl(5, p))
                    mstore(at, add(mload(at), share))
                    total := add(total, share)
                    headroom := add(headroom, sub(price, share))
                    lane := add(lane, 1)
                }
            }
        }
        if (!capped) return total;
        uint256 rest = pool - total;
        assembly ("memory-safe") {
            let n := mload(prices)
            for { let p := 0 } lt(p, n) { p := add(p, 1) } {
                if and(shr(p, mask), 1) {
                    let at := shl(5, p)
                    let room := sub(
                        mload(add(add(prices, 0x20), at)), mload(add(add(shares, 0x20), at))
                    )
                    let extra := div(mul(rest, room), headroom)
                    let payAt := add(add(pay, 0x20), at)
                    mstore(payAt, add(mload(payAt), extra))
                    total := add(total, extra)
                }
            }
        }
    }

    /// @dev Releases the task's budget and its selected nodes' deposits from escrow, emits the
    /// summary event, then credits: trainers (pay, stake back, bond share) by position, the
    /// aggregator (fee, bond back unless aborted), the challenger that proved the aggregate
    /// wrong (its bounty, when not zero), the buyer (refund, slashed deposits).
    function _settle(
        uint256 taskId,
        Task storage t,
        Payout memory out,
        bool aborted,
        address challenger
    ) private {
        uint256 n = out.pay.length;
        uint256 stake = _deposit(t, Role.Trainer);
        uint256 bond = _deposit(t, Role.Aggregator);
        uint256 keptCount = _popcount(out.kept);
        uint256 slashed = (n - keptCount) * stake;
        uint256 bounty = challenger == address(0) ? 0 : bond * CHALLENGE_BOUNTY_PER_MILLE / 1000;
        uint256 bondShare;
        if (aborted) {
            slashed += bond;
            if (keptCount != 0) bondShare = (bond - bounty) / 2 / keptCount;
        }
        uint256 refunded = t.budget - out.trainersPaid - out.aggregatorPaid;
        t.stakesHeld -= bond + n * stake;
        _escrowLocked -= t.budget + bond + n * stake;
        if (aborted) {
            emit TaskAborted(
                taskId, t.publishedRounds, out.trainersPaid, out.aggregatorPaid, refunded, slashed
            );
        } else {
            emit TaskFinalized(taskId, out.trainersPaid, out.aggregatorPaid, refunded, slashed);
        }
        _creditTrainers(taskId, out, stake, bondShare);
        _credit(t.aggregator, taskId, out.aggregatorPaid, CreditReason.AggregatorPay);
        if (!aborted) _credit(t.aggregator, taskId, bond, CreditReason.StakeReturned);
        _credit(challenger, taskId, bounty, CreditReason.ChallengeBounty);
        _credit(t.buyer, taskId, refunded, CreditReason.Refund);
        _credit(
            t.buyer, taskId, slashed - bondShare * keptCount - bounty, CreditReason.StakeSlashed
        );
    }

    /// @dev Each trainer's pay, and its stake back with its share of a slashed bond when it
    /// missed no round.
    function _creditTrainers(uint256 taskId, Payout memory out, uint256 stake, uint256 bondShare)
        private
    {
        for (uint256 p = 0; p < out.pay.length; ++p) {
            address device = _trainers[taskId][p].device;
            _credit(device, taskId, out.pay[p], CreditReason.TrainerPay);
            if ((out.kept >> p) & 1 == 1) {
                _credit(device, taskId, stake, CreditReason.StakeReturned);
                _credit(device, taskId, bondShare, CreditReason.StakeSlashed);
            }
        }
    }

    /// @dev A trainer bid's stake, budget / (2 * rounds * maxTrainers), is about half of one
    /// round's pay at the task's price level; an aggregator's bond, half the budget, is at
    /// least every trainer pool it could share out (the pools are half the trainers' prices).
    function _deposit(Task storage t, Role role) private view returns (uint256) {
        uint256 budget = t.budget;
        if (role == Role.Aggregator) return budget / 2;
        return budget / (2 * uint256(t.rounds) * t.maxTrainers);
    }

    function _releaseStake(uint256 taskId, Task storage t, address device, uint256 amount)
        private
    {
        t.stakesHeld -= amount;
        _escrowLocked -= amount;
        _credit(device, taskId, amount, CreditReason.StakeReturned);
    }

    /// @dev Records the first use of `modelId` (see _models); a second use reverts.
    function _useModelId(bytes32 modelId, uint256 taskId, uint256 round, uint256 slot) private {
        if (_models[modelId] != 0) revert FlexMarketModelIdUsed(modelId);
        _models[modelId] = slot | (round << 8) | (taskId << 24) | (block.number << 88)
            | (block.timestamp << _PUBLISHED_AT_SHIFT);
    }

    function _credit(address account, uint256 taskId, uint256 amount, CreditReason reason) private {
        if (amount == 0) return;
        _credits[account] += amount;
        _creditsOwed += amount;
        emit PaymentCredited(account, taskId, amount, reason);
    }

    function _popcount(uint256 x) private pure returns (uint256 count) {
        while (x != 0) {
            x &= x - 1;
            ++count;
        }
    }
}
