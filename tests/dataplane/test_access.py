"""FlexMarket's access rules for model blobs, read from the real chain and served over TLS."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3

from chain.client import FlexMarket
from chain.events import DeviceClass, Role, TaskCreated
from chain.launcher import dev_accounts, free_port
from dataplane import audit
from dataplane.access import ChainPolicy
from dataplane.client import fetch_openings, kept_pool
from dataplane.protocol import (
    AccessDeniedError,
    ChunkIndexError,
    ModelListError,
    OpeningMalformedError,
    PeerCertificateError,
    PolicyUnavailableError,
)
from dataplane.server import DataPlaneServer, _Handler
from tests.blobs import blob_of
from tests.dataplane.conftest import cert_for
from tests.dataplane.test_dataplane import SERVER, _fetch, _get, _signed
from training.errors import BlobNotFoundError, ModelIdMismatchError
from training.serialize import Openings, id_hex
from training.store import ModelStore, StoredModel


@dataclass(frozen=True)
class OnChain:
    """A deployed market with task ``task_id`` selected and task ``bidding_id`` still open."""

    market: FlexMarket
    task_id: int
    bidding_id: int
    owner: LocalAccount
    buyer: LocalAccount
    aggregator: LocalAccount
    trainers: tuple[LocalAccount, ...]
    outsider: LocalAccount


def _rpc(w3: Web3, method: str, *params: object) -> object:
    return w3.provider.make_request(method, list(params))["result"]  # type: ignore[arg-type]


@contextmanager
def _snapshot(w3: Web3) -> Iterator[None]:
    snapshot = _rpc(w3, "evm_snapshot")
    try:
        yield
    finally:
        _rpc(w3, "evm_revert", snapshot)


@pytest.fixture(scope="module")
def on_chain(w3: Web3) -> Iterator[OnChain]:
    owner, buyer, aggregator, t1, t2, outsider = dev_accounts(6, start=13)
    with _snapshot(w3):
        market = FlexMarket.deploy(w3=w3, sender=owner)
        for device, can_aggregate in ((aggregator, True), (t1, False), (t2, False)):
            market.register_device(
                sender=owner,
                device=device.address,
                device_class=DeviceClass.CPU,
                can_aggregate=can_aggregate,
            )
        ids = []
        for _ in range(2):
            now = w3.eth.get_block("latest")["timestamp"]
            created = market.create_task(
                sender=buyer,
                spec_hash=b"\x11" * 32,
                rounds=2,
                min_trainers=1,
                max_trainers=4,
                bidding_ends=now + 100,
                round_timeout=600,
                budget_wei=10**15,
            )
            ids.append(created.first(TaskCreated).task_id)
        task_id, bidding_id = ids
        market.place_bid(
            sender=aggregator,
            task_id=task_id,
            price_per_round_wei=1,
            samples=0,
            role=Role.AGGREGATOR,
        )
        for trainer in (t1, t2):
            market.place_bid(
                sender=trainer,
                task_id=task_id,
                price_per_round_wei=1,
                samples=100,
                role=Role.TRAINER,
            )
        _rpc(w3, "evm_increaseTime", 200)
        _rpc(w3, "evm_mine")
        market.select_nodes(sender=buyer, task_id=task_id)
        yield OnChain(market, task_id, bidding_id, owner, buyer, aggregator, (t1, t2), outsider)


def _meta(kind: str | None, task_id: int | None) -> StoredModel:
    return StoredModel(
        model_id=b"\x42" * 32,
        size=1,
        kind=kind,
        chain_id=31337,
        contract="0x" + "00" * 20,
        task_id=task_id,
        round_number=0,
        trainer="0x" + "00" * 20,
        created=datetime.now(tz=UTC),
    )


def _aggregators_plane(store: ModelStore, on_chain: OnChain) -> DataPlaneServer:
    """The task's aggregator's data plane over ``store``, under the chain's access policy."""
    return DataPlaneServer(
        certificate=cert_for("server"),
        store=store,
        policy=ChainPolicy(market=on_chain.market),
        node_address=on_chain.aggregator.address,
    )


def test_chain_selection_is_what_the_rules_are_tested_against(on_chain: OnChain) -> None:
    selection = on_chain.market.selection(task_id=on_chain.task_id)
    assert selection is not None
    assert selection.aggregator == on_chain.aggregator.address
    assert set(selection.trainers) == {t.address for t in on_chain.trainers}


def test_only_the_aggregator_may_fetch_an_update(on_chain: OnChain) -> None:
    policy = ChainPolicy(market=on_chain.market)
    update = _meta("update", on_chain.task_id)
    policy.authorize_fetch(requester=on_chain.aggregator.address, meta=update)
    for other in (*on_chain.trainers, on_chain.buyer, on_chain.outsider):
        with pytest.raises(AccessDeniedError, match=r"only task .* aggregator") as exc:
            policy.authorize_fetch(requester=other.address, meta=update)
        assert exc.value.requester == other.address
        assert exc.value.task_id == on_chain.task_id


def test_selected_nodes_and_buyer_may_fetch_a_global_model(on_chain: OnChain) -> None:
    policy = ChainPolicy(market=on_chain.market)
    global_model = _meta("global", on_chain.task_id)
    for party in (on_chain.buyer, on_chain.aggregator, *on_chain.trainers):
        policy.authorize_fetch(requester=party.address.lower(), meta=global_model)
    with pytest.raises(AccessDeniedError, match="buyer, aggregator and selected trainers"):
        policy.authorize_fetch(requester=on_chain.outsider.address, meta=global_model)


def test_blobs_of_unselected_or_unknown_tasks_or_no_task_are_refused(on_chain: OnChain) -> None:
    policy = ChainPolicy(market=on_chain.market)
    buyer = on_chain.buyer.address
    with pytest.raises(AccessDeniedError, match=r"no selected nodes \(bidding\)"):
        policy.authorize_fetch(requester=buyer, meta=_meta("global", on_chain.bidding_id))
    with pytest.raises(AccessDeniedError, match="does not exist on chain"):
        policy.authorize_fetch(requester=buyer, meta=_meta("global", 10_000))
    with pytest.raises(AccessDeniedError, match="not indexed as a task's"):
        policy.authorize_fetch(requester=buyer, meta=_meta(None, None))


def test_revoked_device_loses_access_once_the_cache_expires(w3: Web3, on_chain: OnChain) -> None:
    now = [1000.0]
    policy = ChainPolicy(market=on_chain.market, ttl=10.0, clock=lambda: now[0])
    trainer = on_chain.trainers[0].address
    global_model = _meta("global", on_chain.task_id)
    with _snapshot(w3):
        policy.authorize_fetch(requester=trainer, meta=global_model)
        on_chain.market.revoke_device(sender=on_chain.owner, device=trainer)
        now[0] += 9.0
        policy.authorize_fetch(requester=trainer, meta=global_model)  # answer still cached
        now[0] += 2.0
        with pytest.raises(AccessDeniedError, match="revoked"):
            policy.authorize_fetch(requester=trainer, meta=global_model)
        # The aggregator's access is untouched by a trainer's revocation.
        policy.authorize_fetch(requester=on_chain.aggregator.address, meta=global_model)


def test_chain_policy_over_http(store: ModelStore, on_chain: OnChain) -> None:
    trainer = on_chain.trainers[0]
    blob = blob_of([np.ones(4, np.float32)], task_id=on_chain.task_id, trainer=trainer.address)
    update = store.put(blob)
    policy = ChainPolicy(market=on_chain.market)
    with DataPlaneServer(
        certificate=cert_for("server"), store=store, policy=policy, node_address=trainer.address
    ) as plane:
        assert _fetch(plane, id_hex(update), account=on_chain.aggregator) == blob
        with pytest.raises(AccessDeniedError) as exc:
            _fetch(plane, id_hex(update), account=on_chain.trainers[1])
    assert exc.value.status == 403
    assert on_chain.aggregator.address in exc.value.reason


def test_unreachable_chain_is_503_not_access(store: ModelStore, on_chain: OnChain) -> None:
    dead = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}", request_kwargs={"timeout": 2}))
    policy = ChainPolicy(market=FlexMarket(w3=dead, address=on_chain.market.address))
    update = store.put(blob_of([np.ones(2, np.float32)], task_id=on_chain.task_id))
    with (
        DataPlaneServer(
            certificate=cert_for("server"), store=store, policy=policy, node_address=SERVER.address
        ) as plane,
        pytest.raises(PolicyUnavailableError),
    ):
        _fetch(plane, id_hex(update), account=on_chain.aggregator, retries=0)


def test_chunks_of_an_update_go_to_the_tasks_parties_whole_updates_only_to_the_aggregator(
    store: ModelStore, on_chain: OnChain
) -> None:
    """Watchers check an aggregate a chunk at a time: the buyer and the selected trainers
    may open single chunks of an update, checked against its ID; an outsider may not."""
    trainer = on_chain.trainers[0]
    values = [np.arange(600, dtype=np.float32) / 7]
    blob = blob_of(values, task_id=on_chain.task_id, trainer=trainer.address, chunk_values=256)
    update = id_hex(store.put(blob))
    with _aggregators_plane(store, on_chain) as plane:

        def opening(account: LocalAccount, index: int, **kw: object):
            return fetch_openings(
                base_url=plane.url,
                cert_sha256=plane.certificate.sha256,
                model_ids=[kw.pop("model_id", update)],
                indexes=[index],
                server_address=plane.node_address,
                account=account,
                retries=0,
            )[0][0]

        whole = store.load(update)
        for party in (on_chain.buyer, *on_chain.trainers):
            assert opening(party, 2) == whole.opening(2)  # the short last chunk
        with pytest.raises(AccessDeniedError, match="chunks of its updates"):
            opening(on_chain.outsider, 0)
        with pytest.raises(AccessDeniedError, match="aggregator"):
            _fetch(plane, update, account=on_chain.trainers[1])
        with pytest.raises(ChunkIndexError) as exc:
            opening(on_chain.buyer, 3)
        assert exc.value.status == 404
        missing = "0x" + "ab" * 32
        with pytest.raises(BlobNotFoundError):
            opening(on_chain.buyer, 0, model_id=missing)


def test_a_watchers_openings_come_several_to_a_request_over_one_pinned_connection(
    store: ModelStore, on_chain: OnChain
) -> None:
    """A watcher opens every sampled chunk of every update of a round: one request per update
    brings them all, in the order asked, and the thread keeps one TLS connection for every
    request, still pinned to the server's certificate."""
    trainer = on_chain.trainers[0]
    values = [np.arange(600, dtype=np.float32)]
    blob = blob_of(values, task_id=on_chain.task_id, trainer=trainer.address, chunk_values=256)
    update = id_hex(store.put(blob))
    with _aggregators_plane(store, on_chain) as plane:

        def openings(indexes: list[int], *, cert_sha256: str = plane.certificate.sha256):
            [of_update] = fetch_openings(
                base_url=plane.url,
                cert_sha256=cert_sha256,
                model_ids=[update],
                indexes=indexes,
                server_address=plane.node_address,
                account=on_chain.buyer,
                retries=0,
            )
            return of_update

        whole = store.load(update)
        assert openings([2, 0, 1]) == [whole.opening(i) for i in (2, 0, 1)]
        assert openings([1]) == [whole.opening(1)]
        assert kept_pool(plane.url, sha256=plane.certificate.sha256).num_connections == 1
        with pytest.raises(ChunkIndexError, match="no chunk 3"):
            openings([0, 3])  # one past the last: the whole request is refused
        with pytest.raises(ValueError, match="1 to 64 chunks"):
            openings(list(range(65)))
        with pytest.raises(PeerCertificateError):
            openings([0], cert_sha256=cert_for("other").sha256)


def test_a_watcher_opens_a_chunk_of_many_updates_in_one_request(
    store: ModelStore, on_chain: OnChain
) -> None:
    """A round's check needs the same chunks of every update: one request brings them, model
    by model in the order asked, each checked against its own ID; one model the requester
    may not open, or one too many, refuses the whole request and says which or how many."""
    updates = [
        id_hex(
            store.put(
                blob_of(
                    [np.arange(600, dtype=np.float32) * (k + 1)],
                    task_id=on_chain.task_id,
                    trainer=trainer.address,
                    chunk_values=256,
                )
            )
        )
        for k, trainer in enumerate(on_chain.trainers)
    ]
    # An update of the task still bidding, which has nobody selected to open it.
    stranger = id_hex(
        store.put(
            blob_of(
                [np.ones(600, np.float32)],
                task_id=on_chain.bidding_id,
                trainer=on_chain.trainers[0].address,
            )
        )
    )
    with _aggregators_plane(store, on_chain) as plane:

        def openings(model_ids: list[str], indexes: list[int]):
            return fetch_openings(
                base_url=plane.url,
                cert_sha256=plane.certificate.sha256,
                model_ids=model_ids,
                indexes=indexes,
                server_address=plane.node_address,
                account=on_chain.trainers[0],
                retries=0,
            )

        asked = list(reversed(updates))
        got = openings(asked, [2, 0])
        assert got == [[store.load(u).opening(i) for i in (2, 0)] for u in asked]
        with pytest.raises(AccessDeniedError, match=f"model {stranger}: task"):
            openings([*updates, stranger], [0])
        with pytest.raises(ChunkIndexError, match="no chunk 3"):
            openings(updates, [0, 3])
        with pytest.raises(ValueError, match="1 to 32 models"):
            openings([updates[0]] * 33, [0])
        # Past the limit the server refuses too, and says why, whoever the client is.
        path = f"/models/{','.join([updates[0]] * 33)}/chunks/0"
        refused = _get(plane, path, _signed(plane, path, account=on_chain.trainers[0]))
        assert refused.status == 400
        assert refused.json()["code"] == ModelListError.code
        assert "1 to 32 models at once, separated by commas, not 33" in refused.json()["message"]


def test_a_round_too_large_for_one_request_is_opened_over_several_and_put_back_in_order(
    store: ModelStore, on_chain: OnChain, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More chunks than a request takes (65 of 64), and a model whose chunks fill an answer:
    the watcher asks in parts and gets every model's chunks back in the order asked, its own
    update from its own store."""
    chunks = list(range(65))
    blobs = [
        blob_of(
            [np.arange(65 * 16, dtype=np.float32) + k],
            task_id=on_chain.task_id,
            trainer=trainer.address,
            chunk_values=16,
        )
        for k, trainer in enumerate(on_chain.trainers)
    ]
    theirs, mine = (id_hex(store.put(b)) for b in blobs)
    own = ModelStore(tmp_path / "own")
    own.put(blobs[1])
    # One model's chunks are as many values as an answer may carry: one model a request.
    monkeypatch.setattr(audit, "OPENINGS_REQUEST_VALUES", 65 * 16)
    asked = []
    real = fetch_openings

    def counted(**kw):
        asked.append((kw["model_ids"], kw["indexes"]))
        return real(**kw)

    monkeypatch.setattr(audit, "fetch_openings", counted)
    with _aggregators_plane(store, on_chain) as plane:
        aggregator = audit.Aggregator(
            address=on_chain.aggregator.address,
            url=plane.url,
            cert_sha256=plane.certificate.sha256,
        )
        got = audit.openings(
            own, on_chain.trainers[1], aggregator, [mine, theirs, theirs], chunks, chunk_values=16
        )
    assert got == [[store.load(m).opening(i) for i in chunks] for m in (mine, theirs, theirs)]
    # Only the other's update is asked for, once, in two parts of at most 64 chunks.
    assert asked == [([theirs], chunks[:64]), ([theirs], chunks[64:])]


def test_a_node_that_serves_another_chunk_or_model_is_caught(
    store: ModelStore, on_chain: OnChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = on_chain.trainers[0]
    values = np.arange(600, dtype=np.float32)  # no two chunks alike
    blob = blob_of([values], task_id=on_chain.task_id, trainer=trainer.address)
    other = blob_of([np.zeros(600, np.float32)], task_id=on_chain.task_id, trainer=trainer.address)
    update, decoy = id_hex(store.put(blob)), id_hex(store.put(other))
    real = ModelStore.opened
    with _aggregators_plane(store, on_chain) as plane:

        def fetch(*indexes: int):
            [of_update] = fetch_openings(
                base_url=plane.url,
                cert_sha256=plane.certificate.sha256,
                model_ids=[update],
                indexes=indexes,
                server_address=plane.node_address,
                account=on_chain.buyer,
                retries=0,
            )
            return of_update

        monkeypatch.setattr(ModelStore, "opened", lambda self, _id, ii: real(self, decoy, ii))
        with pytest.raises(ModelIdMismatchError, match=f"expected {update}"):
            fetch(0)
        # Another chunk of the right model: its leaf does not make the model's root.
        monkeypatch.setattr(
            ModelStore, "opened", lambda self, mid, ii: real(self, mid, [i + 1 for i in ii])
        )
        with pytest.raises(ModelIdMismatchError, match=f"expected {update}"):
            fetch(0)
        # A proof hash changed: the same.
        monkeypatch.setattr(
            ModelStore,
            "opened",
            lambda self, mid, ii: replace(
                real(self, mid, ii), proof=(bytes(32),) * len(real(self, mid, ii).proof)
            ),
        )
        with pytest.raises(ModelIdMismatchError, match=f"expected {update}"):
            fetch(0)
        # Fewer chunks than asked: the body is not the answer to the request.
        monkeypatch.setattr(ModelStore, "opened", lambda self, mid, ii: real(self, mid, ii[1:]))
        with pytest.raises(
            OpeningMalformedError, match="a proof of 2 hashes where the chunks take 1"
        ):
            fetch(0, 1)
        monkeypatch.setattr(
            ModelStore,
            "opened",
            lambda self, mid, ii: replace(o := real(self, mid, ii), chunks=o.chunks[:1]),
        )
        with pytest.raises(OpeningMalformedError, match="ends inside chunk 2"):
            fetch(0, 2)
        monkeypatch.setattr(ModelStore, "opened", real)
        pack = Openings.pack
        monkeypatch.setattr(Openings, "pack", lambda self: pack(self) + b"more")
        with pytest.raises(OpeningMalformedError, match="4 bytes after the last model's openings"):
            fetch(0)
        monkeypatch.setattr(Openings, "pack", pack)
        # A peer on an older FLEX answers in JSON: told apart, not parsed.
        opening = _Handler._get_opening
        monkeypatch.setattr(
            _Handler, "_get_opening", lambda self, *_: self._send_json(200, {"openings": []})
        )
        with pytest.raises(OpeningMalformedError, match="application/json where application/oc"):
            fetch(0)
        monkeypatch.setattr(_Handler, "_get_opening", opening)
        assert [o.index for o in fetch(1, 0)] == [1, 0]
        assert fetch(2, 0, 2) == [store.opening(update, i) for i in (2, 0, 2)]
        # An answer longer than openings of the chunk size the watcher expects is refused
        # before it is parsed: a lying node cannot make it read a megabyte an opening.
        with pytest.raises(OpeningMalformedError, match="more than"):
            fetch_openings(
                base_url=plane.url,
                cert_sha256=plane.certificate.sha256,
                model_ids=[update],
                indexes=[0, 1],
                server_address=plane.node_address,
                account=on_chain.buyer,
                retries=0,
                opening_bytes=64,
            )
