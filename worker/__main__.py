"""`python -m worker`: enrol this machine as a FLEX device, then run it as a Celery worker.

    python -m worker join SERVER_URL TOKEN --home DIR --class cpu [--price-wei N] [...]
    python -m worker start --home DIR [--home DIR ...]
    python -m worker status --home DIR
    python -m worker balance --home DIR
    python -m worker withdraw --home DIR [--to ADDRESS]
    python -m worker prune --home DIR [--keep-days N] [--json]
    python -m worker provenance --rpc URL --contract ADDRESS --task N --spec FILE --blobs DIR

The key's passphrase comes from FLEX_DEVICE_PASSPHRASE, or is asked for at the terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
from pathlib import Path

from core.errors import FlexError
from core.units import wei_argument, whole_number

log = logging.getLogger("worker")


def _partition(value: str):
    from worker.config import Partition

    index, _, count = value.partition("/")
    try:
        return Partition(index=int(index), count=int(count))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected INDEX/COUNT such as 2/5: {exc}") from exc


DATAPLANE_PORT = whole_number(0, 65535, "a TCP port (0: any free one)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    join = sub.add_parser("join", help="enrol this device with a one-time join token")
    join.add_argument("server_url", help="the platform, e.g. http://127.0.0.1:8000")
    join.add_argument("token", help="the join token an admin issued")
    join.add_argument("--home", type=Path, required=True, help="the device's own directory")
    join.add_argument(
        "--name", help="a name for the device (default: the one its join token was issued for)"
    )
    join.add_argument(
        "--class", dest="device_class", choices=["cpu", "gpu", "jetson"], default="cpu"
    )
    join.add_argument(
        "--price-wei",
        type=wei_argument,
        default=0,
        help="price per training round (default 0: each task's minimum price, which no bid "
        "goes below)",
    )
    join.add_argument(
        "--min-budget-wei", type=wei_argument, default=0, help="skip tasks below this budget"
    )
    join.add_argument(
        "--aggregator-price-wei", type=wei_argument, help="bid as aggregator at this price"
    )
    data = join.add_mutually_exclusive_group()
    data.add_argument("--data", help="the device's own .npz or .csv training data")
    data.add_argument("--partition", type=_partition, help="INDEX/COUNT of the bundled digits")
    join.add_argument(
        "--dataplane-host",
        default="127.0.0.1",
        help="address the data plane listens on (default 127.0.0.1; 0.0.0.0 for every one)",
    )
    join.add_argument(
        "--dataplane-port", type=DATAPLANE_PORT, default=0, help="default: a free port"
    )
    join.add_argument(
        "--dataplane-url",
        help="https://HOST:PORT where peers reach the data plane (default: its host and port)",
    )
    join.add_argument(
        "--eth-rpc-url", help="the chain node's URL from this host (default: the platform's)"
    )
    join.add_argument("--no-start", action="store_true", help="enrol only; start later")
    join.add_argument(
        "--light-key",
        action="store_true",
        help="cheaper key encryption (scrypt n=2^12) for devices short of memory",
    )

    start = sub.add_parser("start", help="run enrolled node(s) as a Celery worker")
    start.add_argument("--home", type=Path, action="append", required=True)
    start.add_argument("--concurrency", type=whole_number(1, None, "worker processes"), default=1)
    start.add_argument("--loglevel", default="INFO")
    start.add_argument(
        "--broker-url",
        help="override the broker URL the platform gave at join (simulations serving several "
        "nodes from one process need one whose user may read all their queues)",
    )
    start.add_argument("--eth-rpc-url", help="override the chain URL the platform gave at join")
    start.add_argument("--dataplane-host", help="override the address the data plane listens on")

    status = sub.add_parser(
        "status", help="bids, selected tasks, rounds, earnings, credit and data-plane health"
    )
    status.add_argument("--home", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="print one JSON object")

    balance = sub.add_parser("balance", help="the device's ETH and its credit in the contract")
    balance.add_argument("--home", type=Path, required=True)
    balance.add_argument("--json", action="store_true", help="print one JSON object")

    withdraw = sub.add_parser("withdraw", help="take the device's credit out of the contract")
    withdraw.add_argument("--home", type=Path, required=True)
    withdraw.add_argument("--to", help="send it on to this address (default: the device's own)")
    withdraw.add_argument("--json", action="store_true", help="print one JSON object")

    prune = sub.add_parser(
        "prune",
        help="delete the models of settled tasks kept long enough (start does it every hour)",
    )
    prune.add_argument("--home", type=Path, required=True)
    prune.add_argument(
        "--keep-days",
        type=whole_number(0, None, "a whole number of days"),
        help="days to keep a settled task's models (default: FLEX_STORE_KEEP_DAYS, 30)",
    )
    prune.add_argument("--json", action="store_true", help="print one JSON object")

    prov = sub.add_parser(
        "provenance",
        help="recompute every global model of a task from the chain and its blobs alone",
    )
    prov.add_argument("--rpc", required=True, help="the chain's JSON-RPC URL")
    prov.add_argument("--contract", required=True, help="the FlexMarket contract's address")
    prov.add_argument("--task", type=int, required=True, help="the task's id on chain")
    prov.add_argument("--spec", type=Path, required=True, help="the task's spec (JSON file)")
    prov.add_argument(
        "--blobs",
        type=Path,
        action="append",
        required=True,
        help="a model store or a device's home holding the task's blobs (repeatable)",
    )
    prov.add_argument("--from-block", type=int, default=0, help="scan payments from this block")
    prov.add_argument("--json", type=Path, help="also write the report here")
    return p


def _market(home: Path):
    from chain.client import FlexMarket
    from chain.node import connect
    from worker import config as config_mod

    cfg = config_mod.load(home)
    return cfg, FlexMarket(w3=connect(cfg.eth_rpc_url), address=cfg.contract_address)


def _json(record) -> str:
    """A record as one JSON line, wei as strings of digits (exact in any JSON reader)."""
    fields = dataclasses.asdict(record)
    return json.dumps({k: str(v) if isinstance(v, int) else v for k, v in fields.items()})


def cmd_balance(args: argparse.Namespace) -> int:
    from chain.withdrawals import balance_of
    from core.units import wei_to_eth

    cfg, market = _market(args.home)
    held = balance_of(market=market, address=cfg.address)
    if args.json:
        print(_json(held))
    else:
        print(f"device {cfg.address}")
        print(f"  account  {held.wallet_wei} wei ({wei_to_eth(held.wallet_wei)} ETH)")
        print(f"  credit   {held.credit_wei} wei ({wei_to_eth(held.credit_wei)} ETH), withdrawable")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from worker import node as nodes
    from worker.keys import passphrase_read
    from worker.status import dataplane_problem, owner_link, render, status_fetch

    node = nodes.load(home=args.home, passphrase=passphrase_read())
    status = status_fetch(node)
    local, link = dataplane_problem(node), owner_link(account=node.account, config=node.config)
    stored, size = models = node.store.usage()
    if args.json:
        mine = {"local_dataplane_problem": local, "owner_link": link}
        print(json.dumps({**status, **mine, "models_stored": stored, "models_bytes": size}))
    else:
        print(render(status, local_problem=local, link=link, models=models))
    return 0


def cmd_withdraw(args: argparse.Namespace) -> int:
    from chain.withdrawals import withdraw_credit
    from worker import node as nodes
    from worker.keys import passphrase_read

    node = nodes.load(home=args.home, passphrase=passphrase_read())
    done = withdraw_credit(market=node.market, sender=node.account, to=args.to)
    if args.json:
        print(_json(done))
    else:
        print(f"withdrew {done.amount_wei} wei to {done.account} (tx {done.withdraw_tx})")
        if done.forward_tx:
            print(f"sent {done.amount_wei} wei on to {done.to} (tx {done.forward_tx})")
        print(f"gas paid: {done.fee_wei} wei")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from training.store import ModelStore
    from worker.node import STORE_DIR
    from worker.retention import DAY_S, KEEP_DAYS, prune

    cfg, market = _market(args.home)
    days = KEEP_DAYS if args.keep_days is None else args.keep_days
    store = ModelStore(args.home / STORE_DIR, max_blob_bytes=cfg.max_model_bytes)
    pruned = prune(store=store, market=market, node=cfg.address, keep_s=days * DAY_S)
    if args.json:
        gone = [{**dataclasses.asdict(p), "state": p.state.name.lower()} for p in pruned]
        print(json.dumps({"keep_days": days, "pruned": gone}))
        return 0
    for gone in pruned:
        print(gone)
    if not pruned:
        print(f"nothing to delete: no task settled with models kept {days} day(s)")
    return 0


def cmd_provenance(args: argparse.Namespace) -> int:
    from chain.client import FlexMarket
    from chain.node import connect
    from worker.provenance import folder_blobs, provenance, table

    market = FlexMarket(w3=connect(args.rpc), address=args.contract, deploy_block=args.from_block)
    try:
        spec = json.loads(args.spec.read_text())
        blobs = folder_blobs(args.blobs)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = provenance(market, task_id=args.task, spec=spec, blobs=blobs)
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["verified"] else 1


def cmd_join(args: argparse.Namespace) -> int:
    from worker.config import KEYSTORE_FILE, BidPolicy
    from worker.join import join
    from worker.keys import LIGHT_SCRYPT_N, STANDARD_SCRYPT_N, key_load_or_create, passphrase_read

    passphrase = passphrase_read(confirm=not (args.home / KEYSTORE_FILE).exists())
    account = key_load_or_create(
        path=args.home / KEYSTORE_FILE,
        passphrase=passphrase,
        scrypt_n=LIGHT_SCRYPT_N if args.light_key else STANDARD_SCRYPT_N,
    )
    cfg = join(
        server_url=args.server_url,
        token=args.token,
        account=account,
        home=args.home,
        name=args.name,
        device_class=args.device_class,
        policy=BidPolicy(
            price_per_round_wei=args.price_wei,
            min_budget_wei=args.min_budget_wei,
            aggregator_price_per_round_wei=args.aggregator_price_wei,
        ),
        data_path=args.data,
        partition=args.partition,
        dataplane_host=args.dataplane_host,
        dataplane_port=args.dataplane_port,
        dataplane_url=args.dataplane_url,
        eth_rpc_url=args.eth_rpc_url,
    )
    print(f"enrolled as device {cfg.device_id}: {cfg.address} ({cfg.device_class})")
    print(f"queues {', '.join(cfg.queues)}; config in {args.home}")
    from worker.status import owner_link

    print(
        "its page on the website (for an hour; `python -m worker status` makes a new link): "
        + owner_link(account=account, config=cfg)
    )
    from chain.node import connect

    balance = connect(cfg.eth_rpc_url).eth.get_balance(cfg.address)
    if balance == 0:
        print(f"fund {cfg.address} with ETH for its gas before it can bid", file=sys.stderr)
    if args.no_start:
        return 0
    return run(homes=[args.home], passphrase=passphrase, concurrency=1, loglevel="INFO")


def run(
    *,
    homes: list[Path],
    passphrase: str,
    concurrency: int,
    loglevel: str,
    broker_url: str | None = None,
    eth_rpc_url: str | None = None,
    dataplane_host: str | None = None,
) -> int:
    """Load each node, start its data plane, and consume all their queues until stopped."""
    from worker import node as nodes
    from worker.app import node_app

    overrides = {"eth_rpc_url": eth_rpc_url, "dataplane_host": dataplane_host}
    overrides = {k: v for k, v in overrides.items() if v}
    loaded = [nodes.register(nodes.load(home=h, passphrase=passphrase, **overrides)) for h in homes]
    brokers = {broker_url or n.config.broker_url for n in loaded}
    if len(brokers) != 1:
        raise FlexError("all nodes of one worker must use the same broker", brokers=sorted(brokers))
    queues = sorted({q for n in loaded for q in n.config.queues})
    app = node_app(broker_url=brokers.pop(), queue=loaded[0].config.queues[0])
    import worker.tasks  # noqa: F401  (registers the tasks before the pool forks)
    from worker.follow import RoundFollower
    from worker.payments import PaymentWatcher
    from worker.retention import StoreKeeper

    watcher = PaymentWatcher(loaded)
    keeper = StoreKeeper(loaded)
    follower = RoundFollower(loaded, app=app)
    for n in loaded:
        n.warm()  # before it listens: a bid must not wait for data or libraries to load
    # What is loaded now (TensorFlow, Keras, the data) lives as long as the process: out of the
    # collector's sight, a full collection takes microseconds instead of a quarter second, the
    # pool's forked children share those pages instead of copying them as the collector writes
    # to them, and the process exits at once instead of collecting them on the way out.
    gc.freeze()
    try:
        for n in loaded:
            n.start_dataplane()
        watcher.start()
        keeper.start()
        follower.start()
        app.worker_main(
            [
                "worker",
                "--queues",
                ",".join(queues),
                "--concurrency",
                str(concurrency),
                "--hostname",
                worker_hostname(loaded[0].config.name),
                "--loglevel",
                loglevel,
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        follower.stop()
        keeper.stop()
        watcher.stop()
        for n in loaded:
            if n.server:
                n.server.stop()
    return 0


def worker_hostname(name: str) -> str:
    """The Celery node name of a device named ``name`` on this host: its name is any text the
    owner chose, where Celery reads "@" as the end of the name and "%x" as a placeholder."""
    return name.replace("@", "-").replace("%", "%%") + "@%h"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parser().parse_args(argv)
    try:
        if args.command == "join":
            return cmd_join(args)
        if args.command == "balance":
            return cmd_balance(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "withdraw":
            return cmd_withdraw(args)
        if args.command == "provenance":
            return cmd_provenance(args)
        if args.command == "prune":
            return cmd_prune(args)
        from worker.keys import passphrase_read

        return run(
            homes=args.home,
            passphrase=passphrase_read(),
            concurrency=args.concurrency,
            loglevel=args.loglevel,
            broker_url=args.broker_url,
            eth_rpc_url=args.eth_rpc_url,
            dataplane_host=args.dataplane_host,
        )
    except FlexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
