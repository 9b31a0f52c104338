"""Run the local dev chain with FlexMarket deployed, until Ctrl-C."""

import signal
import time
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from web3 import Web3

from chain.errors import FlexError
from chain.launcher import LocalChain, dev_accounts


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options):
        port = urlparse(settings.ETH_RPC_URL).port or 8545
        state = Path(settings.VAR_DIR) / "chain" / "state.json"
        node = LocalChain(port=port, state_path=state, log_path=state.parent / "anvil.log")
        try:
            node.start()
            self.stdout.write(f"local chain at {node.rpc_url} (state kept in {state})")
            call_command("deploy_contract", stdout=self.stdout)
        except FlexError as exc:
            node.stop()
            raise CommandError(exc.message) from exc
        self.stdout.write("funded dev accounts (address, private key):")
        for i, account in enumerate(dev_accounts(5)):
            balance = node.w3().eth.get_balance(account.address)
            self.stdout.write(
                f"  {i}  {account.address}  {account.key.hex()}  "
                f"{Web3.from_wei(balance, 'ether')} ETH"
            )
        self.stdout.write("Ctrl-C stops the chain.")
        stopping = []
        signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        while not stopping and node.process.poll() is None:
            time.sleep(0.2)
        node.stop()
        self.stdout.write("chain stopped")
