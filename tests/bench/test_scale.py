"""The scale benchmark's quick parts: its fleet, its budgets, its figures per task, the PNG it
writes, and the sizes it refuses (the run itself is `python -m bench scale`, not a test)."""

from __future__ import annotations

import hashlib

import pytest

from bench import scale
from bench.scale_plot import scale_plot, task_figures
from stack.demo import DEMO_SPEC
from training.datasets import load_partition


def summary(*, rounds: list[tuple[float, int, int]], state: str = "finalized") -> dict:
    """follow_task's summary with (wall seconds, gas, updates) per round."""
    return {
        "state": state,
        "rounds": [
            {"round": i + 1, "wall_s": s, "gas": g, "updates": u, "accuracy": 0.5}
            for i, (s, g, u) in enumerate(rounds)
        ],
        "final_accuracy": 0.5 if rounds else None,
    }


TASKS = [
    {"trainers": 32, "round_s": 6.0, "posted_to_round_1_s": 9.0, "gas_per_round": 4_000_000},
    {"trainers": 8, "round_s": 2.0, "posted_to_round_1_s": 4.0, "gas_per_round": 1_000_000},
    {"trainers": 128, "round_s": 20.0, "posted_to_round_1_s": 30.0, "gas_per_round": 15_000_000},
]


def test_the_plot_is_a_png_with_round_time_and_gas_against_trainers(tmp_path):
    path = tmp_path / "bench" / "scale.png"

    fig = scale_plot(TASKS, path, devices=1000)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    time_ax, gas_ax = fig.axes
    (steady,) = time_ax.lines
    assert list(steady.get_xdata()) == [8, 32, 128]  # by trainers, whatever the run order
    assert list(steady.get_ydata()) == [2.0, 6.0, 20.0]
    (gas,) = gas_ax.lines
    assert list(gas.get_ydata()) == [1.0, 4.0, 15.0]  # million gas
    assert "1000 devices" in fig.get_suptitle()


def test_no_task_means_no_plot(tmp_path):
    with pytest.raises(ValueError, match="no task to plot"):
        scale_plot([], tmp_path / "scale.png", devices=10)
    assert not (tmp_path / "scale.png").exists()


def test_a_task_figures_its_steady_rounds_apart_from_the_first():
    done = summary(rounds=[(10.0, 900, 8), (2.0, 1000, 8), (4.0, 1101, 7)])
    # The round clock's times of each round's updates, after the model they trained from.
    for r, (first, last) in zip(done["rounds"], [(9.0, 9.5), (1.0, 1.5), (1.0, 3.0)], strict=True):
        r["updates_mined_s"] = {"first_update_s": first, "last_update_s": last}

    figures = task_figures(done, trainers=8, bids=1000, selection_gas=5_000_000)

    assert figures["round_s"] == 3.0  # rounds 2 and 3; round 1 also waits for the first model
    assert figures["posted_to_round_1_s"] == 10.0
    assert figures["gas_per_round"] == 1000  # (900 + 1000 + 1101) // 3, whole gas
    assert figures["updates_per_round"] == [8, 8, 7]
    assert (figures["bids"], figures["selection_gas"]) == (1000, 5_000_000)
    # Where the steady rounds' time went, as medians: rounds 2 and 3 again.
    assert figures["round_phases_s"] == {
        "model_to_first_update_s": 1.0,
        "model_to_last_update_s": 2.25,
        "last_update_to_next_model_s": 0.75,  # 2.0 - 1.5 and 4.0 - 3.0
    }
    table = scale.table(
        {
            "devices": 10,
            "worker_processes": 1,
            "join_tokens": {"devices": 10, "seconds": 1.0},
            "enrolment": [],
            "tasks": [figures],
            "peak_rss_mb": {},
        }
    )
    lines = table.splitlines()
    row = next(lines[i + 1].split() for i, line in enumerate(lines) if "updates s" in line)
    assert row[:6] == ["8", "1000", "7", "3.00", "2.25", "0.75"]


def test_a_task_that_did_not_finish_is_reported_not_figured():
    with pytest.raises(ValueError, match="8-trainer task ended aborted after 1 rounds"):
        task_figures(
            summary(rounds=[(1.0, 1, 1)], state="aborted"), trainers=8, bids=9, selection_gas=None
        )


def test_the_default_fleet_bids_up_to_the_contracts_limit():
    fleet = scale.fleet(scale.MAX_BIDS)

    assert len(fleet) == 1000
    assert len({d.name for d in fleet}) == 1000
    assert [d.aggregator for d in fleet].count(True) == 1
    trainers = [d for d in fleet if not d.aggregator]
    assert {d.partition for d in trainers} == set(range(scale.SLICES))
    assert {d.device_class for d in trainers} == {"cpu", "gpu", "jetson"}


def test_no_two_trainers_of_the_fleet_hold_the_same_data():
    # Selection goes by price per sample, so any trainers may meet in a task; two holding the
    # same data would hand in the same update, and one would be left out as a copy.
    trainers = [d for d in scale.fleet(scale.MAX_BIDS) if not d.aggregator]

    held = set()
    for d in trainers:
        data = load_partition(schema=DEMO_SPEC["dataset"], **d.slice.model_dump())
        assert len(data) > 0
        held.add(hashlib.sha256(data.x.tobytes() + data.y.tobytes()).digest())

    assert len(held) == len(trainers) == 999


def test_a_budget_pays_every_trainer_asked_for_at_the_dearest_price():
    budget = scale.budget_wei(trainers=128, rounds=5)
    assert budget > 5 * (scale.AGGREGATOR_PRICE + 128 * max(scale.TRAINER_PRICES))
    assert isinstance(budget, int)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trainers", "8,200"], "between 1 and the contract's 128"),
        (["--trainers", "8,x"], "expected numbers such as 8,32,128"),
        (["--devices", "1001"], "the contract's 1000 bids per task"),
        (["--devices", "20", "--trainers", "32"], "32 trainers need at least 33 devices"),
        (["--rounds", "0"], "between 1 and the contract's 100"),
    ],
)
def test_sizes_beyond_what_the_contract_takes_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        scale.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
