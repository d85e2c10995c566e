"""The `_id` indexes FerretDB 1.x on SQLite can use, made in its SQLite files directly.

FerretDB 1.x keeps each database in a SQLite file of its own (`<directory>/<database>.sqlite`), each collection as a
table of one JSON column, `_ferretdb_sjson`, listed with its table in `_ferretdb_collections`. It passes a filter down
to SQLite only when it is `{_id: value}`, as `_ferretdb_sjson->'$._id' = ?`, and it updates and deletes each document
by the same comparison. Its own `_id` index is on `_ferretdb_sjson->"_id"`: the same value, but not the expression
SQLite compares, so SQLite never uses it and each of those statements reads and parses every row of its table. The
store's writes all go by `_id` there (reactor/adapters/mongo_store.py), so a release's time grew with the square of
its size. An index on the very expression FerretDB compares makes each of them a lookup (bench/bus.py, measured on 2
cores, a release through Kafka: 22.9 nodes/s without it and 125 with it at 1,000 nodes; 147 with it at 3,000).

FerretDB opens its files in WAL mode with a busy timeout, so another process may add an index while it runs. The
index is not in FerretDB's metadata: FerretDB does not list it among the collection's indexes, and drops it with its
table. Only missing indexes are made, each under the file's write lock: FerretDB's writes wait while one is built
(measured: 0.1 s for a table of 100,000 records of 300 bytes; FerretDB waits up to 10 s), and so does another
process making them (`_BUSY_TIMEOUT_S`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from reactor import logs
from reactor.errors import BackendUnavailable, ReactorError

log = logs.get_logger(__name__)

METADATA_TABLE = "_ferretdb_collections"
# The expression FerretDB 1.x compares with a document's `_id` (its `metadata.IDColumn`).
ID_EXPRESSION = "_ferretdb_sjson->'$._id'"
_BUSY_TIMEOUT_S = 30.0


def quote_identifier(name: str) -> str:
    """`name` as a SQLite identifier, whatever it holds."""
    if "\x00" in name:
        raise ValueError("a SQLite identifier cannot hold NUL")
    return '"' + name.replace('"', '""') + '"'


def index_name(table: str) -> str:
    """The name of the store's `_id` index on `table` (FerretDB names its own `<table>_<index name>`)."""
    return f"{table}_reactor_id"


def database_file(directory: Path, database: str) -> Path:
    """The SQLite file in which FerretDB 1.x keeps database `database`."""
    if not database or "/" in database or "\x00" in database or database.startswith("."):
        raise ReactorError(f"{database!r} is not a FerretDB database name that names a file")
    return directory / f"{database}.sqlite"


async def ensure_id_indexes(directory: Path, database: str, collections: Iterable[str]) -> list[str]:
    """Make the `_id` indexes missing on the tables of `collections` of FerretDB database `database`, whose SQLite
    directory is `directory`; the collections whose index was made. Collections not created yet are skipped.
    ReactorError when the directory holds no such FerretDB database (refused rather than guessed: the store would
    run without the indexes unknowingly) or SQLite refuses the index."""
    return await asyncio.to_thread(_ensure, directory, database, tuple(collections))


def _ensure(directory: Path, database: str, collections: tuple[str, ...]) -> list[str]:
    path = database_file(directory, database)
    where = "REACTOR_FERRETDB_SQLITE_DIR"
    if not path.is_file():
        raise ReactorError(
            f"FerretDB's SQLite directory {directory} has no {path.name}: is {where} the directory FerretDB stores"
            " in (its --sqlite-url), on this machine?"
        )
    try:
        # `mode=rw`: never create a file FerretDB did not.
        connection = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None
        )
    except sqlite3.Error as exc:
        raise BackendUnavailable(f"FerretDB's SQLite file {path}: {exc}") from None
    try:
        try:
            return _make_missing(connection, path, collections)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise BackendUnavailable(f"FerretDB's SQLite file {path}: {exc}") from None
            raise ReactorError(
                f"FerretDB's SQLite file {path} refused the store's indexes ({exc}); let this process write it,"
                f" or unset {where}"
            ) from None
        except sqlite3.Error as exc:
            raise ReactorError(f"FerretDB's SQLite file {path}: {exc}") from None
    finally:
        connection.close()


def _has_index(connection: sqlite3.Connection, name: str) -> bool:
    found = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)).fetchone()
    return found is not None


def _make_missing(connection: sqlite3.Connection, path: Path, collections: tuple[str, ...]) -> list[str]:
    known = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (METADATA_TABLE,)
    ).fetchone()
    if known is None:
        raise ReactorError(f"{path} has no {METADATA_TABLE}: is it a file FerretDB stores in?")
    tables = {
        str(name): str(table)
        for name, table in connection.execute(f"SELECT name, table_name FROM {METADATA_TABLE}")  # noqa: S608
    }
    made: list[str] = []
    for collection in collections:
        table = tables.get(collection)
        if table is None:
            continue
        name = index_name(table)
        # Looked for and made under the file's write lock, so that of processes opening at once one makes it (and says
        # so); FerretDB's writers wait for it meanwhile (their busy timeout).
        connection.execute("BEGIN IMMEDIATE")
        try:
            present = _has_index(connection, name)
            if not present:
                connection.execute(
                    f"CREATE INDEX {quote_identifier(name)} ON {quote_identifier(table)} ({ID_EXPRESSION})"
                )
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if "no such table" in str(exc):
                continue  # the collection was dropped since its table was listed: nothing to index
            raise
        connection.execute("COMMIT")
        if not present:
            made.append(collection)
    if made:
        log.info("ferretdb sqlite indexes made", file=str(path), collections=made)
    return made
