"""FerretDB on PostgreSQL as the harness runs it: a crash of FerretDB leaves its cluster and data; stop takes both."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pymongo import MongoClient

from tests.infra import testenv

pytestmark = pytest.mark.mongo


def _refused(port: int) -> bool:
    try:
        with socket.create_connection((testenv.HOST, port), timeout=3):
            return False
    except OSError:
        return True


@pytest.mark.timeout(300)
def test_killed_ferretdb_on_postgresql_comes_back_on_its_cluster_and_stop_takes_both(tmp_path: Path) -> None:
    """`kill` strikes FerretDB alone (its PostgreSQL keeps running), `relaunch` serves the same port and data, and
    `stop` stops FerretDB, then PostgreSQL, and removes the cluster's private directory if it had one."""
    ferretdb = testenv.start_ferretdb(tmp_path / "ferretdb", backend="postgresql")
    [postgres] = ferretdb.parts
    try:
        url = ferretdb.env["REACTOR_MONGO_URL"]
        with MongoClient[dict[str, object]](url, serverSelectionTimeoutMS=10000) as client:
            client.relaunch.things.insert_one({"_id": "kept"})

        ferretdb.kill()
        assert _refused(int(url.rstrip("/").rsplit(":", 1)[1]))
        assert postgres.alive(), "PostgreSQL went down with FerretDB"

        ferretdb = testenv.relaunch(ferretdb)
        ferretdb.wait_ready(testenv.FERRETDB_START_TIMEOUT)
        assert ferretdb.parts == [postgres]
        with MongoClient[dict[str, object]](url, serverSelectionTimeoutMS=10000) as client:
            assert client.relaunch.things.find_one({"_id": "kept"}) == {"_id": "kept"}
    finally:
        ferretdb.stop()
    assert not postgres.alive()
    port = int(postgres.env["REACTOR_POSTGRESQL_URL"].rsplit(":", 1)[1].split("/", 1)[0])
    assert _refused(port)
    assert not postgres.scratch or not Path(postgres.scratch).exists()
