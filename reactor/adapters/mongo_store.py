"""MongoDB store on PyMongo's AsyncMongoClient; runs unchanged on MongoDB 6/7 and FerretDB 1.x.

Node statuses and releases keep the model's JSON as text in `doc`, as the embedded store does, beside the
fields that are filtered or sorted on: FerretDB 1.x rejects nested arrays, which these models may grow.
Release nodes are small and array-free, so their JSON-mode dump is the document itself (its `_id` is
`<release>/<node>`) and a move updates `state` and `outcome` in place. Only what FerretDB 1.x supports is
used: no transactions, change streams, TTL or partial indexes, no projection in findAndModify.

FerretDB 1.x runs `findAndModify` and `update` as a query followed by a write, so two writers can both
match the same revision and both "win" a compare-and-set. Inserts on a unique index are atomic there, so on
such a server every conditional update runs under a lock document: inserting it acquires the lock (unique
`key`), deleting it by its never-reused `_id` releases it. A writer that dies holding one loses it after a
lease. Where the server's conditional update is atomic (MongoDB), a compare-and-set is that one `update_one`
with the revision in its filter, no lock. Which of the two a store uses is decided when it opens, by racing
writers on the server (`mongo_probe.py`), never by the server's name; the lock path can be forced.

Round trips are batched (group commit, `batching.py`): reads by `_id`, inserts, unlocks and slot frees made by
concurrent callers (a worker's or pacer's concurrent handlers) go to the server together, one `find`, `insert_many`
or `delete` command per batch (a delete statement per item: see `_delete_each`), each caller getting its own item's
answer. Updates go one per command
(FerretDB on PostgreSQL stalls on large `update` commands, see `_update_locked`). An idle store
sends each call at once; under load a batch carries what queued while the previous one ran. FerretDB uses no
index of its own making (tests/behaviour/test_mongo_explain.py; on PostgreSQL the store makes some it can use,
`ferretdb_postgresql.py`) and passes only equalities down to its storage: it decodes every
document of a collection for an `$in`, so reads by `_id` share a query only where the server passes `$in` down
(decided at open, `_choose_reads`). `batch=False` sends every call alone (the benchmarks' baseline).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from uuid import uuid4

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, DeleteMany
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, CollectionInvalid, ConnectionFailure, OperationFailure, PyMongoError

from reactor import logs
from reactor.adapters.batching import Batcher, BatchOperation, settled
from reactor.adapters.ferretdb_postgresql import ensure_indexes
from reactor.adapters.ferretdb_sqlite import ensure_id_indexes
from reactor.adapters.mongo_probe import PROBE_COLLECTION, WRITERS, ProbeResult, probe_compare_and_set
from reactor.adapters.urls import without_password
from reactor.domain.pacer import ItemState
from reactor.domain.status import NodeStatus
from reactor.errors import BackendUnavailable, InvalidInput, ReactorError
from reactor.ports import ReleaseNode, ReleaseRecord, Slot

log = logs.get_logger(__name__)

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741  # one item of a batched call
R = TypeVar("R")  # its result
Document = dict[str, Any]
# How a store makes a conditional update exclusive: `probe` decides at open between the two below.
CompareAndSetSetting = Literal["probe", "locked"]
CompareAndSet = Literal["atomic", "locked"]

_DUPLICATE_KEY = 11000
_NAMESPACE_EXISTS = 48
# Documents a read asks for in its first reply. FerretDB 1.x on PostgreSQL keeps a pooled connection for a cursor
# left open after a reply (the default first batch is 101 documents) until the client's getMore; with every client
# connection busy with requests waiting for a pooled connection, that getMore can never be sent and the server
# stalls for good (seen with 256-id batched reads). Replies are capped at 16 MiB whatever this says.
_READ_BATCH = 100_000
# Release node rows inserted per request (a release's rows are stored before its record).
_INSERT_CHUNK = 1000
_MILLISECOND = timedelta(milliseconds=1)  # what a BSON date counts
# Every collection the store writes (the probe's own scratch collection aside).
COLLECTIONS = ("nodes", "processed", "releases", "release_nodes", "slots", "leases", "locks")
# Pauses between the attempts of one operation; a call also stops retrying once its timeout is spent.
_BACKOFF_S = (0.1, 0.4)
_LOCK_POLL_S = (0.002, 0.05)
# A lock outlives any holder that is still working: one update is bounded by `timeout_s` (retries included).
_LOCK_LEASE_TIMEOUTS = 6


async def _first(results: Awaitable[Sequence[R]]) -> R:
    """The one result of a batch operation run on one item."""
    [result] = await results
    return result


def _is_transient(exc: PyMongoError) -> bool:
    return isinstance(exc, ConnectionFailure) or exc.has_error_label("RetryableWriteError")


def _raise_swallowed_cancellation(task: asyncio.Task[Any] | None, cancels: int) -> None:
    """Raise CancelledError if the task was cancelled while a pymongo call ran and the call ate it.

    PyMongo's async client sometimes returns a result (or raises a connection error) instead of letting a
    cancellation through (seen with find_one on FerretDB, pymongo 4.x); the caller would then go on, and a
    worker being shut down would never stop. An unhandled request shows as a higher `cancelling()` count.
    """
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError


def _node_fields(status: NodeStatus) -> Document:
    return {
        "revision": status.revision,
        "release_id": status.release_id,
        "service": status.service,
        "doc": status.model_dump_json(),
    }


def _release_fields(record: ReleaseRecord) -> Document:
    created_at = record.created_at if record.created_at.tzinfo else record.created_at.replace(tzinfo=UTC)
    return {
        "revision": record.revision,
        # BSON datetimes keep milliseconds; the rest of the microseconds breaks ties in the sort.
        "created_at": created_at,
        "created_at_us": created_at.microsecond % 1000,
        "doc": record.model_dump_json(),
    }


def _release_node_id(release_id: str, node_key: str) -> str:
    """The `_id` of a release's node row: a filter of `_id` alone is one FerretDB on SQLite passes to its storage
    (a filter of the row's fields it checks itself, on every row of the collection). Release ids have no `/`."""
    if "/" in release_id:
        raise InvalidInput("release_id", f"{release_id!r} has a '/'")
    return f"{release_id}/{node_key}"


def _release_node(document: Document) -> ReleaseNode:
    return ReleaseNode.model_validate({name: document[name] for name in ReleaseNode.model_fields if name in document})


def _checkable(condition: Mapping[str, Any]) -> bool:
    """Whether `_matches` can check `condition`: each field equal to a value or `$in` a list of them."""
    return all(
        not isinstance(wanted, dict) or (wanted.keys() == {"$in"} and isinstance(wanted["$in"], list))
        for wanted in condition.values()
    ) and not any(name.startswith("$") for name in condition)


def _matches(document: Mapping[str, Any], condition: Mapping[str, Any]) -> bool:
    """Whether `document` meets a `_checkable` condition, as the server would judge it."""
    for name, wanted in condition.items():
        if name not in document:
            return False
        value = document[name]
        if isinstance(wanted, dict):
            if value not in wanted["$in"]:
                return False
        elif value != wanted:
            return False
    return True


def _too_many_to_delete_at_once(exc: ReactorError) -> bool:
    """Whether FerretDB refused a delete for the number of documents it matched (a statement parameter each)."""
    cause = exc.__cause__
    return isinstance(cause, OperationFailure) and (
        "parameters" in str(cause) or "too many SQL variables" in str(cause)
    )


class MongoStore:
    """The Store port on a MongoDB-protocol server (MongoDB or FerretDB)."""

    def __init__(
        self,
        url: str,
        database: str = "reactor",
        *,
        timeout_s: float = 10.0,
        compare_and_set: CompareAndSetSetting = "probe",
        batch: bool = True,
        batch_reads: bool | None = None,
        max_batch: int = 256,
        pool_size: int = 16,
        postgresql_url: str | None = None,
        sqlite_dir: Path | None = None,
    ) -> None:
        self.url = url
        # FerretDB 1.x on PostgreSQL: its PostgreSQL, where the store makes the indexes FerretDB's queries can use
        # (reactor/adapters/ferretdb_postgresql.py). None: the server's own indexes only.
        self.postgresql_url = postgresql_url
        # FerretDB 1.x on SQLite: the directory of its files, where the store makes the `_id` indexes FerretDB's
        # statements can use (reactor/adapters/ferretdb_sqlite.py). None: the server's own indexes only.
        self.sqlite_dir = sqlite_dir
        # Connections to the server, so at most this many requests of this process at once: FerretDB 1.x on
        # PostgreSQL stalls for good once more requests than its own pool holds wait for a second connection each
        # (seen under a 64-handler worker with 100 connections); with batched calls a few carry the load.
        self.pool_size = pool_size
        self.batch = batch
        # Whether reads by `_id` share one `$in` query when batching: None decides at open (`_choose_reads`).
        self.batch_reads_setting = batch_reads
        self.batch_reads = batch and batch_reads is not False
        # Whether a batch of slot frees goes as a statement per node or one `$or` (decided at open, `_choose_reads`).
        self.free_by_statement = True
        # On the lock path, whether a conditional update reads the document by `_id` alone and checks the condition
        # itself before it updates by `_id` alone (decided at open, `_choose_updates`).
        self.check_in_store = False
        self.max_batch = max_batch
        # One batcher per kind of call and collection, made on first use (see the module docstring).
        self._batchers: dict[tuple[str, str], Batcher[Any, Any]] = {}
        # Requests sent to the server so far, by what they did ("read nodes", "unlock", ...): benchmarks read it.
        self.round_trips: Counter[str] = Counter()
        self.round_trip_s: defaultdict[str, float] = defaultdict(float)  # and the seconds they took, summed
        self.database = database
        self.timeout_s = timeout_s
        self.compare_and_set_setting: CompareAndSetSetting = compare_and_set
        # The lock path until the probe, run at open, finds the server's conditional update atomic.
        self.compare_and_set: CompareAndSet = "locked"
        self._client: AsyncMongoClient[Document] | None = None
        self._db: AsyncDatabase[Document] | None = None  # made once: every request names it
        # Per slot scope, the index after the last slot this process took: the first one `take_slots` tries.
        self._next_slot: dict[str, int] = {}

    async def __aenter__(self) -> Self:
        timeout_ms = max(1, int(self.timeout_s * 1000))
        try:
            self._client = AsyncMongoClient(
                self.url,
                tz_aware=True,
                appname="deploy-reactor",
                maxPoolSize=self.pool_size,
                serverSelectionTimeoutMS=timeout_ms,
                connectTimeoutMS=timeout_ms,
                socketTimeoutMS=timeout_ms,
                waitQueueTimeoutMS=timeout_ms,
            )
        except (PyMongoError, ValueError) as exc:
            # pymongo's URL parser raises ValueError too (a port that is not a number); its text must not carry
            # the URL's password either, so whatever sits between "//" and "@" is taken out of it.
            raise InvalidInput("mongo url", without_password(str(exc), self.url)) from exc
        try:
            await self.ping()
            await self._create_collections()
            await self._create_indexes()
            if self.postgresql_url is not None:
                await ensure_indexes(self.postgresql_url, self.database)
            if self.sqlite_dir is not None:
                await ensure_id_indexes(self.sqlite_dir, self.database, COLLECTIONS)
            await self._choose_compare_and_set()
            await self._choose_updates()
            await self._choose_reads()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        client, self._client, self._db = self._client, None, None
        if client is not None:
            await client.close()

    async def _create_collections(self) -> None:
        """Create every collection the store writes before anyone writes it.

        FerretDB 1.x on PostgreSQL creates a collection on its first insert under a registry-wide write lock, then
        waits for a pooled connection, while every pooled connection belongs to a request waiting for that lock: a
        first insert made under load (the first outcome of a release, say) could stop the server for good (seen
        with 64 concurrent workers' calls: every request hung, PostgreSQL idle). Made at open, one at a time, no
        request waits for a creation.
        """
        existing = set(await self._retry("list collections", self.db.list_collection_names))
        for name in COLLECTIONS:
            if name in existing:
                continue
            try:
                await self._retry(
                    f"create collection {name}", partial(self.db.create_collection, name, check_exists=False)
                )
            except ReactorError as exc:
                # Created meanwhile by another process opening the same database.
                cause = exc.__cause__
                if not isinstance(cause, CollectionInvalid) and not (
                    isinstance(cause, OperationFailure) and cause.code == _NAMESPACE_EXISTS
                ):
                    raise

    async def _create_indexes(self) -> None:
        indexes: list[tuple[str, list[tuple[str, int]], bool]] = [
            ("nodes", [("release_id", ASCENDING)], False),
            ("nodes", [("service", ASCENDING)], False),
            ("processed", [("at", ASCENDING)], False),
            ("releases", [("created_at", DESCENDING), ("created_at_us", DESCENDING)], False),
            ("release_nodes", [("release_id", ASCENDING), ("node_key", ASCENDING)], True),
            (
                "release_nodes",
                [("release_id", ASCENDING), ("batch", ASCENDING), ("state", ASCENDING), ("position", ASCENDING)],
                False,
            ),
            ("locks", [("key", ASCENDING)], True),
            ("slots", [("scope", ASCENDING), ("index", ASCENDING)], False),
            ("slots", [("release_id", ASCENDING), ("node_key", ASCENDING)], False),
        ]
        for collection, keys, unique in indexes:
            await self._retry(
                f"create index on {collection}", partial(self.db[collection].create_index, keys, unique=unique)
            )

    async def _choose_compare_and_set(self) -> None:
        """Probe the server unless the lock path is forced; log the choice once."""
        if self.compare_and_set_setting == "locked":
            self.compare_and_set = "locked"
            log.info("mongo compare-and-set chosen", compare_and_set="locked", probed=False)
            return
        result = await self._retry("compare-and-set probe", self._probe)
        self.compare_and_set = "atomic" if result.atomic else "locked"
        log.info(
            "mongo compare-and-set chosen",
            compare_and_set=self.compare_and_set,
            probed=True,
            probe_rounds=result.rounds,
            probe_winners=result.winners,
        )

    async def _choose_updates(self) -> None:
        """Whether a conditional update under a lock checks its condition in the store: where the server passes
        `{_id: value}` to its storage but not `_id` with another field.

        FerretDB 1.x on SQLite passes down only a filter of exactly `{_id: value}`; for any other it decodes every
        document of the collection and tests each. A node's status or a release's node row, updated as `{_id, revision}`
        or `{release_id, node_key, state}`, then cost a decode of every node (or every row of every release) per
        write: a release's time grew with the square of its size (10.5 nodes/s at 1,000 nodes, 5.4 at 2,000). Under
        the lock no other writer changes the document, so reading it by `_id`, checking the condition here and
        updating by `_id` is the same compare-and-set, at two requests each passed down. Its explain says which
        (`filterPushdown`); MongoDB's has no such field, and there the update is atomic and takes no lock anyway.
        """
        if self.compare_and_set != "locked":
            return
        alone = await self._pushed_down("nodes", {"_id": "x"})
        paired = await self._pushed_down("nodes", {"_id": "x", "revision": 1})
        self.check_in_store = alone is True and paired is False
        log.info("mongo conditional updates chosen", condition_checked_in_store=self.check_in_store)
        if self.check_in_store and self.sqlite_dir is None:
            log.warning(
                "the server passes only {_id: value} to its storage (FerretDB on SQLite) and no"
                " REACTOR_FERRETDB_SQLITE_DIR is set: without the store's _id indexes there"
                " (reactor/adapters/ferretdb_sqlite.py) each request by _id reads its whole collection, so a"
                " release's time grows with its size squared"
            )

    async def _choose_reads(self) -> None:
        """Whether concurrent reads by `_id` share one `$in` query: only where the server passes an `$in` of ids to
        its storage as it does one id.

        FerretDB 1.x passes `{_id: value}` down (PostgreSQL or SQLite filters it) but filters `{_id: {$in: [...]}}`
        itself, after decoding every document of the collection; a batch's read then decodes the whole collection
        (every processed request, every node), and FerretDB's CPU is what a distributed loop waits on. Measured on
        FerretDB/PostgreSQL, a 2,000-node release: 1.3x the nodes per second with single reads. Its explain says
        which (`filterPushdown`); MongoDB's has no such field and serves both from the `_id` index.
        """
        if not self.batch:
            return
        # Frees of several nodes' slots: a statement each where the server passes a node's filter down (FerretDB
        # on PostgreSQL), one `$or` where it filters even that itself (FerretDB on SQLite passes only `_id` down:
        # one scan of the held slots for the batch rather than one per node).
        slot = await self._pushed_down("slots", {"release_id": "x", "node_key": "y"})
        self.free_by_statement = slot is not False
        if self.batch_reads_setting is not None:
            return
        one = await self._pushed_down("processed", {"_id": "x"})
        among = await self._pushed_down("processed", {"_id": {"$in": ["x", "y"]}})
        self.batch_reads = not (one is True and among is False)
        log.info("mongo reads by _id chosen", batched=self.batch_reads, frees_by_statement=self.free_by_statement)

    async def _pushed_down(self, collection: str, query: Document) -> object:
        """Whether the server filters `query` in its storage (FerretDB's explain tells; None where it has no such
        field, as MongoDB, which serves every query from its indexes)."""
        explained = await self._retry(
            "explain", lambda: self.db.command({"explain": {"find": collection, "filter": query}})
        )
        return explained.get("filterPushdown")

    async def _probe(self) -> ProbeResult:
        """Race writers on clients of one connection each, so that each really has its own."""
        timeout_ms = max(1, int(self.timeout_s * 1000))
        clients = [
            AsyncMongoClient[Document](
                self.url,
                tz_aware=True,
                appname="deploy-reactor-probe",
                maxPoolSize=1,
                serverSelectionTimeoutMS=timeout_ms,
                connectTimeoutMS=timeout_ms,
                socketTimeoutMS=timeout_ms,
            )
            for _ in range(WRITERS)
        ]
        try:
            return await probe_compare_and_set([client[self.database][PROBE_COLLECTION] for client in clients])
        finally:
            for client in clients:
                await client.close()

    async def ping(self) -> None:
        """Raise BackendUnavailable unless the server answers."""
        await self._retry("ping", lambda: self.db.command("ping"))

    @property
    def db(self) -> AsyncDatabase[Document]:
        """The open database."""
        if self._client is None:
            raise BackendUnavailable("MongoDB store is not open")
        if self._db is None:
            self._db = self._client[self.database]
        return self._db

    # --- nodes ---

    async def get_node(self, node_key: str) -> NodeStatus | None:
        found = await self._find_by_id("nodes", node_key)
        return None if found is None else NodeStatus.model_validate_json(found["doc"])

    async def put_node(self, status: NodeStatus, *, expected_revision: int) -> NodeStatus | None:
        new = status.model_copy(update={"revision": expected_revision + 1})
        fields = _node_fields(new)
        if expected_revision == 0:
            written = await self._insert("nodes", {"_id": new.node_key, **fields})
        else:
            written = await self._update("nodes", {"_id": new.node_key}, {"revision": expected_revision}, fields)
        return new if written else None

    async def list_nodes(self, *, release_id: str | None = None, service: str | None = None) -> list[NodeStatus]:
        query: Document = {}
        if release_id is not None:
            query["release_id"] = release_id
        if service is not None:
            query["service"] = service
        found = await self._find("nodes", query, sort=[("_id", ASCENDING)])
        return [NodeStatus.model_validate_json(document["doc"]) for document in found]

    # --- processed requests ---

    async def get_processed(self, event_id: str) -> str | None:
        found = await self._find_by_id("processed", event_id)
        return None if found is None else str(found["outcome"])

    async def put_processed(self, event_id: str, outcome: str, *, at: datetime | None = None) -> bool:
        # First write wins; a duplicate is a redelivery (or a retried insert that had landed: then it is ours).
        return await self._insert("processed", {"_id": event_id, "outcome": outcome, "at": at or datetime.now(UTC)})

    async def prune_processed(self, before: datetime) -> int:
        """One `delete_many` of the records finished before `before`, split by time where the server refuses it.

        FerretDB 1.x decodes every record for it (no index serves a filter there, test_mongo_explain.py), and so it
        does for each `get_processed` on the hot path unless the store made its indexes in FerretDB's PostgreSQL
        (`ferretdb_postgresql.py`): that is why the executor prunes hourly rather than let the records grow.
        FerretDB on PostgreSQL deletes what a filter matched in one statement with a parameter per document and
        refuses more than 65,535 (found by bench/processed.py): then the window, narrowed to its oldest and newest
        records, is halved until each half goes. Not by ids: FerretDB decodes every record for
        each id of an `$in`.
        """
        return await self._prune_window(None, before)

    async def _prune_window(self, since: datetime | None, before: datetime) -> int:
        window: Document = {"$lt": before} if since is None else {"$gte": since, "$lt": before}
        try:
            deleted = await self._retry("prune processed", partial(self.db["processed"].delete_many, {"at": window}))
            return int(deleted.deleted_count)
        except ReactorError as exc:
            if not _too_many_to_delete_at_once(exc):
                raise
        if since is None:
            # Halved between the records it holds, not from the dawn of time or across a day with none.
            ends = [
                await self._retry(
                    "prune processed: the window's ends",
                    partial(self.db["processed"].find_one, {"at": window}, sort=[("at", order)]),
                )
                for order in (ASCENDING, DESCENDING)
            ]
            if ends[0] is None or ends[1] is None:
                return 0
            since = ends[0]["at"].replace(tzinfo=UTC)
            # Through the newest (dates count milliseconds); one recorded after the ends were read goes next time.
            return await self._prune_window(since, min(ends[1]["at"].replace(tzinfo=UTC) + _MILLISECOND, before))
        middle = since + (before - since) / 2
        # BSON dates count milliseconds: a window of one holds what was recorded within it, never this many.
        if middle - since < _MILLISECOND:
            raise ReactorError(f"MongoDB prune processed: too many records finished at {since.isoformat()} to delete")
        log.info(
            "too many processed records to delete at once; halving the window",
            since=since.isoformat(),
            before=before.isoformat(),
        )
        return await self._prune_window(since, middle) + await self._prune_window(middle, before)

    # --- releases ---

    async def get_release(self, release_id: str) -> ReleaseRecord | None:
        found = await self._find_by_id("releases", release_id)
        return None if found is None else ReleaseRecord.model_validate_json(found["doc"])

    async def put_release(self, record: ReleaseRecord, *, expected_revision: int) -> ReleaseRecord | None:
        new = record.model_copy(update={"revision": expected_revision + 1})
        fields = _release_fields(new)
        if expected_revision == 0:
            written = await self._insert("releases", {"_id": new.release_id, **fields})
        else:
            written = await self._update("releases", {"_id": new.release_id}, {"revision": expected_revision}, fields)
        return new if written else None

    async def list_releases(self) -> list[ReleaseRecord]:
        found = await self._find("releases", {}, sort=[("created_at", DESCENDING), ("created_at_us", DESCENDING)])
        return [ReleaseRecord.model_validate_json(document["doc"]) for document in found]

    async def add_release_nodes(self, nodes: Iterable[ReleaseNode]) -> None:
        """Insert the rows `_INSERT_CHUNK` at a time, each chunk a request of its own that its own retries bound:
        FerretDB took longer than a request's timeout over the rows of 100,000 nodes sent at once, and each retry
        of them all (rows already in are skipped) took as long again. Only the chunk being sent is in memory."""
        remaining = iter(nodes)
        while chunk := list(islice(remaining, _INSERT_CHUNK)):
            documents = [
                {"_id": _release_node_id(node.release_id, node.node_key), **node.model_dump(mode="json")}
                for node in chunk
            ]

            async def insert(documents: list[Document] = documents) -> None:
                try:
                    await self.db["release_nodes"].insert_many(documents, ordered=False)
                except BulkWriteError as exc:
                    errors = exc.details.get("writeErrors", [])
                    if exc.details.get("writeConcernErrors") or any(e.get("code") != _DUPLICATE_KEY for e in errors):
                        raise

            await self._retry("insert into release_nodes", insert)

    async def move_release_node(
        self,
        release_id: str,
        node_key: str,
        *,
        from_states: Sequence[ItemState],
        to_state: ItemState,
        outcome: str | None = None,
        dispatched_at: datetime | None = None,
    ) -> bool:
        row_id = _release_node_id(release_id, node_key)
        fields: Document = {"state": to_state.value}
        if outcome is not None:
            fields["outcome"] = outcome
        if dispatched_at is not None:
            fields["dispatched_at"] = dispatched_at.isoformat()
        condition = {"state": {"$in": [state.value for state in from_states]}}
        # The lock key is the one rows stored by their fields had, so that a move by `_id` and a move by fields
        # exclude each other (see below).
        key = f"release_nodes/{release_id}/{node_key}"
        if await self._update("release_nodes", {"_id": row_id}, condition, fields, key=key):
            return True
        if await self._find_by_id("release_nodes", row_id) is not None:
            return False
        # A row stored before rows had an `_id` of their own (it has an ObjectId) is found by its fields, once (on
        # FerretDB/SQLite a read of every row), and written by its `_id`; a node not in the release costs that read.
        legacy = await self._find_one("release_nodes", {"release_id": release_id, "node_key": node_key})
        if legacy is None:
            return False
        return await self._update("release_nodes", {"_id": legacy["_id"]}, condition, fields, key=key)

    async def move_release_nodes(
        self,
        release_id: str,
        node_keys: Sequence[str],
        *,
        from_states: Sequence[ItemState],
        to_state: ItemState,
        dispatched_at: datetime | None = None,
    ) -> set[str]:
        # Each node's compare-and-set on its own (a conditional write of one document), all at once: the batchers
        # send them together. Every one finishes before an error goes on, so none is left running.
        moves = await asyncio.gather(
            *(
                self.move_release_node(
                    release_id, node_key, from_states=from_states, to_state=to_state, dispatched_at=dispatched_at
                )
                for node_key in node_keys
            ),
            return_exceptions=True,
        )
        for result in moves:
            if isinstance(result, BaseException):
                raise result
        return {node_key for node_key, moved in zip(node_keys, moves, strict=True) if moved is True}

    async def list_release_nodes(
        self,
        release_id: str,
        *,
        batch: int | None = None,
        state: ItemState | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[ReleaseNode]:
        if limit == 0:
            return []
        query: Document = {"release_id": release_id}
        if batch is not None:
            query["batch"] = batch
        if state is not None:
            query["state"] = state.value
        found = await self._find(
            "release_nodes",
            query,
            sort=[("position", DESCENDING if newest_first else ASCENDING)],
            limit=limit if limit is not None and limit > 0 else 0,
        )
        return [_release_node(document) for document in found]

    async def list_release_node_keys(self, release_id: str, *, batch: int | None = None) -> list[str]:
        query: Document = {"release_id": release_id}
        if batch is not None:
            query["batch"] = batch
        found = await self._find(
            "release_nodes", query, sort=[("position", ASCENDING)], projection={"_id": False, "node_key": True}
        )
        return [str(document["node_key"]) for document in found]

    async def get_release_node(self, release_id: str, node_key: str) -> ReleaseNode | None:
        found = await self._find_by_id("release_nodes", _release_node_id(release_id, node_key))
        if found is None:  # a row stored before rows had an `_id` of their own
            found = await self._find_one("release_nodes", {"release_id": release_id, "node_key": node_key})
        return None if found is None else _release_node(found)

    async def count_release_nodes(self, release_id: str, *, batch: int | None = None) -> dict[ItemState, int]:
        match: Document = {"release_id": release_id}
        if batch is not None:
            match["batch"] = batch
        counts = dict.fromkeys(ItemState, 0)
        for group in await self._count_release_nodes(match, "$state"):
            counts[ItemState(group["_id"])] = int(group["count"])
        return counts

    async def count_release_batches(self, release_id: str) -> dict[int, dict[ItemState, int]]:
        # One aggregation, not one for the batch and one for the release: FerretDB decodes every node row of the
        # release for each (it counts in its own process), and the pacer counts on every pass.
        counts: dict[int, dict[ItemState, int]] = {}
        key = {"batch": "$batch", "state": "$state"}
        for group in await self._count_release_nodes({"release_id": release_id}, key):
            counts.setdefault(int(group["_id"]["batch"]), {})[ItemState(group["_id"]["state"])] = int(group["count"])
        return counts

    async def _count_release_nodes(self, match: Document, key: object) -> list[Document]:
        pipeline: list[Document] = [{"$match": match}, {"$group": {"_id": key, "count": {"$sum": 1}}}]

        async def aggregate() -> list[Document]:
            cursor = await self.db["release_nodes"].aggregate(pipeline)
            return await cursor.to_list()

        return await self._retry("count release_nodes", aggregate)

    # --- in-flight slots and leases ---

    async def take_slots(
        self, release_id: str, node_key: str, scopes: Sequence[tuple[str, int]], *, now: datetime
    ) -> bool:
        # A slot is a document whose `_id` names its scope and index: inserting it is the atomic step, so any index
        # below the limit may be tried. The one after the last this process took is tried first, without reading the
        # scope: a window's nodes take a scope's slots one after another (or a chunk at once), and reading every
        # held slot (FerretDB decodes each) for each node made taking a window's slots quadratic. Only when that one
        # is not free are the held slots read, to find one that is.
        taken: list[str] = []

        async def take(scope: str, index: int) -> str | None:
            slot_id = f"{scope}#{index}"
            document = {
                "_id": slot_id,
                "scope": scope,
                "index": index,
                "release_id": release_id,
                "node_key": node_key,
                "taken_at": now,
            }
            if not await self._insert("slots", document):
                return None
            self._next_slot[scope] = index + 1
            return slot_id

        for scope, limit in scopes:
            # Taken from the hint before the insert: concurrent takers of this process try distinct slots.
            guess = self._next_slot.get(scope, 0)
            self._next_slot[scope] = guess + 1
            won = await take(scope, guess) if guess < limit else None
            if won is None:
                # Unsorted: FerretDB sorts after decoding every held slot, and a set of indexes needs no order.
                held = await self._read_all("slots", {"scope": scope})
                used = {int(slot["index"]) for slot in held}
                for index in range(limit):
                    if index not in used and index != guess and (won := await take(scope, index)) is not None:
                        break
            if won is None:
                if taken:
                    await self._delete_each("free slots", "slots", [{"_id": slot_id} for slot_id in taken])
                return False
            taken.append(won)
        return True

    async def free_slots(self, release_id: str, node_key: str) -> None:
        await self._call("free", "slots", self._free_slots_batch, (release_id, node_key))

    async def _free_slots_batch(self, nodes: Sequence[tuple[str, str]]) -> list[None]:
        held = [{"release_id": release_id, "node_key": node_key} for release_id, node_key in nodes]
        if self.free_by_statement or len(held) == 1:
            await self._delete_each("free slots", "slots", held)
        else:
            await self._retry("free slots", partial(self.db["slots"].delete_many, {"$or": held}))
        return [None] * len(nodes)

    async def list_slots(self) -> list[Slot]:
        found = await self._find("slots", {}, sort=[("scope", ASCENDING), ("index", ASCENDING)])
        return [Slot.model_validate({name: slot[name] for name in Slot.model_fields}) for slot in found]

    async def take_lease(self, name: str, holder: str, *, now: datetime, ttl_s: float) -> bool:
        fields = {"holder": holder, "expires_at": now + timedelta(seconds=ttl_s)}
        if await self._insert("leases", {"_id": name, **fields}):
            return True
        condition = {"$or": [{"holder": holder}, {"expires_at": {"$lte": now}}]}
        return await self._update("leases", {"_id": name}, condition, fields)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._retry("release lease", partial(self.db["leases"].delete_one, {"_id": name, "holder": holder}))

    # --- primitives ---

    async def _retry(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`, again after a transient failure while time is left; translate pymongo errors."""
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        task = asyncio.current_task()
        cancels = 0 if task is None else task.cancelling()
        while True:
            self.round_trips[what] += 1
            sent = time.monotonic()
            try:
                result = await operation()
            except PyMongoError as exc:
                self.round_trip_s[what] += time.monotonic() - sent
                _raise_swallowed_cancellation(task, cancels)
                if not _is_transient(exc):
                    raise ReactorError(f"MongoDB {what}: {exc}") from exc
                delay = _BACKOFF_S[attempt] if attempt < len(_BACKOFF_S) else None
                if delay is None or time.monotonic() + delay >= deadline:
                    raise BackendUnavailable(f"MongoDB {what}: {exc}") from exc
                log.warning("mongo operation failed; retrying", operation=what, attempt=attempt + 1, error=str(exc))
                attempt += 1
                await asyncio.sleep(delay)
            else:
                self.round_trip_s[what] += time.monotonic() - sent
                _raise_swallowed_cancellation(task, cancels)
                return result

    async def _find_one(self, collection: str, query: Mapping[str, Any]) -> Document | None:
        return await self._retry(f"read {collection}", lambda: self.db[collection].find_one(query))

    async def _find(
        self,
        collection: str,
        query: Mapping[str, Any],
        *,
        sort: list[tuple[str, int]],
        limit: int = 0,
        projection: Mapping[str, bool] | None = None,
    ) -> list[Document]:
        return await self._retry(
            f"read {collection}",
            lambda: (
                self.db[collection].find(query, projection, batch_size=_READ_BATCH).sort(sort).limit(limit).to_list()
            ),
        )

    async def _call(
        self, kind: str, collection: str, operation: BatchOperation[I, R], item: I, *, settle: bool = False
    ) -> R:
        """`operation` on `item`: in the next batch of this kind of call on `collection`, or alone if the store does
        not batch. `settle`: see `batching.settled`."""
        if self.batch:
            batcher = self._batchers.get((kind, collection))
            if batcher is None:
                batcher = self._batchers[(kind, collection)] = Batcher(operation, max_batch=self.max_batch)
            call: Coroutine[Any, Any, R] = batcher(item)
        else:
            call = _first(operation([item]))
        return await (settled(call) if settle else call)

    async def _delete_each(self, what: str, collection: str, queries: Sequence[Document]) -> None:
        """Delete the documents each of `queries` matches, in one round trip: one `delete` command with a statement
        per query. Not one `$in`/`$or` query: FerretDB 1.x passes neither to its storage, so it decodes and tests
        every document of the collection (every held slot, every lock) for each such delete; an `_id` it passes
        down (on PostgreSQL, other equalities too), served by an index."""
        if len(queries) == 1:
            await self._retry(what, partial(self.db[collection].delete_many, queries[0]))
            return
        statements = [DeleteMany(query) for query in queries]
        await self._retry(what, partial(self.db[collection].bulk_write, statements, ordered=False))

    def _ids(self, document_ids: Sequence[str]) -> Document:
        """A query for the documents with these `_id`s."""
        wanted = list(dict.fromkeys(document_ids))
        return {"_id": wanted[0]} if len(wanted) == 1 else {"_id": {"$in": wanted}}

    async def _read_all(self, collection: str, query: Mapping[str, Any]) -> list[Document]:
        """Every document matching `query`, in the first reply (see `_READ_BATCH`)."""
        return await self._retry(
            f"read {collection}", lambda: self.db[collection].find(query, batch_size=_READ_BATCH).to_list()
        )

    async def _find_by_id(self, collection: str, document_id: str) -> Document | None:
        """The document with `_id` `document_id`; concurrent reads of one collection share one `$in` query where the
        server passes it down (`_choose_reads`), else each goes alone."""
        if not self.batch_reads:
            return await self._find_one(collection, {"_id": document_id})
        return await self._call("find", collection, partial(self._find_by_ids, collection), document_id)

    async def _find_by_ids(self, collection: str, document_ids: Sequence[str]) -> list[Document | None]:
        by_id = {document["_id"]: document for document in await self._read_all(collection, self._ids(document_ids))}
        return [by_id.get(document_id) for document_id in document_ids]

    async def _insert(self, collection: str, document: Document, *, settle: bool = False) -> bool:
        """Insert `document`; False if its `_id` is taken by another writer's document.

        `settle`: a caller cancelled meanwhile still waits until the insert is done, so that what it undoes next
        (a lock it gives back) is not overtaken by the insert itself.
        """
        stamped = {**document, "write_token": uuid4().hex}
        return await self._call("insert", collection, partial(self._insert_batch, collection), stamped, settle=settle)

    async def _insert_batch(self, collection: str, documents: Sequence[Document]) -> list[bool]:
        """Insert stamped documents in one `insert_many`; per document, whether it is the stored one."""
        attempts = 0

        async def insert() -> set[int]:
            nonlocal attempts
            attempts += 1
            try:
                await self.db[collection].insert_many(list(documents), ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if exc.details.get("writeConcernErrors") or any(
                    error.get("code") != _DUPLICATE_KEY for error in errors
                ):
                    raise
                return {int(error["index"]) for error in errors}
            return set()

        duplicates = await self._retry(f"insert into {collection}", insert)
        inserted = [index not in duplicates for index in range(len(documents))]
        if not duplicates:
            return inserted
        # An attempt whose reply was lost may have inserted some: where the stored document is ours, it was.
        stored = await self._read_all(collection, self._ids([documents[index]["_id"] for index in duplicates]))
        tokens = {document["_id"]: document.get("write_token") for document in stored}
        for index in duplicates:
            inserted[index] = tokens.get(documents[index]["_id"]) == documents[index]["write_token"]
        return inserted

    async def _update(
        self, collection: str, identity: Document, condition: Document, fields: Document, *, key: str | None = None
    ) -> bool:
        """Set `fields` on the document at `identity` if it matches `condition`, exclusive of other writers. `key`:
        the lock's (on the lock path), by default the collection and identity's values."""
        if self.compare_and_set == "atomic":
            return await self._update_atomic(collection, identity, condition, fields)
        if key is None:
            key = f"{collection}/" + "/".join(str(value) for value in identity.values())
        return await self._update_locked(collection, identity, condition, fields, key)

    async def _update_atomic(self, collection: str, identity: Document, condition: Document, fields: Document) -> bool:
        """One conditional `update_one`: the server matches and writes it as one step (the probe saw to that)."""
        token = uuid4().hex
        update = {"$set": {**fields, "write_token": token}}
        attempts = 0

        async def update_one() -> int:
            nonlocal attempts
            attempts += 1
            result = await self.db[collection].update_one({**identity, **condition}, update)
            return result.matched_count

        if await self._retry(f"update {collection}", update_one):
            return True
        # An earlier attempt whose reply was lost may have applied it: then the document no longer matches.
        return attempts > 1 and await self._find_one(collection, {**identity, "write_token": token}) is not None

    async def _update_locked(
        self, collection: str, identity: Document, condition: Document, fields: Document, key: str
    ) -> bool:
        """Find-and-update under the document's lock document: for servers whose own update is not atomic.

        Where the server filters only `_id` in its storage (`check_in_store`), the document is read by its `_id`
        under the lock, the condition checked here, and the update sent by `_id` alone.
        """
        checked = self.check_in_store and identity.keys() == {"_id"} and _checkable(condition)

        async def matching() -> Document | None:
            if not checked:
                return await self._find_one(collection, {**identity, **condition})
            found = await self._find_by_id(collection, identity["_id"])
            return found if found is not None and _matches(found, condition) else None

        lock_id = await self._lock(key, matching)
        if lock_id is None:
            return False
        update = {"$set": {**fields, "write_token": uuid4().hex}}
        try:
            if checked:
                # Held now: the document cannot change until the lock is given back.
                if await settled(matching()) is None:
                    return False
                return await settled(self._update_held(collection, identity, identity, update))
            # One update per command, not batched: FerretDB 1.x on PostgreSQL holds a pooled connection per statement
            # of an `update` command until the command ends, so a batch of 50 (its pool) stalls the server for good.
            # Settled: the lock is given back only once the update is done, whatever happens to the caller.
            return await settled(self._update_held(collection, identity, {**identity, **condition}, update))
        finally:
            # Shielded: a writer cancelled now (a worker stopping) still gives the lock back, rather than leave the
            # next writer of this document waiting out its lease.
            await asyncio.shield(self._unlock(key, lock_id))

    async def _update_held(self, collection: str, identity: Document, query: Document, change: Document) -> bool:
        """Apply a conditional update of the document at `identity`, whose lock the caller holds; whether it
        applied. Where a reply was lost, the update's write token on the document tells (no one else writes a
        locked document)."""
        attempts = 0

        async def update_one() -> int:
            nonlocal attempts
            attempts += 1
            result = await self.db[collection].update_one(query, change)
            return int(result.matched_count)

        if await self._retry(f"update {collection}", update_one) and attempts == 1:
            return True
        found = await self._find_one(collection, identity)
        return found is not None and found.get("write_token") == change["$set"]["write_token"]

    async def _lock(self, key: str, matching: Callable[[], Awaitable[Document | None]]) -> str | None:
        """Take the lock of one document; None once the document no longer matches (the update would fail).

        BackendUnavailable if a live holder keeps it for longer than `timeout_s`.
        """
        lock_id = uuid4().hex
        lease = timedelta(seconds=self.timeout_s * _LOCK_LEASE_TIMEOUTS)
        deadline = time.monotonic() + self.timeout_s
        poll = _LOCK_POLL_S[0]
        held: Document | None = None  # the first attempt assumes the lock is free
        while True:
            if held is None:
                lock = {"_id": lock_id, "key": key, "expires_at": datetime.now(UTC) + lease}
                try:
                    taken = await self._insert("locks", lock, settle=True)
                except asyncio.CancelledError:
                    # The insert may have landed: give the lock back rather than leave it to expire.
                    await asyncio.shield(self._unlock(key, lock_id))
                    raise
                if taken:
                    return lock_id
            elif held["expires_at"] <= datetime.now(UTC):
                log.warning("taking over an expired lock", lock=key)
                await self._retry("unlock", partial(self.db["locks"].delete_one, {"_id": held["_id"]}))
                held = None
                continue
            # Losers of a race see the winner's write here and give up at once instead of queueing.
            if await matching() is None:
                return None
            if time.monotonic() >= deadline:
                raise BackendUnavailable(f"MongoDB lock {key} is held by another writer")
            await asyncio.sleep(poll)
            poll = min(poll * 2, _LOCK_POLL_S[1])
            # Waiters read rather than retry the insert: on FerretDB every insert attempt takes the write lock.
            held = await self._find_one("locks", {"key": key})

    async def _unlock(self, key: str, lock_id: str) -> None:
        try:
            await self._call("unlock", "locks", self._unlock_batch, lock_id)
        except BackendUnavailable as exc:
            # The write itself is settled; the lock expires after its lease.
            log.warning("could not release a lock", lock=key, error=str(exc))

    async def _unlock_batch(self, lock_ids: Sequence[str]) -> list[None]:
        await self._delete_each("unlock", "locks", [{"_id": lock_id} for lock_id in dict.fromkeys(lock_ids)])
        return [None] * len(lock_ids)
