"""Embedded store on SQLite: one file, survives a restart; ':memory:' for fast tests.

Calls are synchronous on purpose: SQLite on a local file answers in microseconds, which is cheaper than a
thread hop per call. Documents are the models' JSON, as in the MongoDB store.

Writes are group-committed: the first write of an event-loop turn opens a transaction (taking the write lock)
and the next turn commits it, so the writes of every task that ran in between share one commit. Readers on
this connection see them at once; other processes see them a turn later. A crash loses at most that turn,
which in the embedded mode is no worse than the in-memory bus it runs with: recovery re-sends what the store
shows dispatched and deploys are idempotent.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

from reactor import logs
from reactor.domain.pacer import ItemState
from reactor.domain.status import NodeStatus
from reactor.errors import BackendUnavailable
from reactor.ports import ReleaseNode, ReleaseRecord, Slot

log = logs.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_key TEXT PRIMARY KEY, release_id TEXT, service TEXT, revision INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS nodes_release ON nodes (release_id);
CREATE TABLE IF NOT EXISTS processed (event_id TEXT PRIMARY KEY, outcome TEXT NOT NULL, at REAL);
CREATE TABLE IF NOT EXISTS releases (
    release_id TEXT PRIMARY KEY, created_at TEXT NOT NULL, revision INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS release_nodes (
    release_id TEXT NOT NULL, node_key TEXT NOT NULL, batch INTEGER NOT NULL, position INTEGER NOT NULL,
    state TEXT NOT NULL, doc TEXT NOT NULL, outcome TEXT, dispatched_at TEXT, PRIMARY KEY (release_id, node_key));
CREATE INDEX IF NOT EXISTS release_nodes_batch ON release_nodes (release_id, batch, state, position);
CREATE TABLE IF NOT EXISTS release_counts (
    release_id TEXT NOT NULL, batch INTEGER NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (release_id, batch, state));
DROP TRIGGER IF EXISTS release_nodes_added;
CREATE TRIGGER IF NOT EXISTS release_nodes_moved AFTER UPDATE OF state ON release_nodes
WHEN old.state <> new.state BEGIN
    UPDATE release_counts SET n = n - 1
        WHERE release_id = old.release_id AND batch = old.batch AND state = old.state;
    INSERT OR IGNORE INTO release_counts (release_id, batch, state, n) VALUES (new.release_id, new.batch, new.state, 0);
    UPDATE release_counts SET n = n + 1
        WHERE release_id = new.release_id AND batch = new.batch AND state = new.state;
END;
CREATE TABLE IF NOT EXISTS slots (
    scope TEXT NOT NULL, idx INTEGER NOT NULL, release_id TEXT NOT NULL, node_key TEXT NOT NULL,
    taken_at TEXT NOT NULL, PRIMARY KEY (scope, idx));
CREATE INDEX IF NOT EXISTS slots_holder ON slots (release_id, node_key);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at TEXT NOT NULL);
"""


_MOVING = {"state", "outcome", "dispatched_at"}
"""What a release node's row keeps in columns, not in its document: what moves as the release goes."""

_NODE_COLUMNS = "doc, state, outcome, dispatched_at"

_KEYS_AT_ONCE = 500
"""The most release nodes one statement moves (each key is a bound parameter)."""


def _marks(count: int) -> str:
    """`count` placeholders, comma-separated."""
    return ", ".join("?" * count)


def _moves(to_state: ItemState, outcome: str | None, dispatched_at: datetime | None) -> tuple[str, list[object]]:
    """The SET clause of a move of release nodes and its values."""
    changes = "state = ?"
    values: list[object] = [to_state.value]
    if outcome is not None:
        changes += ", outcome = ?"
        values.append(outcome)
    if dispatched_at is not None:
        changes += ", dispatched_at = ?"
        values.append(dispatched_at.isoformat())
    return changes, values


def _release_node(document: str, state: str, outcome: str | None, dispatched_at: str | None) -> ReleaseNode:
    """A release node from its row: the document with the moving fields appended, so that where a file from before
    they had columns still holds them in its document, the columns (last) win, and a NULL column leaves the doc's."""
    tail = f',"state":{json.dumps(state)}'
    if outcome is not None:
        tail += f',"outcome":{json.dumps(outcome)}'
    if dispatched_at is not None:
        tail += f',"dispatched_at":{json.dumps(dispatched_at)}'
    return ReleaseNode.model_validate_json(document[:-1] + tail + "}")


class EmbeddedStore:
    """The Store port on one SQLite file."""

    def __init__(self, path: Path | str = ":memory:") -> None:
        self.path = str(path)
        self._db: sqlite3.Connection | None = None
        # Release records are read on every outcome and change far less often: parse a document once.
        self._releases: dict[str, tuple[str, ReleaseRecord]] = {}

    async def __aenter__(self) -> Self:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            counted = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'release_counts'"
            ).fetchone()
            self._db.executescript(_SCHEMA)
            if counted is None:  # a file from before the counters: count what is there once
                self._db.execute(
                    "INSERT INTO release_counts (release_id, batch, state, n)"
                    " SELECT release_id, batch, state, COUNT(*) FROM release_nodes GROUP BY release_id, batch, state"
                )
            columns = {str(row[1]) for row in self._db.execute("PRAGMA table_info(processed)")}
            if "at" not in columns:  # a file from before records had a time: those are kept (NULL is never before)
                self._db.execute("ALTER TABLE processed ADD COLUMN at REAL")
            self._db.execute("CREATE INDEX IF NOT EXISTS processed_at ON processed (at)")
            columns = {str(row[1]) for row in self._db.execute("PRAGMA table_info(release_nodes)")}
            for column in ("outcome", "dispatched_at"):
                if column not in columns:  # a file from before these moved out of the document: NULL, see the doc
                    self._db.execute(f"ALTER TABLE release_nodes ADD COLUMN {column} TEXT")
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"embedded store {self.path}: {exc}") from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._db is not None:
            self._commit()
            self._db.close()
            self._db = None

    def _writer(self) -> sqlite3.Connection:
        """The connection inside this turn's write transaction (opened, and its commit scheduled, if need be)."""
        db = self.db
        if not db.in_transaction:
            db.execute("BEGIN IMMEDIATE")
            asyncio.get_running_loop().call_soon(self._commit)
        return db

    def _commit(self) -> None:
        if self._db is None or not self._db.in_transaction:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            log.exception("embedded store commit failed; the writes of one turn are lost", path=self.path)
            self._db.execute("ROLLBACK")

    async def ping(self) -> None:
        """Raise unless the database file answers."""
        try:
            self.db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"embedded store {self.path}: {exc}") from exc

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection."""
        if self._db is None:
            raise BackendUnavailable("embedded store is not open")
        return self._db

    # --- nodes ---

    async def get_node(self, node_key: str) -> NodeStatus | None:
        row = self.db.execute("SELECT doc FROM nodes WHERE node_key = ?", (node_key,)).fetchone()
        return None if row is None else NodeStatus.model_validate_json(row[0])

    async def put_node(self, status: NodeStatus, *, expected_revision: int) -> NodeStatus | None:
        new = status.model_copy(update={"revision": expected_revision + 1})
        params = (new.release_id, new.service, new.revision, new.model_dump_json(), new.node_key)
        if expected_revision == 0:
            cursor = self._writer().execute(
                "INSERT INTO nodes (release_id, service, revision, doc, node_key) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (node_key) DO NOTHING",
                params,
            )
        else:
            cursor = self._writer().execute(
                "UPDATE nodes SET release_id = ?, service = ?, revision = ?, doc = ?"
                " WHERE node_key = ? AND revision = ?",
                (*params, expected_revision),
            )
        return new if cursor.rowcount == 1 else None

    async def list_nodes(self, *, release_id: str | None = None, service: str | None = None) -> list[NodeStatus]:
        rows = self.db.execute(
            "SELECT doc FROM nodes WHERE (? IS NULL OR release_id = ?) AND (? IS NULL OR service = ?)"
            " ORDER BY node_key",
            (release_id, release_id, service, service),
        ).fetchall()
        return [NodeStatus.model_validate_json(row[0]) for row in rows]

    # --- processed requests ---

    async def get_processed(self, event_id: str) -> str | None:
        row = self.db.execute("SELECT outcome FROM processed WHERE event_id = ?", (event_id,)).fetchone()
        return None if row is None else str(row[0])

    async def put_processed(self, event_id: str, outcome: str, *, at: datetime | None = None) -> bool:
        inserted = self._writer().execute(
            "INSERT INTO processed (event_id, outcome, at) VALUES (?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
            (event_id, outcome, (at or datetime.now(UTC)).timestamp()),
        )
        return inserted.rowcount == 1

    async def prune_processed(self, before: datetime) -> int:
        return self._writer().execute("DELETE FROM processed WHERE at < ?", (before.timestamp(),)).rowcount

    # --- releases ---

    async def get_release(self, release_id: str) -> ReleaseRecord | None:
        row = self.db.execute("SELECT doc FROM releases WHERE release_id = ?", (release_id,)).fetchone()
        if row is None:
            return None
        cached = self._releases.get(release_id)
        if cached is not None and cached[0] == row[0]:
            return cached[1]  # records are frozen: sharing one is safe
        record = ReleaseRecord.model_validate_json(row[0])
        self._releases[release_id] = (row[0], record)
        return record

    async def put_release(self, record: ReleaseRecord, *, expected_revision: int) -> ReleaseRecord | None:
        new = record.model_copy(update={"revision": expected_revision + 1})
        if expected_revision == 0:
            cursor = self._writer().execute(
                "INSERT INTO releases (release_id, created_at, revision, doc) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (release_id) DO NOTHING",
                (new.release_id, new.created_at.astimezone(UTC).isoformat(), new.revision, new.model_dump_json()),
            )
        else:
            cursor = self._writer().execute(
                "UPDATE releases SET revision = ?, doc = ? WHERE release_id = ? AND revision = ?",
                (new.revision, new.model_dump_json(), new.release_id, expected_revision),
            )
        return new if cursor.rowcount == 1 else None

    async def list_releases(self) -> list[ReleaseRecord]:
        rows = self.db.execute("SELECT doc FROM releases ORDER BY created_at DESC").fetchall()
        return [ReleaseRecord.model_validate_json(row[0]) for row in rows]

    async def add_release_nodes(self, nodes: Iterable[ReleaseNode]) -> None:
        db = self._writer()
        release_ids: set[str] = set()

        def rows() -> Iterator[tuple[str, str, int, int, str, str, str | None, str | None]]:
            # Made as SQLite takes them: the rows of a large release are never all in memory at once.
            for node in nodes:
                release_ids.add(node.release_id)
                document = node.model_dump_json(exclude=_MOVING)
                dispatched = None if node.dispatched_at is None else node.dispatched_at.isoformat()
                state = node.state.value
                yield (
                    node.release_id,
                    node.node_key,
                    node.batch,
                    node.position,
                    state,
                    document,
                    node.outcome,
                    dispatched,
                )

        db.execute("SAVEPOINT add_release_nodes")
        try:
            db.executemany(
                "INSERT INTO release_nodes (release_id, node_key, batch, position, state, doc, outcome, dispatched_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rows(),
            )
            # Counted once per release here rather than by a trigger per row: a release adds thousands at once.
            for release_id in sorted(release_ids):
                db.execute("DELETE FROM release_counts WHERE release_id = ?", (release_id,))
                db.execute(
                    "INSERT INTO release_counts (release_id, batch, state, n) SELECT release_id, batch, state,"
                    " COUNT(*) FROM release_nodes WHERE release_id = ? GROUP BY batch, state",
                    (release_id,),
                )
        except BaseException:
            db.execute("ROLLBACK TO add_release_nodes")
            db.execute("RELEASE add_release_nodes")
            raise
        db.execute("RELEASE add_release_nodes")

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
        # One statement is the compare-and-set; triggers keep the per-state counters in the same transaction. What
        # moves is in columns of its own: rewriting the document (json_set) took as long as the rest of the update.
        if not from_states:
            return False
        changes, values = _moves(to_state, outcome, dispatched_at)
        cursor = self._writer().execute(
            f"UPDATE release_nodes SET {changes}"  # noqa: S608 (fixed fragments and placeholders only)
            f" WHERE release_id = ? AND node_key = ? AND state IN ({_marks(len(from_states))})",
            (*values, release_id, node_key, *(state.value for state in from_states)),
        )
        return cursor.rowcount == 1

    async def move_release_nodes(
        self,
        release_id: str,
        node_keys: Sequence[str],
        *,
        from_states: Sequence[ItemState],
        to_state: ItemState,
        dispatched_at: datetime | None = None,
    ) -> set[str]:
        # One statement for up to _KEYS_AT_ONCE nodes (each found by the primary key), telling which moved.
        if not from_states or not node_keys:
            return set()
        changes, values = _moves(to_state, None, dispatched_at)
        states = [state.value for state in from_states]
        db = self._writer()
        moved: set[str] = set()
        for start in range(0, len(node_keys), _KEYS_AT_ONCE):
            chunk = node_keys[start : start + _KEYS_AT_ONCE]
            rows = db.execute(
                f"UPDATE release_nodes SET {changes}"  # noqa: S608 (fixed fragments and placeholders only)
                f" WHERE release_id = ? AND state IN ({_marks(len(states))}) AND node_key IN ({_marks(len(chunk))})"
                " RETURNING node_key",
                (*values, release_id, *states, *chunk),
            ).fetchall()
            moved.update(str(row[0]) for row in rows)
        return moved

    async def list_release_nodes(
        self,
        release_id: str,
        *,
        batch: int | None = None,
        state: ItemState | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[ReleaseNode]:
        # Only the conditions given, so SQLite walks the (release_id, batch, state, position) index rather than
        # every row of the release (`? IS NULL OR ...` would defeat it).
        where: list[str] = ["release_id = ?"]
        params: list[object] = [release_id]
        if batch is not None:
            where.append("batch = ?")
            params.append(batch)
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        params.append(-1 if limit is None else limit)
        rows = self.db.execute(
            f"SELECT {_NODE_COLUMNS} FROM release_nodes WHERE {' AND '.join(where)}"  # noqa: S608 (fixed fragments)
            f" ORDER BY position {'DESC' if newest_first else 'ASC'} LIMIT ?",
            params,
        ).fetchall()
        return [_release_node(*row) for row in rows]

    async def list_release_node_keys(self, release_id: str, *, batch: int | None = None) -> list[str]:
        if batch is None:
            rows = self.db.execute(
                "SELECT node_key FROM release_nodes WHERE release_id = ? ORDER BY position", (release_id,)
            ).fetchall()
        else:
            rows = self.db.execute(
                "SELECT node_key FROM release_nodes WHERE release_id = ? AND batch = ? ORDER BY position",
                (release_id, batch),
            ).fetchall()
        return [str(row[0]) for row in rows]

    async def get_release_node(self, release_id: str, node_key: str) -> ReleaseNode | None:
        row = self.db.execute(
            f"SELECT {_NODE_COLUMNS} FROM release_nodes WHERE release_id = ? AND node_key = ?",  # noqa: S608
            (release_id, node_key),
        ).fetchone()
        return None if row is None else _release_node(*row)

    async def count_release_nodes(self, release_id: str, *, batch: int | None = None) -> dict[ItemState, int]:
        # One batch's (each pass of the pacer asks) reads its rows off the primary key, without a grouping.
        rows = (
            self.db.execute(
                "SELECT state, SUM(n) FROM release_counts WHERE release_id = ? GROUP BY state", (release_id,)
            ).fetchall()
            if batch is None
            else self.db.execute(
                "SELECT state, n FROM release_counts WHERE release_id = ? AND batch = ?", (release_id, batch)
            ).fetchall()
        )
        counts = dict.fromkeys(ItemState, 0)
        for state, count in rows:
            counts[ItemState(state)] = int(count)
        return counts

    async def count_release_batches(self, release_id: str) -> dict[int, dict[ItemState, int]]:
        rows = self.db.execute(
            "SELECT batch, state, n FROM release_counts WHERE release_id = ? AND n > 0", (release_id,)
        ).fetchall()
        counts: dict[int, dict[ItemState, int]] = {}
        for batch, state, count in rows:
            counts.setdefault(int(batch), {})[ItemState(state)] = int(count)
        return counts

    # --- in-flight slots and leases ---

    async def take_slots(
        self, release_id: str, node_key: str, scopes: Sequence[tuple[str, int]], *, now: datetime
    ) -> bool:
        # The turn's transaction holds the write lock before reading, so two processes cannot both see a
        # slot free; a savepoint undoes the scopes taken when a later one is full.
        db = self._writer()
        db.execute("SAVEPOINT take_slots")
        try:
            for scope, limit in scopes:
                rows = db.execute("SELECT idx FROM slots WHERE scope = ?", (scope,))
                taken = {int(row[0]) for row in rows.fetchall()}
                free = next((index for index in range(limit) if index not in taken), None)
                if free is None:
                    db.execute("ROLLBACK TO take_slots")
                    db.execute("RELEASE take_slots")
                    return False
                db.execute(
                    "INSERT INTO slots (scope, idx, release_id, node_key, taken_at) VALUES (?, ?, ?, ?, ?)",
                    (scope, free, release_id, node_key, now.astimezone(UTC).isoformat()),
                )
        except BaseException:
            db.execute("ROLLBACK TO take_slots")
            db.execute("RELEASE take_slots")
            raise
        db.execute("RELEASE take_slots")
        return True

    async def free_slots(self, release_id: str, node_key: str) -> None:
        self._writer().execute("DELETE FROM slots WHERE release_id = ? AND node_key = ?", (release_id, node_key))

    async def list_slots(self) -> list[Slot]:
        rows = self.db.execute(
            "SELECT scope, idx, release_id, node_key, taken_at FROM slots ORDER BY scope, idx"
        ).fetchall()
        return [
            Slot(
                scope=scope,
                index=int(index),
                release_id=release_id,
                node_key=node_key,
                taken_at=datetime.fromisoformat(taken_at),
            )
            for scope, index, release_id, node_key, taken_at in rows
        ]

    async def take_lease(self, name: str, holder: str, *, now: datetime, ttl_s: float) -> bool:
        expires = (now + timedelta(seconds=ttl_s)).astimezone(UTC).isoformat()
        cursor = self._writer().execute(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
            " SET holder = excluded.holder, expires_at = excluded.expires_at"
            " WHERE leases.holder = excluded.holder OR leases.expires_at <= ?",
            (name, holder, expires, now.astimezone(UTC).isoformat()),
        )
        return cursor.rowcount == 1

    async def release_lease(self, name: str, holder: str) -> None:
        self._writer().execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))
