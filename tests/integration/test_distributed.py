"""The reactor on a real Kafka broker and a real MongoDB-protocol server (FerretDB): releases, redelivery after a
killed worker, scale-out in one consumer group, the demo with real processes, replay, health and metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from uuid import uuid4

import pytest

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import decode
from reactor.demo import build_package
from reactor.demo.scenario import free_ports, release_plan, served_version
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState, NodeStatus, pending
from reactor.events import (
    AutoRollback,
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
from reactor.runtime import Role
from reactor.settings import Settings
from tests.conftest import fresh_kafka_bus
from tests.fakes import Script, scripted
from tests.infra import testenv
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


@pytest.fixture
async def kafka(kafka_bootstrap: str) -> AsyncIterator[KafkaBus]:
    async with fresh_kafka_bus(kafka_bootstrap, retry_delay_s=0.05, grace_s=2.0) as bus:
        yield bus


def settings_under(directory: Path) -> Settings:
    """A worker's settings with its state and `local` nodes under `directory`."""
    return Settings(state_dir=directory / "state", local_root=directory / "nodes")


async def until(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Like tests.support.until, with the longer wait real backends need."""
    await poll_until(condition, what, timeout_s)


async def release_state(store: Store, release_id: str) -> ReleaseState | None:
    record = await store.get_release(release_id)
    return None if record is None else record.state


async def events(bus: KafkaBus, topic: Topic) -> list[Event]:
    return [decode(record)[0] for record in await bus.history(topic)]


async def test_release_with_a_failing_node_halts_and_rolls_back_on_kafka_and_mongo(
    kafka: KafkaBus, mongo: MongoStore, tmp_path: Path
) -> None:
    """Canary then the rest; budget 1 of 6; two failures halt the release; the failed nodes are rolled back."""
    for index in range(6):
        running = pending_success(f"fake/host-{index:02d}/app")
        assert await mongo.put_node(running, expected_revision=0) is not None
    script = Script(behaviour={"fake/host-02/app": "fail", "fake/host-03/app": "fail"})
    release = plan(6, Strategy(batches=[1, "50%"], max_parallel=3, failure_budget=1))
    async with running_roles(kafka, mongo, settings_under(tmp_path), {Role.ALL}, {"fake": scripted(script)}):
        await kafka.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: release_state(mongo, release.release_id), "the release is recorded")
        await until(lambda: equals(release_state(mongo, release.release_id), ReleaseState.HALTED), "the release halts")
        await until(lambda: script.calls["rollback:fake/host-03/app"] == 1, "the second failed node is rolled back")
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
    kafka: KafkaBus, mongo: MongoStore, tmp_path: Path
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
    kafka: KafkaBus, mongo: MongoStore, tmp_path: Path
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
            await kafka.publish(ReleaseRequested(release_id=release.release_id, plan=release))
            await until(
                lambda: equals(release_state(mongo, release.release_id), ReleaseState.COMPLETED),
                "the release completes",
            )
    calls = first.calls + second.calls
    assert sorted(calls) == sorted(f"deploy:{node.node_key}" for node in release.nodes)
    assert set(calls.values()) == {1}
    assert first.calls, "the first member of the group did some of the work"
    assert second.calls, "the second member of the group did some of the work"


async def test_demo_scenario_with_real_processes_on_kafka_and_mongo(
    kafka: KafkaBus, mongo: MongoStore, tmp_path: Path
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
                await kafka.publish(ReleaseRequested(release_id=good.release_id, plan=good))
                release_id = good.release_id
                await until(
                    lambda: equals(release_state(mongo, release_id), ReleaseState.COMPLETED),  # noqa: B023 (awaited here)
                    "completion",
                )
                assert {served_version(port) for port in ports.values()} == {version}
            bad = plans[2]
            await kafka.publish(ReleaseRequested(release_id=bad.release_id, plan=bad))
            await until(lambda: equals(release_state(mongo, bad.release_id), ReleaseState.HALTED), "the halt")
            await until(lambda: _node_state(mongo, "local/node-1/hello", NodeState.ROLLED_BACK), "the rollback")
            assert {served_version(port) for port in ports.values()} == {"1.1.0"}
    finally:
        stop_all(tmp_path / "nodes")


async def test_replay_rebuild_matches_live_status_and_reports_a_tampered_node(
    kafka: KafkaBus, mongo: MongoStore, mongo_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """`reactor replay` prints the timeline; after every kind of outcome `--rebuild` finds no difference, then
    exactly the one made by hand."""
    script = Script(behaviour={"fake/host-01/app": "fail"})
    release = plan(3, Strategy(batches=["100%"], max_parallel=3, failure_budget=1, auto_rollback="none"))
    async with running_roles(kafka, mongo, settings_under(tmp_path), {Role.ALL}, {"fake": scripted(script)}):
        await kafka.publish(ReleaseRequested(release_id=release.release_id, plan=release, actor="ci-pipeline"))
        await until(lambda: equals(release_state(mongo, release.release_id), ReleaseState.COMPLETED), "completion")
        await _every_other_outcome(kafka, script)
    told = await events(kafka, Topic.OUTCOMES)
    assert {type(event) for event in told} == {NodeDeployed, NodeFailed, NodeRolledBack, RollbackFailed}
    refusals = [event for event in told if isinstance(event, RollbackFailed) and event.target_version is None]
    assert len(refusals) == 3
    env = {
        **os.environ,
        "REACTOR_MODE": "distributed",
        # Tests publish through fixture buses that sign nothing (signed commands: test_signed_commands.py).
        "REACTOR_REQUIRE_SIGNED": "false",
        "REACTOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
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
