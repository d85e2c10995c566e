"""The reactor on a real Kafka broker and a real MongoDB-protocol server (FerretDB): releases, redelivery after a
killed worker, scale-out in one consumer group, the demo with real processes, replay, health and metrics.

Each test runs twice (`transport`): on a plaintext broker with nothing signed, and on the session's SASL_SSL broker
(SCRAM-SHA-512 over TLS, ACLs per principal) with signatures required. There the workers' bus is the worker
principal signing as the reactor identity; the test's own node commands (DeployRequested, RollbackRequested
straight to `commands`) go through that bus too, since only the worker principal may write `commands` and only a
reactor identity may sign a node command; releases are submitted on the `ci` bus, the ci principal (WRITE on
`releases` only) signing as the ci identity. After each secure test every message on `commands`, `outcomes` and
`releases` must verify with the signer it should have, and none may have been dead-lettered for a signature.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import pytest
import yaml
from pydantic import SecretStr

from reactor.adapters.dispatch import DLQ_REASON
from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import decode, encode
from reactor.demo import build_package
from reactor.demo.scenario import free_ports, release_plan, served_version
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState, NodeStatus, pending
from reactor.errors import AccessDenied, BackendUnavailable
from reactor.events import (
    AutoRollback,
    BatchStarted,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    NodeTarget,
    Package,
    ReleasePlan,
    ReleaseRequested,
    RollbackFailed,
    RollbackRequested,
    Strategy,
    Topic,
    derived_event_id,
)
from reactor.executors.local import stop_all
from reactor.observability import CountingBus, HealthServer
from reactor.ports import ExecutorFactory, Store
from reactor.runtime import Role, kafka_bus, load_signatures
from reactor.settings import Settings
from reactor.trust import generate_key, verify_record
from tests import kafka_principals
from tests.fakes import Script, scripted
from tests.infra import kafka_secure, testenv
from tests.infra.testenv import Service
from tests.leaks import collecting_the_sockets_pymongo_leaks
from tests.support import equals, running_roles
from tests.support import until as poll_until

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="d" * 64)
WAIT_S = 60.0


def plan(count: int, strategy: Strategy, release_id: str = "app-2") -> ReleasePlan:
    return ReleasePlan(
        release_id=release_id,
        service="app",
        version="2.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"fake/host-{index:02d}/app") for index in range(count)],
        strategy=strategy,
    )


@pytest.fixture
async def mongo(mongo_url: str, mongo_database: str) -> AsyncIterator[MongoStore]:
    async with MongoStore(mongo_url, database=mongo_database) as store:
        yield store


@dataclass(frozen=True)
class Transport:
    """How this module's buses reach Kafka and what they sign: the settings the workers' bus and roles are built
    from, those of the bus CI submits releases on, and the environment of an operator's `reactor` CLI."""

    worker: Settings
    ci: Settings
    operator_env: dict[str, str]
    broker: Service | None = None  # the SASL_SSL broker


@pytest.fixture(params=["plaintext", "sasl_ssl"])
async def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Transport:
    """Plaintext with signatures off, as a developer runs it; or SASL_SSL as the ACL'd principals with signatures
    required, a reactor identity for the workers and a ci identity for releases, on a fresh granted prefix."""
    prefix = f"t{uuid4().hex[:10]}."
    if request.param == "plaintext":
        bootstrap: str = request.getfixturevalue("kafka_bootstrap")
        plain = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix, grace_s=2.0)
        # Tests publish through fixture buses that sign nothing (signed commands: test_signed_commands.py).
        operator_env = {"REACTOR_KAFKA_BOOTSTRAP": bootstrap, "REACTOR_REQUIRE_SIGNED": "false"}
        return Transport(plain, plain, operator_env)
    broker: Service = request.getfixturevalue("secure_kafka")
    bootstrap = kafka_principals.bootstrap(broker)
    async with asyncio.timeout(60):
        with pytest.raises(BackendUnavailable):  # the only listener takes no client without TLS and SASL
            async with KafkaBus(bootstrap, prefix=prefix):
                pass
    await kafka_principals.grant(broker, prefix)
    keys = tmp_path / "keys"
    for name in ("reactor", "ci"):
        generate_key(name, keys)
    identities = [
        {"name": "reactor", "public_key": "reactor.pub", "reactor": True},
        {"name": "ci", "public_key": "ci.pub"},
    ]
    (keys / "trust.yaml").write_text(yaml.safe_dump(identities))
    passwords = kafka_secure.passwords(broker)
    worker = Settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        grace_s=2.0,
        signing_key=keys / "reactor.key",
        trust_file=keys / "trust.yaml",
        require_signed=True,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_ssl_cafile=Path(broker.env["REACTOR_KAFKA_SSL_CAFILE"]),
        kafka_sasl_username=kafka_secure.WORKER,
        kafka_sasl_password=SecretStr(passwords[kafka_secure.WORKER]),
    )
    ci = worker.model_copy(
        update={
            "signing_key": keys / "ci.key",
            "kafka_sasl_username": kafka_secure.CI,
            "kafka_sasl_password": SecretStr(passwords[kafka_secure.CI]),
        }
    )
    operator_env = {  # the admin: `reactor replay` reads `dlq`, which no other principal may (an operator's job)
        **broker.env,
        "REACTOR_KAFKA_SASL_USERNAME": kafka_secure.ADMIN,
        "REACTOR_KAFKA_SASL_PASSWORD": passwords[kafka_secure.ADMIN],
        "REACTOR_TRUST_FILE": str(keys / "trust.yaml"),
        "REACTOR_REQUIRE_SIGNED": "true",
    }
    await _ci_cannot_write_commands(ci)
    return Transport(worker, ci, operator_env, broker)


@pytest.fixture
async def kafka(transport: Transport) -> AsyncIterator[KafkaBus]:
    """The workers' bus on topics no other test uses (the test publishes node commands on it too); over SASL_SSL,
    afterwards, every message must verify as signed by whom it should be."""
    bus = kafka_bus(transport.worker, load_signatures(transport.worker))
    bus.retry_delay_s = 0.05
    async with bus:
        if transport.broker is None:
            await bus.create_topics(partitions=4)
            yield bus
            return
        assert (bus.security.protocol, bus.security.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
        assert bus.security.username == kafka_secure.WORKER
        assert bus.signatures.required, "signatures are checked"
        assert bus.signatures.key is not None, "the workers sign"
        yield bus
        await _all_signed_by_whom_they_should_be(transport, bus)


async def _all_signed_by_whom_they_should_be(transport: Transport, bus: KafkaBus) -> None:
    """Commands and outcomes verify as the reactor's, releases as CI's (its requests) or the reactor's (the rest);
    no dead letter names a signature (read as the admin: no other principal may read `dlq`)."""
    assert transport.broker is not None
    trust = bus.signatures.trust
    assert trust is not None
    for topic in (Topic.COMMANDS, Topic.OUTCOMES, Topic.RELEASES):
        for record in await bus.history(topic):
            event = decode(record)[0]
            expected = "ci" if isinstance(event, ReleaseRequested) else "reactor"
            assert verify_record(record, trust).identity.name == expected, (topic, event)
    admin = kafka_principals.security(transport.broker, kafka_secure.ADMIN)
    async with KafkaBus(bus.bootstrap, prefix=bus.prefix, security=admin) as operator:
        reasons = [(record.header(DLQ_REASON) or b"").decode() for record in await operator.history(Topic.DLQ)]
    assert not [reason for reason in reasons if reason.startswith(("signature:", "policy:"))], reasons


@pytest.fixture
async def ci(transport: Transport, kafka: KafkaBus) -> AsyncIterator[KafkaBus]:
    """The bus releases are submitted on: over SASL_SSL the ci principal signing as the ci identity; in plaintext
    the workers' bus itself."""
    if transport.ci is transport.worker:
        yield kafka
        return
    async with kafka_bus(transport.ci, load_signatures(transport.ci)) as bus:
        yield bus


async def _ci_cannot_write_commands(ci: Settings) -> None:
    """The ACLs are in force on this prefix: CI's node command of its own is refused by the broker."""
    command = DeployRequested(node_key="fake/ci/app", service="app", version="6.6.6", package=PACKAGE)
    async with kafka_bus(ci, load_signatures(ci)) as intruder:
        with pytest.raises((AccessDenied, BackendUnavailable), match="TopicAuthorizationFailed"):
            await intruder.publish(command)


@pytest.fixture
def settings_under(transport: Transport) -> Callable[[Path], Settings]:
    """A worker's settings with its state and `local` nodes under a directory (and signing as the transport says)."""

    def under(directory: Path) -> Settings:
        return transport.worker.model_copy(update={"state_dir": directory / "state", "local_root": directory / "nodes"})

    return under


async def until(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Like tests.support.until, with the longer wait real backends need."""
    await poll_until(condition, what, timeout_s)


async def release_state(store: Store, release_id: str) -> ReleaseState | None:
    record = await store.get_release(release_id)
    return None if record is None else record.state


async def events(bus: KafkaBus, topic: Topic) -> list[Event]:
    return [decode(record)[0] for record in await bus.history(topic)]


async def rolled_back(bus: KafkaBus) -> list[str]:
    """The nodes with a NodeRolledBack on the outcomes topic so far."""
    return sorted(event.node_key for event in await events(bus, Topic.OUTCOMES) if isinstance(event, NodeRolledBack))


async def test_release_with_a_failing_node_halts_and_rolls_back_on_kafka_and_mongo(
    kafka: KafkaBus, ci: KafkaBus, mongo: MongoStore, tmp_path: Path, settings_under: Callable[[Path], Settings]
) -> None:
    """Canary then the rest; budget 1 of 6; two failures halt the release; the failed nodes are rolled back."""
    for index in range(6):
        running = pending_success(f"fake/host-{index:02d}/app")
        assert await mongo.put_node(running, expected_revision=0) is not None
    script = Script(behaviour={"fake/host-02/app": "fail", "fake/host-03/app": "fail"})
    release = plan(6, Strategy(batches=[1, "50%"], max_parallel=3, failure_budget=1))
    async with running_roles(kafka, mongo, settings_under(tmp_path), {Role.ALL}, {"fake": scripted(script)}):
        await ci.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: release_state(mongo, release.release_id), "the release is recorded")
        await until(lambda: equals(release_state(mongo, release.release_id), ReleaseState.HALTED), "the release halts")
        # Both rollbacks' outcomes, in whichever order they come (each node's commands have a partition of its own).
        await until(
            lambda: equals(rolled_back(kafka), ["fake/host-02/app", "fake/host-03/app"]),
            "both failed nodes are rolled back",
        )
    outcomes = await events(kafka, Topic.OUTCOMES)
    failed = sorted(event.node_key for event in outcomes if isinstance(event, NodeFailed))
    assert failed == ["fake/host-02/app", "fake/host-03/app"]
    rolled = sorted(event.node_key for event in outcomes if isinstance(event, NodeRolledBack))
    assert rolled == failed
    assert script.peak_in_flight <= 3
    counts = await mongo.count_release_nodes(release.release_id)
    assert counts[ItemState.QUEUED] == 2  # the third batch never started
    for key in failed:
        node = await mongo.get_node(key)
        assert node is not None
        assert (node.state, node.current_version) == (NodeState.ROLLED_BACK, "1.0.0")


async def test_worker_killed_mid_deploy_leaves_it_uncommitted_and_the_next_worker_finishes_it(
    kafka: KafkaBus, mongo: MongoStore, tmp_path: Path, settings_under: Callable[[Path], Settings]
) -> None:
    """Exactly-once effects: the interrupted deploy runs again on the next worker, finished ones do not."""
    script = Script(behaviour={"fake/host-01/app": "hang"}, release=asyncio.Event())
    requests = [
        DeployRequested(node_key=f"fake/host-{index:02d}/app", service="app", version="2.0.0", package=PACKAGE)
        for index in range(4)
    ]
    factories: dict[str, ExecutorFactory] = {"fake": scripted(script)}
    async with running_roles(kafka, mongo, settings_under(tmp_path), {Role.EXECUTOR}, factories):
        for request in requests:
            await kafka.publish(request)
        await until(lambda: sum(script.calls.values()) == 4, "every request reached the executor")
        await until(
            lambda: _count_state(mongo, NodeState.SUCCESS, 3), "the three other nodes are deployed and recorded"
        )
    # The first worker is gone (its grace period ran out on the hanging deploy). The next one gets it again.
    assert script.release is not None
    script.release.set()
    async with running_roles(kafka, mongo, settings_under(tmp_path), {Role.EXECUTOR}, factories):
        await until(lambda: _count_state(mongo, NodeState.SUCCESS, 4), "the interrupted deploy finishes")
    assert script.calls["deploy:fake/host-01/app"] == 2
    assert [script.calls[f"deploy:fake/host-{index:02d}/app"] for index in (0, 2, 3)] == [1, 1, 1]
    deployed = [event for event in await events(kafka, Topic.OUTCOMES) if isinstance(event, NodeDeployed)]
    assert sorted({event.node_key for event in deployed}) == [request.node_key for request in requests]


async def test_two_executors_in_one_group_share_the_work_and_deploy_each_node_once(
    kafka: KafkaBus, ci: KafkaBus, mongo: MongoStore, tmp_path: Path, settings_under: Callable[[Path], Settings]
) -> None:
    """Scale-out: two executor workers split the partitions; every node is deployed exactly once."""
    first, second = Script(delay_s=0.01), Script(delay_s=0.01)
    release = plan(24, Strategy(batches=["100%"], max_parallel=24))
    async with (
        running_roles(kafka, mongo, settings_under(tmp_path), {Role.EXECUTOR}, {"fake": scripted(first)}),
        running_roles(kafka, mongo, settings_under(tmp_path / "second"), {Role.EXECUTOR}, {"fake": scripted(second)}),
    ):
        # Let both members join before work arrives, so the group splits the partitions between them.
        await asyncio.sleep(3)
        async with running_roles(kafka, mongo, settings_under(tmp_path / "pacer"), {Role.PACER, Role.ROLLBACK}):
            await ci.publish(ReleaseRequested(release_id=release.release_id, plan=release))
            await until(
                lambda: equals(release_state(mongo, release.release_id), ReleaseState.COMPLETED),
                "the release completes",
            )
    calls = first.calls + second.calls
    assert sorted(calls) == sorted(f"deploy:{node.node_key}" for node in release.nodes)
    assert set(calls.values()) == {1}
    assert first.calls, "the first member of the group did some of the work"
    assert second.calls, "the second member of the group did some of the work"


async def test_a_release_larger_than_a_1_mib_message_starts_on_kafka_and_mongo(
    kafka: KafkaBus, ci: KafkaBus, mongo: MongoStore, tmp_path: Path, settings_under: Callable[[Path], Settings]
) -> None:
    """A request of 20,000 nodes (2.3 MB: over Kafka's default message size and the limit of the other topics) is
    taken by the releases topic, read by the pacer and planned whole; its first batch runs and it then waits for the
    approval after it (over SASL_SSL it is signed by CI and verified, the topic made by the admin)."""
    script = Script()
    release = plan(20_000, Strategy(batches=[2, "50%"], max_parallel=2, approval_after_batches=[1]))
    request = ReleaseRequested(release_id=release.release_id, plan=release)
    assert len(encode(request, "/ci").value) > 2 * 1024 * 1024
    async with running_roles(kafka, mongo, settings_under(tmp_path), {Role.ALL}, {"fake": scripted(script)}):
        await ci.publish(request)
        await until(
            lambda: equals(release_state(mongo, release.release_id), ReleaseState.AWAITING_APPROVAL),
            "the first batch is done and the release waits for its approval",
            timeout_s=180,
        )
    assert sorted(script.calls) == ["deploy:fake/host-00/app", "deploy:fake/host-01/app"]
    counts = await mongo.count_release_nodes(release.release_id)
    assert (counts[ItemState.SUCCEEDED], counts[ItemState.QUEUED]) == (2, 19_998)
    started = [event for event in await events(kafka, Topic.RELEASES) if isinstance(event, BatchStarted)]
    assert [(event.batch, event.node_keys) for event in started] == [(0, ["fake/host-00/app", "fake/host-01/app"])]


async def test_demo_scenario_with_real_processes_on_kafka_and_mongo(
    kafka: KafkaBus, ci: KafkaBus, mongo: MongoStore, tmp_path: Path, settings_under: Callable[[Path], Settings]
) -> None:
    """Two good releases then a bad canary, with the local executor: checked over HTTP, as in the demo."""
    dist = tmp_path / "dist"
    packages = {version: build_package(dist, version) for version in ("1.0.0", "1.1.0", "1.2.0")}
    ports = dict(zip(("node-1", "node-2", "node-3"), free_ports(3), strict=True))
    plans = [
        release_plan("hello-1.0.0", packages["1.0.0"], ports),
        release_plan("hello-1.1.0", packages["1.1.0"], ports),
        release_plan("hello-1.2.0-bad", packages["1.2.0"], ports, bad_node="node-1"),
    ]
    try:
        async with running_roles(kafka, mongo, settings_under(tmp_path), {Role.ALL}):
            for good, version in ((plans[0], "1.0.0"), (plans[1], "1.1.0")):
                await ci.publish(ReleaseRequested(release_id=good.release_id, plan=good))
                release_id = good.release_id
                await until(
                    lambda: equals(release_state(mongo, release_id), ReleaseState.COMPLETED),  # noqa: B023 (awaited here)
                    "completion",
                )
                assert {served_version(port) for port in ports.values()} == {version}
            bad = plans[2]
            await ci.publish(ReleaseRequested(release_id=bad.release_id, plan=bad))
            await until(lambda: equals(release_state(mongo, bad.release_id), ReleaseState.HALTED), "the halt")
            await until(lambda: _node_state(mongo, "local/node-1/hello", NodeState.ROLLED_BACK), "the rollback")
            assert {served_version(port) for port in ports.values()} == {"1.1.0"}
    finally:
        stop_all(tmp_path / "nodes")


async def test_replay_rebuild_matches_live_status_and_reports_a_tampered_node(
    kafka: KafkaBus,
    ci: KafkaBus,
    mongo: MongoStore,
    mongo_url: str,
    transport: Transport,
    tmp_path: Path,
    settings_under: Callable[[Path], Settings],
) -> None:
    """`reactor replay` prints the timeline; after every kind of outcome `--rebuild` finds no difference, then
    exactly the one made by hand. Over SASL_SSL the CLI runs as the admin principal: it reads `dlq`, which the
    ACLs give no other principal (an operator's job)."""
    script = Script(behaviour={"fake/host-01/app": "fail"})
    release = plan(3, Strategy(batches=["100%"], max_parallel=3, failure_budget=1, auto_rollback="none"))
    async with running_roles(kafka, mongo, settings_under(tmp_path), {Role.ALL}, {"fake": scripted(script)}):
        await ci.publish(ReleaseRequested(release_id=release.release_id, plan=release, actor="ci-pipeline"))
        await until(lambda: equals(release_state(mongo, release.release_id), ReleaseState.COMPLETED), "completion")
        await _every_other_outcome(kafka, script)
    told = await events(kafka, Topic.OUTCOMES)
    assert {type(event) for event in told} == {NodeDeployed, NodeFailed, NodeRolledBack, RollbackFailed}
    refusals = [event for event in told if isinstance(event, RollbackFailed) and event.target_version is None]
    assert len(refusals) == 3
    env = {
        **os.environ,
        **transport.operator_env,
        "REACTOR_MODE": "distributed",
        "REACTOR_TOPIC_PREFIX": kafka.prefix,
        "REACTOR_MONGO_URL": mongo_url,
        "REACTOR_MONGO_DATABASE": mongo.database,
        "REACTOR_STATE_DIR": str(tmp_path / "cli"),
    }

    def replay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reactor.cli.main", "replay", *args],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip

    timeline = replay("--release", release.release_id)
    assert timeline.returncode == 0, timeline.stderr
    assert "ci-pipeline" in timeline.stdout
    assert "fake/host-01/app" in timeline.stdout
    assert "failed" in timeline.stdout

    clean = replay("--rebuild")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "live node status matches the log" in clean.stdout
    assert await mongo.get_node("fake/host-09/app") is None  # a refused rollback writes no record
    assert "rollback refused: no previous version to roll back to (runs nothing)" in clean.stdout

    node = await mongo.get_node("fake/host-02/app")
    assert node is not None
    assert await mongo.put_node(node.model_copy(update={"current_version": "6.6.6"}), expected_revision=node.revision)
    tampered = replay("--rebuild")
    assert tampered.returncode == 1
    differences = [line for line in tampered.stdout.splitlines() if line.startswith("DIFFERENCE")]
    assert differences == ["DIFFERENCE fake/host-02/app current_version: live '6.6.6', rebuilt from the log '2.0.0'"]


async def _every_other_outcome(bus: KafkaBus, script: Script) -> None:
    """After the release (host-00 and host-02 deployed, host-01 failed): rolled back by hand and automatically,
    failed at min_healthy and by a crash, a rollback that ran and failed, and three refused rollbacks."""

    def fake(index: int) -> str:
        return f"fake/host-{index:02d}/app"

    def deploy(node_key: str, version: str, **extra: object) -> DeployRequested:
        request = DeployRequested(node_key=node_key, service="app", version=version, package=PACKAGE)
        return request.model_copy(update=extra)

    async def answered(request: DeployRequested | RollbackRequested, caused_by: str | None = None) -> None:
        """Publish `request`; wait for the outcome of the command `caused_by` names (itself by default)."""
        await bus.publish(request)
        command = caused_by or request.event_id
        await until(
            lambda: _has_outcome(bus, command),
            f"the outcome of {type(request).__name__} on {request.node_key}",
        )

    await answered(deploy(fake(0), "2.1.0"))
    await answered(RollbackRequested(node_key=fake(0), service="app"))  # rolled back by hand, to 2.0.0
    for index in (1, 2, 9):  # refused: the first deploy failed, 2.0.0 is all it ran, never deployed
        await answered(RollbackRequested(node_key=fake(index), service="app"))
    # Ran and failed: the local executor has no 0.9.0 on the node.
    await answered(RollbackRequested(node_key="local/host-05/app", service="app", to_version="0.9.0"))
    await answered(deploy(fake(4), "1.0.0"))
    script.probes[fake(4)] = ["unhealthy"]
    await answered(deploy(fake(4), "2.0.0", min_healthy_s=0.3, auto_rollback=AutoRollback.NONE))
    script.behaviour[fake(6)] = "crash"
    await answered(deploy(fake(6), "1.0.0", auto_rollback=AutoRollback.NONE))
    await answered(deploy(fake(7), "1.0.0"))
    script.behaviour[fake(7)] = "fail"
    failing = deploy(fake(7), "2.0.0")  # failed, then rolled back by the rollback consumer
    await answered(failing, caused_by=derived_event_id(failing.event_id, "rollback"))


async def _has_outcome(bus: KafkaBus, command_id: str) -> bool:
    return any(event.causation_id == command_id for event in await events(bus, Topic.OUTCOMES))


async def test_health_endpoint_is_ready_only_when_bus_and_store_answer(
    kafka: KafkaBus, mongo: MongoStore, tmp_path: Path
) -> None:
    """/healthz is 200 with live backends and 503 naming the store when it cannot be reached; /metrics counts."""
    counting = CountingBus(kafka)
    async with HealthServer(0, {"bus": kafka.ping, "store": mongo.ping}, host="127.0.0.1") as server:
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/healthz")
        assert (status, body.strip()) == (200, "ok")
        await counting.publish(
            DeployRequested(node_key="fake/h/app", service="app", version=f"9.{uuid4().int % 1000}", package=PACKAGE)
        )
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
        assert 'reactor_events_produced_total{type="dev.deployreactor.node.deploy.requested.v1"}' in body
    # A store that was reachable and then went away: its own FerretDB, stopped under it.
    server_of_its_own = testenv.start_ferretdb(tmp_path / "ferretdb")
    try:
        async with (
            collecting_the_sockets_pymongo_leaks(),
            MongoStore(server_of_its_own.env["REACTOR_MONGO_URL"], timeout_s=1.0) as doomed,
        ):
            server_of_its_own.stop()
            async with HealthServer(0, {"bus": kafka.ping, "store": doomed.ping}, host="127.0.0.1") as server:
                status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/healthz")
    finally:
        server_of_its_own.stop()
    assert status == 503
    assert body.startswith("store: ")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (loopback test endpoint)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def pending_success(node_key: str) -> NodeStatus:
    return pending(node_key, "app").model_copy(update={"state": NodeState.SUCCESS, "current_version": "1.0.0"})


async def _count_state(store: Store, state: NodeState, count: int) -> bool:
    return sum(node.state == state for node in await store.list_nodes()) == count


async def _node_state(store: Store, node_key: str, state: NodeState) -> bool:
    node = await store.get_node(node_key)
    return node is not None and node.state == state
