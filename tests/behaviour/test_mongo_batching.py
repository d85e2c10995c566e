"""The MongoDB store's batched round trips (group commit) on the real server: concurrent callers share round trips
and each still gets its own answer; races between callers of one batch still let exactly one win; an `update`
command never carries more than one statement; a lock is never given back before the update made under it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo import ReplaceOne, UpdateMany, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection

from reactor.adapters.mongo_store import Document, MongoStore
from reactor.domain.pacer import ItemState
from reactor.domain.status import NodeState, NodeStatus, pending
from reactor.ports import ReleaseNode

pytestmark = pytest.mark.mongo

NODES = 48
CONTENDERS = 20


@pytest.fixture(params=[True, False], ids=["batched", "unbatched"])
async def mongo(request: pytest.FixtureRequest, mongo_url: str, mongo_database: str) -> AsyncIterator[MongoStore]:
    async with MongoStore(mongo_url, database=mongo_database, batch=request.param) as opened:
        yield opened


async def test_concurrent_writes_and_reads_of_many_nodes_all_land(mongo: MongoStore) -> None:
    keys = [f"local/h{index}/api" for index in range(NODES)]
    created = await asyncio.gather(*(mongo.put_node(pending(key, "api"), expected_revision=0) for key in keys))
    assert all(status is not None for status in created)
    changed = await asyncio.gather(
        *(
            mongo.put_node(
                status.model_copy(update={"state": NodeState.DEPLOYING, "request_id": f"req-{status.node_key}"}),
                expected_revision=status.revision,
            )
            for status in created
            if status is not None
        )
    )
    read = await asyncio.gather(*(mongo.get_node(key) for key in keys))
    assert read == changed
    assert [status.request_id if status else None for status in read] == [f"req-{key}" for key in keys]
    assert await mongo.db["locks"].count_documents({}) == 0


async def test_calls_made_while_a_round_trip_runs_go_together_in_the_next(
    mongo_url: str, mongo_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first read and the first insert are held (latches) until every other call queued behind them: then the
    rest goes in one request each, and every caller gets its own answer."""
    held = {"read": asyncio.Event(), "insert": asyncio.Event()}
    first = {"read": asyncio.Event(), "insert": asyncio.Event()}
    find_by_ids, insert_batch = MongoStore._find_by_ids, MongoStore._insert_batch

    async def read(self: MongoStore, collection: str, ids: Sequence[str]) -> list[Document | None]:
        if collection == "processed" and not first["read"].is_set():
            first["read"].set()
            await held["read"].wait()
        return await find_by_ids(self, collection, ids)

    async def insert(self: MongoStore, collection: str, documents: Sequence[Document]) -> list[bool]:
        if collection == "processed" and not first["insert"].is_set():
            first["insert"].set()
            await held["insert"].wait()
        return await insert_batch(self, collection, documents)

    monkeypatch.setattr(MongoStore, "_find_by_ids", read)
    monkeypatch.setattr(MongoStore, "_insert_batch", insert)
    # Reads by `_id` batched as on a server that passes `$in` down to its storage (FerretDB does not: see below).
    async with MongoStore(mongo_url, database=mongo_database, compare_and_set="locked", batch_reads=True) as store:
        ids = [f"evt-{index}" for index in range(NODES)]
        calls: dict[str, Callable[[str], Coroutine[Any, Any, object]]] = {
            "insert": lambda event: store.put_processed(event, f"outcome-{event}"),
            "read": store.get_processed,
        }
        for kind, call in calls.items():
            # The first call goes alone and is held; the others come while it is in flight.
            tasks: list[asyncio.Task[object]] = [asyncio.create_task(call(ids[0]))]
            await first[kind].wait()
            tasks += [asyncio.create_task(call(event)) for event in ids[1:]]
            batcher = store._batchers[("find" if kind == "read" else "insert", "processed")]
            async with asyncio.timeout(10):
                while len(batcher._waiting) < NODES - 1:
                    await asyncio.sleep(0)
            held[kind].set()
            answers = await asyncio.gather(*tasks)
            assert (batcher.batches, batcher.items) == (2, NODES)
            if kind == "read":
                assert answers == [f"outcome-{event}" for event in ids]
        assert store.round_trips["insert into processed"] == 2
        assert store.round_trips["read processed"] == 2


async def test_ferretdb_filters_an_in_of_ids_itself_so_reads_by_id_go_alone(
    mongo_url: str, mongo_database: str
) -> None:
    """FerretDB's explain shows `{_id: {$in: ...}}` filtered outside its storage (every document decoded) and one
    `_id` passed down: the store then sends each read by `_id` alone, and each caller still gets its own answer."""
    async with MongoStore(mongo_url, database=mongo_database) as store:
        explained = await store.db.command({"explain": {"find": "processed", "filter": {"_id": {"$in": ["a", "b"]}}}})
        assert explained.get("filterPushdown") is False
        assert store.batch_reads is False
        ids = [f"evt-{index}" for index in range(NODES)]
        await asyncio.gather(*(store.put_processed(event, f"outcome-{event}") for event in ids))
        before = store.round_trips["read processed"]
        answers = await asyncio.gather(*(store.get_processed(event) for event in [*ids, "evt-unknown"]))
        assert answers == [*(f"outcome-{event}" for event in ids), None]
        assert store.round_trips["read processed"] - before == NODES + 1
        assert ("find", "processed") not in store._batchers
    async with MongoStore(mongo_url, database=mongo_database, batch=False) as unbatched:
        assert unbatched.batch_reads is False


async def test_concurrent_updates_of_one_node_in_one_batch_let_exactly_one_win(mongo: MongoStore) -> None:
    stored = await mongo.put_node(pending("local/h1/api", "api"), expected_revision=0)
    assert stored is not None

    def attempt(index: int) -> NodeStatus:
        return stored.model_copy(update={"state": NodeState.DEPLOYING, "request_id": f"req-{index}"})

    results = await asyncio.gather(
        *(mongo.put_node(attempt(index), expected_revision=stored.revision) for index in range(CONTENDERS))
    )
    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert await mongo.get_node("local/h1/api") == winners[0]


async def test_concurrent_leases_of_one_name_in_one_batch_let_exactly_one_win(mongo: MongoStore) -> None:
    now = datetime.now(UTC)
    taken = await asyncio.gather(
        *(mongo.take_lease("pacer", f"holder-{index}", now=now, ttl_s=60) for index in range(CONTENDERS))
    )
    assert taken.count(True) == 1
    [lease] = await mongo.db["leases"].find({}).to_list()
    assert lease["holder"] == f"holder-{taken.index(True)}"


async def test_concurrent_outcomes_of_one_request_keep_the_first(mongo: MongoStore) -> None:
    await asyncio.gather(*(mongo.put_processed("evt-1", f"outcome-{index}") for index in range(CONTENDERS)))
    stored = await mongo.db["processed"].find({"_id": "evt-1"}).to_list()
    assert len(stored) == 1
    assert await mongo.get_processed("evt-1") == stored[0]["outcome"]


async def test_concurrent_moves_of_many_release_nodes_and_slot_frees_all_apply(mongo: MongoStore) -> None:
    keys = [f"local/h{index}/api" for index in range(NODES)]
    await mongo.add_release_nodes(
        [ReleaseNode(release_id="rel-1", node_key=key, batch=0, position=index) for index, key in enumerate(keys)]
    )
    now = datetime.now(UTC)
    for key in keys:
        assert await mongo.take_slots("rel-1", key, [(f"node:{key}", 1)], now=now)
    moved = await asyncio.gather(
        *(
            mongo.move_release_node(
                "rel-1", key, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED, outcome=f"evt-{key}"
            )
            for key in keys
        )
    )
    assert moved == [True] * NODES
    await asyncio.gather(*(mongo.free_slots("rel-1", key) for key in keys[: NODES // 2]))
    assert sorted(slot.node_key for slot in await mongo.list_slots()) == sorted(keys[NODES // 2 :])
    nodes = await mongo.list_release_nodes("rel-1")
    assert {(node.state, node.outcome) for node in nodes} == {(ItemState.DISPATCHED, f"evt-{key}") for key in keys}


async def test_no_update_command_carries_more_than_one_statement(
    mongo_url: str, mongo_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FerretDB on PostgreSQL holds a pooled connection per statement until the command ends: 50 stall it for good."""
    sizes: list[int] = []
    bulk_write = AsyncCollection.bulk_write
    update_one = AsyncCollection.update_one

    async def counted_bulk(self: AsyncCollection[Document], requests: list[object], **options: object) -> object:
        updates = [request for request in requests if isinstance(request, UpdateOne | UpdateMany | ReplaceOne)]
        if updates:  # a batch of deletes (unlocks) is not what this is about
            sizes.append(len(updates))
        return await bulk_write(self, requests, **options)  # type: ignore[arg-type]

    async def counted_one(self: AsyncCollection[Document], *args: object, **options: object) -> object:
        sizes.append(1)
        return await update_one(self, *args, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(AsyncCollection, "bulk_write", counted_bulk)
    monkeypatch.setattr(AsyncCollection, "update_one", counted_one)
    async with MongoStore(mongo_url, database=mongo_database, compare_and_set="locked") as store:
        keys = [f"local/h{index}/api" for index in range(NODES)]
        created = await asyncio.gather(*(store.put_node(pending(key, "api"), expected_revision=0) for key in keys))
        changed = await asyncio.gather(
            *(
                store.put_node(status.model_copy(update={"state": NodeState.DEPLOYING}), expected_revision=1)
                for status in created
                if status is not None
            )
        )
    assert all(status is not None for status in changed)
    assert sizes
    assert max(sizes) == 1


async def test_a_writer_cancelled_while_its_update_runs_gives_the_lock_back_only_after_it(
    mongo_url: str, mongo_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update is held by a latch inside its batch while its caller is cancelled: the lock stays until the
    update is done (giving it back first would let a second writer in beside the first's update), then goes."""
    async with MongoStore(mongo_url, database=mongo_database, compare_and_set="locked") as store:
        stored = await store.put_node(pending("local/h1/api", "api"), expected_revision=0)
        assert stored is not None
        updating, go_on = asyncio.Event(), asyncio.Event()
        update = MongoStore._update_held

        async def held(
            self: MongoStore, collection: str, identity: Document, query: Document, change: Document
        ) -> bool:
            updating.set()
            await go_on.wait()
            return await update(self, collection, identity, query, change)

        monkeypatch.setattr(MongoStore, "_update_held", held)
        changed = stored.model_copy(update={"state": NodeState.DEPLOYING, "request_id": "req-cancelled"})
        writing = asyncio.create_task(store.put_node(changed, expected_revision=stored.revision))
        await updating.wait()
        writing.cancel()
        for _ in range(50):
            await asyncio.sleep(0)
        assert await store.db["locks"].count_documents({}) == 1, "the lock went back while its update still ran"
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await writing
        async with asyncio.timeout(10):
            while await store.db["locks"].count_documents({}):
                await asyncio.sleep(0.01)
        latest = await store.get_node("local/h1/api")
        assert latest is not None
        assert (latest.revision, latest.request_id) == (stored.revision + 1, "req-cancelled")


async def test_batched_deletes_go_as_one_command_of_statements_each_passed_down(
    mongo_url: str, mongo_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slot frees and unlocks of many callers go together, as one `delete` command with a statement per item: the
    server passes each one's filter down to its storage. One `$in` or `$or` for the batch it would not (FerretDB
    then decodes every held slot or lock for every batch); each item's documents go and no one else's. The first
    call of each kind is held (a latch) until every other one queued behind it."""
    statements: list[tuple[str, Document]] = []
    bulk_write = AsyncCollection.bulk_write
    free_batch, unlock_batch = MongoStore._free_slots_batch, MongoStore._unlock_batch
    held = {"free": asyncio.Event(), "unlock": asyncio.Event()}
    first = {"free": asyncio.Event(), "unlock": asyncio.Event()}

    async def recorded(self: AsyncCollection[Document], requests: list[Any], **options: object) -> object:
        statements.extend((self.name, request._filter) for request in requests)
        return await bulk_write(self, requests, **options)  # type: ignore[arg-type]

    async def free(self: MongoStore, nodes: Sequence[tuple[str, str]]) -> list[None]:
        if not first["free"].is_set():
            first["free"].set()
            await held["free"].wait()
        return await free_batch(self, nodes)

    async def unlock(self: MongoStore, lock_ids: Sequence[str]) -> list[None]:
        if not first["unlock"].is_set():
            first["unlock"].set()
            await held["unlock"].wait()
        return await unlock_batch(self, lock_ids)

    monkeypatch.setattr(AsyncCollection, "bulk_write", recorded)
    monkeypatch.setattr(MongoStore, "_free_slots_batch", free)
    monkeypatch.setattr(MongoStore, "_unlock_batch", unlock)

    async def together(
        store: MongoStore, kind: str, collection: str, calls: Sequence[Awaitable[object]]
    ) -> list[object]:
        """Run `calls`: the first alone, held until every other one waits behind it."""
        tasks = [asyncio.ensure_future(calls[0])]
        await first[kind].wait()
        tasks += [asyncio.ensure_future(call) for call in calls[1:]]
        async with asyncio.timeout(10):
            while len(store._batchers[(kind, collection)]._waiting) < len(calls) - 1:
                await asyncio.sleep(0)
        held[kind].set()
        return await asyncio.gather(*tasks)

    async with MongoStore(mongo_url, database=mongo_database, compare_and_set="locked") as store:
        keys = [f"local/h{index}/api" for index in range(NODES)]
        now = datetime.now(UTC)
        for key in keys:
            assert await store.take_slots("rel-1", key, [(f"node:{key}", 1), ("release:rel-1", NODES)], now=now)
        freed = keys[: NODES // 2]
        await together(store, "free", "slots", [store.free_slots("rel-1", key) for key in freed])
        assert store.round_trips["free slots"] == 2
        left = await store.list_slots()
        assert sorted(slot.node_key for slot in left) == sorted(2 * keys[NODES // 2 :])
        created = await asyncio.gather(*(store.put_node(pending(key, "api"), expected_revision=0) for key in keys))
        changes = [
            store.put_node(status.model_copy(update={"state": NodeState.DEPLOYING}), expected_revision=1)
            for status in created
            if status is not None
        ]
        changed = await together(store, "unlock", "locks", changes)
        assert all(status is not None for status in changed)
        assert await store.db["locks"].count_documents({}) == 0
        assert store.round_trips["unlock"] == 2
        # A server that filters even one node's slots itself (FerretDB on SQLite: only `_id` goes down) scans them
        # once for the batch, with one `$or`, rather than once per node.
        slot_statements = len(freed) - 1 if store.free_by_statement else 0
        assert sorted(collection for collection, _ in statements) == ["locks"] * (NODES - 1) + ["slots"] * (
            slot_statements
        )
        one_node = {"release_id": "rel-1", "node_key": keys[0]}
        explained = await store.db.command({"explain": {"find": "slots", "filter": one_node}})
        assert store.free_by_statement is (explained.get("filterPushdown", True) is True)
        for collection, query in statements:
            assert all(not name.startswith("$") and not isinstance(value, dict) for name, value in query.items())
            explained = await store.db.command({"explain": {"find": collection, "filter": query}})
            # FerretDB reports whether its storage filtered; a server that does not report it has no such gap.
            assert explained.get("filterPushdown", True) is True, (collection, query)
