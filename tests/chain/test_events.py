"""Event records and the chunked scanner."""

from __future__ import annotations

import itertools

import pytest
from web3 import Web3
from web3.exceptions import Web3RPCError

from chain.client import FlexMarket
from chain.errors import ChainUnavailableError
from chain.events import (
    GlobalModelPublished,
    NodesSelected,
    TaskFinalized,
    UpdateSubmitted,
    chunks,
    decode_log,
    decode_logs,
    event_topics,
    get_logs,
    scan,
)
from chain.launcher import free_port
from tests.chain.conftest import Accounts, Flow, Running


def lifecycle(market: FlexMarket, accounts: Accounts, flow: Flow, running: Running) -> None:
    flow.run_round(running, 0, scores=[1, 2, 3])
    flow.run_round(running, 1)
    market.finalize(sender=accounts.outsider, task_id=running.task_id)


def test_chunks():
    assert list(chunks(5, 11, size=3)) == [(5, 7), (8, 10), (11, 11)]
    assert list(chunks(5, 4, size=3)) == []
    with pytest.raises(ValueError, match="at least 1"):
        list(chunks(0, 1, size=0))


def test_scan_in_small_chunks_sees_every_event_once(
    market: FlexMarket, accounts: Accounts, flow: Flow, running: Running, w3: Web3
):
    lifecycle(market, accounts, flow, running)
    head = w3.eth.block_number
    small = list(market.scan(to_block=head, chunk=3))
    whole = list(market.scan(to_block=head, chunk=10_000))
    assert len(whole) == 1
    assert small[0].from_block == market.deploy_block
    assert small[-1].to_block == head
    for a, b in itertools.pairwise(small):
        assert b.from_block == a.to_block + 1
    for chunk in small:
        assert chunk.to_block_hash == "0x" + w3.eth.get_block(chunk.to_block)["hash"].hex()
    events = [e for c in small for e in c.events]
    assert events == list(whole[0].events)
    assert len({e.key for e in events}) == len(events)
    assert events == sorted(events, key=lambda e: (e.block_number, e.log_index))
    names = [e.name for e in events]
    for name in ("TaskCreated", "BidPlaced", "NodesSelected", "GlobalModelPublished"):
        assert name in names
    assert names[-1] == "PaymentCredited"


def test_events_carry_what_a_mirror_needs(
    market: FlexMarket, accounts: Accounts, flow: Flow, running: Running, w3: Web3
):
    lifecycle(market, accounts, flow, running)
    (chunk,) = scan(w3, market.address, 0, w3.eth.block_number)
    selected = next(e for e in chunk.events if isinstance(e, NodesSelected))
    assert selected.trainers == tuple(t.address for t in running.trainers)
    published = [e for e in chunk.events if isinstance(e, GlobalModelPublished)]
    assert [e.model_id for e in published] == running.published
    assert published[1].scores == (1, 2, 3)
    updates = [e for e in chunk.events if isinstance(e, UpdateSubmitted)]
    assert {(e.round, e.position) for e in updates} == {(r, p) for r in (0, 1) for p in range(3)}
    final = next(e for e in chunk.events if isinstance(e, TaskFinalized))
    receipt = w3.eth.get_transaction_receipt(final.tx_hash)
    assert receipt["blockNumber"] == final.block_number
    assert final.address == market.address
    # The block's time comes with each log from this node: the mirror dates rounds by it.
    for event in (selected, *published, final):
        assert event.block_time == w3.eth.get_block(event.block_number)["timestamp"]


def test_logs_as_the_node_sends_them_decode_as_web3_formats_them(
    market: FlexMarket, accounts: Accounts, flow: Flow, running: Running, w3: Web3
):
    # Scans read raw logs; receipts come formatted by web3. Both decode to the same records.
    lifecycle(market, accounts, flow, running)
    head = w3.eth.block_number
    raw = get_logs(w3, address=market.address, from_block=0, to_block=head)
    formatted = w3.eth.get_logs({"address": market.address, "fromBlock": 0, "toBlock": head})
    assert isinstance(raw[0]["blockNumber"], str)
    assert decode_logs(raw) == decode_logs(formatted)
    assert len(decode_logs(raw)) == len(formatted) > 10


def test_a_refused_log_query_raises_the_nodes_error(market: FlexMarket, w3: Web3):
    beyond = w3.eth.block_number + 10
    with pytest.raises(Web3RPCError, match="block"):
        get_logs(w3, address=market.address, from_block=beyond, to_block=beyond + 1)


def test_scan_of_an_empty_range(market: FlexMarket, w3: Web3):
    head = w3.eth.block_number
    assert list(scan(w3, market.address, head + 1, head)) == []


def test_decode_log_ignores_other_events():
    assert decode_log({"topics": ["0x" + "11" * 32], "data": "0x"}) is None
    assert decode_log({"topics": [], "data": "0x"}) is None
    assert len(event_topics()) == 21


def test_scan_with_the_node_gone(market: FlexMarket):
    dead = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 2}))
    with pytest.raises(ChainUnavailableError):
        list(scan(dead, market.address, 0, 10, retries=2, retry_delay=0))
