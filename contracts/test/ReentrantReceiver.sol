// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @dev FlexMarket's task terms: sample cap, dispute window, strategy (FedAvg = 0), trim.
struct Terms {
    uint256 sampleCap;
    uint256 disputeWindow;
    uint8 strategy;
    uint256 trimPerMille;
}

/// @dev The parts of FlexMarket the attacker drives.
interface IFlexMarket {
    function createTask(
        bytes32 specHash,
        uint256 rounds,
        uint256 minTrainers,
        uint256 maxTrainers,
        uint256 biddingEnds,
        uint256 roundTimeout,
        Terms calldata terms
    ) external payable returns (uint256 taskId);

    function cancelTask(uint256 taskId) external;

    function withdraw() external;
}

/**
 * @title ReentrantReceiver
 * @notice TEST ONLY. A buyer contract that, when FlexMarket pays it in {withdraw}, tries to
 * withdraw again from its receive hook. `Mode.Catch` records the re-entrant call's revert
 * data and lets the outer payment succeed; `Mode.Bubble` re-raises it so the outer withdraw
 * fails; `Mode.Reject` simply refuses the ether.
 */
contract ReentrantReceiver {
    enum Mode {
        Catch,
        Bubble,
        Reject
    }

    error ReentrantReceiverRejected();

    IFlexMarket private immutable _market;
    Mode private _mode;
    uint256 private _reentries;
    uint256 private _received;
    bytes private _lastError;

    constructor(address market) {
        _market = IFlexMarket(market);
    }

    /// @notice Creates a task on the market with this contract as buyer.
    function createTask(
        bytes32 specHash,
        uint256 rounds,
        uint256 minTrainers,
        uint256 maxTrainers,
        uint256 biddingEnds,
        uint256 roundTimeout
    ) external payable returns (uint256) {
        return _market.createTask{value: msg.value}(
            specHash, rounds, minTrainers, maxTrainers, biddingEnds, roundTimeout,
            Terms(1000, 0, 0, 0)
        );
    }

    /// @notice Cancels a task of this contract, which credits its budget back here.
    function cancelTask(uint256 taskId) external {
        _market.cancelTask(taskId);
    }

    /// @notice Withdraws this contract's credit, re-entering as `mode` says.
    function attack(Mode mode) external {
        _mode = mode;
        _market.withdraw();
    }

    /// @notice How often receive() re-entered, the ether received, and the last revert data.
    function observed() external view returns (uint256 reentries, uint256 received, bytes memory lastError) {
        return (_reentries, _received, _lastError);
    }

    receive() external payable {
        if (_mode == Mode.Reject) revert ReentrantReceiverRejected();
        _received += msg.value;
        if (_reentries > 0) return;
        ++_reentries;
        if (_mode == Mode.Catch) {
            try _market.withdraw() {} catch (bytes memory reason) {
                _lastError = reason;
            }
        } else {
            _market.withdraw();
        }
    }
}
