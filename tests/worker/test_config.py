"""A device's config file (worker.config), as its owner may have left it: missing, edited by
hand, cut short. The node refuses to start on it with an error that names the file and what
in it is wrong, and changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker import config as config_mod
from worker.__main__ import main
from worker.config import CONFIG_FILE, BidPolicy, DeviceConfig, DeviceConfigError, Partition

ROOT = Path(__file__).resolve().parents[2]
ADDRESS = "0x" + "ab" * 20


def _config(**fields) -> DeviceConfig:
    return DeviceConfig(
        server_url="http://127.0.0.1:9",
        name="box",
        device_id=1,
        address=ADDRESS,
        device_class="cpu",
        queues=["device.1"],
        broker_url="amqp://127.0.0.1:9//",
        eth_rpc_url="http://127.0.0.1:9",
        chain_id=31337,
        contract_address="0x" + "cd" * 20,
        policy=BidPolicy(price_per_round_wei=10**14),
        **fields,
    )


def test_a_saved_config_loads_as_it_was_saved(tmp_path):
    saved = _config(partition=Partition(index=2, count=5, seed=3))
    config_mod.save(tmp_path, saved)

    assert config_mod.load(tmp_path) == saved


def test_a_missing_config_says_to_enrol_first(tmp_path):
    with pytest.raises(DeviceConfigError) as exc:
        config_mod.load(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in exc.value.message
    assert "python -m worker join" in exc.value.message


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["partition"].update(seed=-1), "partition.seed"),
        (lambda c: c["partition"].update(index=5), "index must be below count"),
        (lambda c: c["partition"].update(count=0), "partition.count"),
        (lambda c: c["policy"].update(price_per_round_wei=-1), "policy.price_per_round_wei"),
        (lambda c: c.update(device_class="toaster"), "device_class"),
        (lambda c: c.update(dataplane_port=70000), "dataplane_port"),
        (lambda c: c.update(wallet="0x00"), "wallet"),  # a field the node does not know
        (lambda c: c.pop("eth_rpc_url"), "eth_rpc_url"),
    ],
    ids=["negative-seed", "index-past-count", "no-slices", "negative-price", "unknown-class",
         "port-out-of-range", "unknown-field", "missing-field"],
)  # fmt: skip
def test_a_hand_edited_config_is_refused_naming_the_field(tmp_path, edit, named):
    config_mod.save(tmp_path, _config(partition=Partition(index=0, count=5)))
    path = tmp_path / CONFIG_FILE
    fields = json.loads(path.read_text())
    edit(fields)
    path.write_text(json.dumps(fields))

    with pytest.raises(DeviceConfigError) as exc:
        config_mod.load(tmp_path)
    assert f"{path} is invalid" in exc.value.message
    assert named in exc.value.message
    assert json.loads(path.read_text()) == fields  # left as the owner wrote it


def test_the_cli_refuses_a_cut_short_config_with_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    config_mod.save(tmp_path, _config())
    path = tmp_path / CONFIG_FILE
    path.write_text(path.read_text()[:40])
    monkeypatch.setenv("FLEX_DEVICE_PASSPHRASE", "unused: the config is read first")

    assert main(["status", "--home", str(tmp_path)]) == 1

    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is invalid")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("given", "named"),
    [
        (["--partition=5/5"], "index must be below count: 5 of 5"),
        (["--partition=-1/5"], "greater than or equal to 0"),
        (["--partition=two/5"], "expected INDEX/COUNT such as 2/5"),
        (["--price-wei=-5"], "--price-wei: expected a whole number of wei, 0 or more; got '-5'"),
        (["--price-wei=0.5"], "--price-wei: expected a whole number of wei"),
        (["--min-budget-wei=-1"], "--min-budget-wei: expected a whole number of wei"),
        (["--aggregator-price-wei=-1"], "--aggregator-price-wei: expected a whole number"),
        (["--dataplane-port=70000"], "--dataplane-port: expected a TCP port (0: any free one)"),
    ],
)
def test_join_refuses_what_a_device_cannot_have_before_enrolling(tmp_path, capsys, given, named):
    home = tmp_path / "device"
    argv = ["join", "http://127.0.0.1:9", "unused-token", "--home", str(home), "--price-wei=1"]

    with pytest.raises(SystemExit) as exc:
        main([*argv, *given])

    assert exc.value.code == 2
    assert named in capsys.readouterr().err
    assert not home.exists()  # nothing enrolled, no key made


def test_start_refuses_no_worker_processes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["start", "--home", str(tmp_path), "--concurrency", "0"])
    assert exc.value.code == 2
    assert "--concurrency: expected worker processes, 1 or more; got '0'" in capsys.readouterr().err


def test_prune_refuses_a_negative_keep_and_a_home_without_a_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--home", str(tmp_path), "--keep-days", "-1"])
    assert exc.value.code == 2
    assert "--keep-days: expected a whole number of days, 0 or more; got '-1'" in (
        capsys.readouterr().err
    )

    assert main(["prune", "--home", str(tmp_path / "nowhere")]) == 1
    assert "python -m worker join" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()  # no store made where no device is


def test_prune_refuses_an_unusable_keep_setting_by_name(tmp_path):
    config_mod.save(tmp_path, _config())
    done = subprocess.run(
        [sys.executable, "-m", "worker", "prune", "--home", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "FLEX_STORE_KEEP_DAYS": "a month"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: FLEX_STORE_KEEP_DAYS: expected whole days")
    assert not (tmp_path / "models").exists()
