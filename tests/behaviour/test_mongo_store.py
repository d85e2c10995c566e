"""What only the MongoDB store has: indexes, the compare-and-set probe, atomic compare-and-set on the server, locks,
errors, durability.

The Store behaviour shared with every backend is in test_store.py (it runs on MongoDB through `store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from reactor.adapters.mongo_probe import PROBE_COLLECTION
from reactor.adapters.mongo_store import COLLECTIONS, CompareAndSetSetting, MongoStore
from reactor.domain.pacer import ItemState
from reactor.domain.status import NodeState, NodeStatus, pending
from reactor.errors import BackendUnavailable
from reactor.events import NodeTarget, ReleasePlan, Strategy
from reactor.ports import ReleaseNode, ReleaseRecord
from tests.infra import testenv
from tests.leaks import collecting_the_sockets_pymongo_leaks

pytestmark = pytest.mark.mongo

NODE = "local/h1/api"
T0 = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
CONTENDERS = 20


@pytest.fixture
async def mongo(mongo_url: str, mongo_database: str) -> AsyncIterator[MongoStore]:
    """A MongoStore on a fresh database."""
    async with MongoStore(mongo_url, database=mongo_database) as opened:
        yield opened


def release(release_id: str = "rel-1", *, created_at: datetime = T0) -> ReleaseRecord:
    nodes = [NodeTarget(node_key=f"local/h{index}/api") for index in range(2)]
    return ReleaseRecord(
        release_id=release_id,
        plan=ReleasePlan(
            release_id=release_id,
            service="api",
            version="2.0.0",
            image="registry.example.com/shop/api:2.0.0",
            nodes=nodes,
            strategy=Strategy(batches=[1, "100%"]),
        ).spec(),
        batch_sizes=[1, 1],
        request_id=f"req-{release_id}",
        created_at=created_at,
        updated_at=created_at,
    )


def attempt(stored: NodeStatus, index: int) -> NodeStatus:
    """A distinct change per contender, so the stored document names the winner."""
    return stored.model_copy(update={"state": NodeState.DEPLOYING, "request_id": f"req-{index}"})


async def test_open_creates_the_indexes(mongo_url: str, mongo: MongoStore) -> None:
    async with AsyncMongoClient[dict[str, object]](mongo_url) as client:
        database = client[mongo.database]

        async def names(collection: str) -> set[str]:
            return {str(index["name"]) async for index in await database[collection].list_indexes()}

        assert await names("nodes") >= {"_id_", "release_id_1", "service_1"}
        assert await names("releases") >= {"_id_", "created_at_-1_created_at_us_-1"}
        assert await names("release_nodes") >= {
            "release_id_1_node_key_1",
            "release_id_1_batch_1_state_1_position_1",
        }
        assert await names("locks") >= {"key_1"}
        unique = {
            str(index["name"]) async for index in await database["release_nodes"].list_indexes() if index.get("unique")
        }
        assert "release_id_1_node_key_1" in unique


async def test_open_creates_every_collection_the_store_writes(mongo: MongoStore) -> None:
    """None is left to be created by its first insert under load (FerretDB on PostgreSQL could hang on it)."""
    assert set(COLLECTIONS) <= set(await mongo.db.list_collection_names())


async def test_stores_opening_one_new_database_at_once_all_open(mongo_url: str, mongo_database: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        stores = await asyncio.gather(
            *(
                stack.enter_async_context(MongoStore(mongo_url, database=mongo_database, compare_and_set="locked"))
                for _ in range(4)
            )
        )
        assert set(COLLECTIONS) <= set(await stores[0].db.list_collection_names())


async def test_outcomes_recorded_before_they_had_a_time_are_kept_by_pruning(mongo: MongoStore) -> None:
    """An outcome stored by an earlier version has no `at`: how old it is cannot be told, so pruning keeps it."""
    await mongo.db["processed"].insert_one({"_id": "req-old", "outcome": "old"})
    await mongo.put_processed("req-timed", "timed", at=datetime(2025, 6, 1, tzinfo=UTC))
    assert await mongo.prune_processed(datetime.now(UTC) + timedelta(days=1)) == 1
    assert await mongo.get_processed("req-old") == "old"
    assert await mongo.get_processed("req-timed") is None


@pytest.mark.timeout(600)
async def test_more_records_than_the_server_deletes_at_once_are_pruned_in_halves_of_their_window(
    mongo: MongoStore,
) -> None:
    """FerretDB refuses one delete of over 65,535 documents on PostgreSQL (a statement parameter each; found by
    bench/processed.py with 100,000): the store halves the window, from the oldest record on, until each half goes.
    70,000 records a millisecond apart, and one just after the cutoff that stays."""
    first = datetime(2025, 6, 1, tzinfo=UTC)
    count = 70_000
    for start in range(0, count, 5000):
        await mongo.db["processed"].insert_many(
            [
                {"_id": f"req-{index}", "outcome": "old", "at": first + timedelta(milliseconds=index)}
                for index in range(start, start + 5000)
            ]
        )
    cutoff = first + timedelta(milliseconds=count)
    await mongo.put_processed("req-kept", "kept", at=cutoff)
    assert await mongo.prune_processed(cutoff) == count
    assert await mongo.db["processed"].count_documents({}) == 1
    assert await mongo.get_processed("req-kept") == "kept"


async def test_opening_twice_keeps_the_indexes_and_the_data(mongo_url: str, mongo: MongoStore) -> None:
    assert await mongo.put_node(pending(NODE, "api"), expected_revision=0)
    async with MongoStore(mongo_url, database=mongo.database) as again:
        assert (await again.get_node(NODE)) == await mongo.get_node(NODE)


async def server_is_ferretdb(store: MongoStore) -> bool:
    """FerretDB adds `ferretdbVersion` to buildInfo (used by tests only: the store never asks the server's name)."""
    return "ferretdbVersion" in await store.db.command("buildInfo")


async def test_the_probe_finds_ferretdb_not_atomic_and_the_store_takes_the_lock_path(mongo: MongoStore) -> None:
    """FerretDB 1.x, on SQLite and on PostgreSQL alike, lets two racing conditional updates both match; MongoDB
    does not. The probe must tell them apart by what they do."""
    expected = "locked" if await server_is_ferretdb(mongo) else "atomic"
    assert mongo.compare_and_set == expected


async def test_the_probe_leaves_no_document_behind(mongo: MongoStore) -> None:
    assert await mongo.db[PROBE_COLLECTION].count_documents({}) == 0


async def test_forcing_the_lock_path_skips_the_probe(mongo_url: str, mongo_database: str) -> None:
    async with MongoStore(mongo_url, database=mongo_database, compare_and_set="locked") as store:
        assert store.compare_and_set == "locked"
        assert PROBE_COLLECTION not in await store.db.list_collection_names()


@pytest.mark.parametrize("setting", ["probe", "locked"])
async def test_concurrent_updates_with_the_same_revision_let_exactly_one_win(
    mongo_url: str, mongo_database: str, setting: CompareAndSetSetting
) -> None:
    """N writers of one node with the same expected revision: exactly one wins, in the mode the probe chose (the
    lock path on FerretDB, whose findAndModify is not atomic on its own) and with the lock path forced."""
    async with MongoStore(mongo_url, database=mongo_database, compare_and_set=setting) as mongo:
        stored = await mongo.put_node(pending(NODE, "api"), expected_revision=0)
        assert stored is not None
        results = await asyncio.gather(
            *(mongo.put_node(attempt(stored, index), expected_revision=stored.revision) for index in range(CONTENDERS))
        )
        winners = [result for result in results if result is not None]
        assert len(winners) == 1, f"{len(winners)} winners with compare_and_set={mongo.compare_and_set}"
        assert winners[0].revision == stored.revision + 1
        assert await mongo.get_node(NODE) == winners[0]


async def test_concurrent_inserts_of_one_node_let_exactly_one_win(mongo: MongoStore) -> None:
    results = await asyncio.gather(
        *(mongo.put_node(attempt(pending(NODE, "api"), index), expected_revision=0) for index in range(CONTENDERS))
    )
    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert await mongo.get_node(NODE) == winners[0]


async def test_concurrent_release_updates_let_exactly_one_win(mongo: MongoStore) -> None:
    stored = await mongo.put_release(release(), expected_revision=0)
    assert stored is not None
    results = await asyncio.gather(
        *(
            mongo.put_release(stored.model_copy(update={"reason": f"writer {index}"}), expected_revision=1)
            for index in range(CONTENDERS)
        )
    )
    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert await mongo.get_release("rel-1") == winners[0]


async def test_concurrent_moves_of_one_release_node_let_exactly_one_win(mongo: MongoStore) -> None:
    await mongo.add_release_nodes([ReleaseNode(release_id="rel-1", node_key=NODE, batch=0, position=0)])
    moved = await asyncio.gather(
        *(
            mongo.move_release_node(
                "rel-1", NODE, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED, outcome=f"evt-{index}"
            )
            for index in range(CONTENDERS)
        )
    )
    assert moved.count(True) == 1
    [node] = await mongo.list_release_nodes("rel-1")
    assert (node.state, node.outcome) == (ItemState.DISPATCHED, f"evt-{moved.index(True)}")


async def test_a_window_takes_its_slots_without_reading_the_scope_until_the_next_one_is_not_free(
    mongo: MongoStore,
) -> None:
    """Nodes taking a scope's slots one after another each insert the next slot, reading no held slot; once the
    next is not free (the limit reached, or held by another process) the held slots are read to find a free one."""
    window = 20
    for index in range(window):
        assert await mongo.take_slots("rel-1", f"local/h{index}/api", [("release/rel-1", window)], now=T0)
    assert mongo.round_trips["read slots"] == 0
    assert sorted(slot.index for slot in await mongo.list_slots()) == list(range(window))
    await mongo.free_slots("rel-1", "local/h7/api")
    reads = mongo.round_trips["read slots"]
    assert await mongo.take_slots("rel-1", "local/h99/api", [("release/rel-1", window)], now=T0)
    assert not await mongo.take_slots("rel-1", "local/h98/api", [("release/rel-1", window)], now=T0)
    # Two reads of the scope (the free slot found, the full scope seen) and the insert's check of the taken slot 8.
    assert mongo.round_trips["read slots"] - reads == 3
    assert {slot.index: slot.node_key for slot in await mongo.list_slots()}[7] == "local/h99/api"
    # Another process takes the index this one would try next: this one then reads, and takes a free one.
    await mongo.free_slots("rel-1", "local/h3/api")
    await mongo.free_slots("rel-1", "local/h9/api")
    mongo._next_slot["release/rel-1"] = 3
    assert await mongo.take_slots("rel-2", "local/h50/api", [("release/rel-1", window)], now=T0)
    mongo._next_slot["release/rel-1"] = 3
    assert await mongo.take_slots("rel-1", "local/h97/api", [("release/rel-1", window)], now=T0)
    taken = {slot.index: slot.node_key for slot in await mongo.list_slots()}
    assert (taken[3], taken[9], len(taken)) == ("local/h50/api", "local/h97/api", window)


@pytest.fixture
async def locked(mongo_url: str, mongo_database: str) -> AsyncIterator[MongoStore]:
    """A MongoStore on a fresh database that takes the lock path whatever the server."""
    async with MongoStore(mongo_url, database=mongo_database, compare_and_set="locked") as opened:
        yield opened


async def test_a_lock_left_by_a_dead_writer_is_taken_over_once_expired(locked: MongoStore) -> None:
    mongo = locked
    stored = await mongo.put_node(pending(NODE, "api"), expected_revision=0)
    assert stored is not None
    expired = datetime.now(UTC) - timedelta(seconds=1)
    await mongo.db["locks"].insert_one({"_id": "dead-writer", "key": f"nodes/{NODE}", "expires_at": expired})
    assert await mongo.put_node(attempt(stored, 1), expected_revision=1) is not None
    assert await mongo.db["locks"].count_documents({}) == 0


async def test_a_writer_cancelled_while_it_gives_its_lock_back_still_gives_it_back(
    locked: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task is cancelled exactly while the lock is being released (held there by a latch): the release goes
    on, so the next writer of the node does not wait out the lease."""
    stored = await locked.put_node(pending(NODE, "api"), expected_revision=0)
    assert stored is not None
    unlocking, go_on = asyncio.Event(), asyncio.Event()
    unlock = MongoStore._unlock

    async def held(store: MongoStore, key: str, lock_id: str) -> None:
        unlocking.set()
        await go_on.wait()
        await unlock(store, key, lock_id)

    monkeypatch.setattr(MongoStore, "_unlock", held)
    writing = asyncio.create_task(locked.put_node(attempt(stored, 1), expected_revision=1))
    await unlocking.wait()
    assert await locked.db["locks"].count_documents({}) == 1
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    go_on.set()
    async with asyncio.timeout(10):
        while await locked.db["locks"].count_documents({}):
            await asyncio.sleep(0.01)
    monkeypatch.setattr(MongoStore, "_unlock", unlock)
    latest = await locked.get_node(NODE)
    assert latest is not None
    assert await locked.put_node(attempt(latest, latest.revision), expected_revision=latest.revision) is not None


async def test_a_lock_held_by_a_live_writer_makes_the_write_unavailable_not_lost(
    mongo_url: str, mongo_database: str
) -> None:
    async with MongoStore(mongo_url, database=mongo_database, timeout_s=0.5, compare_and_set="locked") as store:
        stored = await store.put_node(pending(NODE, "api"), expected_revision=0)
        assert stored is not None
        alive = datetime.now(UTC) + timedelta(minutes=5)
        await store.db["locks"].insert_one({"_id": "live-writer", "key": f"nodes/{NODE}", "expires_at": alive})
        with pytest.raises(BackendUnavailable, match="held by another writer"):
            await store.put_node(attempt(stored, 1), expected_revision=1)
        assert await store.get_node(NODE) == stored


async def test_unreachable_server_raises_backend_unavailable_within_the_timeout() -> None:
    url = f"mongodb://127.0.0.1:{testenv.free_port()}/?directConnection=true"
    started = time.monotonic()
    async with collecting_the_sockets_pymongo_leaks():
        with pytest.raises(BackendUnavailable) as raised:
            async with MongoStore(url, database="unreachable", timeout_s=1.0):
                pass
        elapsed, retriable = time.monotonic() - started, raised.value.retriable
        del raised  # its traceback holds pymongo's closed topology, and with it the socket a monitor leaked
    assert elapsed < 3.0
    assert retriable


async def test_a_socket_leaked_in_the_collecting_block_is_freed_before_it_ends() -> None:
    """What the block silences does not outlive it: a socket left unclosed in a reference cycle is collected by
    the time the block ends, so no later test meets its warning."""
    async with collecting_the_sockets_pymongo_leaks():
        leaked = socket.socket()
        cycle: list[object] = [leaked]
        cycle.append(cycle)
        freed = weakref.ref(leaked)
        del leaked, cycle
    assert freed() is None


async def test_a_server_that_goes_away_makes_calls_unavailable(tmp_path: Path) -> None:
    server = testenv.start_ferretdb(tmp_path / "ferretdb", backend=testenv.mongo_backend())
    try:
        async with (
            collecting_the_sockets_pymongo_leaks(),
            MongoStore(server.env["REACTOR_MONGO_URL"], timeout_s=1.0) as store,
        ):
            assert await store.get_node(NODE) is None
            server.stop(grace=0)  # killed, as a crashed server would be
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await store.get_node(NODE)
            with pytest.raises(BackendUnavailable):
                await store.ping()
            assert time.monotonic() - started < 5.0
    finally:
        server.stop()


async def test_everything_survives_closing_and_reopening(mongo_url: str, mongo_database: str) -> None:
    async with MongoStore(mongo_url, database=mongo_database) as store:
        node = await store.put_node(
            pending(NODE, "api").model_copy(update={"release_id": "rel-1"}), expected_revision=0
        )
        record = await store.put_release(release(), expected_revision=0)
        older = await store.put_release(
            release("rel-0", created_at=T0 - timedelta(microseconds=1)), expected_revision=0
        )
        assert record is not None
        await store.add_release_nodes(
            [
                ReleaseNode(release_id="rel-1", node_key=f"local/h{i}/api", batch=i, position=i)
                for i in range(len(record.batch_sizes))
            ]
        )
        assert await store.move_release_node(
            "rel-1", "local/h0/api", from_states=[ItemState.QUEUED], to_state=ItemState.SUCCEEDED, outcome="evt-1"
        )
        await store.put_processed("req-1", "outcome-1")
        nodes_before = await store.list_release_nodes("rel-1")

    async with MongoStore(mongo_url, database=mongo_database) as reopened:
        assert await reopened.get_node(NODE) == node
        assert await reopened.list_nodes(release_id="rel-1") == [node]
        assert await reopened.get_release("rel-1") == record
        # The microsecond below BSON's millisecond still orders them.
        assert await reopened.list_releases() == [record, older]
        assert await reopened.get_processed("req-1") == "outcome-1"
        assert await reopened.list_release_nodes("rel-1") == nodes_before
        assert (await reopened.count_release_nodes("rel-1"))[ItemState.SUCCEEDED] == 1
        assert node is not None
        assert await reopened.put_node(node, expected_revision=0) is None
        updated = await reopened.put_node(node, expected_revision=1)
        assert updated is not None
        assert updated.revision == 2


async def test_a_cancelled_store_call_always_stops_the_task(mongo: MongoStore) -> None:
    """Cancelling a task inside any store call ends it, at every instant of the call: PyMongo's async client
    sometimes eats the cancellation, and a worker shutting down must not run on."""

    async def busy() -> None:
        index = 0
        while True:
            await mongo.take_lease("timers", "me", now=datetime.now(UTC), ttl_s=5)
            await mongo.list_releases()
            await mongo.get_processed(f"event-{index}")
            index += 1

    async def cancelled_at_every_instant() -> int:
        """How many of 120 tasks, cancelled a little later each time, went on running."""
        stuck = 0
        for attempt in range(120):
            task = asyncio.create_task(busy())
            await asyncio.sleep((attempt % 30) / 1000)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            if not done or not task.cancelled():
                stuck += 1
                task.cancel()
                await asyncio.wait([task], timeout=2)
        return stuck

    # A task cancelled while pymongo opens a connection leaks the socket; the tasks are gone once this returns.
    async with collecting_the_sockets_pymongo_leaks():
        stuck = await cancelled_at_every_instant()
    assert stuck == 0, f"{stuck} of 120 cancelled tasks went on running"


async def test_the_lock_free_path_writes_and_refuses_as_the_lock_path_does(mongo: MongoStore) -> None:
    """The one-update compare-and-set, switched on by hand (one writer, so no race for the server to lose): a stale
    revision or state is refused, a current one written, and no lock document is ever made."""
    mongo.compare_and_set = "atomic"
    stored = await mongo.put_node(pending(NODE, "api"), expected_revision=0)
    assert stored is not None
    written = await mongo.put_node(attempt(stored, 1), expected_revision=1)
    assert written is not None
    assert await mongo.put_node(attempt(stored, 2), expected_revision=1) is None
    assert await mongo.get_node(NODE) == written
    await mongo.add_release_nodes([ReleaseNode(release_id="rel-1", node_key=NODE, batch=0, position=0)])
    assert await mongo.move_release_node("rel-1", NODE, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED)
    assert not await mongo.move_release_node(
        "rel-1", NODE, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
    )
    assert await mongo.take_lease("timers", "me", now=T0, ttl_s=60)
    assert not await mongo.take_lease("timers", "you", now=T0, ttl_s=60)
    assert await mongo.take_lease("timers", "me", now=T0, ttl_s=60)
    assert await mongo.db["locks"].count_documents({}) == 0


async def test_a_large_release_s_rows_go_in_chunks_each_a_request_of_its_own(mongo: MongoStore) -> None:
    """The rows of 2,500 nodes go in three inserts (1,000 a request), not one: each request's time stays bounded
    however large the release. Added again (a redelivered request), every row is kept as it is."""
    rows = [
        ReleaseNode(
            release_id="rel-big", node_key=f"local/h{index}/api", batch=index // 500, position=index,
            target=NodeTarget(node_key=f"local/h{index}/api"),
        )
        for index in range(2_500)
    ]  # fmt: skip
    before = mongo.round_trips["insert into release_nodes"]
    await mongo.add_release_nodes(rows)
    assert mongo.round_trips["insert into release_nodes"] - before == 3
    assert await mongo.move_release_node(
        "rel-big", "local/h2499/api", from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
    )
    await mongo.add_release_nodes(rows)
    counts = await mongo.count_release_nodes("rel-big")
    assert (counts[ItemState.QUEUED], counts[ItemState.DISPATCHED]) == (2_499, 1)
    assert [row.position for row in await mongo.list_release_nodes("rel-big", batch=4)] == list(range(2_000, 2_500))


async def test_conditional_writes_send_only_filters_the_server_passes_down(
    mongo_url: str, mongo_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the lock path every read and update of a node's status or a release's node row filters on what the
    server hands its storage (FerretDB on SQLite: `_id` alone; a filter with another field it tests itself on every
    document of the collection, so a release's time grew with the square of its size). Stale writes are still
    refused, and each row of a release has an `_id` of its own."""
    sent: list[tuple[str, dict[str, object]]] = []
    find, update_one = AsyncCollection.find, AsyncCollection.update_one

    def recorded_find(self: AsyncCollection[dict[str, object]], *args: object, **options: object) -> object:
        query = args[0] if args else options.get("filter")
        sent.append((self.name, dict(query) if isinstance(query, Mapping) else {}))
        return find(self, *args, **options)

    async def recorded_update(
        self: AsyncCollection[dict[str, object]], query: dict[str, object], *args: object, **options: object
    ) -> object:
        sent.append((self.name, dict(query)))
        return await update_one(self, query, *args, **options)  # type: ignore[arg-type]

    async with MongoStore(mongo_url, database=mongo_database, compare_and_set="locked") as store:
        paired = await store.db.command({"explain": {"find": "nodes", "filter": {"_id": NODE, "revision": 1}}})
        assert store.check_in_store is (paired.get("filterPushdown") is False)
        await store.add_release_nodes(
            [
                ReleaseNode(release_id="rel-1", node_key=f"local/h{index}/api", batch=0, position=index)
                for index in (1, 2)
            ]
        )
        stored = await store.put_node(pending(NODE, "api"), expected_revision=0)
        assert stored is not None
        monkeypatch.setattr(AsyncCollection, "find", recorded_find)
        monkeypatch.setattr(AsyncCollection, "update_one", recorded_update)
        written = await store.put_node(attempt(stored, 1), expected_revision=1)
        assert written is not None
        assert await store.put_node(attempt(stored, 2), expected_revision=1) is None
        assert await store.move_release_node(
            "rel-1", NODE, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
        )
        assert not await store.move_release_node(
            "rel-1", NODE, from_states=[ItemState.QUEUED], to_state=ItemState.FAILED
        )
        assert await store.move_release_node(
            "rel-1", NODE, from_states=[ItemState.QUEUED, ItemState.DISPATCHED], to_state=ItemState.SUCCEEDED
        )
        node = await store.get_release_node("rel-1", NODE)
        monkeypatch.undo()
        # A node not in the release: looked for among rows stored by their fields too (see the next test).
        assert not await store.move_release_node(
            "rel-1", "local/h9/api", from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
        )
        assert node is not None
        assert node.state == ItemState.SUCCEEDED
        assert await store.get_node(NODE) == written
        assert sorted([row["_id"] async for row in store.db["release_nodes"].find({})]) == [
            "rel-1/local/h1/api",
            "rel-1/local/h2/api",
        ]
        assert await store.db["locks"].count_documents({}) == 0
        written_to = {collection for collection, _ in sent}
        assert {"nodes", "release_nodes"} <= written_to
        for collection, query in sent:
            if collection == "locks":
                continue  # a lock's holder, read only while another writer holds it
            explained = await store.db.command({"explain": {"find": collection, "filter": query}})
            # FerretDB reports whether its storage filtered; a server that does not report it has no such gap.
            assert explained.get("filterPushdown", True) is True, (collection, query)


async def test_release_rows_stored_without_an_id_of_their_own_still_move(mongo: MongoStore) -> None:
    """Rows stored before a release's rows had an `_id` of their own (an ObjectId): found by their fields."""
    await mongo.db["release_nodes"].insert_many(
        [ReleaseNode(release_id="rel-old", node_key=NODE, batch=0, position=0).model_dump(mode="json")]
    )
    assert await mongo.get_release_node("rel-old", NODE) is not None
    assert await mongo.move_release_node("rel-old", NODE, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED)
    assert not await mongo.move_release_node(
        "rel-old", NODE, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
    )
    moved = await mongo.get_release_node("rel-old", NODE)
    assert moved is not None
    assert moved.state == ItemState.DISPATCHED
    assert [row.state for row in await mongo.list_release_nodes("rel-old")] == [ItemState.DISPATCHED]
