"""The reactor on a SASL_SSL broker (SCRAM-SHA-512 over TLS) with an authorizer and ACLs per principal.

Each refusal is checked against its control: the same client with the right password, or the same write once
the missing ACL is granted, succeeds; so the refusal comes from the protection, not from a broken client.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError
from pydantic import SecretStr

from reactor.adapters.kafka_bus import KafkaBus, _record
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import Record, decode
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState
from reactor.errors import AccessDenied, BackendUnavailable
from reactor.events import (
    DeployRequested,
    Event,
    NodeDeployed,
    NodeTarget,
    Package,
    ReleasePlan,
    ReleaseRequested,
    Strategy,
    Topic,
)
from tests import kafka_principals
from tests.infra import kafka_secure, testenv
from tests.infra.testenv import Service
from tests.kafka_principals import bootstrap, security
from tests.workers import Workers, worker_group

pytestmark = [pytest.mark.kafka]

PREFIX = "secure."
PACKAGE = Package(url="https://packages.example.test/app-4.0.0.tar.gz", sha256="f" * 64)


@pytest.fixture(scope="module")
def broker(secure_kafka: Service) -> Service:
    """The session's SASL_SSL broker with the reactor's topics and ACLs under PREFIX, set by Kafka's own tools as
    `scripts/testenv up kafka --secure` sets them."""
    try:
        kafka_secure.grant(secure_kafka, PREFIX)
    except (testenv.TestEnvError, OSError) as exc:
        pytest.fail(f"the topics and ACLs of {PREFIX!r} could not be set: {exc}")
    return secure_kafka


@pytest.fixture
async def raw_producer(broker: Service) -> AsyncIterator[dict[str, AIOKafkaProducer]]:
    """Plain (not idempotent) producers per principal, so a refusal names the topic, started on use."""
    producers: dict[str, AIOKafkaProducer] = {}
    for user in (kafka_secure.CI, kafka_secure.SUBSCRIBER):
        producers[user] = AIOKafkaProducer(
            bootstrap_servers=bootstrap(broker), request_timeout_ms=10_000, **security(broker, user).client_options()
        )
    try:
        for producer in producers.values():
            await producer.start()
        yield producers
    finally:
        for producer in producers.values():
            await producer.stop()


async def test_wrong_password_is_refused_with_a_clear_error_at_once(broker: Service) -> None:
    """A bus with a wrong password fails to open with AccessDenied naming the user, within seconds (a worker
    would otherwise wait for the 'outage' forever); the right password opens it."""
    wrong = replace(security(broker, kafka_secure.WORKER), password=SecretStr("not-the-password"))
    started = time.monotonic()
    with pytest.raises(AccessDenied, match="authentication failed as 'worker'") as refused:
        async with KafkaBus(bootstrap(broker), prefix=PREFIX, security=wrong):
            pass
    assert time.monotonic() - started < 30
    assert "not-the-password" not in str(refused.value)
    async with KafkaBus(bootstrap(broker), prefix=PREFIX, security=security(broker, kafka_secure.WORKER)) as bus:
        await bus.ping()


async def test_a_broker_certificate_from_another_ca_is_refused_at_once(broker: Service, tmp_path: Path) -> None:
    """A client trusting another CA does not talk to the broker: AccessDenied (not an outage to wait out)."""
    other_ca, _ = kafka_secure.make_certificates(tmp_path)
    elsewhere = replace(security(broker, kafka_secure.WORKER), cafile=other_ca)
    with pytest.raises(AccessDenied, match="certificate does not verify"):
        async with asyncio.timeout(60), KafkaBus(bootstrap(broker), prefix=PREFIX, security=elsewhere):
            pass


async def test_plaintext_client_cannot_use_the_tls_listener(broker: Service) -> None:
    """A client without TLS and SASL does not get through (BackendUnavailable, not a hang)."""
    async with asyncio.timeout(60):
        with pytest.raises(BackendUnavailable):
            async with KafkaBus(bootstrap(broker), prefix=PREFIX):
                pass


async def test_ci_principal_cannot_write_commands_until_granted(
    broker: Service, raw_producer: dict[str, AIOKafkaProducer]
) -> None:
    """CI writes releases but not commands (authorization error); granted WRITE on commands, the same write goes
    through, so the refusal is the ACL's."""
    ci = raw_producer[kafka_secure.CI]
    await ci.send_and_wait(PREFIX + "releases", b"{}", key=b"test-ci")
    commands = PREFIX + "commands"
    with pytest.raises(TopicAuthorizationFailedError):
        await ci.send_and_wait(commands, b"{}", key=b"test-ci")
    await asyncio.to_thread(kafka_secure.add_acl, broker, kafka_secure.CI, "Write", commands)
    try:
        await _send_once_allowed(ci, commands)
    finally:
        await asyncio.to_thread(kafka_secure.revoke, broker, kafka_secure.CI, "Write", commands)


async def test_subscriber_reads_but_cannot_write(broker: Service, raw_producer: dict[str, AIOKafkaProducer]) -> None:
    """The subscriber reads outcomes and releases (in a group of its own prefix) and may write to no topic."""
    subscriber = raw_producer[kafka_secure.SUBSCRIBER]
    for topic in ("outcomes", "releases", "commands", "dlq"):
        with pytest.raises(TopicAuthorizationFailedError):
            await subscriber.send_and_wait(PREFIX + topic, b"{}", key=b"test-subscriber")
    consumer = AIOKafkaConsumer(
        PREFIX + "releases",
        bootstrap_servers=bootstrap(broker),
        group_id=f"{PREFIX}subscriber-test",
        auto_offset_reset="earliest",
        **security(broker, kafka_secure.SUBSCRIBER).client_options(),
    )
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while not await consumer.getmany(timeout_ms=1000):  # CI's release of the test above, or this one's
                await raw_producer[kafka_secure.CI].send_and_wait(PREFIX + "releases", b"{}", key=b"test-sub")
    finally:
        await consumer.stop()
    await asyncio.to_thread(kafka_secure.add_acl, broker, kafka_secure.SUBSCRIBER, "Write", PREFIX + "outcomes")
    try:
        await _send_once_allowed(subscriber, PREFIX + "outcomes")
    finally:
        await asyncio.to_thread(kafka_secure.revoke, broker, kafka_secure.SUBSCRIBER, "Write", PREFIX + "outcomes")


async def _send_once_allowed(producer: AIOKafkaProducer, topic: str) -> None:
    """Send until the broker's authorizer has the new ACL (it applies metadata within moments)."""
    async with asyncio.timeout(30):
        while True:
            try:
                await producer.send_and_wait(topic, b"{}", key=b"test-granted")
            except TopicAuthorizationFailedError:
                await asyncio.sleep(0.5)
            else:
                return


@pytest.fixture
def workers(broker: Service, mongo_url: str, mongo_database: str, tmp_path: Path) -> Iterator[Workers]:
    """`reactor worker` processes as the worker principal, with the settings `scripts/testenv up kafka --secure`
    prints, on PREFIX."""
    with worker_group(bootstrap(broker), mongo_url, mongo_database, tmp_path) as group:
        group.env.update(broker.env)
        group.env["REACTOR_TOPIC_PREFIX"] = PREFIX
        yield group


@pytest.mark.mongo
@pytest.mark.timeout(240)
async def test_release_runs_end_to_end_over_sasl_ssl_with_worker_processes(
    broker: Service, workers: Workers, mongo_url: str, mongo_database: str
) -> None:
    """CI submits a release (its only right: write releases); two worker processes with the worker principal's
    ACLs deploy every node; the subscriber reads each node's outcome."""
    workers.start()
    workers.start()
    release = ReleasePlan(
        release_id=f"secure-{time.monotonic_ns()}",
        service="app",
        version="4.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"noop/host-{index:02d}/app") for index in range(8)],
        strategy=Strategy(batches=[1, "100%"], max_parallel=4, failure_budget=0),
    )
    async with KafkaBus(bootstrap(broker), prefix=PREFIX, security=security(broker, kafka_secure.CI)) as ci:
        await ci.publish(ReleaseRequested(release_id=release.release_id, plan=release, actor="ci"))
    async with MongoStore(mongo_url, database=mongo_database) as store, asyncio.timeout(180):
        while (record := await store.get_release(release.release_id)) is None or record.state in {
            ReleaseState.RUNNING,
            ReleaseState.WAITING,
        }:
            assert all(process.poll() is None for process in workers.processes), "a worker exited"
            await asyncio.sleep(0.2)
        assert record.state == ReleaseState.COMPLETED, record.reason
        nodes = await store.list_nodes()
        assert {(node.state, node.current_version) for node in nodes} == {(NodeState.SUCCESS, "4.0.0")}
    # Read as a subscriber does, with a consumer only: KafkaBus opens a producer, which needs a WRITE ACL.
    records = await _read_all(broker, PREFIX + "outcomes", kafka_secure.SUBSCRIBER)
    # Leaving out what the other tests wrote once granted (keys `test-...`; workers dead-letter those).
    outcomes = [decode(record)[0] for record in records if not (record.key or b"").startswith(b"test-")]
    deployed = {event.node_key for event in outcomes if isinstance(event, NodeDeployed)}
    assert deployed == {node.node_key for node in release.nodes}
    passwords = kafka_secure.passwords(broker).values()
    for index in range(len(workers.processes)):
        text = workers.log_path(index).read_text(errors="replace")
        assert not [secret for secret in passwords if secret in text], "a password is in a worker's log"


async def _read_all(broker: Service, topic: str, user: str) -> list[Record]:
    """Every message of `topic` up to its current end, read by `user` without a group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap(broker), enable_auto_commit=False, **security(broker, user).client_options()
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, partition) for partition in range(kafka_secure.PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[Record] = []
        async with asyncio.timeout(30):
            while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    records.extend(_record(message) for message in messages)
    finally:
        await consumer.stop()
    return records


def test_a_worker_with_a_wrong_password_exits_at_once_naming_the_user(broker: Service, tmp_path: Path) -> None:
    """`reactor worker` does not wait for a refused password as for an outage: it exits non-zero, says whose
    credentials were refused, and prints no password."""
    env = {
        **os.environ,
        **broker.env,
        "REACTOR_MODE": "distributed",
        "REACTOR_TOPIC_PREFIX": PREFIX,
        "REACTOR_STATE_DIR": str(tmp_path / "state"),
        "REACTOR_HTTP_PORT": "0",
        "REACTOR_KAFKA_SASL_PASSWORD": "not-the-password",
        "REACTOR_REQUIRE_SIGNED": "false",  # no keys here: the password is what this test is about
    }
    done = subprocess.run(
        [sys.executable, "-m", "reactor.cli.main", "worker", "--role", "all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "authentication failed as 'worker'" in output
    assert "not-the-password" not in output
    assert kafka_secure.passwords(broker)[kafka_secure.WORKER] not in output


@pytest.mark.timeout(180)
async def test_a_worker_whose_outcome_is_refused_stops_and_leaves_its_command_to_an_allowed_one(
    secure_kafka: Service,
) -> None:
    """A worker principal without WRITE on outcomes handles a command, and the broker refuses its outcome: the
    consumer stops at once with AccessDenied naming the topic (no retrying as for an outage, no dead letter, since
    the command is not at fault), and the command's offset stays uncommitted. Granted the ACL, the same group
    takes the same command again and its outcome goes through: the refusal was the ACL's."""
    broker = secure_kafka
    prefix = f"refused-{time.monotonic_ns()}."
    missing = kafka_secure.AclBinding(kafka_secure.WORKER, "Write", "topic", prefix + "outcomes")
    await kafka_principals.grant(broker, prefix, leave_out=[missing])
    command = DeployRequested(node_key="noop/host-01/app", service="app", version="4.0.0", package=PACKAGE)
    handled: list[str] = []

    async with KafkaBus(
        bootstrap(broker), prefix=prefix, security=security(broker, kafka_secure.WORKER), retry_delay_s=0.05
    ) as bus:

        async def handle(event: Event) -> None:
            assert isinstance(event, DeployRequested)
            handled.append(event.event_id)
            await bus.publish(NodeDeployed(node_key=event.node_key, service="app", version=event.version))

        await bus.publish(command)
        with pytest.raises(AccessDenied, match=f"not allowed to write {prefix}outcomes"):
            async with asyncio.timeout(60):
                await bus.consume([Topic.COMMANDS], "executor", handle)
        assert handled == [command.event_id]  # taken once, not retried
        assert await _read_all(broker, prefix + "dlq", kafka_secure.ADMIN) == []

        await kafka_principals.allow(broker, [missing])
        async with asyncio.timeout(90):
            while not (records := await _read_all(broker, prefix + "outcomes", kafka_secure.ADMIN)):
                try:
                    async with asyncio.timeout(10):
                        await bus.consume([Topic.COMMANDS], "executor", handle)
                except AccessDenied:  # the broker applies the new ACL moments after the controller took it
                    await asyncio.sleep(0.2)
                except TimeoutError:
                    pass
    [(outcome, _source)] = [decode(record) for record in records]
    assert isinstance(outcome, NodeDeployed)
    assert outcome.node_key == command.node_key
    assert set(handled) == {command.event_id}
    assert len(handled) >= 2


@pytest.mark.mongo
@pytest.mark.timeout(180)
async def test_a_worker_process_without_its_outcomes_acl_exits_naming_the_topic(
    secure_kafka: Service, mongo_url: str, mongo_database: str, tmp_path: Path
) -> None:
    """`reactor worker --role executor` as the worker principal on a prefix where it may not write outcomes: it
    runs the command it takes, its outcome is refused, and the process exits non-zero with `error: ... not allowed
    to write <prefix>outcomes`, instead of retrying as if the broker were away."""
    broker = secure_kafka
    with worker_group(bootstrap(broker), mongo_url, mongo_database, tmp_path) as group:
        prefix = group.env["REACTOR_TOPIC_PREFIX"]
        missing = kafka_secure.AclBinding(kafka_secure.WORKER, "Write", "topic", prefix + "outcomes")
        await kafka_principals.grant(broker, prefix, leave_out=[missing])
        group.env.update(broker.env)
        group.env["REACTOR_TOPIC_PREFIX"] = prefix
        async with KafkaBus(bootstrap(broker), prefix=prefix, security=security(broker, kafka_secure.WORKER)) as bus:
            await bus.publish(
                DeployRequested(node_key="noop/host-01/app", service="app", version="4.0.0", package=PACKAGE)
            )
        process = group.start("executor")
        code = await asyncio.to_thread(process.wait, 120)
        output = group.log_path(0).read_text(errors="replace")
    assert code != 0, output
    assert f"not allowed to write {prefix}outcomes" in output
    assert kafka_secure.passwords(broker)[kafka_secure.WORKER] not in output
