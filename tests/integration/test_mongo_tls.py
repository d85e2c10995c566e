"""MongoDB over TLS (issue 11, transports), on FerretDB listening with TLS only: the store works through a URL
that names the CA (`tls=true&tlsCAFile=...`), and a client without TLS, or without the CA, gets nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reactor.adapters.mongo_store import MongoStore
from reactor.domain.status import NodeState, NodeStatus
from reactor.errors import BackendUnavailable, ReactorError
from tests.infra.testenv import FERRETDB_STORAGE_VARIABLES, ensure_postgres, start_ferretdb
from tests.leaks import collecting_the_sockets_pymongo_leaks

pytestmark = pytest.mark.mongo


@pytest.fixture(scope="module")
def tls_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a FerretDB of its own that listens with TLS only (`scripts/testenv up mongo --tls`)."""
    with start_ferretdb(tmp_path_factory.mktemp("ferretdb-tls") / "mongo", tls=True) as service:
        yield service.env["REACTOR_MONGO_URL"]


async def test_the_store_works_over_tls_with_the_ca_named_in_the_url(tls_url: str) -> None:
    assert "tls=true&tlsCAFile=" in tls_url
    status = NodeStatus(
        node_key="noop/tls-1/app",
        host="tls-1",
        service="app",
        platform="noop",
        state=NodeState.SUCCESS,
        current_version="1.0.0",
        updated_at=datetime.now(UTC),
    )
    async with MongoStore(tls_url, database=f"tls{os.urandom(4).hex()}") as store:
        stored = await store.put_node(status, expected_revision=0)
        assert stored is not None
        found = await store.get_node("noop/tls-1/app")
        assert found is not None
        assert found.current_version == "1.0.0"


@pytest.mark.parametrize("client", ["without TLS", "without the CA"])
async def test_a_client_without_tls_or_without_the_ca_is_refused(tls_url: str, client: str) -> None:
    url = tls_url.split("?", maxsplit=1)[0] if client == "without TLS" else tls_url.split("&", maxsplit=1)[0]
    async with collecting_the_sockets_pymongo_leaks():
        with pytest.raises(BackendUnavailable) as refused:
            async with MongoStore(url, database="refused", timeout_s=2):
                pass
        if client == "without the CA":
            assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
        del refused


@pytest.mark.kafka
def test_reactor_status_reads_the_store_over_tls(tls_url: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    """The CLI, as a process, with REACTOR_MONGO_URL as `scripts/testenv up mongo --tls` exports it."""
    # Not where the session's FerretDB stores (`scripts/testenv up mongo` exports it): this server is one of its own.
    inherited = {name: value for name, value in os.environ.items() if name not in FERRETDB_STORAGE_VARIABLES}
    env = {
        **inherited,
        "REACTOR_MODE": "distributed",
        "REACTOR_REQUIRE_SIGNED": "false",
        "REACTOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "REACTOR_TOPIC_PREFIX": f"t{os.urandom(4).hex()}.",
        "REACTOR_MONGO_URL": tls_url,
        "REACTOR_MONGO_DATABASE": f"tls{os.urandom(4).hex()}",
        "REACTOR_STATE_DIR": str(tmp_path / "state"),
    }
    command = [sys.executable, "-m", "reactor.cli.main", "status"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    plain = {**env, "REACTOR_MONGO_URL": tls_url.split("?", maxsplit=1)[0]}
    refused = subprocess.run(command, env=plain, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0
    assert "MongoDB" in refused.stderr


@pytest.fixture(scope="module")
def mutual_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """FerretDB over TLS that demands a client certificate signed by its CA (the launcher's -listen-tls-ca-file)."""
    workdir = tmp_path_factory.mktemp("ferretdb-mutual") / "mongo"
    with start_ferretdb(workdir, tls=True, client_certificates=True) as service:
        yield service.env["REACTOR_MONGO_URL"]


async def test_with_client_certificates_demanded_a_client_without_one_is_refused(mutual_url: str) -> None:
    """FerretDB checks the client's certificate against its CA (it authenticates nobody by it: that is MongoDB's
    MONGODB-X509); the URL's `tlsCertificateKeyFile` gets through, the same URL without it does not."""
    assert "&tlsCertificateKeyFile=" in mutual_url
    async with MongoStore(mutual_url, database=f"mtls{os.urandom(4).hex()}") as store:
        assert await store.get_node("noop/none/app") is None
    without = mutual_url.partition("&tlsCertificateKeyFile=")[0]
    async with collecting_the_sockets_pymongo_leaks():
        with pytest.raises(BackendUnavailable):
            async with MongoStore(without, database="refused", timeout_s=2):
                pass


@pytest.fixture(scope="module")
def credentials_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """FerretDB over TLS on PostgreSQL, where a MongoDB client's PLAIN user and password are PostgreSQL's: a role
    `reactor` with a password, and SCRAM authentication for every loopback user but the harness's `postgres`."""
    workdir = tmp_path_factory.mktemp("ferretdb-credentials") / "mongo"
    with start_ferretdb(workdir, backend="postgresql", tls=True) as service:
        postgres_url = service.parts[0].env["REACTOR_POSTGRESQL_URL"]
        host_port = postgres_url.split("@", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        psql = [str(ensure_postgres() / "psql"), "-h", host, "-p", port, "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        sql = f"CREATE ROLE reactor LOGIN PASSWORD '{PASSWORD}'; GRANT ALL ON DATABASE ferretdb TO reactor;"
        subprocess.run([*psql, "-d", "ferretdb", "-c", sql], check=True, capture_output=True, timeout=60)
        hba = workdir / "postgres" / "cluster" / "data" / "pg_hba.conf"
        hba.write_text(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        subprocess.run([*psql, "-d", "postgres", "-c", "SELECT pg_reload_conf()"], check=True, capture_output=True)
        yield service.env["REACTOR_MONGO_URL"]


PASSWORD = "pg-Pa55-3e1f"  # noqa: S105 (a test password)


def _with_user(url: str, user: str, password: str) -> str:
    return url.replace("mongodb://", f"mongodb://{user}:{password}@", 1) + "&authMechanism=PLAIN"


async def test_on_postgresql_the_url_credentials_are_checked(credentials_url: str) -> None:
    """The right password works; a wrong one, or an unknown user, gets no data (PostgreSQL refuses the login)."""
    database = f"cred{os.urandom(4).hex()}"
    async with MongoStore(_with_user(credentials_url, "reactor", PASSWORD), database=database) as store:
        assert await store.get_node("noop/none/app") is None
    for user, password in (("reactor", "wrong"), ("nobody", PASSWORD)):
        async with collecting_the_sockets_pymongo_leaks():
            with pytest.raises(ReactorError) as refused:
                async with MongoStore(_with_user(credentials_url, user, password), database=database, timeout_s=3):
                    pass
            assert "authentication failed" in str(refused.value) or "does not exist" in str(refused.value)
            assert password not in str(refused.value)
            del refused
