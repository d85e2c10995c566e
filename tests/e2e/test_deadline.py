"""One failure, one rollback, end to end: a real service that never becomes healthy is failed by the pacer's
deadline first and by the worker's health check later; the node is rolled back once and serves its old version.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reactor.demo import build_package
from reactor.demo.scenario import free_ports, release_plan, served_version
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState
from reactor.events import (
    HealthCheck,
    NodeFailed,
    NodeRolledBack,
    ReleaseRequested,
    RollbackFailed,
    RollbackRequested,
    Topic,
)
from reactor.executors.local import stop_all
from reactor.session import embedded
from reactor.settings import Settings

pytestmark = pytest.mark.e2e

NODE = "local/node-1/hello"


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    configured = Settings(state_dir=tmp_path / "state", local_root=tmp_path / "nodes")
    yield configured
    stop_all(configured.nodes_root)


@pytest.mark.timeout(300)
async def test_a_node_failed_by_its_deadline_and_then_by_its_worker_is_rolled_back_once(
    settings: Settings, tmp_path: Path
) -> None:
    """2.0.0 only sleeps: the deadline (2 s) fails it first, the health check (6 s) later; one rollback runs, the
    node serves 1.0.0 rolled back, the deadline stays the release's cause, and the late report changes nothing."""
    port = free_ports(1)[0]
    good = build_package(tmp_path / "dist", "1.0.0")
    hanging = build_package(tmp_path / "dist", "2.0.0", run=b"#!/bin/sh\nexec sleep 600\n")
    first = release_plan("hello-1", good, {"node-1": port})
    second = release_plan("hello-2", hanging, {"node-1": port})
    second = second.model_copy(
        update={
            "health": HealthCheck(timeout_s=6),
            "strategy": second.strategy.model_copy(
                update={"node_deadline_s": 2, "failure_budget": 1, "batches": ["100%"]}
            ),
        }
    )
    async with embedded(settings) as session:
        await session.submit(ReleaseRequested(release_id="hello-1", plan=first))
        assert await session.release_state("hello-1") == ReleaseState.COMPLETED
        await session.bus.publish(ReleaseRequested(release_id="hello-2", plan=second))
        await session.settle_release("hello-2", timeout_s=120)
        await session.settle(timeout_s=120)  # the worker's own failure and the rollback come after the deadline

        outcomes = [event for event in session.bus.events(Topic.OUTCOMES) if event.release_id == "hello-2"]
        failures = [event for event in outcomes if isinstance(event, NodeFailed)]
        assert [event.step for event in failures] == ["deadline", "health"]  # the late report is in the trail
        rollbacks = [event for event in session.bus.events(Topic.COMMANDS) if isinstance(event, RollbackRequested)]
        assert len({event.event_id for event in rollbacks}) == 1
        assert "deadline" in rollbacks[0].reason
        rolled_back = [event for event in outcomes if isinstance(event, NodeRolledBack)]
        assert len({event.event_id for event in rolled_back}) == 1
        assert rolled_back[0].version == "1.0.0"
        assert not [event for event in outcomes if isinstance(event, RollbackFailed)]

        status = await session.backends.store.get_node(NODE)
        assert status is not None
        assert (status.state, status.current_version) == (NodeState.ROLLED_BACK, "1.0.0")
        [node] = await session.backends.store.list_release_nodes("hello-2")
        assert node.state == ItemState.FAILED
        assert node.outcome is not None
        assert node.outcome.startswith("deadline")
        assert served_version(port) == "1.0.0"
