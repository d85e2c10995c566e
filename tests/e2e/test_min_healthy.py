"""min_healthy end to end: the embedded reactor deploys real packages with the `local` executor and watches the
real service through its window; a service killed meanwhile fails the node and is rolled back, checked over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reactor.demo import BuiltPackage, build_package
from reactor.demo.scenario import free_ports, release_plan, served_version
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState
from reactor.events import Event, NodeDeployed, NodeFailed, NodeRolledBack, ReleasePlan, ReleaseRequested, Topic
from reactor.executors.local import stop_all
from reactor.session import Session, embedded
from reactor.settings import Settings
from tests.support import until

pytestmark = pytest.mark.e2e

NODE = "local/node-1/hello"
WINDOW_S = 1.5


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """An embedded reactor's settings; every service started under its nodes root is stopped after the test."""
    configured = Settings(state_dir=tmp_path / "state", local_root=tmp_path / "nodes")
    yield configured
    stop_all(configured.nodes_root)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltPackage]:
    dist = tmp_path_factory.mktemp("dist")
    return {version: build_package(dist, version) for version in ("1.0.0", "1.1.0")}


def plan(release_id: str, package: BuiltPackage, port: int, min_healthy_s: float = 0.0) -> ReleasePlan:
    """One node, failure budget 0, per-node rollback (the demo's plan), with a min_healthy window."""
    base = release_plan(release_id, package, {"node-1": port})
    return base.model_copy(update={"strategy": base.strategy.model_copy(update={"min_healthy_s": min_healthy_s})})


def running_pid(settings: Settings) -> tuple[int, str] | None:
    """The pid and version the local executor recorded for the node's service, if any."""
    try:
        pid, version = (settings.nodes_root / "node-1" / "hello" / "run" / "pid").read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid), version


async def deployed_v2(session: Session) -> bool:
    """The worker recorded the node deployed at 1.1.0: the deploy passed and the window began."""
    status = await session.backends.store.get_node(NODE)
    return status is not None and (status.state, status.current_version) == (NodeState.SUCCESS, "1.1.0")


def outcomes_of(session: Session, release_id: str) -> list[Event]:
    return [event for event in session.bus.events(Topic.OUTCOMES) if event.release_id == release_id]


async def deploy_first_version(session: Session, package: BuiltPackage, port: int) -> None:
    await session.submit(ReleaseRequested(release_id="hello-1.0.0", plan=plan("hello-1.0.0", package, port)))
    assert await session.release_state("hello-1.0.0") == ReleaseState.COMPLETED
    assert await asyncio.to_thread(served_version, port) == "1.0.0"


async def test_service_that_stays_up_is_deployed_only_after_the_window(
    settings: Settings, packages: dict[str, BuiltPackage]
) -> None:
    """v2 keeps serving: NodeDeployed comes no sooner than min_healthy after v2 started serving."""
    port = free_ports(1)[0]
    async with embedded(settings) as session:
        await deploy_first_version(session, packages["1.0.0"], port)
        release = plan("hello-1.1.0", packages["1.1.0"], port, min_healthy_s=WINDOW_S)
        submitted = asyncio.create_task(session.submit(ReleaseRequested(release_id=release.release_id, plan=release)))
        await until(lambda: deployed_v2(session), "v2 is deployed")
        window_began = time.monotonic()
        assert served_version(port) == "1.1.0"
        assert outcomes_of(session, release.release_id) == []  # within the window: not done yet
        await submitted
        done_after = time.monotonic() - window_began

        assert await session.release_state(release.release_id) == ReleaseState.COMPLETED
        [outcome] = outcomes_of(session, release.release_id)
        assert isinstance(outcome, NodeDeployed)
        assert (outcome.version, outcome.prev_version) == ("1.1.0", "1.0.0")
        assert outcome.duration_s >= WINDOW_S
        assert done_after >= WINDOW_S - 0.1  # the store is polled, so the window began a little earlier
        assert served_version(port) == "1.1.0"


async def test_service_killed_within_the_window_fails_and_is_rolled_back(
    settings: Settings, packages: dict[str, BuiltPackage]
) -> None:
    """v2 is killed after it passed its health check: NodeFailed at min_healthy, and the automatic rollback makes
    the node serve v1 again over HTTP."""
    port = free_ports(1)[0]
    async with embedded(settings) as session:
        await deploy_first_version(session, packages["1.0.0"], port)
        release = plan("hello-1.1.0", packages["1.1.0"], port, min_healthy_s=WINDOW_S)
        submitted = asyncio.create_task(session.submit(ReleaseRequested(release_id=release.release_id, plan=release)))
        await until(lambda: deployed_v2(session), "v2 is deployed")
        recorded = running_pid(settings)
        assert recorded is not None
        pid, version = recorded
        assert version == "1.1.0"
        assert outcomes_of(session, release.release_id) == []  # within the window
        os.killpg(pid, signal.SIGKILL)  # a crash: the service dies without a word
        await submitted

        events = outcomes_of(session, release.release_id)
        assert [type(event) for event in events] == [NodeFailed, NodeRolledBack]
        failed, rolled_back = events
        assert isinstance(failed, NodeFailed)
        assert (failed.step, failed.version, failed.current_version) == ("min_healthy", "1.1.0", "1.1.0")
        assert "1.1.0 should run but nothing does" in failed.error
        assert isinstance(rolled_back, NodeRolledBack)
        assert (rolled_back.version, rolled_back.from_version) == ("1.0.0", "1.1.0")
        assert await session.release_state(release.release_id) == ReleaseState.HALTED
        status = await session.backends.store.get_node(NODE)
        assert status is not None
        assert (status.state, status.current_version) == (NodeState.ROLLED_BACK, "1.0.0")
        assert await asyncio.to_thread(served_version, port) == "1.0.0"
        new_pid = running_pid(settings)
        assert new_pid is not None
        assert new_pid[0] != pid
