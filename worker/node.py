"""A running node: its config, key, model store, data-plane server and chain client.

One worker process may serve several node identities (the simulation mode serves many
devices from a few processes), so every Celery task names the node it is addressed to.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from eth_account.signers.local import LocalAccount

from chain.client import FlexMarket
from chain.errors import ChainUnavailableError
from chain.node import chain_time, client, connect
from core.errors import FlexError
from core.messages import Deployment
from dataplane.access import ChainPolicy
from dataplane.server import DataPlaneServer
from dataplane.tls import node_certificate_load
from training.catalogue import SCHEMAS, import_keras
from training.datasets import Dataset, load_local, load_partition
from training.errors import DatasetError
from training.store import ModelStore
from worker import config as config_mod
from worker.config import KEYSTORE_FILE, TLS_DIR, DeviceConfig
from worker.keys import key_load

log = logging.getLogger(__name__)

STORE_DIR = "models"


class UnknownNodeError(FlexError):
    """This worker process does not serve the node a task was addressed to."""

    code = "unknown_node"


@dataclass(eq=False)
class Node:
    """Everything one node identity needs to bid, train, aggregate and serve its blobs."""

    home: Path
    config: DeviceConfig
    account: LocalAccount
    store: ModelStore
    server: DataPlaneServer | None = None
    _data: dict[str, Dataset] = field(default_factory=dict)

    @functools.cached_property
    def market(self) -> FlexMarket:
        return FlexMarket(w3=connect(self.config.eth_rpc_url), address=self.config.contract_address)

    @property
    def address(self) -> str:
        return self.account.address

    @property
    def deployment(self) -> Deployment:
        """The FlexMarket this node enrolled with: messages for any other are dropped."""
        return Deployment(chain_id=self.config.chain_id, contract=self.config.contract_address)

    def chain_time(self) -> int:
        return chain_time(self.market.w3)

    def data_for(self, dataset: str) -> Dataset:
        """The node's own training data in schema ``dataset``; DatasetError when it has none."""
        key = dataset
        if key not in self._data:
            if self.config.data_path:
                self._data[key] = load_local(path=self.config.data_path, schema=key)
            elif self.config.partition is not None:
                p = self.config.partition
                self._data[key] = load_partition(
                    schema=key, index=p.index, count=p.count, alpha=p.alpha, seed=p.seed
                )
            else:
                raise DatasetError(source=str(self.home), reason="this node has no data configured")
        return self._data[key]

    def warm(self) -> None:
        """Load, before the node takes work, what deciding a bid and training would otherwise
        load inside a bidding window: its data in every schema it has, the chain client and
        the signing code, and TensorFlow. On a busy machine with a cold disk cache that first
        load has taken longer than a bidding window. Safe to call again."""
        started = time.perf_counter()
        loaded = []
        for key in SCHEMAS:
            try:
                data = self.data_for(key)
            except DatasetError:
                continue  # no data in this schema here: the node does not bid on its tasks
            loaded.append(f"{len(data)} samples of {key}")
        # A client of its own, never used again: the worker's pool forks after this, and a
        # child must not inherit the node's client with a connection the parent opened.
        w3 = client(self.config.eth_rpc_url)
        try:
            chain_time(w3)
            FlexMarket(w3=w3, address=self.config.contract_address).task_count()
        except ChainUnavailableError as exc:  # it may come up later; the work retries then
            log.warning("node %s: %s", self.address, exc.message)
        # Signing's first use imports its curve code: do it now on a transaction never sent.
        self.account.sign_transaction(
            {"to": self.address, "value": 0, "gas": 21000, "gasPrice": 1, "nonce": 0, "chainId": 1}
        )
        import_keras()
        log.info(
            "node %s ready to bid in %.1f s: %s, chain %s, TensorFlow loaded",
            self.address,
            time.perf_counter() - started,
            ", ".join(loaded) or "no training data (aggregator only)",
            self.config.chain_id,
        )

    def start_dataplane(self) -> DataPlaneServer:
        self.server = DataPlaneServer(
            store=self.store,
            policy=ChainPolicy(market=self.market),
            node_address=self.address,
            certificate=node_certificate_load(self.home / TLS_DIR),
            public_url=self.config.dataplane_url or None,
            host=self.config.dataplane_host,
            port=self.config.dataplane_port,
            max_bytes=self.config.max_model_bytes,
        ).start()
        return self.server


_NODES: dict[str, Node] = {}


def load(*, home: Path, passphrase: str, **overrides: object) -> Node:
    """Open a node's home: its config (with ``overrides`` of its fields, for this run only),
    its decrypted key and its model store."""
    cfg = config_mod.load(home)
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    account = key_load(path=home / KEYSTORE_FILE, passphrase=passphrase)
    if account.address != cfg.address:
        raise config_mod.DeviceConfigError(
            f"the key in {home} is {account.address}, but the config is for {cfg.address}",
            path=str(home),
        )
    store = ModelStore(home / STORE_DIR, max_blob_bytes=cfg.max_model_bytes)
    return Node(home=home, config=cfg, account=account, store=store)


def register(node: Node) -> Node:
    _NODES[node.address.lower()] = node
    return node


def unregister(node: Node) -> None:
    _NODES.pop(node.address.lower(), None)


def get(address: str) -> Node:
    try:
        return _NODES[address.lower()]
    except KeyError:
        raise UnknownNodeError(
            f"this worker does not serve node {address}", address=address, served=list(_NODES)
        ) from None


def served() -> list[Node]:
    return list(_NODES.values())
