"""One task across hosts, run by tests/e2e/test_hosts.py in a process of its own (Django set
up for the stack's database, not the test run's): the platform in the root namespace,
reachable only at the bridge's address; the aggregator and three trainers each in a network
namespace of its own, enrolled through `python -m worker join` against that address, with
TLS data planes on their own addresses and broker users of their own. The task runs to
finalized, then every device (from its own host) and the buyer withdraw. Writes
``<var>/hosts/summary.json``.

    python -m tests.e2e.across_hosts --var DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from chain.launcher import free_port
from core.broker import queues_consumed
from stack.demo import DEMO_SPEC, follow_task, withdraw_all
from stack.devstack import PY, ROOT, _config, manage, say, stack, wait_for
from tests.e2e import BIDDING_WINDOW_S, DISPUTE_WINDOW_S
from tests.e2e.hosts import VirtualNetwork, tcp_forward

DATAPLANE_PORT = 8443
# name, device class, price per round (wei), its slice of the digits set (None: aggregator)
DEVICES = (
    ("aggregator", "gpu", 3 * 10**14, None),
    ("trainer-1", "cpu", 2 * 10**14, 0),
    ("trainer-2", "jetson", 25 * 10**13, 1),
    ("trainer-3", "cpu", 3 * 10**14, 2),
)
AGGREGATOR_PRICE = 4 * 10**14
ROUNDS = 3


def _join(host, *, name: str, device_class: str, price: int, partition, web: str, env, home):
    args = [name, "--hours", "1"] + (["--aggregator"] if partition is None else [])
    token = manage("issue_join_token", *args, env=env, capture=True).splitlines()[-1]
    cmd = [
        PY, "-m", "worker", "join", web, token, "--home", str(home), "--name", name,
        "--class", device_class, "--price-wei", str(price), "--no-start", "--light-key",
        "--dataplane-host", host.address, "--dataplane-port", str(DATAPLANE_PORT),
        "--dataplane-url", f"https://{host.address}:{DATAPLANE_PORT}",
    ]  # fmt: skip
    if partition is None:
        cmd += ["--aggregator-price-wei", str(AGGREGATOR_PRICE)]
    else:
        cmd += ["--partition", f"{partition}/{len(DEVICES) - 1}"]
    subprocess.run(host.command(cmd), cwd=ROOT, env=env, check=True)


def _platform_env(net: VirtualNetwork, broker_port: int) -> dict[str, str]:
    """Where the platform listens and what it tells devices: the bridge address only."""
    platform, web_port, chain_port = net.platform_address, free_port(), free_port()
    return {
        "FLEX_WEB_HOST": platform,
        "FLEX_WEB_PORT": str(web_port),
        "FLEX_PUBLIC_URL": f"http://{platform}:{web_port}",
        "FLEX_CHAIN_HOST": platform,
        "FLEX_CHAIN_PORT": str(chain_port),
        "FLEX_DEVICE_ETH_RPC_URL": f"http://{platform}:{chain_port}",
        "FLEX_DEVICE_BROKER_URL": f"amqp://{platform}:{broker_port}/",
    }


def _devices_up(up: dict, net: VirtualNetwork, var: Path) -> dict:
    """Enrol each device from its own host and start its worker there; the stack's ``up``
    with their homes and the command prefix of each host."""
    public, env = up["public_url"], up["env"]
    homes, hosts = {}, {}
    for name, device_class, price, partition in DEVICES:
        host = net.hosts[name]
        homes[name], hosts[name] = var / "devices" / name, host.command([])
        say(f"enrolling {name} from {host.address} at {public}")
        _join(
            host,
            name=name,
            device_class=device_class,
            price=price,
            partition=partition,
            web=public,
            env=env,
            home=homes[name],
        )
        start = [PY, "-m", "worker", "start", "--home", str(homes[name])]
        up["supervisor"].start(name, host.command(start))
    queues = [_config(h)["queues"][0] for h in homes.values()]
    wait_for(
        "the devices' workers",
        lambda: queues_consumed(env["FLEX_BROKER_URL"], queues),
        timeout=300,
        sup=up["supervisor"],
    )
    return {**up, "homes": homes, "hosts": hosts}


def run(var: Path) -> dict:
    names = [name for name, *_ in DEVICES]
    trainers = len(DEVICES) - 1
    budget = ROUNDS * (trainers * max(p for _, _, p, _ in DEVICES) + AGGREGATOR_PRICE) * 3 // 2
    with (
        VirtualNetwork(names) as net,
        # The machine's RabbitMQ listens on loopback only: publish it on the bridge.
        tcp_forward(listen=(net.platform_address, 0), target=("127.0.0.1", 5672)) as broker,
    ):
        os.environ.update(_platform_env(net, broker))
        with stack(var=var, devices=(), quiet_web=True, ephemeral=True) as platform:
            up = _devices_up(platform, net, var)
            summary = follow_task(
                up,
                out=var / "hosts",
                spec_fields={**DEMO_SPEC, "rounds": ROUNDS},
                trainers=trainers,
                budget_wei=budget,
                round_timeout_s=120,
                bidding_window_s=BIDDING_WINDOW_S,
                dispute_window_s=DISPUTE_WINDOW_S,
                timeout_s=900,
            )
            if summary["state"] == "finalized":
                buyer = up["buyer"]["username"]
                summary["withdrawals"] = withdraw_all(up, buyer_username=buyer)
            summary["devices_config"] = {
                name: {
                    "eth_rpc_url": config["eth_rpc_url"],
                    "dataplane_url": config["dataplane_url"],
                    "broker": urlsplit(config["broker_url"]).hostname,
                }
                for name, config in ((n, _config(h)) for n, h in up["homes"].items())
            }
        summary["addresses"] = {
            "platform": net.platform_address,
            **{name: host.address for name, host in net.hosts.items()},
        }
    summary["leftovers"] = net.leftovers()
    (var / "hosts" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.across_hosts")
    parser.add_argument("--var", type=Path, required=True)
    summary = run(parser.parse_args(argv).var.resolve())
    return 0 if summary["state"] == "finalized" else 1


if __name__ == "__main__":
    sys.exit(main())
