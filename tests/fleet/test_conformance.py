"""The host contract, checked on real systemd hosts for both physical drivers (ssh and ansible).

Every test runs once per driver against the same nspawn hosts. Starting states are put on a host with the
ssh driver, so each test also shows that a host one driver set up is carried on by the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState
from reactor.events import (
    BatchStarted,
    HealthCheck,
    NodeFailed,
    NodeTarget,
    Package,
    ReleasePlan,
    ReleaseRequested,
    RollbackRequested,
    Strategy,
    Topic,
)
from reactor.executors.ansible import run_playbook
from reactor.executors.hostcontract import HostAddress, physical_executor, state_text, unit_text
from reactor.ports import Store
from reactor.runtime import Backends, Role, run_roles
from reactor.settings import Settings
from tests.fleet.conftest import DRIVERS, Artifact, Node, settings_for
from tests.infra.fleet import Fleet

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(600)]

# A file on a test host that a successful injection would create.
PWNED = "/tmp/pwned"  # noqa: S108 (a path on the test host, never written by the test)
# A cut cable must turn into a failed deploy within this long (keepalives notice it after ~6 s).
UNREACHABLE_DEADLINE_S = 45.0


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The physical driver under test."""
    return str(request.param)


@pytest.fixture
def node(fleet: Fleet, service: tuple[str, int], driver: str, request: pytest.FixtureRequest) -> Node:
    """A fresh node of the test's own service, on a host picked by the test's position."""
    host = fleet.hosts[len(request.node.nodeid) % (len(fleet.hosts) - 1)].name  # the last host is for cutting
    return Node(fleet, host, service[0], service[1], driver)


# --- deploy ---------------------------------------------------------------------------------------------


async def test_first_deploy_starts_the_release_enables_it_and_records_it(
    node: Node, artifacts: dict[str, Artifact]
) -> None:
    """The release is unpacked, its template instance runs and is enabled, `current` and the state file follow."""
    status = await node.deploy(artifacts["1.0.0"])

    assert (status.state, status.current_version, status.prev_version) == (NodeState.SUCCESS, "1.0.0", None)
    assert status.last_error == ""
    assert node.served() == "1.0.0"
    assert node.unit_property("1.0.0", "ActiveState") == "active"
    assert node.enabled("1.0.0")
    assert node.current_link() == "releases/1.0.0"
    assert node.path(node.layout.state_file).read_text() == state_text(["1.0.0"])
    assert node.path(node.layout.unit_file).read_text() == unit_text(node.service)
    assert node.path(node.layout.marker("1.0.0")).read_text().strip() == artifacts["1.0.0"].sha256
    assert node.path(node.layout.env_file).read_text() == f"PORT={node.port}\n"


async def test_upgrade_replaces_the_release_and_stops_and_disables_the_old_one(
    node: Node, artifacts: dict[str, Artifact]
) -> None:
    """After an upgrade only the new instance runs and is enabled; the old release stays on disk for rollback."""
    await node.arrange(artifacts["1.0.0"])

    status = await node.deploy(artifacts["1.1.0"])

    assert (status.state, status.current_version, status.prev_version) == (NodeState.SUCCESS, "1.1.0", "1.0.0")
    assert node.served() == "1.1.0"
    assert node.unit_property("1.0.0", "ActiveState") == "inactive"
    assert (node.enabled("1.0.0"), node.enabled("1.1.0")) == (False, True)
    assert node.current_link() == "releases/1.1.0"
    assert node.path(node.layout.state_file).read_text() == state_text(["1.0.0", "1.1.0"])
    assert node.path(node.layout.marker("1.0.0")).exists()


async def test_redeploy_of_the_serving_version_restarts_nothing(node: Node, artifacts: dict[str, Artifact]) -> None:
    """Deploying what already runs and answers is a no-op: same process, same files, success."""
    await node.arrange(artifacts["1.0.0"])
    pid = node.unit_property("1.0.0", "MainPID")
    before = node.snapshot()

    status = await node.deploy(artifacts["1.0.0"])

    assert (status.state, status.current_version) == (NodeState.SUCCESS, "1.0.0")
    assert node.unit_property("1.0.0", "MainPID") == pid
    assert node.snapshot() == before


async def test_sha256_mismatch_fails_at_verify_and_leaves_the_host_untouched(
    node: Node, artifacts: dict[str, Artifact]
) -> None:
    """A wrong checksum fails before any change: nothing unpacked, same unit, same process, old version serving."""
    await node.arrange(artifacts["1.0.0"])
    before = node.snapshot()

    status = await node.deploy(artifacts["1.1.0"], sha256="f" * 64)

    assert status.state == NodeState.FAILED
    assert status.last_error.startswith("verify: sha256 mismatch: expected " + "f" * 64)
    assert (status.current_version, status.deploying_version) == ("1.0.0", "1.1.0")
    assert node.snapshot() == before
    assert not node.path(node.layout.release("1.1.0")).exists()
    assert node.served() == "1.0.0"


async def test_release_that_does_not_start_fails_and_the_previous_one_serves_again(
    node: Node, artifacts: dict[str, Artifact]
) -> None:
    """A release whose process exits fails at start; the previous release is restarted, enabled and current."""
    await node.arrange(artifacts["1.0.0"])

    status = await node.deploy(artifacts["broken"])

    assert status.state == NodeState.FAILED
    assert status.last_error.startswith(f"start: {node.layout.unit('2.0.0')} exited with status 3")
    assert status.last_error.endswith("; 1.0.0 restored and serving")
    assert (status.current_version, status.deploying_version) == ("1.0.0", "2.0.0")
    assert node.served() == "1.0.0"
    assert node.unit_property("2.0.0", "ActiveState") in ("inactive", "failed")
    assert (node.enabled("1.0.0"), node.enabled("2.0.0")) == (True, False)
    assert node.current_link() == "releases/1.0.0"
    assert node.path(node.layout.state_file).read_text() == state_text(["1.0.0"])


@pytest.fixture
def cut_node(fleet: Fleet, service: tuple[str, int], driver: str) -> Iterator[Node]:
    """A node on the fleet's last host, whose cable is plugged back in after the test whatever happened."""
    host = fleet.hosts[-1].name
    try:
        yield Node(fleet, host, service[0], service[1], driver)
    finally:
        fleet.heal(host)


async def test_host_cut_off_mid_deploy_fails_within_the_deadline_and_recovers_after(
    cut_node: Node, fleet: Fleet, artifacts: dict[str, Artifact]
) -> None:
    """The cable is pulled while the new release starts: the deploy fails in time, and a redeploy repairs the host."""
    node = cut_node
    await node.arrange(artifacts["1.0.0"])
    node.health = HealthCheck(timeout_s=120)  # the slow release would pass only after 60 s: the cut comes first
    deploy = asyncio.create_task(node.deploy(artifacts["slow"]))
    unpacked = node.path(node.layout.marker("1.5.0"))
    async with asyncio.timeout(120):
        while not unpacked.exists():
            assert not deploy.done(), deploy.result().last_error
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # stop and start are under way
    fleet.cut(node.host)
    cut_at = time.monotonic()

    async with asyncio.timeout(UNREACHABLE_DEADLINE_S + 30):
        status = await deploy
    elapsed = time.monotonic() - cut_at

    assert status.state == NodeState.FAILED
    assert elapsed < UNREACHABLE_DEADLINE_S, f"took {elapsed:.0f}s: {status.last_error}"
    assert "unreachable" in status.last_error or "no answer" in status.last_error, status.last_error
    assert status.current_version == "1.0.0"

    fleet.heal(node.host)
    repaired = await node.deploy(artifacts["1.0.0"])
    assert (repaired.state, repaired.current_version) == (NodeState.SUCCESS, "1.0.0"), repaired.last_error
    assert node.served() == "1.0.0"
    assert node.unit_property("1.5.0", "ActiveState") == "inactive"


# --- rollback and status -------------------------------------------------------------------------------


async def test_rollback_runs_the_previous_release_from_the_host_without_downloading(
    node: Node, artifacts: dict[str, Artifact]
) -> None:
    """Rollback after an upgrade starts the unpacked previous release again (its archive is gone)."""
    await node.arrange(artifacts["1.0.0"], artifacts["1.1.0"])
    node.sh(f"rm -rf {node.layout.downloads}")

    status = await node.rollback("1.0.0")

    assert (status.state, status.current_version, status.prev_version) == (NodeState.ROLLED_BACK, "1.0.0", None)
    assert node.served() == "1.0.0"
    assert (node.enabled("1.0.0"), node.enabled("1.1.0")) == (True, False)
    assert node.current_link() == "releases/1.0.0"
    assert node.path(node.layout.state_file).read_text() == state_text(["1.0.0"])


async def test_rollback_to_a_release_not_on_the_host_fails_and_changes_nothing(
    node: Node, artifacts: dict[str, Artifact]
) -> None:
    """A rollback target that was never unpacked there fails clearly; the running release keeps serving."""
    await node.arrange(artifacts["1.0.0"])
    before = node.snapshot()

    status = await node.rollback("0.9.0")

    assert status.state == NodeState.FAILED
    assert status.last_error == "rollback: release 0.9.0 is not on the host"
    assert node.snapshot() == before
    assert node.served() == "1.0.0"


async def test_status_reports_drift_after_someone_changes_the_host_by_hand(
    node: Node, artifacts: dict[str, Artifact]
) -> None:
    """Status probes the host: in step with the record it succeeds; an old release started by hand is drift."""
    await node.arrange(artifacts["1.0.0"], artifacts["1.1.0"])
    healthy = await node.probe()
    assert (healthy.state, healthy.current_version, healthy.last_error) == (NodeState.SUCCESS, "1.1.0", "")

    node.sh(f"systemctl stop {node.layout.unit('1.1.0')} && systemctl start {node.layout.unit('1.0.0')}")
    drifted = await node.probe()

    assert drifted.state == NodeState.FAILED
    assert drifted.last_error == f"drift: 1.1.0 should run but {node.layout.unit('1.0.0')} does"
    assert drifted.current_version == "1.0.0"


async def test_a_port_held_by_another_program_is_no_proof_of_health(node: Node, artifacts: dict[str, Artifact]) -> None:
    """Another program answers 200 on the node's port (its own unit, not the release's): status is not success,
    and a deploy whose release never listens fails instead of passing on the stranger's answer."""
    await node.arrange(artifacts["1.0.0"])
    stranger = f"stranger-{node.service}"
    node.sh(f"systemctl stop {node.layout.unit('1.0.0')}")
    # It answers 200 on every path the checks use: /VERSION from the release's files, the health path from its own.
    node.sh(f"mkdir -p /tmp/{stranger} && cp /opt/{node.service}/releases/1.0.0/VERSION /tmp/{stranger}/")
    node.sh(f"touch /tmp/{stranger}{node.health.path}")
    node.sh(
        f"systemd-run --unit {stranger} --property=WorkingDirectory=/tmp/{stranger} "
        f"python3 -m http.server {node.port} --bind 127.0.0.1"
    )
    try:
        assert node.sh(f"curl -fsS -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{node.port}/VERSION") == "200"
        seen = await node.probe()
        assert seen.state == NodeState.FAILED, seen.last_error
        # `slow` stays up without listening for 60 s: only the stranger answers while the health check waits.
        failed = await node.deploy(artifacts["slow"])
        assert failed.state == NodeState.FAILED
        if node.driver == "ssh":  # the playbooks report a failed check task by its exit status alone
            assert f"not by {node.layout.unit('1.5.0')}" in failed.last_error, failed.last_error
        assert node.unit_property("1.5.0", "ActiveState") != "active"
    finally:
        node.sh(f"systemctl stop {stranger}", check=False)


async def test_deployed_release_comes_back_after_the_host_reboots(
    node: Node, fleet: Fleet, artifacts: dict[str, Artifact]
) -> None:
    """The active instance is enabled: after a power-off and boot (disk kept) it serves again, status is clean."""
    await node.deploy(artifacts["1.0.0"])
    fleet.power_off(node.host)
    fleet.boot(node.host)

    status = await node.probe()

    assert (status.state, status.current_version, status.last_error) == (NodeState.SUCCESS, "1.0.0", "")
    assert node.served() == "1.0.0"


# --- what must never reach a host ----------------------------------------------------------------------

HOSTILE: dict[str, dict[str, Any]] = {
    "service": {"service": "hello;touch /tmp/pwned"},
    "version": {"target_version": "1.0.0$(touch /tmp/pwned)"},
    "host": {"host": "h1;touch /tmp/pwned"},
    "package url": {"package": Package.model_construct(url="http://10.0.0.1/x.tgz;touch /tmp/pwned", sha256="a" * 64)},
    "package sha256": {"package": Package.model_construct(url="http://10.0.0.1/x.tgz", sha256="$(touch /tmp/pwned)")},
    "health path": {"health": HealthCheck.model_construct(kind="http", path="/x' -o /tmp/pwned '", timeout_s=5.0)},
}


@pytest.mark.parametrize("field", sorted(HOSTILE))
async def test_hostile_field_values_are_rejected_before_reaching_the_host(
    node: Node, artifacts: dict[str, Artifact], field: str
) -> None:
    """A value outside the contract's patterns fails at prepare and the host sees nothing of it."""
    context = dataclasses.replace(node.context("1.0.0", artifacts["1.0.0"].package()), **HOSTILE[field])

    status = await physical_executor(context).deploy()

    assert status.state == NodeState.FAILED
    assert status.last_error.startswith("prepare: "), status.last_error
    assert "is not allowed" in status.last_error, status.last_error
    assert not node.path(PWNED).exists()
    assert not node.path(node.layout.base).exists()


async def test_playbooks_reject_hostile_variables_on_their_own(fleet: Fleet, service: tuple[str, int]) -> None:
    """Run without the reactor in front, deploy.yml still refuses a value outside the patterns, before any change."""
    host = fleet.hosts[0]
    node = Node(fleet, host.name, service[0], service[1], "ansible")
    extravars = {
        "service": node.service,
        "version": "1.0.0;touch /tmp/pwned",
        "package_url": "http://10.0.0.1/x.tgz",
        "package_sha256": "a" * 64,
    }

    results = await run_playbook(
        "deploy", extravars, [HostAddress(host.name, host.address, 22, "root")], settings_for(fleet, "ansible")
    )

    result = results[host.name]
    assert result.report is None
    task, message = result.failures[0]
    assert task == "prepare: check the request"
    assert message.startswith('version "1.0.0;touch /tmp/pwned" is not allowed'), message
    assert not node.path(PWNED).exists()
    assert not node.path(node.layout.base).exists()


async def test_host_with_an_unknown_host_key_is_refused(
    node: Node, artifacts: dict[str, Artifact], tmp_path: Path
) -> None:
    """Host keys are checked: with a known_hosts that lacks the host, the deploy fails at connect, host untouched."""
    stranger = tmp_path / "known_hosts"
    stranger.write_text("")
    context = node.context("1.0.0", artifacts["1.0.0"].package(), physical_known_hosts=stranger)

    status = await physical_executor(context).deploy()

    assert status.state == NodeState.FAILED
    assert status.last_error.startswith("connect: "), status.last_error
    assert not node.path(node.layout.base).exists()


# --- releases through the reactor (embedded mode) -----------------------------------------------------


@contextlib.asynccontextmanager
async def embedded_reactor(store: Store, settings: Settings) -> AsyncIterator[MemoryBus]:
    """Pacer, executor worker and rollback consumer in this process, on the in-memory bus."""
    bus = MemoryBus(retry_delay_s=0.05)
    started = asyncio.Event()
    task = asyncio.create_task(
        run_roles(Backends(bus=bus, store=store, memory_bus=bus), settings, {Role.ALL}, started=started)
    )
    await started.wait()
    try:
        yield bus
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def reactor_settings(fleet: Fleet, driver: str, state_dir: Path) -> Settings:
    return Settings(
        state_dir=state_dir,
        physical_driver=driver,
        physical_inventory=fleet.inventory,
        physical_known_hosts=fleet.known_hosts,
        physical_private_key=fleet.private_key,
        physical_connect_timeout_s=5.0,
        physical_command_timeout_s=60.0,
        resend_after_s=900.0,  # ansible on a busy machine can take longer than the default minute per node
    )


def release_plan(
    fleet: Fleet, service: tuple[str, int], release_id: str, artifact: Artifact, strategy: Strategy
) -> ReleasePlan:
    name, port = service
    return ReleasePlan(
        release_id=release_id,
        service=name,
        version=artifact.version,
        package=artifact.package(),
        health=HealthCheck(timeout_s=10),
        nodes=[NodeTarget(node_key=f"physical/{host.name}/{name}", port=port) for host in fleet.hosts],
        strategy=strategy,
    )


async def test_release_to_six_hosts_in_three_batches_succeeds(
    fleet: Fleet, service: tuple[str, int], driver: str, artifacts: dict[str, Artifact], tmp_path: Path
) -> None:
    """ReleaseRequested for 6 hosts in batches of 2: three batches in order, every host serves the version."""
    plan = release_plan(fleet, service, f"ok-{driver}", artifacts["1.0.0"], Strategy(batches=[2], max_parallel=2))
    async with EmbeddedStore(":memory:") as store:
        async with embedded_reactor(store, reactor_settings(fleet, driver, tmp_path)) as bus:
            await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
            await bus.idle(timeout_s=540)
        record = await store.get_release(plan.release_id)
        nodes = await store.list_nodes(release_id=plan.release_id)

    assert record is not None
    assert (record.state, record.batch_sizes) == (ReleaseState.COMPLETED, [2, 2, 2]), record.reason
    batches = [event for event in bus.events(Topic.RELEASES) if isinstance(event, BatchStarted)]
    assert [sorted(b.node_keys) for b in batches] == [
        sorted(n.node_key for n in plan.nodes[i : i + 2]) for i in (0, 2, 4)
    ]
    assert {(n.state, n.current_version) for n in nodes} == {(NodeState.SUCCESS, "1.0.0")}
    for host in fleet.hosts:
        probe = Node(fleet, host.name, service[0], service[1], driver)
        assert probe.served() == "1.0.0", host.name


async def test_broken_release_fails_on_the_first_batch_and_leaves_it_serving_the_previous_version(
    fleet: Fleet, service: tuple[str, int], driver: str, artifacts: dict[str, Artifact], tmp_path: Path
) -> None:
    """A package that does not start fails on the canary; the release halts; every host still serves 1.0.0."""
    nodes = [Node(fleet, host.name, service[0], service[1], driver) for host in fleet.hosts]
    await asyncio.gather(*(node.arrange(artifacts["1.0.0"]) for node in nodes))
    plan = release_plan(
        fleet, service, f"broken-{driver}", artifacts["broken"], Strategy(batches=[1, 5], max_parallel=2)
    )
    async with EmbeddedStore(":memory:") as store:
        for node in nodes:  # the reactor knows what the hosts run
            assert await store.put_node(node.status, expected_revision=0) is not None
        async with embedded_reactor(store, reactor_settings(fleet, driver, tmp_path)) as bus:
            await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
            await bus.idle(timeout_s=540)
        record = await store.get_release(plan.release_id)
        counts = await store.count_release_nodes(plan.release_id)
        canary = await store.get_node(plan.nodes[0].node_key)

    assert record is not None
    assert record.state == ReleaseState.HALTED
    assert (counts[ItemState.FAILED], counts[ItemState.QUEUED]) == (1, 5)
    failures = [event for event in bus.events(Topic.OUTCOMES) if isinstance(event, NodeFailed)]
    assert [(f.node_key, f.step, f.current_version) for f in failures] == [(plan.nodes[0].node_key, "start", "1.0.0")]
    rollbacks = [event for event in bus.events(Topic.COMMANDS) if isinstance(event, RollbackRequested)]
    assert [event.node_key for event in rollbacks] == [plan.nodes[0].node_key]
    assert canary is not None
    assert canary.current_version == "1.0.0"
    assert [node.served() for node in nodes] == ["1.0.0"] * len(nodes)
    assert not any(node.path(node.layout.release("2.0.0")).exists() for node in nodes[1:])
