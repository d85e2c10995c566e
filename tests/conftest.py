"""Shared fixtures. Behaviour tests take `store` and `bus`, parametrised by backend, written once."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import tracemalloc
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import PyMongoError

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.memory_bus import MemoryBus
from reactor.adapters.mongo_store import MongoStore
from reactor.ports import EventBus, Store
from tests.infra import fleet as fleet_harness
from tests.infra import kafka_secure, testenv
from tests.infra.fleet import Fleet
from tests.infra.testenv import TestEnvError

STORE_BACKENDS = [
    pytest.param("embedded", marks=pytest.mark.unit),
    pytest.param("embedded-file", marks=pytest.mark.unit),
    pytest.param("mongo", marks=pytest.mark.mongo),
]
BUS_BACKENDS = [pytest.param("memory", marks=pytest.mark.unit), pytest.param("kafka", marks=pytest.mark.kafka)]
FLEET_HOSTS = 6


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Six nspawn hosts with systemd and sshd, and a package server on their bridge (the fleet and chaos tiers).

    The fleet is $REACTOR_FLEET_DIR (from `eval "$(scripts/testenv up fleet --hosts 6)"`) if set, else one this
    session boots and removes. A fleet that cannot be had fails the tests: it is never a reason to skip.
    """
    if directory := os.environ.get("REACTOR_FLEET_DIR"):
        try:
            running = Fleet.load(Path(directory))
            states = running.status()
        except TestEnvError as exc:
            pytest.fail(f"REACTOR_FLEET_DIR={directory} is not a running fleet: {exc}")
        if len(running.hosts) < FLEET_HOSTS or set(states.values()) != {"running"}:
            pytest.fail(f"the fleet in {directory} needs {FLEET_HOSTS} running hosts, it has {states}")
        yield dataclasses.replace(running, hosts=running.hosts[:FLEET_HOSTS])  # a bigger fleet: its first six
        return
    try:
        service = fleet_harness.start_fleet(tmp_path_factory.mktemp("fleet") / "fleet", FLEET_HOSTS, owned=True)
    except (TestEnvError, OSError) as exc:
        pytest.fail(f"the test fleet could not be started: {exc}")
    try:
        yield Fleet.load(Path(service.workdir))
    finally:
        service.stop()


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB-protocol server for the session: $REACTOR_MONGO_URL, else FerretDB started by the harness on
    $REACTOR_MONGO_BACKEND (`sqlite`, the default, or `postgresql`: a PostgreSQL cluster of its own)."""
    if url := os.environ.get("REACTOR_MONGO_URL"):
        try:
            with MongoClient[dict[str, object]](url, serverSelectionTimeoutMS=5000) as client:
                client.admin.command("ping")
        except PyMongoError as exc:
            pytest.fail(f"the server at REACTOR_MONGO_URL does not answer: {exc}")
        yield url
        return
    try:
        backend = testenv.mongo_backend()
        testenv.ensure_ferretdb()
        service = testenv.start_ferretdb(tmp_path_factory.mktemp("ferretdb"), backend=backend)
    except (testenv.TestEnvError, OSError) as exc:
        pytest.fail(f"FerretDB could not be started for the mongo tests: {exc}")
    # What `scripts/testenv up` exports for it (where stores and workers make the indexes FerretDB can use: its
    # PostgreSQL, or its SQLite directory), in place of whatever the environment said of another server.
    storage = testenv.FERRETDB_STORAGE_VARIABLES
    before = {variable: os.environ.pop(variable, None) for variable in storage}
    os.environ.update({name: value for name, value in service.env.items() if name in storage})
    try:
        yield service.env["REACTOR_MONGO_URL"]
    finally:
        for variable, value in before.items():
            os.environ.pop(variable, None)
            if value is not None:
                os.environ[variable] = value
        service.stop()


@pytest.fixture(scope="session")
def ferretdb_postgresql_url(mongo_url: str) -> str | None:
    """The PostgreSQL under the session's FerretDB, where it runs on one ($REACTOR_FERRETDB_POSTGRESQL_URL); None on
    SQLite or MongoDB."""
    return os.environ.get("REACTOR_FERRETDB_POSTGRESQL_URL")


@pytest.fixture(scope="session")
def ferretdb_sqlite_dir(mongo_url: str) -> Path | None:
    """The directory of the session's FerretDB's SQLite files, where it runs on SQLite ($REACTOR_FERRETDB_SQLITE_DIR);
    None on PostgreSQL or MongoDB."""
    directory = os.environ.get("REACTOR_FERRETDB_SQLITE_DIR")
    return None if directory is None else Path(directory)


@contextlib.asynccontextmanager
async def _fresh_mongo_database(url: str) -> AsyncIterator[str]:
    """The name of a database no test used, dropped afterwards."""
    database = f"test_{uuid4().hex[:12]}"
    try:
        yield database
    finally:
        async with AsyncMongoClient[dict[str, object]](url, serverSelectionTimeoutMS=5000) as client:
            await client.drop_database(database)


@pytest.fixture
async def mongo_database(mongo_url: str) -> AsyncIterator[str]:
    """A fresh database on the session's MongoDB-protocol server, dropped after the test."""
    async with _fresh_mongo_database(mongo_url) as database:
        yield database


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, empty store of each backend."""
    if request.param == "mongo":
        url: str = request.getfixturevalue("mongo_url")  # only mongo runs start the server
        postgresql_url: str | None = request.getfixturevalue("ferretdb_postgresql_url")
        sqlite_dir: Path | None = request.getfixturevalue("ferretdb_sqlite_dir")
        async with (
            _fresh_mongo_database(url) as database,
            MongoStore(url, database=database, postgresql_url=postgresql_url, sqlite_dir=sqlite_dir) as opened,
        ):
            yield opened
        return
    path: Path | str = ":memory:" if request.param == "embedded" else tmp_path / "reactor.db"
    async with EmbeddedStore(path) as opened:
        yield opened


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka broker for the session: $REACTOR_KAFKA_BOOTSTRAP, else a KRaft broker started by the harness."""
    if bootstrap := os.environ.get("REACTOR_KAFKA_BOOTSTRAP"):
        yield bootstrap
        return
    try:
        testenv.ensure_kafka()
        service = testenv.start_kafka(tmp_path_factory.mktemp("kafka"))
    except (testenv.TestEnvError, OSError) as exc:
        pytest.fail(f"Kafka could not be started for the kafka tests: {exc}")
    try:
        yield service.env["REACTOR_KAFKA_BOOTSTRAP"]
    finally:
        service.stop()


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testenv.Service]:
    """A SASL_SSL broker (SCRAM-SHA-512 over TLS, ACLs per principal) for the session, started by the harness
    with no topics: each user grants its own prefix (slow to start, so shared)."""
    try:
        testenv.ensure_kafka()
        service = kafka_secure.start_secure_kafka(tmp_path_factory.mktemp("kafka-secure") / "kafka")
    except (testenv.TestEnvError, OSError) as exc:
        pytest.fail(f"the SASL_SSL broker could not be started: {exc}")
    try:
        yield service
    finally:
        service.stop()


@contextlib.asynccontextmanager
async def fresh_kafka_bus(bootstrap: str, **options: Any) -> AsyncIterator[KafkaBus]:
    """A Kafka bus on topics no other test uses (a random prefix), created with 4 partitions."""
    async with KafkaBus(bootstrap, prefix=f"t{uuid4().hex[:10]}.", **options) as opened:
        await opened.create_topics(partitions=4)
        yield opened


@pytest.fixture(params=BUS_BACKENDS)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    """A fresh bus of each backend."""
    if request.param == "kafka":
        bootstrap: str = request.getfixturevalue("kafka_bootstrap")  # only kafka runs start the broker
        async with fresh_kafka_bus(bootstrap, retry_delay_s=0.01, grace_s=5.0) as opened:
            yield opened
        return
    async with MemoryBus(retry_delay_s=0.01) as opened:
        yield opened


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Collect the garbage a test that talks to a server leaves, once its fixtures and event loop are gone: what
    it left unclosed fails this test, not whichever later one the garbage collector happens to run in."""
    if not any(item.get_closest_marker(tier) for tier in ("mongo", "kafka")):
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    if caught:
        pytest.fail("\n".join(_left_behind(warning) for warning in caught), pytrace=False)


def _left_behind(warning: warnings.WarningMessage) -> str:
    made = tracemalloc.get_object_traceback(warning.source) if warning.source is not None else None
    where = "\n".join(made.format()) if made is not None else "(PYTHONTRACEMALLOC=20 shows where it was made)"
    return f"{warning.category.__name__}: {warning.message}\n{where}"


_TIERS = ("unit", "e2e", "kafka", "mongo", "fleet", "k8s")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test with no tier of its own is a unit test.

    Tests that take `store` or `bus` get their tier from the backend parameter (`mongo`, `kafka`, or `unit`
    for the in-memory ones), so `pytest -m unit` never starts FerretDB or Kafka. Runs before `-m` selection.
    """
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in _TIERS):
            item.add_marker(pytest.mark.unit)
