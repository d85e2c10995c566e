"""Every hot-path query of the MongoDB store is served by an index, where the server's plans can show it.

The test runs `explain` on each query the store sends on a hot path, as the store sends it. Servers answer in
three shapes, each read by `scans` below:
- MongoDB: `queryPlanner.winningPlan`, a tree of stages; a `COLLSCAN` stage is a collection scan.
- FerretDB 1.x on PostgreSQL: `queryPlanner.Plan`, PostgreSQL's EXPLAIN (FORMAT JSON) of the SQL FerretDB runs;
  a "Seq Scan" node is a scan. FerretDB adds `filterPushdown`: whether the filter reached PostgreSQL at all.
- FerretDB 1.x on SQLite: `queryPlanner.Plan`, SQLite's EXPLAIN QUERY PLAN rows; `SCAN <table>` is a scan.
- An empty `queryPlanner` (FerretDB, for a collection that does not exist) is no plan at all.

What FerretDB 1.24 does, found by this test: no read is ever served by an index, on either storage, whatever
indexes exist. SQLite: only a filter of exactly `{_id: value}` reaches SQLite, compared as
`_ferretdb_sjson->'$._id'` while the `_id` index is on `_ferretdb_sjson->"_id"`, so even that is a SCAN; every
other filter is applied in FerretDB to every document. PostgreSQL: scalar equalities reach PostgreSQL as
`_jsonb->'field' @> value`, an operator no btree expression index (FerretDB's own) serves, so every query is a
Seq Scan. For update, delete and findAndModify FerretDB's explain ignores the filter (a bare scan): the test explains
each conditional write's filter as the find it starts with.

The store makes GIN indexes of those expressions in FerretDB's PostgreSQL when told it
(reactor/adapters/ferretdb_postgresql.py; the fixtures tell it on PostgreSQL): then every hot-path query there is
served by an index, and the test requires it. On SQLite it makes, when told FerretDB's directory, an index on the very
expression FerretDB compares `_id` with (reactor/adapters/ferretdb_sqlite.py; the fixtures tell it on SQLite): then
every hot-path query of exactly `{_id: value}` is a SEARCH, and the test requires it; every other filter is still
applied by FerretDB to every row. A table of a page or two is scanned by any planner, so every collection also holds
rows no query matches.

So the test first asks the server whether it serves from an index the one query every server should: `_id`
equality. Where it does (MongoDB; FerretDB on PostgreSQL with the store's indexes), any hot-path query that scans
fails the test (on SQLite, any that FerretDB passes down). Where it does not, the scans
are the server's own and no index can help; the test then asserts what it can: every hot-path filter leads with
a field some index of the store's (as the server lists them) starts with, so that MongoDB serves it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reactor.adapters.mongo_store import COLLECTIONS, MongoStore
from reactor.domain.pacer import ItemState
from reactor.domain.status import pending
from reactor.ports import ReleaseNode
from tests.behaviour.test_mongo_store import release

Document = dict[str, Any]
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
NODES = 60


@dataclass(frozen=True)
class Query:
    """One query the store sends on a hot path, as an explainable command."""

    what: str
    collection: str
    filter: Document
    sort: Document | None = None
    limit: int = 0
    group: bool = False  # an aggregation: $match on `filter`, then $group

    @property
    def by_id_alone(self) -> bool:
        """A find of exactly `{_id: a string}`: the one filter FerretDB on SQLite passes to SQLite."""
        return not self.group and list(self.filter) == ["_id"] and isinstance(self.filter["_id"], str)

    def command(self) -> Document:
        if self.group:
            pipeline = [{"$match": self.filter}, {"$group": {"_id": "$state", "count": {"$sum": 1}}}]
            return {"aggregate": self.collection, "pipeline": pipeline, "cursor": {}}
        command: Document = {"find": self.collection, "filter": self.filter}
        if self.sort:
            command["sort"] = self.sort
        if self.limit:
            command["limit"] = self.limit
        return command


NODE = "local/h1/api"
ROW = f"rel-1/{NODE}"  # its row in release rel-1
QUERIES = [
    Query("get_node", "nodes", {"_id": NODE}, limit=1),
    Query("put_node: the conditional write", "nodes", {"_id": NODE, "revision": 1}),
    Query("a write whose reply was lost: is it ours? (read by _id, its token compared)", "nodes", {"_id": NODE}),
    Query("list_nodes by release", "nodes", {"release_id": "rel-1"}, sort={"_id": 1}),
    Query("list_nodes by service", "nodes", {"service": "api"}, sort={"_id": 1}),
    Query("list_nodes by release and service", "nodes", {"release_id": "rel-1", "service": "api"}, sort={"_id": 1}),
    Query("get_processed", "processed", {"_id": "req-1"}, limit=1),
    Query("get_release", "releases", {"_id": "rel-1"}, limit=1),
    Query("put_release: the conditional write", "releases", {"_id": "rel-1", "revision": 1}),
    Query("list_release_nodes", "release_nodes", {"release_id": "rel-1"}, sort={"position": 1}),
    Query("list_release_nodes by batch", "release_nodes", {"release_id": "rel-1", "batch": 1}, sort={"position": 1}),
    Query(
        "list_release_nodes by batch and state",
        "release_nodes",
        {"release_id": "rel-1", "batch": 1, "state": "queued"},
        sort={"position": 1},
        limit=10,
    ),
    Query(
        "list_release_nodes by state", "release_nodes", {"release_id": "rel-1", "state": "queued"}, sort={"position": 1}
    ),
    Query(
        "list_release_nodes by batch and state, newest first (a rollback's next nodes)",
        "release_nodes",
        {"release_id": "rel-1", "batch": 1, "state": "succeeded"},
        sort={"position": -1},
        limit=10,
    ),
    Query("get_release_node", "release_nodes", {"_id": ROW}, limit=1),
    Query(
        "get_release_node: a row stored before rows had an _id of their own",
        "release_nodes",
        {"release_id": "rel-1", "node_key": NODE},
        limit=1,
    ),
    Query(
        "move_release_node: the conditional write",
        "release_nodes",
        {"_id": ROW, "state": {"$in": ["queued", "dispatched"]}},
    ),
    Query(
        "move_release_node: a row stored before rows had an _id of their own",
        "release_nodes",
        {"release_id": "rel-1", "node_key": NODE, "state": {"$in": ["queued", "dispatched"]}},
    ),
    Query("count_release_nodes", "release_nodes", {"release_id": "rel-1"}, group=True),
    Query("count_release_nodes by batch", "release_nodes", {"release_id": "rel-1", "batch": 1}, group=True),
    Query("take_slots: the slots of a scope", "slots", {"scope": "release:rel-1"}, sort={"index": 1}),
    Query("take_slots: giving back (a node's one slot, its next scope full)", "slots", {"_id": "release:rel-1#0"}),
    Query("free_slots", "slots", {"release_id": "rel-1", "node_key": NODE}),
    Query("take_lease: the conditional write", "leases", {"_id": "timers", "$or": [{"holder": "me"}]}),
    Query("release_lease", "leases", {"_id": "timers", "holder": "me"}),
    Query("a lock's holder", "locks", {"key": f"nodes/{NODE}"}, limit=1),
    Query("unlock", "locks", {"_id": "lock-1"}),
]


def _walk(value: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        yield value
        for inner in value.values():
            yield from _walk(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _walk(inner)


def plan_shape(explained: Mapping[str, Any]) -> str:
    """`mongodb`, `postgresql`, `sqlite` or `none`: which of the shapes in the module docstring the answer has."""
    planner = explained.get("queryPlanner") or {}
    if "winningPlan" in planner:
        return "mongodb"
    plan = planner.get("Plan")
    if isinstance(plan, Mapping):
        return "postgresql"
    if isinstance(plan, list):
        return "sqlite"
    return "none"


def scans(explained: Mapping[str, Any]) -> list[str]:
    """The collection scans in an `explain` answer, described; empty if every access uses an index."""
    planner = explained.get("queryPlanner") or {}
    match plan_shape(explained):
        case "mongodb":
            return [str(stage["stage"]) for stage in _walk(planner["winningPlan"]) if stage.get("stage") == "COLLSCAN"]
        case "postgresql":
            return [
                f"Seq Scan on {node.get('Relation Name')}"
                for node in _walk(planner["Plan"])
                if node.get("Node Type") == "Seq Scan"
            ]
        case "sqlite":
            return [row for row in planner["Plan"] if "detail=SCAN " in row and " USING " not in row]
        case _:
            return []


def led_by_an_index(query: Query, indexes: list[list[str]]) -> bool:
    """Whether the filter pins the first field of some index (or `_id`), so MongoDB serves it from that index."""
    fields = {name for name in query.filter if not name.startswith("$")}
    return "_id" in fields or any(keys[0] in fields for keys in indexes)


@pytest.fixture
async def populated(
    mongo_url: str, mongo_database: str, ferretdb_postgresql_url: str | None, ferretdb_sqlite_dir: Path | None
) -> AsyncIterator[MongoStore]:
    """A store with some of everything each query reads, so every collection exists and has rows to scan."""
    async with MongoStore(
        mongo_url, database=mongo_database, postgresql_url=ferretdb_postgresql_url, sqlite_dir=ferretdb_sqlite_dir
    ) as store:
        for index in range(NODES):
            status = pending(f"local/h{index}/api", "api").model_copy(update={"release_id": "rel-1"})
            assert await store.put_node(status, expected_revision=0)
            await store.put_processed(f"req-{index}", f"outcome-{index}")
        assert await store.put_release(release(), expected_revision=0)
        await store.add_release_nodes(
            [
                ReleaseNode(release_id="rel-1", node_key=f"local/h{index}/api", batch=index % 3, position=index)
                for index in range(NODES)
            ]
        )
        assert await store.move_release_node(
            "rel-1", "local/h0/api", from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
        )
        assert await store.take_slots("rel-1", "local/h1/api", [("release:rel-1", 5)], now=NOW)
        assert await store.take_lease("timers", "me", now=NOW, ttl_s=60)
        await store.db["locks"].insert_one({"_id": "old", "key": "nodes/other", "expires_at": NOW})
        # Rows of other releases, services and scopes in every collection: a cost-based planner (PostgreSQL's) scans
        # a table of a page or two rather than read an index, whatever indexes it has.
        for collection in COLLECTIONS:
            await store.db[collection].insert_many([filler(collection, index) for index in range(FILLER)])
        yield store


FILLER = 2000


def filler(collection: str, index: int) -> Document:
    """A document of `collection` that no query of `QUERIES` matches, with the fields the queries filter on."""
    group = f"other-{index % 40}"
    fields: Document = {"release_id": group, "service": group, "scope": group, "batch": index % 3}
    return {"_id": f"other-{index}", "node_key": f"other/{index}", "key": f"other/{index}", **fields}


@pytest.mark.mongo
async def test_every_hot_path_query_is_served_by_an_index_where_the_server_can(
    populated: MongoStore, ferretdb_postgresql_url: str | None, ferretdb_sqlite_dir: Path | None
) -> None:
    database = populated.db
    probe = await database.command("explain", {"find": "nodes", "filter": {"_id": NODE}})
    server_uses_indexes = plan_shape(probe) != "none" and not scans(probe)
    # FerretDB with the store's own indexes in its storage (reactor/adapters/ferretdb_postgresql.py, and
    # ferretdb_sqlite.py).
    told = ferretdb_postgresql_url is not None or ferretdb_sqlite_dir is not None
    assert server_uses_indexes or not told, f"the store's indexes are not used: {probe}"
    found: dict[str, list[str]] = {}
    unindexed: list[str] = []
    for query in QUERIES:
        explained = await database.command("explain", query.command())
        assert plan_shape(explained) == plan_shape(probe), f"{query.what}: {explained}"
        found[query.what] = scans(explained)
        indexes = [list(index["key"]) async for index in await database[query.collection].list_indexes()]
        if not led_by_an_index(query, indexes):
            unindexed.append(f"{query.what}: {query.filter} (indexes {indexes})")
    assert not unindexed, "no index leads with a field of these filters:\n" + "\n".join(unindexed)
    if plan_shape(probe) == "sqlite":
        # FerretDB on SQLite passes only `{_id: value}` down (module docstring); it applies every other filter itself.
        # A query scans unless it goes by `_id` alone and the store's index is there to search.
        by_id = {query.what for query in QUERIES if query.by_id_alone}
        assert by_id, "no hot-path query goes by _id alone"
        expected = {what: what not in by_id or not server_uses_indexes for what in found}
        assert {what: bool(scan) for what, scan in found.items()} == expected, found
    elif server_uses_indexes:
        scanned = {what: scan for what, scan in found.items() if scan}
        assert not scanned, f"collection scans: {scanned}"
    else:
        # FerretDB 1.24 (module docstring): every query scans, and the `_id` lookup above proves no index is used.
        assert all(found.values()) or plan_shape(probe) == "none"


MONGODB_COLLSCAN = {
    "queryPlanner": {"winningPlan": {"stage": "SORT", "inputStage": {"stage": "COLLSCAN", "direction": "forward"}}}
}
MONGODB_IXSCAN = {
    "queryPlanner": {"winningPlan": {"stage": "FETCH", "inputStage": {"stage": "IXSCAN", "indexName": "release_id_1"}}}
}
POSTGRESQL_SEQ_SCAN = {"queryPlanner": {"Plan": {"Node Type": "Seq Scan", "Relation Name": "nodes_514e905a"}}}
POSTGRESQL_INDEX_SCAN = {
    "queryPlanner": {"Plan": {"Node Type": "Limit", "Plans": [{"Node Type": "Index Scan", "Index Name": "x"}]}}
}
SQLITE_SCAN = {"queryPlanner": {"Plan": ["id=2 parent=0 notused=0 detail=SCAN nodes_514e905a"]}}
SQLITE_SEARCH = {
    "queryPlanner": {
        "Plan": ["id=3 parent=0 notused=0 detail=SEARCH nodes_514e905a USING INDEX nodes_514e905a__id_ (<expr>=?)"]
    }
}


@pytest.mark.parametrize(
    ("explained", "shape", "scanned"),
    [
        (MONGODB_COLLSCAN, "mongodb", True),
        (MONGODB_IXSCAN, "mongodb", False),
        (POSTGRESQL_SEQ_SCAN, "postgresql", True),
        (POSTGRESQL_INDEX_SCAN, "postgresql", False),
        (SQLITE_SCAN, "sqlite", True),
        (SQLITE_SEARCH, "sqlite", False),
        ({"queryPlanner": {}}, "none", False),
    ],
)
def test_scans_are_read_from_each_shape_of_plan(explained: Document, shape: str, scanned: bool) -> None:
    assert plan_shape(explained) == shape
    assert bool(scans(explained)) == scanned
