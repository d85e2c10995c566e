"""Indexes FerretDB 1.x on PostgreSQL can use, made in its PostgreSQL directly.

FerretDB 1.x keeps each collection as a PostgreSQL table of one `jsonb` column, `_jsonb`, and passes a scalar equality
of a filter down as `_jsonb->'field' @> value`. The indexes it makes for `createIndexes` are btree indexes on
`(_jsonb->'field')`, which no `@>` can use: every request of the store scans its whole table, so each gets slower as
history grows (measured on 40,000 rows: 13-15 ms a read or a conditional update by key). A GIN index on the same
expression serves `@>` (FerretDB/FerretDB#4646 gives the same workaround): with one on each field the store's
requests filter on, those took 0.7-0.9 ms. The indexes are made without GIN's pending list (`fastupdate = off`):
with it, rows inserted since the last vacuum are found by reading that list through, and reads grew 3x over 40,000
new rows (bench/history.py); without it an insert updates the index at once, and they did not grow at all.

PostgreSQL must also plan each of FerretDB's statements for its values: FerretDB prepares `_jsonb->$1 @> $2`, whose
generic plan (the key a parameter) matches no expression index, and PostgreSQL's default `plan_cache_mode` (`auto`)
may settle on that plan for good, say while a table is small. `plan_cache_mode = force_custom_plan` (the server's
configuration, or `ALTER DATABASE ... SET`, before FerretDB connects) prevents it; the store warns where it is not set.

Tables are found through FerretDB's own metadata table in the schema named after the database
(`<database>._ferretdb_database_metadata`: one row per collection, its table in `table`). Only indexes
missing (or left invalid by an interrupted build) are made, one at a time, by the process that holds an advisory lock
(others opening the store meanwhile go on without waiting), each concurrently: FerretDB goes on writing the table
while it is built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from reactor import logs
from reactor.adapters.urls import without_password
from reactor.errors import BackendUnavailable, InvalidInput, ReactorError

log = logs.get_logger(__name__)

# The fields the store's requests filter on by equality, per collection (tests/behaviour/test_mongo_explain.py lists
# the requests). `state`, `batch` and `revision` narrow what these already find and are left to the table.
INDEXED_FIELDS: Mapping[str, tuple[str, ...]] = {
    "nodes": ("_id", "release_id", "service"),
    "processed": ("_id",),
    "releases": ("_id",),
    "release_nodes": ("_id", "release_id", "node_key"),
    "slots": ("_id", "scope", "node_key"),
    "leases": ("_id",),
    "locks": ("_id", "key"),
}
METADATA_TABLE = "_ferretdb_database_metadata"
_ADVISORY_LOCK = 0x7265_6163_746F_72  # "reactor": one creator of indexes at a time on the server
_CONNECT_TIMEOUT_S = 10.0


def quote_identifier(name: str) -> str:
    """`name` as a PostgreSQL identifier, whatever it holds."""
    if "\x00" in name:
        raise ValueError("a PostgreSQL identifier cannot hold NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """`text` as a PostgreSQL string literal (standard_conforming_strings, on since PostgreSQL 9.1)."""
    if "\x00" in text:
        raise ValueError("a PostgreSQL string cannot hold NUL")
    return "'" + text.replace("'", "''") + "'"


def index_name(table: str, field: str) -> str:
    """The name of the store's GIN index of `field` on `table`: unique per (table, field), within PostgreSQL's
    63 bytes."""
    digest = hashlib.sha256(f"{table}\x00{field}".encode()).hexdigest()[:8]
    return f"{table[:32]}_{field[:16]}_{digest}_gin"


def index_statement(schema: str, table: str, field: str) -> str:
    """The CREATE INDEX of the GIN index serving FerretDB's `_jsonb->'field' @> value` on `schema.table`."""
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote_identifier(index_name(table, field))}"
        f" ON {quote_identifier(schema)}.{quote_identifier(table)}"
        f" USING gin ((_jsonb -> {quote_literal(field)}) jsonb_path_ops) WITH (fastupdate = off)"
    )


async def ensure_indexes(postgresql_url: str, database: str) -> list[str]:
    """Make the GIN indexes of `INDEXED_FIELDS` missing on the tables of FerretDB database `database`, in the
    PostgreSQL at `postgresql_url`; the names of those made. Collections not created yet are skipped (the store
    creates every collection before it calls this). BackendUnavailable if PostgreSQL cannot be reached."""
    import asyncpg  # noqa: PLC0415 (only a store told the PostgreSQL under FerretDB needs it)

    try:
        connection = await asyncpg.connect(postgresql_url, timeout=_CONNECT_TIMEOUT_S)
    except (ValueError, asyncpg.ClientConfigurationError) as exc:
        # Not chained: the URL's parser may quote any part of it. The password is taken out of what is told.
        rule = without_password(f"{type(exc).__name__}: {exc}", postgresql_url)
        raise InvalidInput("ferretdb postgresql url", rule) from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        rule = without_password(f"{type(exc).__name__}: {exc}", postgresql_url)
        raise BackendUnavailable(f"FerretDB's PostgreSQL: {rule}") from None
    try:
        # A session lock, not a transaction's: CREATE INDEX CONCURRENTLY runs outside any transaction. Not waited
        # for: a build waits for every transaction older than itself, a waiter's too (a deadlock); the holder makes
        # every missing index, and until it has, this process's requests are only slower.
        made = []
        if await connection.fetchval("SELECT pg_try_advisory_lock($1)", _ADVISORY_LOCK):
            try:
                made = await _make_missing(connection, database)
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK)
        else:
            log.info("ferretdb postgresql indexes are being made by another process", database=database)
        mode = await connection.fetchval("SELECT current_setting('plan_cache_mode')")
    except asyncpg.PostgresError as exc:
        # Refused (say, a user without CREATE on FerretDB's schema): the store does not open on a guess.
        raise ReactorError(
            f"FerretDB's PostgreSQL refused the store's indexes ({type(exc).__name__}: {exc}); give the user of"
            " REACTOR_FERRETDB_POSTGRESQL_URL the right to make indexes on FerretDB's tables, or unset it"
        ) from None
    finally:
        await connection.close()
    if made:
        log.info("ferretdb postgresql indexes made", database=database, indexes=made)
    if mode != "force_custom_plan":
        log.warning(
            "ferretdb postgresql plan_cache_mode is not force_custom_plan: its statements may keep a plan that scans"
            " every row; set it in PostgreSQL's configuration (or ALTER DATABASE ... SET) and restart FerretDB",
            plan_cache_mode=mode,
        )
    return made


async def _make_missing(connection: Any, database: str) -> list[str]:
    """Make the indexes missing (or left invalid by a build that was interrupted) on `database`'s tables."""
    metadata = f"{quote_identifier(database)}.{quote_identifier(METADATA_TABLE)}"
    if await connection.fetchval("SELECT to_regclass($1)", metadata) is None:
        raise ReactorError(f"FerretDB's PostgreSQL has no {metadata}: is it the one FerretDB stores in?")
    tables = {
        str(row["collection"]): str(row["table"])
        for row in await connection.fetch(
            f"SELECT _jsonb->>'_id' AS collection, _jsonb->>'table' AS table FROM {metadata}"  # noqa: S608 (quoted)
        )
    }
    # Each index of the schema and whether it is usable: CREATE INDEX CONCURRENTLY that fails leaves its index
    # behind, invalid (never used, still updated), and IF NOT EXISTS would then keep it for good.
    present = {
        str(row["name"]): bool(row["valid"])
        for row in await connection.fetch(
            "SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1",
            database,
        )
    }
    made: list[str] = []
    for collection, fields in INDEXED_FIELDS.items():
        table = tables.get(collection)
        if table is None:
            continue
        for field in fields:
            name = index_name(table, field)
            if present.get(name) is True:
                continue
            if name in present:
                log.warning("ferretdb postgresql index left invalid; making it again", index=name)
                await connection.execute(
                    f"DROP INDEX CONCURRENTLY IF EXISTS {quote_identifier(database)}.{quote_identifier(name)}"
                )
            # Concurrently: FerretDB goes on writing the table meanwhile (a plain CREATE INDEX would hold its writes
            # for as long as the build of a large table takes).
            await connection.execute(index_statement(database, table, field))
            made.append(f"{collection}.{field}")
    # Fresh statistics, so that the planner weighs the new indexes against what the tables hold now.
    for collection in sorted({name.split(".", 1)[0] for name in made}):
        await connection.execute(f"ANALYZE {quote_identifier(database)}.{quote_identifier(tables[collection])}")
    return made
