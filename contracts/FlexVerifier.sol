// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

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

    /// @notice The coordinate challenged: value `offset` of chunk `chunk`.
    struct Point {
        uint256 chunk;
        uint256 offset;
    }

    bytes8 private constant _MAGIC = "FLEXMDL2";
    uint256 private constant _FIXED = 86; // header bytes before the tensors' shapes
    uint256 private constant _MAX_SAMPLES = 1 << 24;
    uint256 private constant _MAX_UPDATES = 128;

    /// @notice `which` is 0 for the global model and k + 1 for update k in the errors below.
    error FlexVerifierLengthMismatch(uint256 expected, uint256 got);
    error FlexVerifierTooManyUpdates(uint256 count, uint256 max);
    error FlexVerifierIdMismatch(uint256 which, bytes32 expected, bytes32 actual);
    error FlexVerifierChunkOutOfRange(uint256 chunk, uint256 chunks);
    error FlexVerifierOffsetOutOfRange(uint256 offset, uint256 values);
    error FlexVerifierBadChunk(uint256 which, uint256 expectedBytes, uint256 got);
    error FlexVerifierBadProof(uint256 which);
    error FlexVerifierBadTrim(uint256 trimPerMille);

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
