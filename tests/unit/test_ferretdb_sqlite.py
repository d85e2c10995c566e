"""The settings and names of the store's `_id` indexes in FerretDB's SQLite files (reactor/adapters/ferretdb_sqlite.py);
tests/integration/test_ferretdb_sqlite.py makes them in a real FerretDB's."""

from __future__ import annotations

from pathlib import Path

import pytest

from reactor.adapters.ferretdb_sqlite import database_file
from reactor.errors import ReactorError
from reactor.runtime import mongo_store
from reactor.settings import Settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "nul\x00"])
def test_a_database_name_that_would_name_another_file_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ReactorError, match="not a FerretDB database name"):
        database_file(tmp_path, name)


def test_the_setting_reaches_the_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """REACTOR_FERRETDB_SQLITE_DIR goes to the store the runtime builds."""
    monkeypatch.setenv("REACTOR_FERRETDB_SQLITE_DIR", str(tmp_path / "ferretdb"))
    assert mongo_store(Settings(state_dir=tmp_path, mode="distributed")).sqlite_dir == tmp_path / "ferretdb"
    monkeypatch.delenv("REACTOR_FERRETDB_SQLITE_DIR")
    assert mongo_store(Settings(state_dir=tmp_path)).sqlite_dir is None
