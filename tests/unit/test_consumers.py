"""Executor worker and rollback consumer: claims, outcomes, redelivery of finished and interrupted requests."""

from __future__ import annotations

from datetime import timedelta
from typing import cast

import pytest

from reactor import outcomes
from reactor.adapters.memory_bus import MemoryBus
from reactor.consumers.executor_worker import ExecutorWorker
from reactor.consumers.rollback import RollbackConsumer
from reactor.domain.status import NodeState, claim, pending
from reactor.errors import NodeBusy
from reactor.events import (
    AutoRollback,
    DeployRequested,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    Package,
    RollbackFailed,
    RollbackRequested,
    Topic,
    derived_event_id,
    utc_now,
)
from reactor.ports import ExecutorFactory, Store
from tests.fakes import Script, scripted

# Tier: `unit` on the in-memory backends, `mongo` on FerretDB (from the `store` fixture parameter).

NODE = "fake/host-1/app"
PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="a" * 64)


def deploy(version: str = "2.0.0", node_key: str = NODE, **extra: object) -> DeployRequested:
    return DeployRequested(node_key=node_key, service="app", version=version, package=PACKAGE, **extra)


def worker(store: Store, bus: MemoryBus, script: Script, **extra: object) -> ExecutorWorker:
    factories: dict[str, ExecutorFactory] = {"fake": scripted(script)}
    return ExecutorWorker(store, bus, factories=factories, **extra)  # type: ignore[arg-type]


async def test_deploy_records_success_and_emits_node_deployed(store: Store) -> None:
    """A deploy claims the node, runs the executor once, stores success and emits NodeDeployed."""
    bus, script = MemoryBus(), Script()
    request = deploy()
    await worker(store, bus, script).handle(request)

    status = await store.get_node(NODE)
    assert status is not None
    assert (status.state, status.current_version, status.request_id) == (NodeState.SUCCESS, "2.0.0", request.event_id)
    assert script.calls[f"deploy:{NODE}"] == 1
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    assert outcome.event_id == derived_event_id(request.event_id, "outcome")
    assert outcome.causation_id == request.event_id
    assert await store.get_processed(request.event_id) == outcomes.record(outcome)


async def test_redelivered_finished_request_re_emits_recorded_outcome_without_running(store: Store) -> None:
    """A request delivered twice runs once; the second delivery re-emits the same outcome (same event id)."""
    bus, script = MemoryBus(), Script()
    request = deploy()
    consumer = worker(store, bus, script)
    await consumer.handle(request)
    await consumer.handle(request)

    assert script.calls[f"deploy:{NODE}"] == 1
    first, second = bus.events(Topic.OUTCOMES)
    assert first == second


async def test_interrupted_request_runs_again_on_redelivery(store: Store) -> None:
    """A worker that died mid-deploy left the node deploying for the request; the redelivery finishes it."""
    bus, script = MemoryBus(), Script()
    request = deploy()
    interrupted = claim(
        pending(NODE, "app"),
        request_id=request.event_id,
        operation="deploy",
        target_version="2.0.0",
        release_id=None,
        now=utc_now(),
        lease=timedelta(minutes=30),
    )
    assert await store.put_node(interrupted, expected_revision=0) is not None

    await worker(store, bus, script).handle(request)

    status = await store.get_node(NODE)
    assert status is not None
    assert status.state == NodeState.SUCCESS
    assert script.calls[f"deploy:{NODE}"] == 1
    assert [type(event) for event in bus.events(Topic.OUTCOMES)] == [NodeDeployed]


async def test_finished_status_without_recorded_outcome_emits_it_without_running(store: Store) -> None:
    """Crash after the status write, before the outcome record: the redelivery derives and emits the outcome."""
    bus, script = MemoryBus(), Script()
    request = deploy()
    await worker(store, bus, script).handle(request)
    status = await store.get_node(NODE)
    assert status is not None
    # Forget the processed record, as if the worker died right after writing the status.
    fresh_store_bus = MemoryBus()
    other = worker(cast(Store, _ForgetfulStore(store, request.event_id)), fresh_store_bus, script)
    await other.handle(request)

    assert script.calls[f"deploy:{NODE}"] == 1
    [outcome] = fresh_store_bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    assert outcome.event_id == derived_event_id(request.event_id, "outcome")


async def test_node_busy_with_another_request_is_retriable(store: Store) -> None:
    """Within the lease, a node deploying for another request refuses the claim with a retriable error."""
    bus, script = MemoryBus(), Script()
    holder = claim(
        pending(NODE, "app"),
        request_id="other-request",
        operation="deploy",
        target_version="1.0.0",
        release_id=None,
        now=utc_now(),
        lease=timedelta(minutes=30),
    )
    await store.put_node(holder, expected_revision=0)
    with pytest.raises(NodeBusy) as caught:
        await worker(store, bus, script).handle(deploy())
    assert caught.value.retriable
    assert script.calls[f"deploy:{NODE}"] == 0


async def test_stale_claim_of_a_dead_worker_is_taken_over(store: Store) -> None:
    """A claim older than the lease belongs to a dead worker: a new request takes the node."""
    bus, script = MemoryBus(), Script()
    holder = claim(
        pending(NODE, "app"),
        request_id="dead-request",
        operation="deploy",
        target_version="1.0.0",
        release_id=None,
        now=utc_now() - timedelta(hours=2),
        lease=timedelta(minutes=30),
    )
    await store.put_node(holder, expected_revision=0)
    await worker(store, bus, script, lease=timedelta(minutes=30)).handle(deploy())
    status = await store.get_node(NODE)
    assert status is not None
    assert status.state == NodeState.SUCCESS


async def test_failed_deploy_emits_node_failed_with_step_and_policy(store: Store) -> None:
    """An executor failure becomes NodeFailed naming the step, the error and the rollback policy."""
    bus, script = MemoryBus(), Script(behaviour={NODE: "fail"})
    await worker(store, bus, script).handle(deploy(auto_rollback=AutoRollback.NONE))
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeFailed)
    assert (outcome.step, outcome.error, outcome.auto_rollback) == ("health", "did not answer", AutoRollback.NONE)
    status = await store.get_node(NODE)
    assert status is not None
    assert status.state == NodeState.FAILED
    assert status.deploying_version == "2.0.0"


async def test_executor_crash_becomes_node_failed_not_a_lost_event(store: Store) -> None:
    """An exception escaping an executor is reported as NodeFailed, never swallowed."""
    bus, script = MemoryBus(), Script(behaviour={NODE: "crash"})
    await worker(store, bus, script).handle(deploy())
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeFailed)
    assert "executor crashed: RuntimeError: boom" in outcome.error


async def test_unknown_platform_fails_the_node_with_a_clear_error(store: Store) -> None:
    """A node of a platform nobody registered fails with the platform named."""
    bus, script = MemoryBus(), Script()
    await worker(store, bus, script).handle(deploy(node_key="nomad/host-1/app"))
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeFailed)
    assert "no executor for platform 'nomad'" in outcome.error


async def test_rollback_after_failure_targets_the_restored_version(store: Store) -> None:
    """After a failed deploy the rollback returns to what the node ran, and ends rolled_back."""
    bus, script = MemoryBus(), Script()
    consumer = worker(store, bus, script)
    await consumer.handle(deploy("1.0.0"))
    script.behaviour[NODE] = "fail"
    await consumer.handle(deploy("2.0.0"))
    await consumer.handle(RollbackRequested(node_key=NODE, service="app"))

    status = await store.get_node(NODE)
    assert status is not None
    assert (status.state, status.current_version) == (NodeState.ROLLED_BACK, "1.0.0")
    assert isinstance(bus.events(Topic.OUTCOMES)[-1], NodeRolledBack)


async def test_rollback_without_a_previous_version_fails_clearly(store: Store) -> None:
    """Rolling back a node that never ran anything reports RollbackFailed, not a crash."""
    bus, script = MemoryBus(), Script()
    await worker(store, bus, script).handle(RollbackRequested(node_key=NODE, service="app"))
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, RollbackFailed)


async def test_rollback_consumer_follows_the_policy() -> None:
    """NodeFailed with policy node or release asks for a rollback once (deterministic id); none does not."""
    bus = MemoryBus()
    consumer = RollbackConsumer(bus)
    failed = NodeFailed(
        node_key=NODE, service="app", version="2.0.0", current_version="1.0.0", step="verify", error="sha256 mismatch"
    )
    await consumer.handle(failed)
    await consumer.handle(failed)
    await consumer.handle(failed.model_copy(update={"auto_rollback": AutoRollback.NONE}))
    await consumer.handle(failed.model_copy(update={"current_version": None}))

    requests = bus.events(Topic.COMMANDS)
    assert len(requests) == 2
    assert requests[0].event_id == requests[1].event_id == derived_event_id(failed.event_id, "rollback")
    assert isinstance(requests[0], RollbackRequested)
    assert requests[0].causation_id == failed.event_id
    assert "sha256 mismatch" in requests[0].reason


class _ForgetfulStore:
    """Delegates to a store but has no processed record for one event id."""

    def __init__(self, inner: Store, forget: str) -> None:
        self._inner = inner
        self._forget = forget

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def get_processed(self, event_id: str) -> str | None:
        return None if event_id == self._forget else await self._inner.get_processed(event_id)
