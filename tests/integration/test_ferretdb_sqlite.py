"""The store's `_id` indexes in FerretDB's SQLite files (reactor/adapters/ferretdb_sqlite.py), on a real FerretDB 1.x on
SQLite: the session's where it runs on SQLite, else one started here. SQLite's own EXPLAIN QUERY PLAN of the statements
FerretDB runs (as its source writes them) tells whether they search or scan; FerretDB's `explain` tells the same of
what FerretDB itself runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from uuid import uuid4

import pytest
from pymongo import AsyncMongoClient

from reactor.adapters.ferretdb_sqlite import (
    ID_EXPRESSION,
    METADATA_TABLE,
    database_file,
    ensure_id_indexes,
    index_name,
    quote_identifier,
)
from reactor.adapters.mongo_store import COLLECTIONS, MongoStore
from reactor.domain.status import pending
from reactor.errors import ReactorError
from tests.infra import testenv

pytestmark = pytest.mark.mongo

NODE = "local/h1/api"


@pytest.fixture(scope="module")
def on_sqlite(tmp_path_factory: pytest.TempPathFactory, mongo_url: str) -> Iterator[tuple[str, Path]]:
    """(MongoDB URL, SQLite directory) of a FerretDB on SQLite."""
    if directory := os.environ.get("REACTOR_FERRETDB_SQLITE_DIR"):
        yield mongo_url, Path(directory)
        return
    with testenv.start_ferretdb(tmp_path_factory.mktemp("ferretdb-sqlite"), backend="sqlite") as service:
        yield service.env["REACTOR_MONGO_URL"], Path(service.env["REACTOR_FERRETDB_SQLITE_DIR"])


@pytest.fixture
async def database(on_sqlite: tuple[str, Path]) -> AsyncIterator[str]:
    name = f"test_{uuid4().hex[:12]}"
    try:
        yield name
    finally:
        async with AsyncMongoClient[dict[str, object]](on_sqlite[0]) as client:
            await client.drop_database(name)


@pytest.fixture
async def collections_only(on_sqlite: tuple[str, Path], database: str) -> str:
    """`database` with the store's collections made (a store opened without the directory), no index of the store's."""
    async with MongoStore(on_sqlite[0], database):
        pass
    return database


def tables(directory: Path, database: str) -> dict[str, str]:
    """Collection -> table, from FerretDB's metadata."""
    with _reader(directory, database) as connection:
        return {
            str(name): str(table)
            for name, table in connection.execute(f"SELECT name, table_name FROM {METADATA_TABLE}")  # noqa: S608
        }


def plans(directory: Path, database: str) -> dict[str, list[str]]:
    """Per collection, SQLite's plan of the two statements FerretDB 1.24 runs by `_id` (its `collection.go`): the read
    of `{_id: value}` and the update of one document."""
    found: dict[str, list[str]] = {}
    with _reader(directory, database) as connection:
        for collection, table in tables(directory, database).items():
            where = f"WHERE {ID_EXPRESSION} = ?"
            statements = [
                f"SELECT _ferretdb_sjson FROM {quote_identifier(table)} {where}",  # noqa: S608 (quoted)
                f"UPDATE {quote_identifier(table)} SET _ferretdb_sjson = ? {where}",  # noqa: S608 (quoted)
            ]
            found[collection] = [
                " / ".join(
                    str(row[3])
                    for row in connection.execute(f"EXPLAIN QUERY PLAN {statement}", ("x", "y")[: statement.count("?")])
                )
                for statement in statements
            ]
    return found


def _reader(directory: Path, database: str) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection to FerretDB's file of `database` (FerretDB writes it meanwhile, in WAL mode)."""
    return contextlib.closing(sqlite3.connect(f"{database_file(directory, database).as_uri()}?mode=ro", uri=True))


async def test_the_store_indexes_what_ferretdb_compares_and_its_statements_then_search(
    on_sqlite: tuple[str, Path], collections_only: str
) -> None:
    mongo_url, directory = on_sqlite
    database = collections_only
    before = plans(directory, database)
    assert set(before) >= set(COLLECTIONS)
    # Without the store's index each statement by `_id` reads the whole table (FerretDB's own index is on another
    # expression).
    assert all(plan.startswith("SCAN ") for collection in COLLECTIONS for plan in before[collection]), before

    async with MongoStore(mongo_url, database, sqlite_dir=directory) as store:
        after = plans(directory, database)
        for collection in COLLECTIONS:
            name = index_name(tables(directory, database)[collection])
            assert all(name in plan and plan.startswith(("SEARCH ", "SCAN ")) for plan in after[collection]), after
            assert all("USING INDEX" in plan for plan in after[collection]), after
        # What FerretDB itself runs now searches too: its explain of `{_id: value}` is SQLite's plan of its statement.
        explained = await store.db.command("explain", {"find": "nodes", "filter": {"_id": NODE}})
        assert explained["filterPushdown"] is True
        [step] = explained["queryPlanner"]["Plan"]
        assert "SEARCH" in step, explained
        assert index_name(tables(directory, database)["nodes"]) in step, explained
        # FerretDB goes on reading and writing by `_id` through it, and lists only its own indexes.
        written = await store.put_node(pending(NODE, "api"), expected_revision=0)
        assert written is not None
        assert await store.put_node(written.model_copy(update={"service": "api"}), expected_revision=1) is not None
        assert await store.put_node(written, expected_revision=1) is None  # stale: refused as before
        stored = await store.get_node(NODE)
        assert stored is not None
        assert stored.revision == 2
        listed = [index["name"] async for index in await store.db["nodes"].list_indexes()]
        assert "_id_" in listed
        assert not any("reactor" in name for name in listed)

    # Opened again (another worker, a restart): nothing more to make.
    assert await ensure_id_indexes(directory, database, COLLECTIONS) == []


async def test_stores_opening_at_once_make_each_index_once(on_sqlite: tuple[str, Path], collections_only: str) -> None:
    directory, database = on_sqlite[1], collections_only
    made = await asyncio.gather(*(ensure_id_indexes(directory, database, COLLECTIONS) for _ in range(4)))
    assert sorted(collection for collections in made for collection in collections) == sorted(COLLECTIONS)


async def test_a_collection_dropped_and_made_again_is_indexed_when_a_store_opens(
    on_sqlite: tuple[str, Path], database: str
) -> None:
    mongo_url, directory = on_sqlite
    async with MongoStore(mongo_url, database, sqlite_dir=directory) as store:
        await store.db.drop_collection("processed")  # its table goes, and the index with it
    dropped = plans(directory, database)
    assert "processed" not in dropped
    async with MongoStore(mongo_url, database, sqlite_dir=directory):
        pass
    assert all("USING INDEX" in plan for plan in plans(directory, database)["processed"])


async def test_a_directory_that_is_not_ferretdbs_is_refused_and_the_store_does_not_open(
    on_sqlite: tuple[str, Path], collections_only: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mongo_url, database = on_sqlite[0], collections_only
    with pytest.raises(ReactorError, match="REACTOR_FERRETDB_SQLITE_DIR") as refused:
        async with MongoStore(mongo_url, database, sqlite_dir=tmp_path):
            pass
    assert f"{database}.sqlite" in str(refused.value)
    assert not (tmp_path / f"{database}.sqlite").exists(), "a file FerretDB never made was created"
    # A SQLite file of that name, but not one of FerretDB's.
    sqlite3.connect(tmp_path / f"{database}.sqlite").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ReactorError, match=METADATA_TABLE):
        await ensure_id_indexes(tmp_path, database, COLLECTIONS)
    monkeypatch.chdir(tmp_path)  # a relative directory is taken from where the process runs
    with pytest.raises(ReactorError, match=METADATA_TABLE):
        await ensure_id_indexes(Path(), database, COLLECTIONS)
