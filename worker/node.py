"""A running node: its config, key, model store, data-plane server and chain client.

One worker process may serve several node identities (the simulation mode serves many
devices from a few processes), so every Celery task names the node it is addressed to.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from eth_account.signers.local import LocalAccount

from chain.client import FlexMarket
from chain.node import chain_time, connect
from core.errors import FlexError
from core.messages import Deployment
from dataplane.access import ChainPolicy
from dataplane.server import DataPlaneServer
from dataplane.tls import node_certificate_load
from training.datasets import Dataset, load_local, load_partition
from training.errors import DatasetError
from training.spec import TaskSpec
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

    def data_for(self, spec: TaskSpec) -> Dataset:
        """The node's own training data in the task's schema; DatasetError when it has none."""
        key = spec.dataset
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
