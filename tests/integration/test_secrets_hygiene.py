"""Secrets hygiene (issue 11, part 7): a signed release runs through real `reactor worker` and `reactor serve`
processes at debug level with every secret set, on the SASL_SSL broker with the worker principal's real password,
and no secret shows anywhere: not in any process's output, not in any topic's keys, values or headers (the dead
letters included), not on /metrics, not in the error texts of calls that fail on purpose."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from cryptography.hazmat.primitives import serialization

from reactor.adapters.kafka_security import KafkaSecurity
from reactor.api.auth import digest
from reactor.trust import generate_key
from tests import kafka_principals
from tests.infra import kafka_secure
from tests.infra.testenv import Service, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

MONGO_PASSWORD = "mongo-Pa55-91ab2d"  # noqa: S105 (test secrets: the point is that none of them shows)
API_TOKEN = "api-T0ken-5c8d0e"  # noqa: S105
SINK_PASSWORD = "sink-Pa55-44e9f1"  # noqa: S105


def _first_line(process: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return process.stdout.readline().decode()


def _secrets(key_file: Path, kafka_password: str) -> dict[str, bytes]:
    """Every secret value, and the private key in each form it could leak in (PEM, its Base64 body, raw bytes)."""
    pem = key_file.read_bytes()
    private = serialization.load_pem_private_key(pem, password=None)
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    found = {
        "kafka password": kafka_password.encode(),
        "mongo password": MONGO_PASSWORD.encode(),
        "api token": API_TOKEN.encode(),
        "sink password": SINK_PASSWORD.encode(),
        "private key (PKCS#8 Base64)": body,
        "private key (raw, Base64)": base64.b64encode(raw).rstrip(b"="),
        "private key (raw, hex)": raw.hex().encode(),
    }
    if len(raw) == 32 and b"\n" not in raw:
        found["private key (raw bytes)"] = raw
    return found


def _leaks(where: str, text: bytes, secrets: dict[str, bytes]) -> list[str]:
    return [f"{name} in {where}" for name, value in secrets.items() if value in text]


async def _every_record(bootstrap: str, prefix: str, security: KafkaSecurity) -> list[tuple[str, bytes]]:
    """(topic, key + value + headers) of every record on every topic under `prefix`, read as `security` says."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.client_options())
    await admin.start()
    try:
        topics = [topic for topic in await admin.list_topics() if topic.startswith(prefix)]
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        **security.client_options(),
    )
    await consumer.start()
    found: list[tuple[str, bytes]] = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=2000)
            if not batch:
                break
            for records in batch.values():
                for record in records:
                    parts = [record.key or b"", record.value or b""]
                    parts += [name.encode() + b"=" + (value or b"") for name, value in record.headers]
                    found.append((record.topic, b"\n".join(parts)))
    finally:
        await consumer.stop()
    return found


WORKERS = ("worker", "worker-cdevents")


async def _worker_metrics(client: httpx.AsyncClient, output: str) -> bytes:
    """The /metrics text of the worker whose output is `output`."""
    for line in output.splitlines():
        if "health and metrics endpoint" in line:
            metrics = await client.get(f"http://127.0.0.1:{json.loads(line)['port']}/metrics")
            assert metrics.status_code == 200
            return metrics.content
    raise AssertionError(f"no metrics endpoint in {output[-2000:]}")


class Processes:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: list[subprocess.Popen[bytes]] = []
        self.outputs: list[Path] = []

    def start(self, env: dict[str, str], name: str, *args: str, stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
        output = self.directory / f"{name}.out"
        self.outputs.append(output)
        with output.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "reactor.cli.main", *args],
                env=env,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                cwd=self.directory,
            )
        self.running.append(process)
        return process

    def run(self, env: dict[str, str], name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        completed = subprocess.run(
            [sys.executable, "-m", "reactor.cli.main", *args],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
            cwd=self.directory,
        )
        output = self.directory / f"{name}.out"
        output.write_bytes(completed.stdout + b"\n" + completed.stderr)
        self.outputs.append(output)
        return completed

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None and not process.stdout.closed:
                rest = process.stdout.read()
                (self.directory / f"pipe-{process.pid}.out").write_bytes(rest)
                self.outputs.append(self.directory / f"pipe-{process.pid}.out")
                process.stdout.close()


class Sink(ThreadingHTTPServer):
    """A CDEvents sink that takes every event and keeps the Authorization header of each request."""

    authorizations: list[str]


class _SinkHandler(BaseHTTPRequestHandler):
    server: Sink

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.authorizations.append(self.headers.get("authorization") or "")
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Silent."""


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink(("127.0.0.1", 0), _SinkHandler)
    server.authorizations = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.mark.timeout(300)
async def test_no_secret_shows_in_any_output_topic_metric_or_error(
    secure_kafka: Service,
    mongo_url: str,
    mongo_database: str,
    ferretdb_postgresql_url: str | None,
    processes: Processes,
    sink: Sink,
    tmp_path: Path,
) -> None:
    """Signing key, Kafka SASL password (used: the broker is SASL_SSL), MongoDB password, API token and a CDEvents
    sink's user:password all set; a release runs to completion through a worker and serve at debug level; nothing
    anywhere holds a secret."""
    kafka_bootstrap = kafka_principals.bootstrap(secure_kafka)
    kafka_password = kafka_secure.passwords(secure_kafka)[kafka_secure.WORKER]
    worker_security = kafka_principals.security(secure_kafka, kafka_secure.WORKER)
    admin_security = kafka_principals.security(secure_kafka, kafka_secure.ADMIN)
    keys = tmp_path / "keys"
    for name in ("reactor", "ci"):
        generate_key(name, keys)
    trust = keys / "trust.yaml"
    trust.write_text(
        yaml.safe_dump(
            [{"name": "reactor", "public_key": "reactor.pub", "reactor": True}, {"name": "ci", "public_key": "ci.pub"}]
        )
    )
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  {digest(API_TOKEN)}: {{identity: ci, signing_key: keys/ci.key}}\n")
    secrets = _secrets(keys / "reactor.key", kafka_password) | {
        f"ci {name}": value
        for name, value in _secrets(keys / "ci.key", kafka_password).items()
        if name.startswith("private")
    }
    host_port = mongo_url.split("//", 1)[1].rstrip("/")
    mongo_user = "reactor" if ferretdb_postgresql_url is None else urlsplit(ferretdb_postgresql_url).username
    prefix = f"s{os.urandom(5).hex()}."
    dead_sink = free_port()  # nothing listens: every delivery fails, and its errors are logged
    env = {
        **os.environ,
        "REACTOR_MODE": "distributed",
        # SCRAM-SHA-512 over TLS as the worker principal, as `scripts/testenv up kafka --secure` prints it: the
        # password is used on the wire, and every client library's debug output is in what is searched.
        **secure_kafka.env,
        # FerretDB on SQLite takes PLAIN credentials and checks none: the password travels, as it would to MongoDB.
        # On PostgreSQL FerretDB logs in to it as the user named; the harness's cluster trusts loopback, so the
        # password travels there too, and the user must be one the cluster has.
        "REACTOR_MONGO_URL": f"mongodb://{mongo_user}:{MONGO_PASSWORD}@{host_port}/?authMechanism=PLAIN",
        "REACTOR_MONGO_DATABASE": mongo_database,
        "REACTOR_TOPIC_PREFIX": prefix,
        "REACTOR_TOPIC_PARTITIONS": "2",
        "REACTOR_STATE_DIR": str(tmp_path / "state"),
        "REACTOR_HTTP_PORT": "0",
        "REACTOR_SIGNING_KEY": str(keys / "reactor.key"),
        "REACTOR_TRUST_FILE": str(trust),
        "REACTOR_REQUIRE_SIGNED": "true",
        "REACTOR_API_TOKENS": str(tokens),
        "REACTOR_CDEVENTS_SINKS": f"http://cd:{SINK_PASSWORD}@127.0.0.1:{sink.server_port}/events,"
        f"http://cd:{SINK_PASSWORD}@127.0.0.1:{dead_sink}/events",  # sent to in this order
        # HTTP sinks only: the worker principal's ACLs give it no cdevents topic.
        "REACTOR_CDEVENTS_TOPIC": "",
        "REACTOR_CDEVENTS_ATTEMPTS": "2",
        "REACTOR_CDEVENTS_BACKOFF_S": "0.1",
        "REACTOR_LOG_LEVEL": "debug",
        "REACTOR_LOG_FORMAT": "json",
        "REACTOR_NOOP_DELAY_S": "0.1",
        "REACTOR_GRACE_S": "2",
    }
    ci = {**env, "REACTOR_SIGNING_KEY": str(keys / "ci.key")}
    # The admin creates the prefix's topics and ACLs (the worker principal may not create topics).
    await kafka_principals.grant(secure_kafka, prefix, partitions=2)
    assert env["REACTOR_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["REACTOR_KAFKA_SASL_PASSWORD"] == kafka_password
    processes.start(env, "worker", "worker", "--role", "all")
    processes.start(env, "worker-cdevents", "worker", "--role", "cdevents")
    serve = processes.start(ci, "serve", "serve", "--port", "0", stdout_pipe=True)
    line = _first_line(serve, 60)
    assert line.startswith("serving http://127.0.0.1:"), line
    url = line.split()[1]

    plan = tmp_path / "release.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "release_id": "secrets-1",
                "service": "app",
                "version": "1.0.0",
                "package": {"url": "https://packages.example.test/app-1.0.0.tar.gz", "sha256": "a" * 64},
                "nodes": [{"node_key": f"noop/host-{index}/app"} for index in range(3)],
            }
        )
    )
    submitted = processes.run(ci, "submit", "release", "submit", str(plan), "--actor", "ci")
    assert submitted.returncode == 0, submitted.stderr.decode()

    auth = {"authorization": f"Bearer {API_TOKEN}"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + 120
        state = None
        while time.monotonic() < deadline:
            response = await client.get("/api/v1/releases/secrets-1", headers=auth)
            state = response.json().get("state") if response.status_code == 200 else None
            if state == "completed":
                break
            await asyncio.sleep(0.5)
        assert state == "completed", [path.read_text(errors="replace")[-2000:] for path in processes.outputs]
        texts: list[tuple[str, bytes]] = []
        # Calls that fail on purpose: a wrong token, a token with a secret-looking tail, no token.
        for headers in ({"authorization": f"Bearer {API_TOKEN}x"}, {"authorization": API_TOKEN}, {}):
            refused = await client.get("/api/v1/releases", headers=headers)
            assert refused.status_code in (401, 403)
            texts.append((f"serve refusal {refused.status_code}", refused.content))
        texts += [
            (f"{name} /metrics", await _worker_metrics(client, (tmp_path / f"{name}.out").read_text()))
            for name in WORKERS
        ]
        assert len(texts) == 5, texts
    # An unsigned command: the worker dead-letters it, so `dlq` holds a record (and its reason) to search too.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, **worker_security.client_options())
    await producer.start()
    try:
        await producer.send_and_wait(f"{prefix}commands", b"{}", key=b"noop/host-0/app")
    finally:
        await producer.stop()
    deadline = time.monotonic() + 60
    while not any(topic == f"{prefix}dlq" for topic, _ in await _every_record(kafka_bootstrap, prefix, admin_security)):
        assert time.monotonic() < deadline, "the unsigned command never reached the dead letters"
    # Wait until the cdevents worker has logged giving up on its unreachable sink, and the other sink took events.
    cdevents_output = tmp_path / "worker-cdevents.out"
    deadline = time.monotonic() + 60
    while "cdevents sink did not take the event" not in cdevents_output.read_text() or not sink.authorizations:
        assert time.monotonic() < deadline, cdevents_output.read_text()[-2000:]
        await asyncio.sleep(0.2)
    # The sink's password was really used: the working sink got it as HTTP basic authentication.
    expected = "Basic " + base64.b64encode(f"cd:{SINK_PASSWORD}".encode()).decode()
    assert sink.authorizations
    assert set(sink.authorizations) == {expected}

    # More failing calls: a MongoDB that is not there, a Kafka SASL handshake the broker does not speak, a
    # malformed setting next to the password.
    dead = free_port()
    failing = {
        "status without mongo": {
            **env,
            "REACTOR_MONGO_URL": f"mongodb://reactor:{MONGO_PASSWORD}@127.0.0.1:{dead}/?serverSelectionTimeoutMS=1000",
        },
        "mongo url malformed": {**env, "REACTOR_MONGO_URL": f"mongodb://reactor:{MONGO_PASSWORD}@127.0.0.1:x/"},
        "mongo option malformed": {
            **env,
            "REACTOR_MONGO_URL": f"mongodb://reactor:{MONGO_PASSWORD}@{host_port}/?tls=true&tlsInsecure=true&tlsAllowInvalidCertificates=true",
        },
        "bad sasl setting": {**env, "REACTOR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "REACTOR_KAFKA_SASL_MECHANISM": "x"},
        "sink url malformed": {**env, "REACTOR_CDEVENTS_SINKS": f"ftp://cd:{SINK_PASSWORD}@127.0.0.1/"},
    }
    for name, failing_env in failing.items():
        completed = processes.run(failing_env, name.replace(" ", "-"), "status")
        assert completed.returncode != 0, name

    processes.stop_all()
    records = await _every_record(kafka_bootstrap, prefix, admin_security)
    assert {topic.removeprefix(prefix) for topic, _ in records} >= {"releases", "commands", "outcomes", "dlq"}
    texts += [(output.name, output.read_bytes()) for output in processes.outputs]
    texts += [(str(path), path.read_bytes()) for path in (tmp_path / "state").rglob("*") if path.is_file()]
    texts += [(f"topic {topic}", text) for topic, text in records]
    leaks = [leak for where, text in texts for leak in _leaks(where, text, secrets)]
    assert not leaks, sorted(set(leaks))
