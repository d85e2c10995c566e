"""The store's indexes in FerretDB's PostgreSQL (reactor/adapters/ferretdb_postgresql.py), on a real FerretDB 1.x on a
real PostgreSQL: the session's where it runs on one, else one started here. Whether queries use them is
tests/behaviour/test_mongo_explain.py's part."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import asyncpg
import pytest
from pymongo import AsyncMongoClient

from reactor.adapters.ferretdb_postgresql import INDEXED_FIELDS, ensure_indexes
from reactor.adapters.mongo_store import MongoStore
from reactor.errors import BackendUnavailable, ReactorError
from tests.infra import testenv

pytestmark = pytest.mark.mongo


@pytest.fixture(scope="module")
def on_postgresql(tmp_path_factory: pytest.TempPathFactory, mongo_url: str) -> Iterator[tuple[str, str]]:
    """(MongoDB URL, PostgreSQL URL) of a FerretDB on PostgreSQL."""
    if postgresql_url := os.environ.get("REACTOR_FERRETDB_POSTGRESQL_URL"):
        yield mongo_url, postgresql_url
        return
    testenv.install_ferretdb("postgresql")
    with testenv.start_ferretdb(tmp_path_factory.mktemp("ferretdb-pg"), backend="postgresql") as service:
        yield service.env["REACTOR_MONGO_URL"], service.env["REACTOR_FERRETDB_POSTGRESQL_URL"]


@pytest.fixture
async def database(on_postgresql: tuple[str, str]) -> AsyncIterator[str]:
    name = f"test_{uuid4().hex[:12]}"
    try:
        yield name
    finally:
        async with AsyncMongoClient[dict[str, object]](on_postgresql[0]) as client:
            await client.drop_database(name)


@pytest.fixture
async def collections_only(on_postgresql: tuple[str, str], database: str) -> str:
    """`database` with the store's collections made (a store opened without the PostgreSQL URL), no GIN index."""
    async with MongoStore(on_postgresql[0], database):
        pass
    return database


async def gin_indexes(postgresql_url: str, database: str) -> dict[str, str]:
    """Name -> definition of the GIN indexes in the schema of FerretDB database `database`."""
    connection = await asyncpg.connect(postgresql_url)
    try:
        rows = await connection.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 AND indexdef LIKE '%USING gin%'", database
        )
    finally:
        await connection.close()
    return {str(row["indexname"]): str(row["indexdef"]) for row in rows}


async def test_opening_the_store_makes_each_index_once(on_postgresql: tuple[str, str], database: str) -> None:
    mongo_url, postgresql_url = on_postgresql
    async with MongoStore(mongo_url, database, postgresql_url=postgresql_url):
        pass
    made = await gin_indexes(postgresql_url, database)
    assert len(made) == sum(len(fields) for fields in INDEXED_FIELDS.values())
    expression = "USING gin (((_jsonb -> 'node_key'::text)) jsonb_path_ops) WITH (fastupdate=off)"
    assert any(expression in definition for definition in made.values())
    # Opened again (another worker, a restart): nothing more to make.
    assert await ensure_indexes(postgresql_url, database) == []
    assert await gin_indexes(postgresql_url, database) == made


async def test_stores_opening_at_once_make_the_indexes_between_them(
    on_postgresql: tuple[str, str], collections_only: str
) -> None:
    postgresql_url, database = on_postgresql[1], collections_only
    made = await asyncio.gather(*(ensure_indexes(postgresql_url, database) for _ in range(4)))
    assert sorted(name for names in made for name in names) == sorted(
        f"{collection}.{field}" for collection, fields in INDEXED_FIELDS.items() for field in fields
    )
    assert len(await gin_indexes(postgresql_url, database)) == len(made[0] + made[1] + made[2] + made[3])


async def test_an_index_left_invalid_by_an_interrupted_build_is_made_again(
    on_postgresql: tuple[str, str], database: str
) -> None:
    mongo_url, postgresql_url = on_postgresql
    async with MongoStore(mongo_url, database, postgresql_url=postgresql_url):
        pass
    name = next(iter(await gin_indexes(postgresql_url, database)))
    connection = await asyncpg.connect(postgresql_url)
    try:
        # What a CREATE INDEX CONCURRENTLY that failed leaves: the index, marked not valid (never used by a query).
        await connection.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass($1)", f'"{database}"."{name}"'
        )
        assert len(await ensure_indexes(postgresql_url, database)) == 1
        valid = await connection.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", f'"{database}"."{name}"'
        )
    finally:
        await connection.close()
    assert valid is True


async def test_a_user_who_may_not_make_indexes_is_refused_with_what_to_do(
    on_postgresql: tuple[str, str], collections_only: str
) -> None:
    postgresql_url, database = on_postgresql[1], collections_only
    user = f"reader_{uuid4().hex[:8]}"
    connection = await asyncpg.connect(postgresql_url)
    try:
        await connection.execute(f'CREATE ROLE "{user}" LOGIN')
        await connection.execute(f'GRANT USAGE ON SCHEMA "{database}" TO "{user}"')
        await connection.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{database}" TO "{user}"')
        reader = postgresql_url.replace("//postgres@", f"//{user}@")
        assert reader != postgresql_url
        with pytest.raises(ReactorError, match=r"refused the store's indexes.*must be owner") as refused:
            await ensure_indexes(reader, database)
        assert "REACTOR_FERRETDB_POSTGRESQL_URL" in str(refused.value)
    finally:
        await connection.execute(f'DROP OWNED BY "{user}"')
        await connection.execute(f'DROP ROLE "{user}"')
        await connection.close()
    assert await gin_indexes(postgresql_url, database) == {}


async def test_a_postgresql_without_ferretdbs_database_is_refused(
    on_postgresql: tuple[str, str], database: str
) -> None:
    with pytest.raises(ReactorError, match="_ferretdb_database_metadata"):
        await ensure_indexes(on_postgresql[1], database)  # FerretDB has not made this database


async def test_an_unreachable_postgresql_is_unavailable_and_its_password_not_told() -> None:
    port = testenv.free_port()
    with pytest.raises(BackendUnavailable) as raised:
        await ensure_indexes(f"postgres://reactor:hunter2-secret@127.0.0.1:{port}/ferretdb", "reactor")
    assert "hunter2-secret" not in str(raised.value)


async def test_the_harness_postgresql_plans_each_statement_for_its_values(on_postgresql: tuple[str, str]) -> None:
    connection = await asyncpg.connect(on_postgresql[1])
    try:
        assert await connection.fetchval("SELECT current_setting('plan_cache_mode')") == "force_custom_plan"
    finally:
        await connection.close()
