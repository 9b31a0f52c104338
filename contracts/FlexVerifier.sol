// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @notice What FlexVerifier reads from the market to judge a contested exclusion, and the
/// market's entry point for its verdict (FlexMarket's own functions, by ABI).
interface IFlexMarketRecords {
    struct Origin {
        bool known;
        bool isGlobal;
        uint256 taskId;
        uint256 round;
        address author;
        uint256 blockNumber;
    }

    struct Bid {
        address device;
        uint96 pricePerRoundWei;
        uint64 samples;
        uint8 role;
    }

    function modelOrigin(bytes32 modelId) external view returns (Origin memory);
    function globalModel(uint256 taskId, uint256 round) external view returns (bytes32);
    function trainerPosition(uint256 taskId, address device) external view returns (bool, uint256);
    function bidIndexOf(uint256 taskId, address device) external view returns (bool, uint256);
    function bids(uint256 taskId) external view returns (Bid[] memory);
    function exclusionContested(
        uint256 taskId,
        uint256 round,
        address challenger,
        uint256 position,
        bytes32 statementHash,
        uint8 reason
    ) external;
}

/**
 * @title FlexVerifier
 * @notice The fraud proof of a global model: checks one coordinate of a published global model
 * against the updates it claims to aggregate, from openings of one chunk of each model, in the
 * format and arithmetic of docs/verifiable.md.
 *
 * An opening is a model's header, its Merkle root, one chunk's values and that chunk's path to
 * the root; it must give the model's ID (`keccak256(0x02 ‖ keccak256(header) ‖ root)`), so a
 * challenger can choose none of it. Given the openings, `check` answers:
 *  - `InvalidGlobal` when the global model's header does not name this task's next round
 *    (a model of another task, round or kind was published);
 *  - `InvalidUpdate` when an included update's header does not name this task, round and
 *    trainer with the global model's layout, or its weight is outside 1..2^24 (the aggregator
 *    included what it had to leave out: a copy, a stale update, a global model);
 *  - `WrongValue` when the coordinate differs from the strategy's result over the updates';
 *  - `Correct` otherwise.
 * An opening that does not match its ID, or a chunk or offset outside the model, reverts with
 * a named error: such a challenge proves nothing. The contract is stateless; the market
 * supplies the IDs, trainers and weights from its own storage.
 *
 * It also judges the reason an aggregator stated for leaving an update out
 * (`contestExclusion`, docs/verifiable.md "Exclusions"): from the headers and roots of the
 * update, the global model and any model the update is said to copy, it shows the stated
 * rule false (or no reason given) and hands the verdict to the market, which accepts it from
 * this verifier only and slashes the aggregator as for a wrong aggregate.
 */
contract FlexVerifier {
    /// @notice Aggregation strategies, as the task spec names them (fedavg, fedmedian, fedtrimmedavg).
    enum Strategy {
        FedAvg,
        FedMedian,
        FedTrimmedAvg
    }

    /// @notice What a challenge showed.
    enum Verdict {
        Correct,
        WrongValue,
        InvalidUpdate,
        InvalidGlobal
    }

    /// @notice One chunk of one model, with what ties it to the model's ID.
    struct Opening {
        bytes header;
        bytes32 root;
        bytes values;
        bytes32[] siblings;
    }

    /// @notice The round a global model closes: the updates of `round` make global `round + 1`.
    struct Round {
        uint64 chainId;
        address market;
        uint64 taskId;
        uint32 round;
        Strategy strategy;
        uint16 trimPerMille;
    }

    /// @notice An update the global model includes: its ID, author and FedAvg weight (the
    /// recorded, capped sample count; the other strategies ignore it).
    struct Included {
        bytes32 id;
        address trainer;
        uint256 weight;
    }

    /// @notice Why an aggregator left a submitted update out of a round, as it states on chain
    /// (docs/verifiable.md, "Exclusions"); the codes are stable. `Unstated` is what a position
    /// no statement names (or an unknown code) reads as; `NotFetchable` is the one reason the
    /// chain cannot check.
    enum Reason {
        Unstated,
        NotFetchable,
        WrongKind,
        WrongTask,
        WrongRound,
        WrongAuthor,
        WrongLayout,
        SamplesOutOfRange,
        Copied
    }

    /// @notice An update left out, as the market records it: its ID, its author's position
    /// and address, and the author's recorded (capped) sample count.
    struct Excluded {
        bytes32 id;
        uint256 position;
        address trainer;
        uint256 samples;
    }

    /// @notice What a contest of an exclusion opens: the header and Merkle root of the
    /// excluded update, of the global model that left it out and, for `Copied`, of the model
    /// the update is said to copy (its ID `evidenceId`; zero and empty otherwise).
    struct Contest {
        bytes32 updateId;
        bytes updateHeader;
        bytes32 updateRoot;
        bytes globalHeader;
        bytes32 globalRoot;
        bytes32 evidenceId;
        bytes evidenceHeader;
        bytes32 evidenceRoot;
    }

    /// @notice The model an update is said to copy, as the market records it: whether it is
    /// known, a global model, its task, round and (for an update) its trainer's position.
    struct Prior {
        bytes32 id;
        bool known;
        bool isGlobal;
        uint256 taskId;
        uint256 round;
        uint256 position;
    }

    /// @notice The coordinate challenged: value `offset` of chunk `chunk`.
    struct Point {
        uint256 chunk;
        uint256 offset;
    }

    bytes8 private constant _MAGIC = "FLEXMDL2";
    uint256 private constant _FIXED = 86; // header bytes before the tensors' shapes
    uint256 private constant _MAX_SAMPLES = 1 << 24;
    uint256 private constant _MAX_UPDATES = 128;
    uint256 private constant _STATEMENT_BYTES = 34; // position (1) ‖ reason (1) ‖ evidence (32)

    /// @notice `which` is 0 for the global model and k + 1 for update k in the errors below.
    error FlexVerifierLengthMismatch(uint256 expected, uint256 got);
    error FlexVerifierTooManyUpdates(uint256 count, uint256 max);
    error FlexVerifierIdMismatch(uint256 which, bytes32 expected, bytes32 actual);
    error FlexVerifierChunkOutOfRange(uint256 chunk, uint256 chunks);
    error FlexVerifierOffsetOutOfRange(uint256 offset, uint256 values);
    error FlexVerifierBadChunk(uint256 which, uint256 expectedBytes, uint256 got);
    error FlexVerifierBadProof(uint256 which);
    error FlexVerifierBadTrim(uint256 trimPerMille);
    error FlexVerifierExclusionHolds(uint256 position, Reason reason);
    error FlexVerifierUncheckable(uint256 position, Reason reason);
    error FlexVerifierNotRoundUpdate(bytes32 modelId);

    /**
     * @notice Check value `at.offset` of chunk `at.chunk` of global model `globalId` (round
     * `ctx.round + 1`) against the `included` updates, opened in the same order by `updates`.
     * @return verdict What the openings show.
     * @return which For InvalidUpdate, the update's index; otherwise 0.
     * @return claimed The global model's value at the coordinate (0 for the Invalid verdicts).
     * @return expected The strategy's value over the updates' (0 for the Invalid verdicts).
     */
    function check(
        Round calldata ctx,
        bytes32 globalId,
        Included[] calldata included,
        Point calldata at,
        Opening calldata global,
        Opening[] calldata updates
    ) external pure returns (Verdict verdict, uint256 which, int256 claimed, int256 expected) {
        _checkCounts(ctx, included.length, updates.length);
        bytes32 layout;
        (claimed, layout) = _openGlobal(ctx, globalId, global, at);
        if (layout == 0) return (Verdict.InvalidGlobal, 0, 0, 0);
        (int256[] memory values, uint256 invalid) = _updateValues(ctx, included, at, updates, layout);
        if (invalid < included.length) return (Verdict.InvalidUpdate, invalid, 0, 0);
        expected = _aggregate(ctx, values, included);
        verdict = expected == claimed ? Verdict.Correct : Verdict.WrongValue;
    }

    function _checkCounts(Round calldata ctx, uint256 count, uint256 openings) private pure {
        if (count == 0 || count > _MAX_UPDATES) revert FlexVerifierTooManyUpdates(count, _MAX_UPDATES);
        if (openings != count) revert FlexVerifierLengthMismatch(count, openings);
        if (ctx.strategy == Strategy.FedTrimmedAvg && ctx.trimPerMille > 499) {
            revert FlexVerifierBadTrim(ctx.trimPerMille);
        }
    }

    /// @dev The global model's value at `at` and its layout, or a zero layout when its header
    /// does not name this task's next round.
    function _openGlobal(Round calldata ctx, bytes32 globalId, Opening calldata global, Point calldata at)
        private
        pure
        returns (int256 claimed, bytes32 layout)
    {
        claimed = _open(0, globalId, global, at);
        if (_namesRound(global.header, ctx, 0, uint256(ctx.round) + 1, address(0))) {
            layout = _layout(global.header);
        }
    }

    function _aggregate(Round calldata ctx, int256[] memory values, Included[] calldata included)
        private
        pure
        returns (int256)
    {
        if (ctx.strategy == Strategy.FedAvg) return _weightedMean(values, included);
        if (ctx.strategy == Strategy.FedMedian) return _median(values);
        return _trimmedMean(values, ctx.trimPerMille);
    }

    /// @dev Each update's value at `at`, and the index of the first invalid one (or `count`).
    function _updateValues(
        Round calldata ctx,
        Included[] calldata included,
        Point calldata at,
        Opening[] calldata updates,
        bytes32 layout
    ) private pure returns (int256[] memory values, uint256 invalid) {
        values = new int256[](included.length);
        for (uint256 k = 0; k < included.length; k++) {
            values[k] = _open(k + 1, included[k].id, updates[k], at);
            if (!_validUpdate(ctx, included[k], updates[k].header, layout)) return (values, k);
        }
        return (values, included.length);
    }

    /// @dev Whether an included update is one the aggregator may include: this task's round,
    /// by this trainer, in the global model's layout, with a FedAvg weight in 1..2^24.
    function _validUpdate(
        Round calldata ctx,
        Included calldata update,
        bytes calldata header,
        bytes32 layout
    ) private pure returns (bool) {
        if (ctx.strategy == Strategy.FedAvg && (update.weight == 0 || update.weight > _MAX_SAMPLES)) {
            return false;
        }
        return _namesRound(header, ctx, 1, ctx.round, update.trainer) && _layout(header) == layout;
    }

    /**
     * @notice Contest the reason `market` records for leaving update `contest.updateId` (of
     * round `round - 1`) out of global model `round`, within that model's dispute window.
     * `statement` is what the aggregator published with the model ({UpdatesExcluded}; empty
     * when it published none): 34 bytes per excluded position (position ‖ reason ‖ evidence),
     * the first entry for a position counting; a statement of any other length states nothing.
     * When the reason is missing, unknown, or shown false by the openings in `contest` (a
     * header rule the update's header passes, samples within 1..2^24, a "copy" of a model
     * that is not an earlier model of this task with the update's values), the market slashes
     * the aggregator as for a wrong aggregate, the bounty to the caller.
     * @param market The FlexMarket the task lives on; it accepts the verdict only from the
     * verifier it was deployed with.
     * @dev Calls {FlexMarket.exclusionContested}, whose errors pass through (window, task
     * state, caller, statement, position). Reverts with {FlexVerifierNotRoundUpdate} when
     * `contest.updateId` is not a round `round - 1` update of the task,
     * {FlexVerifierUncheckable} for `NotFetchable`, {FlexVerifierExclusionHolds} when the
     * update fails the stated rule, {FlexVerifierIdMismatch} (`which` 0 global, 1 update,
     * 2 evidence) for a header and root that do not give their model's ID.
     */
    function contestExclusion(
        IFlexMarketRecords market,
        uint256 taskId,
        uint256 round,
        bytes calldata statement,
        Contest calldata contest
    ) external {
        Excluded memory excluded = _excludedOf(market, taskId, round, contest.updateId);
        (Reason reason, bytes32 evidence) = _stated(statement, excluded.position);
        if (reason != Reason.Unstated) {
            _judge(
                Round(uint64(block.chainid), address(market), uint64(taskId), uint32(round - 1), Strategy.FedAvg, 0),
                market.globalModel(taskId, round),
                excluded,
                reason,
                _prior(market, taskId, evidence),
                contest
            );
        }
        market.exclusionContested(
            taskId,
            round,
            msg.sender,
            excluded.position,
            statement.length == 0 ? bytes32(0) : keccak256(statement),
            uint8(reason)
        );
    }

    /// @dev The update `id`, when it is an update of round `round - 1` of the task.
    function _excludedOf(IFlexMarketRecords market, uint256 taskId, uint256 round, bytes32 id)
        private
        view
        returns (Excluded memory excluded)
    {
        IFlexMarketRecords.Origin memory origin = market.modelOrigin(id);
        if (!origin.known || origin.isGlobal || origin.taskId != taskId || origin.round + 1 != round) {
            revert FlexVerifierNotRoundUpdate(id);
        }
        (, uint256 position) = market.trainerPosition(taskId, origin.author);
        (, uint256 bidIndex) = market.bidIndexOf(taskId, origin.author);
        excluded = Excluded(id, position, origin.author, market.bids(taskId)[bidIndex].samples);
    }

    /// @dev What the market records of the model `id` (none for a zero or unknown ID).
    function _prior(IFlexMarketRecords market, uint256 taskId, bytes32 id) private view returns (Prior memory prior) {
        IFlexMarketRecords.Origin memory origin = market.modelOrigin(id);
        prior = Prior(id, origin.known, origin.isGlobal, origin.taskId, origin.round, 0);
        if (origin.known && !origin.isGlobal) (, prior.position) = market.trainerPosition(taskId, origin.author);
    }

    /// @dev Reverts unless the openings show that `excluded` passes the stated rule.
    function _judge(
        Round memory ctx,
        bytes32 globalId,
        Excluded memory excluded,
        Reason reason,
        Prior memory evidence,
        Contest calldata contest
    ) private pure {
        if (reason == Reason.NotFetchable) revert FlexVerifierUncheckable(excluded.position, reason);
        _checkId(0, globalId, contest.globalHeader, contest.globalRoot);
        _checkId(1, excluded.id, contest.updateHeader, contest.updateRoot);
        bool holds;
        if (reason == Reason.SamplesOutOfRange) {
            holds = excluded.samples == 0 || excluded.samples > _MAX_SAMPLES;
        } else if (reason == Reason.Copied) {
            // Only an earlier model of this task counts; only then must it be opened.
            holds = _earlier(ctx, excluded, evidence);
            if (holds) {
                _checkId(2, evidence.id, contest.evidenceHeader, contest.evidenceRoot);
                holds = _sameValues(contest.updateHeader, contest.updateRoot, contest.evidenceHeader, contest.evidenceRoot);
            }
        } else {
            holds = _failsRule(reason, ctx, excluded.trainer, contest.updateHeader, contest.globalHeader);
        }
        if (holds) revert FlexVerifierExclusionHolds(excluded.position, reason);
    }

    /// @dev The reason and evidence the statement gives `position`; `Unstated` when none.
    function _stated(bytes calldata statement, uint256 position)
        private
        pure
        returns (Reason reason, bytes32 evidence)
    {
        if (statement.length % _STATEMENT_BYTES != 0) return (Reason.Unstated, 0);
        for (uint256 at = 0; at < statement.length; at += _STATEMENT_BYTES) {
            if (uint8(statement[at]) == position) {
                uint8 code = uint8(statement[at + 1]);
                // An unknown code states nothing: it reads as a code past `Copied`.
                reason = code > uint8(Reason.Copied) ? Reason.Unstated : Reason(code);
                return (reason, bytes32(statement[at + 2:at + _STATEMENT_BYTES]));
            }
        }
    }

    function _checkId(uint256 which, bytes32 id, bytes calldata header, bytes32 root) private pure {
        bytes32 actual = modelId(header, root);
        if (actual != id) revert FlexVerifierIdMismatch(which, id, actual);
    }

    /// @dev Whether an update header fails header rule `reason` (docs/verifiable.md); a header
    /// too short to read is no FLEX update and fails every one.
    function _failsRule(
        Reason reason,
        Round memory ctx,
        address trainer,
        bytes calldata header,
        bytes calldata global
    ) private pure returns (bool) {
        if (header.length < _FIXED) return true;
        if (reason == Reason.WrongKind) {
            return bytes8(header[0:8]) != _MAGIC || uint16(bytes2(header[8:10])) != 2 || uint8(header[10]) != 1;
        }
        if (reason == Reason.WrongTask) {
            return uint64(bytes8(header[16:24])) != ctx.chainId || address(bytes20(header[24:44])) != ctx.market
                || uint64(bytes8(header[44:52])) != ctx.taskId;
        }
        if (reason == Reason.WrongRound) return uint32(bytes4(header[52:56])) != ctx.round;
        if (reason == Reason.WrongAuthor) return address(bytes20(header[56:76])) != trainer;
        // WrongLayout: against the layout of the global model that left the update out.
        if (global.length < _FIXED) return true;
        return !_shapesAddUp(header) || _layout(header) != _layout(global);
    }

    /// @dev Whether `evidence` is a model of this task that an update of `ctx.round` at
    /// `excluded.position` must not copy: a global model up to round `ctx.round`, an update
    /// of an earlier round, or one of this round at a lower position.
    function _earlier(Round memory ctx, Excluded memory excluded, Prior memory prior)
        private
        pure
        returns (bool)
    {
        if (!prior.known || prior.id == excluded.id || prior.taskId != ctx.taskId) return false;
        if (prior.isGlobal) return prior.round <= ctx.round;
        return prior.round < ctx.round || (prior.round == ctx.round && prior.position < excluded.position);
    }

    /// @dev Whether two models hold the same values: same count and chunk size, same root.
    function _sameValues(bytes calldata a, bytes32 rootA, bytes calldata b, bytes32 rootB)
        private
        pure
        returns (bool)
    {
        if (a.length < _FIXED || b.length < _FIXED) return false;
        return rootA == rootB && bytes4(a[12:16]) == bytes4(b[12:16]) && bytes8(a[76:84]) == bytes8(b[76:84]);
    }

    /// @notice A model's ID from its header and Merkle root (docs/verifiable.md).
    function modelId(bytes calldata header, bytes32 root) public pure returns (bytes32) {
        return keccak256(abi.encodePacked(bytes1(0x02), keccak256(header), root));
    }

    // ------------------------------------------------------------------ openings

    /// @dev Check `o` against `id` and return the value at `at`; reverts when it does not hold.
    function _open(uint256 which, bytes32 id, Opening calldata o, Point calldata at)
        private
        pure
        returns (int256)
    {
        bytes32 actual = modelId(o.header, o.root);
        if (actual != id) revert FlexVerifierIdMismatch(which, id, actual);
        (uint256 chunks, uint256 size) = _chunkSize(o.header, at);
        if (o.values.length != 4 * size) revert FlexVerifierBadChunk(which, 4 * size, o.values.length);
        if (_rootOf(o.values, o.siblings, at.chunk, chunks) != o.root) revert FlexVerifierBadProof(which);
        uint256 start = 4 * at.offset;
        return int256(int32(uint32(bytes4(o.values[start:start + 4]))));
    }

    /// @dev The model's chunk count and the number of values in chunk `at.chunk`; reverts when
    /// the chunk or the offset is outside the model. The ID binds the header, so a header too
    /// short to read is the model's own: none of its chunks can be opened.
    function _chunkSize(bytes calldata header, Point calldata at)
        private
        pure
        returns (uint256 chunks, uint256 size)
    {
        if (header.length < _FIXED) revert FlexVerifierChunkOutOfRange(at.chunk, 0);
        uint256 perChunk = uint32(bytes4(header[12:16]));
        uint256 total = uint64(bytes8(header[76:84]));
        if (perChunk == 0) revert FlexVerifierChunkOutOfRange(at.chunk, 0);
        chunks = (total + perChunk - 1) / perChunk;
        if (at.chunk >= chunks) revert FlexVerifierChunkOutOfRange(at.chunk, chunks);
        size = total - at.chunk * perChunk;
        if (size > perChunk) size = perChunk;
        if (at.offset >= size) revert FlexVerifierOffsetOutOfRange(at.offset, size);
    }

    /// @dev The Merkle root that chunk `index`'s values and path give, in a tree of `chunks`
    /// leaves; zero when the path is not that tree's depth.
    function _rootOf(bytes calldata values, bytes32[] calldata siblings, uint256 index, uint256 chunks)
        private
        pure
        returns (bytes32 h)
    {
        uint256 depth = 0;
        while ((uint256(1) << depth) < chunks) depth++;
        if (siblings.length != depth) return bytes32(0);
        h = keccak256(abi.encodePacked(bytes1(0x00), values));
        for (uint256 j = 0; j < depth; j++) {
            h = (index >> j) & 1 == 0
                ? keccak256(abi.encodePacked(bytes1(0x01), h, siblings[j]))
                : keccak256(abi.encodePacked(bytes1(0x01), siblings[j], h));
        }
    }

    /// @dev Whether a header opens a model of `kind` for this chain, market, task and `round`,
    /// by `trainer`, in this format.
    function _namesRound(
        bytes calldata header,
        Round calldata ctx,
        uint8 kind,
        uint256 round,
        address trainer
    ) private pure returns (bool) {
        if (bytes8(header[0:8]) != _MAGIC || uint16(bytes2(header[8:10])) != 2) return false;
        if (uint8(header[10]) != kind || uint64(bytes8(header[16:24])) != ctx.chainId) return false;
        if (address(bytes20(header[24:44])) != ctx.market) return false;
        if (uint64(bytes8(header[44:52])) != ctx.taskId) return false;
        if (uint32(bytes4(header[52:56])) != round) return false;
        if (address(bytes20(header[56:76])) != trainer) return false;
        return _shapesAddUp(header);
    }

    /// @dev Scale, chunk size, count and shapes: what updates and their aggregate share.
    function _layout(bytes calldata header) private pure returns (bytes32) {
        return keccak256(abi.encodePacked(header[11:16], header[76:]));
    }

    /// @dev Whether the shapes are well formed and hold exactly the header's count of values.
    function _shapesAddUp(bytes calldata header) private pure returns (bool) {
        uint256 tensors = uint16(bytes2(header[84:86]));
        if (tensors == 0) return false;
        uint256 at = _FIXED;
        uint256 sum = 0;
        for (uint256 t = 0; t < tensors; t++) {
            if (at >= header.length) return false;
            uint256 ndim = uint8(header[at]);
            at += 1;
            if (ndim > 8 || at + 4 * ndim > header.length) return false;
            uint256 size = 1;
            for (uint256 d = 0; d < ndim; d++) {
                size *= uint32(bytes4(header[at:at + 4]));
                at += 4;
            }
            sum += size;
        }
        return at == header.length && sum == uint64(bytes8(header[76:84]));
    }

    // ------------------------------------------------------------------ arithmetic

    /// @dev floor(a / b) for b > 0 (Solidity's `/` rounds towards zero).
    function _floorDiv(int256 a, int256 b) private pure returns (int256 q) {
        q = a / b;
        if (a % b != 0 && a < 0) q -= 1;
    }

    function _weightedMean(int256[] memory values, Included[] calldata included)
        private
        pure
        returns (int256)
    {
        int256 sum = 0;
        int256 total = 0;
        for (uint256 k = 0; k < values.length; k++) {
            int256 weight = int256(included[k].weight);
            sum += values[k] * weight;
            total += weight;
        }
        return _floorDiv(sum, total);
    }

    function _sort(int256[] memory values) private pure {
        for (uint256 i = 1; i < values.length; i++) {
            int256 v = values[i];
            uint256 j = i;
            while (j > 0 && values[j - 1] > v) {
                values[j] = values[j - 1];
                j--;
            }
            values[j] = v;
        }
    }

    function _median(int256[] memory values) private pure returns (int256) {
        _sort(values);
        uint256 n = values.length;
        if (n % 2 == 1) return values[n / 2];
        return _floorDiv(values[n / 2 - 1] + values[n / 2], 2);
    }

    function _trimmedMean(int256[] memory values, uint256 trimPerMille)
        private
        pure
        returns (int256)
    {
        _sort(values);
        uint256 n = values.length;
        uint256 cut = (trimPerMille * n) / 1000;
        int256 sum = 0;
        for (uint256 k = cut; k < n - cut; k++) {
            sum += values[k];
        }
        return _floorDiv(sum, int256(n - 2 * cut));
    }
}
