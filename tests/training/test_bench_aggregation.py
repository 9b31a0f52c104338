"""The aggregation benchmark runs end to end on small sizes and reports the agreed keys."""

from __future__ import annotations

import json

from bench import aggregation


def test_run_reports_the_agreed_keys(tmp_path):
    results = aggregation.run(
        memcpy_bytes=4_000_000, sizes={"1M": 1_000, "10M": 10_000}, updates=3, repeats=1
    )
    assert results["memcpy_MBps"] > 0
    assert set(results["fedavg_MBps"]) == {"1M", "10M"}
    assert all(v > 0 for v in results["fedavg_MBps"].values())
    assert results["fedavg_to_memcpy_ratio"] == (
        results["fedavg_MBps"]["10M"] / results["memcpy_MBps"]
    )
    assert results["train_round_s"] > 0
    text = aggregation.table(results)
    assert results["merkle_ms_per_MB"] > 0
    assert "fedavg / memory copy" in text
    assert "Merkle tree" in text
    assert "local round" in text
    json.loads(json.dumps(results))  # JSON-ready as returned


def test_updates_differ_in_sample_count():
    updates = aggregation.make_updates(params=10, count=3)
    assert [u.num_examples for u in updates] == [100, 101, 102]
    assert all(u.weights[0].dtype.name == "int32" for u in updates)
