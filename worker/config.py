"""A node's configuration: who it is on chain, where its broker, data and store are, how it bids."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import FlexError

CONFIG_FILE = "device.json"
KEYSTORE_FILE = "key.json"
# The data plane's TLS certificate and key (dataplane.tls), made at enrolment.
TLS_DIR = "tls"


class DeviceConfigError(FlexError):
    """The device configuration is missing or invalid."""

    code = "device_config_invalid"


class Partition(BaseModel):
    """A slice of the bundled digits set, for demos and simulations (non-IID, Dirichlet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    alpha: float = Field(default=0.5, gt=0)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _index_in_range(self) -> Partition:
        # After both fields: ``index`` comes first, so a field validator on it would not see
        # ``count`` yet.
        if self.index >= self.count:
            raise ValueError(f"index must be below count: {self.index} of {self.count}")
        return self


class BidPolicy(BaseModel):
    """How a device prices its work, in wei (integers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    price_per_round_wei: int = Field(ge=0)
    min_budget_wei: int = Field(default=0, ge=0)
    aggregator_price_per_round_wei: int | None = Field(default=None, ge=0)


class DeviceConfig(BaseModel):
    """Everything a node needs to work: written by `join`, read by `start`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    server_url: str
    name: str
    device_id: int
    address: str
    device_class: Literal["cpu", "gpu", "jetson"]
    may_aggregate: bool = False
    queues: list[str]
    broker_url: str
    eth_rpc_url: str
    chain_id: int
    contract_address: str
    data_path: str | None = None
    partition: Partition | None = None
    policy: BidPolicy
    # Where the data plane listens, and the URL it is advertised at (the platform has it).
    dataplane_host: str = "127.0.0.1"
    dataplane_port: int = Field(default=0, ge=0, le=65535)
    dataplane_url: str = ""
    max_model_bytes: int = Field(default=512 * 1024 * 1024, gt=0)


def load(home: Path) -> DeviceConfig:
    path = home / CONFIG_FILE
    try:
        return DeviceConfig.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise DeviceConfigError(
            f"{path} does not exist: enrol the device with `python -m worker join` first",
            path=str(path),
        ) from exc
    except ValidationError as exc:
        raise DeviceConfigError(f"{path} is invalid: {exc}", path=str(path)) from exc


def save(home: Path, config: DeviceConfig) -> Path:
    """Write the config atomically, readable by the device's user only."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / CONFIG_FILE
    data = json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".device.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
