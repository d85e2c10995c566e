"""The SQL the store sends FerretDB's PostgreSQL to make its indexes: names and quoting."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from reactor.adapters.ferretdb_postgresql import (
    INDEXED_FIELDS,
    ensure_indexes,
    index_name,
    index_statement,
    quote_identifier,
    quote_literal,
)
from reactor.adapters.mongo_store import COLLECTIONS
from reactor.errors import InvalidInput
from reactor.runtime import mongo_store
from reactor.settings import Settings


def test_identifiers_and_literals_are_quoted_whatever_they_hold() -> None:
    assert quote_identifier("reactor") == '"reactor"'
    assert quote_identifier('a"; DROP TABLE x; --') == '"a""; DROP TABLE x; --"'
    assert quote_literal("it's") == "'it''s'"
    with pytest.raises(ValueError, match="NUL"):
        quote_identifier("a\x00b")
    with pytest.raises(ValueError, match="NUL"):
        quote_literal("a\x00b")


def test_the_statement_makes_a_gin_index_of_the_expression_ferretdb_filters_on() -> None:
    statement = index_statement("my db", "release_nodes_6e0bbd2f", "node_key")
    assert statement == (
        f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{index_name("release_nodes_6e0bbd2f", "node_key")}"'
        ' ON "my db"."release_nodes_6e0bbd2f"'
        " USING gin ((_jsonb -> 'node_key') jsonb_path_ops) WITH (fastupdate = off)"
    )


def test_index_names_are_distinct_and_fit_postgresql_identifiers() -> None:
    long_table = "t" * 80
    names = {index_name(table, field) for table in ("nodes_1", "nodes_2", long_table) for field in ("_id", "key")}
    assert len(names) == 6
    assert all(len(name.encode()) <= 63 for name in names)
    # Tables FerretDB names alike after 32 characters still get indexes of their own.
    assert index_name(long_table + "a", "_id") != index_name(long_table + "b", "_id")


def test_only_collections_the_store_has_are_indexed() -> None:
    assert set(INDEXED_FIELDS) <= set(COLLECTIONS)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://reactor:s3cret-pw@127.0.0.1:notaport/ferretdb",
        "postgres://reactor:s3cret-pw@127.0.0.1:5432/ferretdb?sslmode=bogus",
        "mysql://reactor:s3cret-pw@127.0.0.1/ferretdb",
    ],
)
async def test_a_malformed_url_is_invalid_input_that_does_not_tell_its_password(url: str) -> None:
    with pytest.raises(InvalidInput, match="ferretdb postgresql url") as raised:
        await ensure_indexes(url, "reactor")
    assert "s3cret-pw" not in str(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


def test_the_setting_reaches_the_store_and_shows_in_no_repr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """REACTOR_FERRETDB_POSTGRESQL_URL goes to the store the runtime builds; the settings never print it."""
    password = secrets.token_urlsafe(16)
    url = f"postgres://ferret:{password}@127.0.0.1:5432/ferretdb"
    monkeypatch.setenv("REACTOR_FERRETDB_POSTGRESQL_URL", url)
    settings = Settings(state_dir=tmp_path, mode="distributed")
    assert mongo_store(settings).postgresql_url == url
    assert mongo_store(settings, "audit-rebuild").database == "audit-rebuild"
    assert password not in repr(settings)
    assert password not in settings.model_dump_json()
    monkeypatch.delenv("REACTOR_FERRETDB_POSTGRESQL_URL")
    assert mongo_store(Settings(state_dir=tmp_path)).postgresql_url is None
