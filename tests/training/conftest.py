"""Shared fixtures for the training engine's tests: a small MLP spec and digits partitions."""

from __future__ import annotations

import pytest

from training.datasets import Dataset, load_partition
from training.spec import TaskSpec


@pytest.fixture
def spec() -> TaskSpec:
    return TaskSpec(
        model="digits-mlp",
        dataset="digits-8x8",
        rounds=2,
        local_epochs=5,
        batch_size=16,
        learning_rate=0.1,
        seed=7,
    )


@pytest.fixture(scope="session")
def partitions() -> list[Dataset]:
    return [
        load_partition(schema="digits-8x8", index=i, count=5, alpha=1.0, seed=7) for i in range(5)
    ]
