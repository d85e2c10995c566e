"""The harness's service record: what a service runs on (FerretDB's PostgreSQL) travels with it through the state
file, and the storage backend is chosen by name."""

from __future__ import annotations

import json
import signal

import pytest

from tests.infra import testenv


def _postgres() -> testenv.Service:
    return testenv.Service(
        name="postgres",
        pid=101,
        env={"REACTOR_POSTGRESQL_URL": "postgres://postgres@127.0.0.1:5433/ferretdb"},
        workdir="/run/mongo/postgres",
        stop_grace=30.0,
        starttime=7,
        command=["postgres", "-D", "data"],
        stop_signal=signal.SIGINT.value,
        scratch="/tmp/reactor-postgres-abc",  # noqa: S108 (a recorded path, nothing is made there)
    )


def test_a_service_comes_back_from_the_state_file_with_its_parts() -> None:
    """FerretDB's PostgreSQL, its stop signal and private directory survive `up`'s state file, so `down` stops it."""
    ferretdb = testenv.Service(
        name="mongo",
        pid=100,
        env={"REACTOR_MONGO_URL": "mongodb://127.0.0.1:27018/"},
        command=[
            "ferretdb",
            "-handler",
            "postgresql",
            "-postgresql-url",
            "postgres://postgres@127.0.0.1:5433/ferretdb",
        ],
        parts=[_postgres()],
    )

    again = testenv.Service.from_json(json.loads(json.dumps(ferretdb.to_json())))

    assert again == ferretdb
    assert again.parts[0].stop_signal == signal.SIGINT
    assert testenv.ferretdb_backend(again) == "postgresql"


def test_a_service_recorded_before_parts_existed_has_none() -> None:
    """A state file written by an older harness still loads: no parts, stopped with SIGTERM."""
    old = {"name": "mongo", "pid": 100, "env": {}, "command": ["ferretdb", "-sqlite-dir", "data"]}

    service = testenv.Service.from_json(old)

    assert (service.parts, service.stop_signal, service.scratch) == ([], signal.SIGTERM, "")
    assert testenv.ferretdb_backend(service) == "sqlite"


@pytest.mark.parametrize(("value", "backend"), [(None, "sqlite"), ("", "sqlite"), ("postgresql", "postgresql")])
def test_the_mongo_backend_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, backend: str
) -> None:
    if value is None:
        monkeypatch.delenv("REACTOR_MONGO_BACKEND", raising=False)
    else:
        monkeypatch.setenv("REACTOR_MONGO_BACKEND", value)
    assert testenv.mongo_backend() == backend


def test_an_unknown_mongo_backend_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REACTOR_MONGO_BACKEND", "postgres")
    with pytest.raises(testenv.TestEnvError, match="sqlite, postgresql"):
        testenv.mongo_backend()
