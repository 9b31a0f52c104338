"""Start and stop a local Ethereum node (Anvil from node_modules) with funded dev accounts."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from chain.node import client, connect
from core.errors import FlexError
from core.signals import Stopper

ROOT = Path(__file__).resolve().parent.parent
ANVIL = ROOT / "node_modules" / ".bin" / "anvil"
# Anvil's (and Hardhat's) well-known development mnemonic: these keys are public, so the
# accounts they derive are only ever funded on a local chain.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_CHAIN_ID = 31337
# The longest one ask of a starting node waits for its answer (it is asked until start's
# deadline).
PROBE_TIMEOUT_S = 2.0

Account.enable_unaudited_hdwallet_features()


class ChainLaunchError(FlexError):
    """The local Ethereum node could not be started."""

    code = "chain_launch_failed"


def dev_accounts(n: int, *, start: int = 0) -> list[LocalAccount]:
    """The first ``n`` accounts of the dev mnemonic (BIP-44 path m/44'/60'/0'/0/i)."""
    return [_dev_account(i) for i in range(start, start + n)]


@functools.cache
def _dev_account(index: int) -> LocalAccount:
    # Derived once per process: a derivation is some 10 ms of key stretching.
    return Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalChain:
    """A child Anvil process (on 127.0.0.1 unless ``host`` says otherwise), funded from
    DEV_MNEMONIC; stopped cleanly on exit.

    ``state_path`` keeps the chain across restarts (Anvil dumps it on exit and every
    ``state_interval`` seconds); without it every start is a fresh chain.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        accounts: int = 20,
        balance_eth: int = 1_000_000,
        block_time: float | None = None,
        state_path: Path | None = None,
        state_interval: int = 5,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.accounts = accounts
        self.balance_eth = balance_eth
        self.block_time = block_time
        self.state_path = state_path
        self.state_interval = state_interval
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def rpc_url(self) -> str:
        """Where this host reaches the node (loopback when it listens on every interface)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            str(ANVIL),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--mnemonic",
            DEV_MNEMONIC,
            "--accounts",
            str(self.accounts),
            "--balance",
            str(self.balance_eth),
            "--chain-id",
            str(DEV_CHAIN_ID),
            # Its line per request would go nowhere, and formatting it is a few per cent of
            # the node's CPU; errors still come on stderr.
            "--silent",
        ]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        if self.state_path:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--state", str(self.state_path), "--state-interval", str(self.state_interval)]
        return cmd

    def start(self, *, timeout: float = 30.0) -> LocalChain:
        if not ANVIL.exists():
            raise ChainLaunchError(
                f"{ANVIL} is missing: run `npm ci` (or `make setup`) first", path=str(ANVIL)
            )
        # What it says on stderr, kept for the error should it exit: a file, which a node
        # that runs for days cannot fill up as it could a pipe nobody reads.
        errors = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        # Asked again and again until the deadline: a short wait for each answer, so that a
        # port something else holds without answering does not keep one ask waiting long.
        w3 = client(self.rpc_url, timeout=PROBE_TIMEOUT_S)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip().splitlines()
                unreadable = self.state_path is not None and any(
                    str(self.state_path) in line for line in said
                )
                raise ChainLaunchError(
                    f"anvil exited with code {self.process.returncode} on port {self.port}"
                    + (f": {said[0]}" if said else "")
                    + (
                        f" (the chain saved in {self.state_path} cannot be read: move it away, "
                        "or `make clean` to start the local platform afresh)"
                        if unreadable
                        else ""
                    ),
                    port=self.port,
                    returncode=self.process.returncode,
                )
            with contextlib.suppress(Exception):
                # Still running: not another node that answers on the port it failed to take.
                if w3.eth.chain_id == DEV_CHAIN_ID and self.process.poll() is None:
                    return self
            time.sleep(0.05)
        self.stop()
        raise ChainLaunchError(f"anvil did not answer on {self.rpc_url} within {timeout}s")

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM the node (it dumps its state) and wait; SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def w3(self) -> Web3:
        return connect(self.rpc_url)

    def __enter__(self) -> LocalChain:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a local node in the foreground until interrupted (used by `make run`)."""
    parser = argparse.ArgumentParser(prog="python -m chain.launcher", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8545)
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--state", type=Path, help="file that keeps the chain across restarts")
    parser.add_argument(
        "--block-time",
        type=float,
        help="mine a block every this many seconds, as a public chain does (default: one "
        "block per transaction, at once)",
    )
    args = parser.parse_args(argv)
    node = LocalChain(
        host=args.host,
        port=args.port,
        accounts=args.accounts,
        state_path=args.state,
        block_time=args.block_time,
    )
    stop = Stopper()
    try:
        node.start()
        stop.started()
        print(f"local chain {node.rpc_url} (chain id {DEV_CHAIN_ID})", flush=True)
        while not stop.stopping.is_set() and node.process and node.process.poll() is None:
            stop.stopping.wait(0.2)
    except KeyboardInterrupt:
        pass  # stopped while starting: the node it began is stopped below
    except FlexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        stop.started()
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
