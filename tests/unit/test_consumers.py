"""Executor worker and rollback consumer: claims, outcomes, redelivery of finished and interrupted requests."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest

from reactor import outcomes
from reactor.adapters.dispatch import deliver
from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import Record, encode
from reactor.consumers.executor_worker import ExecutorWorker, _Heartbeat, _Renewals, probe_interval
from reactor.consumers.rollback import RollbackConsumer
from reactor.domain.replay import apply, refused
from reactor.domain.status import NodeState, NodeStatus, claim, pending
from reactor.errors import BackendUnavailable, Fenced, NodeBusy, PolicyRefused, ReactorError
from reactor.events import (
    AutoRollback,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeEvent,
    NodeFailed,
    NodeRolledBack,
    Package,
    RollbackFailed,
    RollbackRequested,
    Topic,
    derived_event_id,
    utc_now,
)
from reactor.executors.local import LocalExecutor
from reactor.ports import ExecutionContext, ExecutorFactory, ExecutorSettings, Store
from tests.fakes import Probe, Script, ScriptedExecutor, scripted
from tests.support import until

# Tier: `unit` on the in-memory backends, `mongo` on FerretDB (from the `store` fixture parameter).

NODE = "fake/host-1/app"
PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="a" * 64)


def deploy(version: str = "2.0.0", node_key: str = NODE, **extra: object) -> DeployRequested:
    return DeployRequested(node_key=node_key, service="app", version=version, package=PACKAGE, **extra)


def a_lease_later() -> datetime:
    """The clock of a worker that sees every claim of the others' as a lease old: their holders died."""
    return utc_now() + timedelta(hours=1)


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


async def test_a_command_older_than_the_max_age_is_refused_before_anything_runs(store: Store) -> None:
    """A command whose time is older than `max_age` is refused (PolicyRefused, `policy: stale command`): no claim,
    no executor, no outcome. A younger one runs; and the stale redelivery of one that ran re-emits its outcome."""
    bus, script = MemoryBus(), Script()
    consumer = worker(store, bus, script, max_age=timedelta(hours=1))
    stale = deploy(occurred_at=utc_now() - timedelta(hours=2))
    with pytest.raises(PolicyRefused, match=r"^policy: stale command: .* 7200 s old, more than .* \(3600 s\)"):
        await consumer.handle(stale)
    assert await store.get_node(NODE) is None
    assert script.calls[f"deploy:{NODE}"] == 0
    assert bus.events(Topic.OUTCOMES) == []

    young = deploy(occurred_at=utc_now() - timedelta(minutes=50))
    await consumer.handle(young)
    assert script.calls[f"deploy:{NODE}"] == 1
    # Two hours on, the same command comes again: it ran, so its recorded outcome is re-emitted, nothing runs.
    later = worker(store, bus, script, max_age=timedelta(hours=1), clock=lambda: utc_now() + timedelta(hours=2))
    await later.handle(young)
    first, second = bus.events(Topic.OUTCOMES)
    assert first == second
    assert script.calls[f"deploy:{NODE}"] == 1


async def test_outcomes_older_than_kept_are_forgotten_and_their_command_coming_again_is_refused_as_stale(
    store: Store,
) -> None:
    """The worker forgets the recorded outcome of a request that finished more than `keep` ago (keep >= max_age) and
    keeps a younger one. The forgotten command, if it comes again after the node moved on, is too old to run: it is
    refused, and the node is not taken back to its version."""
    bus, script = MemoryBus(), Script()
    now = utc_now()
    early = deploy("1.0.0", occurred_at=now - timedelta(hours=3))
    await worker(store, bus, script, clock=lambda: now - timedelta(hours=3)).handle(early)
    recent = deploy("2.0.0", occurred_at=now - timedelta(minutes=5))
    await worker(store, bus, script, clock=lambda: now - timedelta(minutes=5)).handle(recent)

    pruner = worker(store, bus, script, max_age=timedelta(hours=1), clock=lambda: now)
    assert await pruner.prune_processed(timedelta(hours=2)) == 1
    assert await store.get_processed(early.event_id) is None
    assert await store.get_processed(recent.event_id) is not None
    assert await pruner.prune_processed(timedelta(hours=2)) == 0

    with pytest.raises(PolicyRefused, match=r"^policy: stale command: "):
        await pruner.handle(early)
    assert script.calls[f"deploy:{NODE}"] == 2
    assert len(bus.events(Topic.OUTCOMES)) == 2
    status = await store.get_node(NODE)
    assert status is not None
    assert (status.current_version, status.request_id) == ("2.0.0", recent.event_id)


async def test_pruning_runs_at_once_and_then_every_period_through_a_store_outage(store: Store) -> None:
    """`run_pruning` prunes when it starts and again each period; a store that is down, or refuses the delete, is
    tried at the next one, and the worker goes on."""
    pruned: list[datetime] = []
    failures: list[ReactorError] = [BackendUnavailable("store down"), ReactorError("delete refused")]

    class Recording:
        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        async def prune_processed(self, before: datetime) -> int:
            pruned.append(before)
            if failures:
                raise failures.pop(0)
            return await store.prune_processed(before)

    now = utc_now()
    consumer = worker(Recording(), MemoryBus(), Script(), clock=lambda: now)  # type: ignore[arg-type]
    running = asyncio.create_task(consumer.run_pruning(timedelta(hours=2), every_s=0.01))
    try:
        await until(lambda: len(pruned) >= 4, "four prunings, the first two failed")
    finally:
        running.cancel()
    assert not running.done() or running.cancelled()
    assert set(pruned) == {now - timedelta(hours=2)}


async def test_interrupted_request_runs_again_on_redelivery(store: Store) -> None:
    """A worker that died mid-deploy left the node deploying for the request; once its claim is a lease old,
    the redelivery (on another worker) takes the node and finishes the request."""
    bus, script = MemoryBus(), Script()
    request = deploy()
    interrupted = claim(
        pending(NODE, "app"),
        request_id=request.event_id,
        owner="dead-worker",
        operation="deploy",
        target_version="2.0.0",
        release_id=None,
        now=utc_now() - timedelta(minutes=2),
        lease=timedelta(minutes=1),
    )
    assert await store.put_node(interrupted, expected_revision=0) is not None

    await worker(store, bus, script, lease=timedelta(minutes=1)).handle(request)

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
    # Forget the processed record, as if the worker died right after writing the status; the redelivery comes
    # once that worker's lease ran out (sooner, it waits for the record: see the test after the next).
    fresh_store_bus = MemoryBus()
    forgetful = cast(Store, _ForgetfulStore(store, request.event_id))
    other = worker(forgetful, fresh_store_bus, script, clock=a_lease_later)
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
        owner="other-worker",
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
        owner="dead-worker",
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


# --- record and outcome agree ----------------------------------------------------------------------

# What a record and its outcome event both tell; replaying the event (reactor replay --rebuild) gives them back.
TOLD = ("state", "current_version", "prev_version", "deploying_version", "last_error", "operation", "request_id")


class _RollbackScripted(ScriptedExecutor):
    """The scripted executor, whose rollback also follows the node's behaviour: `fail` fails it at `switch`
    with the node still on the version it was leaving, `crash` raises."""

    async def rollback(self) -> NodeStatus:
        behaviour = self.script.behaviour.get(self.context.node_key, "ok")
        if behaviour == "fail":
            self.script.calls[f"rollback:{self.context.node_key}"] += 1
            return self.context.current.model_copy(
                update={"state": NodeState.FAILED, "last_error": f"switch: {self.context.target_version} did not start"}
            )
        if behaviour == "crash":
            raise RuntimeError("boom")
        return await super().rollback()


class _RolledBackToNothing(ScriptedExecutor):
    """A broken executor: its rollback reports rolled_back while nothing runs."""

    async def rollback(self) -> NodeStatus:
        return self.context.current.model_copy(update={"state": NodeState.ROLLED_BACK, "current_version": None})


def rollback_worker(store: Store, bus: MemoryBus, script: Script, tmp_path: Path, **extra: object) -> ExecutorWorker:
    """A worker with the rollback-scripted `fake` platform and the real `local` one under `tmp_path`."""
    bound = type("BoundRollbackScripted", (_RollbackScripted,), {"script": script})
    factories: dict[str, ExecutorFactory] = {"fake": bound, "local": LocalExecutor}
    settings = ExecutorSettings(local_root=tmp_path)
    return ExecutorWorker(store, bus, settings=settings, factories=factories, **extra)  # type: ignore[arg-type]


async def assert_record_agrees(store: Store, outcome: Event, before: NodeStatus | None) -> None:
    """The node's record is what replaying `outcome` over the record before it gives: state, versions, error."""
    assert isinstance(outcome, NodeDeployed | NodeFailed | NodeRolledBack | RollbackFailed)
    live = await store.get_node(outcome.node_key)
    if before is None and refused(outcome):
        assert live is None
        return
    assert live is not None
    told = apply(before or pending(outcome.node_key, outcome.service), outcome)
    assert {name: getattr(live, name) for name in TOLD} == {name: getattr(told, name) for name in TOLD}
    assert (live.release_id, live.service) == (told.release_id, told.service)


Request = DeployRequested | RollbackRequested
# Runs what comes before, then gives the request whose outcome is checked (not yet handled).
Scenario = Callable[[ExecutorWorker, Script], Awaitable[Request]]


async def _deployed(consumer: ExecutorWorker, script: Script) -> Request:
    await consumer.handle(deploy("1.0.0"))
    return deploy("2.0.0")


async def _deploy_failed(consumer: ExecutorWorker, script: Script) -> Request:
    await consumer.handle(deploy("1.0.0"))
    script.behaviour[NODE] = "fail"
    return deploy("2.0.0")


async def _deploy_crashed(consumer: ExecutorWorker, script: Script) -> Request:
    script.behaviour[NODE] = "crash"
    return deploy("1.0.0")


async def _min_healthy_failed(consumer: ExecutorWorker, script: Script) -> Request:
    await consumer.handle(deploy("1.0.0"))
    script.probes[NODE] = ["unhealthy"]
    return deploy("2.0.0", min_healthy_s=0.2)


async def _rolled_back(consumer: ExecutorWorker, script: Script) -> Request:
    await consumer.handle(deploy("1.0.0"))
    await consumer.handle(deploy("2.0.0"))
    return RollbackRequested(node_key=NODE, service="app")


async def _rolled_back_after_failure(consumer: ExecutorWorker, script: Script) -> Request:
    await _deploy_failed(consumer, script)
    await consumer.handle(deploy("2.0.0"))
    script.behaviour.clear()
    return RollbackRequested(node_key=NODE, service="app", release_id="app-7")


async def _rollback_failed(consumer: ExecutorWorker, script: Script) -> Request:
    await consumer.handle(deploy("1.0.0"))
    await consumer.handle(deploy("2.0.0"))
    script.behaviour[NODE] = "fail"
    return RollbackRequested(node_key=NODE, service="app")


async def _rollback_crashed(consumer: ExecutorWorker, script: Script) -> Request:
    await _rolled_back(consumer, script)
    script.behaviour[NODE] = "crash"
    return RollbackRequested(node_key=NODE, service="app")


async def _never_deployed(consumer: ExecutorWorker, script: Script) -> Request:
    return RollbackRequested(node_key=NODE, service="app")


async def _first_version_only(consumer: ExecutorWorker, script: Script) -> Request:
    await consumer.handle(deploy("1.0.0", release_id="app-1"))
    return RollbackRequested(node_key=NODE, service="app", release_id="app-2")


async def _first_deploy_failed(consumer: ExecutorWorker, script: Script) -> Request:
    script.behaviour[NODE] = "fail"
    await consumer.handle(deploy("1.0.0"))
    return RollbackRequested(node_key=NODE, service="app")


async def _to_version_not_on_disk(consumer: ExecutorWorker, script: Script) -> Request:
    return RollbackRequested(node_key="local/host-1/app", service="app", to_version="0.9.0")


SCENARIOS: dict[str, tuple[Scenario, type[NodeEvent], str | None]] = {
    # name: (scenario, outcome type, "<step>: <error>" of a failure)
    "deployed": (_deployed, NodeDeployed, None),
    "deploy-failed": (_deploy_failed, NodeFailed, "health: did not answer"),
    "deploy-crashed": (_deploy_crashed, NodeFailed, "deploy: executor crashed: RuntimeError: boom"),
    "min-healthy-failed": (_min_healthy_failed, NodeFailed, None),
    "rolled-back": (_rolled_back, NodeRolledBack, None),
    "rolled-back-after-failure": (_rolled_back_after_failure, NodeRolledBack, None),
    "rollback-failed": (_rollback_failed, RollbackFailed, "switch: 1.0.0 did not start"),
    "rollback-crashed": (_rollback_crashed, RollbackFailed, "rollback: executor crashed: RuntimeError: boom"),
    "rollback-never-deployed": (_never_deployed, RollbackFailed, "rollback: no previous version to roll back to"),
    "rollback-first-version": (_first_version_only, RollbackFailed, "rollback: no previous version to roll back to"),
    "rollback-first-failed": (_first_deploy_failed, RollbackFailed, "rollback: no previous version to roll back to"),
    "rollback-to-missing": (_to_version_not_on_disk, RollbackFailed, "rollback: release 0.9.0 is not on the node"),
}


@pytest.mark.parametrize("name", SCENARIOS)
async def test_every_outcome_says_what_the_record_says(store: Store, tmp_path: Path, name: str) -> None:
    """For every kind of outcome, the stored node is exactly what replaying its event gives (state, current and
    previous version, target, error), and a failure's event carries the record's `<step>: <error>`."""
    scenario, kind, error = SCENARIOS[name]
    bus, script = MemoryBus(), Script()
    consumer = rollback_worker(store, bus, script, tmp_path)
    request = await scenario(consumer, script)
    before = await store.get_node(request.node_key)
    await consumer.handle(request)

    outcome = bus.events(Topic.OUTCOMES)[-1]
    assert isinstance(outcome, kind)
    assert outcome.causation_id == request.event_id
    await assert_record_agrees(store, outcome, before)
    if isinstance(outcome, NodeFailed | RollbackFailed):
        assert error is None or f"{outcome.step}: {outcome.error}" == error
    assert await store.get_processed(request.event_id) == outcomes.record(outcome)


@pytest.mark.parametrize("name", ["rollback-never-deployed", "rollback-first-version", "rollback-first-failed"])
async def test_rollback_with_nothing_to_return_to_is_refused_and_leaves_the_node_as_it_was(
    store: Store, tmp_path: Path, name: str
) -> None:
    """No version to go back to: the executor never runs, the record is untouched (a never-deployed node gets
    none), and RollbackFailed names no target and reports what the node still runs."""
    scenario, _, _ = SCENARIOS[name]
    bus, script = MemoryBus(), Script()
    consumer = rollback_worker(store, bus, script, tmp_path)
    request = await scenario(consumer, script)
    before = await store.get_node(NODE)
    await consumer.handle(request)

    assert script.calls[f"rollback:{NODE}"] == 0
    assert await store.get_node(NODE) == before
    outcome = bus.events(Topic.OUTCOMES)[-1]
    assert isinstance(outcome, RollbackFailed)
    assert (outcome.step, outcome.error, outcome.target_version) == (
        "rollback",
        "no previous version to roll back to",
        None,
    )
    assert outcome.version == (before.current_version if before else None)
    assert outcome.release_id == request.release_id

    await consumer.handle(request)  # redelivered: the recorded refusal again, still nothing runs or changes
    assert bus.events(Topic.OUTCOMES)[-1] == outcome
    assert await store.get_node(NODE) == before


async def test_refused_rollback_of_a_node_busy_with_another_request_waits_its_turn(store: Store) -> None:
    """A node deploying for another request is busy for a rollback too, even one that would be refused."""
    bus, script = MemoryBus(), Script()
    holder = claim(
        pending(NODE, "app"),
        request_id="first-deploy",
        owner="other-worker",
        operation="deploy",
        target_version="1.0.0",
        release_id=None,
        now=utc_now(),
        lease=timedelta(minutes=30),
    )
    await store.put_node(holder, expected_revision=0)
    with pytest.raises(NodeBusy):
        await worker(store, bus, script).handle(RollbackRequested(node_key=NODE, service="app"))
    assert bus.events(Topic.OUTCOMES) == []


async def test_executor_that_reports_rolled_back_running_nothing_is_recorded_and_told_failed(store: Store) -> None:
    """A rollback result that contradicts its target is no success: record and event both say failed, and why."""
    bus = MemoryBus()
    consumer = ExecutorWorker(
        store, bus, factories={"fake": type("Broken", (_RolledBackToNothing,), {"script": Script()})}
    )
    await consumer.handle(deploy("1.0.0"))
    await consumer.handle(deploy("2.0.0"))
    before = await store.get_node(NODE)
    await consumer.handle(RollbackRequested(node_key=NODE, service="app"))

    outcome = bus.events(Topic.OUTCOMES)[-1]
    assert isinstance(outcome, RollbackFailed)
    assert (outcome.step, outcome.error, outcome.target_version) == (
        "rollback",
        "the executor reported rolled_back running nothing, not 1.0.0",
        "1.0.0",
    )
    await assert_record_agrees(store, outcome, before)


@pytest.mark.parametrize(
    ("said", "told"),
    [
        ("", "deploy: failed without a message"),
        ("Connection refused: port 80", "deploy: Connection refused: port 80"),
        ("unpack: " + "x" * 5000, "unpack: " + "x" * 3997 + "..."),
    ],
    ids=["empty", "no-step", "too-long"],
)
async def test_failure_in_the_executors_own_words_is_stored_as_its_event_tells_it(
    store: Store, said: str, told: str
) -> None:
    """An error without a step, without a message or too long for an event: record and NodeFailed say the same."""

    class SaysLittle(ScriptedExecutor):
        script = Script()

        async def deploy(self) -> NodeStatus:
            return self.context.current.model_copy(update={"state": NodeState.FAILED, "last_error": said})

    bus = MemoryBus()
    await ExecutorWorker(store, bus, factories={"fake": SaysLittle}).handle(deploy())
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeFailed)
    assert f"{outcome.step}: {outcome.error}" == told
    await assert_record_agrees(store, outcome, None)


async def test_redelivered_interrupted_rollback_returns_to_the_target_of_its_claim(store: Store) -> None:
    """A worker died rolling 2.0.0 back to 1.0.0: the redelivery goes to 1.0.0, not to the version it was leaving."""
    bus, script = MemoryBus(), Script()
    consumer = worker(store, bus, script)
    await consumer.handle(deploy("1.0.0"))
    await consumer.handle(deploy("2.0.0"))
    request = RollbackRequested(node_key=NODE, service="app")
    deployed = await store.get_node(NODE)
    assert deployed is not None
    interrupted = claim(
        deployed,
        request_id=request.event_id,
        owner=consumer.owner,
        operation="rollback",
        target_version="1.0.0",
        release_id=None,
        now=utc_now(),
        lease=timedelta(minutes=30),
    )
    assert await store.put_node(interrupted, expected_revision=deployed.revision) is not None

    await consumer.handle(request)
    outcome = bus.events(Topic.OUTCOMES)[-1]
    assert isinstance(outcome, NodeRolledBack)
    assert outcome.version == "1.0.0"
    status = await store.get_node(NODE)
    assert status is not None
    assert (status.state, status.current_version) == (NodeState.ROLLED_BACK, "1.0.0")


@pytest.mark.parametrize(
    "name", ["deploy-failed", "min-healthy-failed", "rolled-back", "rollback-failed", "rollback-to-missing"]
)
async def test_crash_after_the_status_write_emits_the_outcome_the_record_tells(
    store: Store, tmp_path: Path, name: str
) -> None:
    """The worker died after writing the node, before recording the outcome: the redelivery does not run again and
    derives the same outcome from the record (the version a rollback left is the one thing it cannot know)."""
    scenario, _, _ = SCENARIOS[name]
    bus, script = MemoryBus(), Script()
    consumer = rollback_worker(store, bus, script, tmp_path)
    request = await scenario(consumer, script)
    before = await store.get_node(request.node_key)
    await consumer.handle(request)
    first = bus.events(Topic.OUTCOMES)[-1]
    calls = script.calls.copy()

    again_bus = MemoryBus()
    forgetful = cast(Store, _ForgetfulStore(store, request.event_id))
    await rollback_worker(forgetful, again_bus, script, tmp_path, clock=a_lease_later).handle(request)

    assert script.calls == calls
    [again] = again_bus.events(Topic.OUTCOMES)
    unknowable = {"duration_s", "from_version", "occurred_at"}
    assert again.model_dump(exclude=unknowable) == first.model_dump(exclude=unknowable)
    await assert_record_agrees(store, again, before)


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


async def test_every_report_of_one_failed_deploy_asks_for_the_same_rollback(store: Store) -> None:
    """The pacer's deadline report and the worker's late one of the same deploy lead to one rollback, run once."""
    bus, script = MemoryBus(), Script()
    await worker(store, bus, script).handle(deploy("1.0.0"))
    script.behaviour[NODE] = "fail"
    request = deploy("2.0.0")
    deadline = NodeFailed(
        event_id=derived_event_id("release", NODE, "deadline"),
        node_key=NODE,
        service="app",
        version="2.0.0",
        current_version="1.0.0",
        step="deadline",
        error="no outcome within 2s of dispatch",
        causation_id=request.event_id,
    )
    consumer = RollbackConsumer(bus)
    await consumer.handle(deadline)
    await worker(store, bus, script).handle(request)
    [late] = [event for event in bus.events(Topic.OUTCOMES) if event.causation_id == request.event_id]
    assert isinstance(late, NodeFailed)
    assert late.step != "deadline"
    await consumer.handle(late)

    first, second = bus.events(Topic.COMMANDS)
    assert isinstance(first, RollbackRequested)
    assert first.event_id == second.event_id == derived_event_id(request.event_id, "rollback")
    assert first.causation_id == deadline.event_id
    assert "deadline" in first.reason
    for command in (first, second):
        await worker(store, bus, script).handle(command)
    outcomes_of_rollback = [event for event in bus.events(Topic.OUTCOMES) if event.causation_id == first.event_id]
    assert [type(event) for event in outcomes_of_rollback] == [NodeRolledBack, NodeRolledBack]
    assert outcomes_of_rollback[0].event_id == outcomes_of_rollback[1].event_id  # a re-emission, not a second run
    assert script.calls[f"rollback:{NODE}"] == 1
    status = await store.get_node(NODE)
    assert status is not None
    assert (status.state, status.current_version) == (NodeState.ROLLED_BACK, "1.0.0")


# --- min_healthy -------------------------------------------------------------------------------


async def test_min_healthy_outcome_is_published_only_after_the_window(store: Store) -> None:
    """Healthy probes: the node is recorded success at once, but NodeDeployed comes only after the window."""
    bus, script = MemoryBus(), Script()
    request = deploy(min_healthy_s=0.3)
    began = time.monotonic()
    running = asyncio.create_task(worker(store, bus, script).handle(request))
    await asyncio.sleep(0.1)
    assert bus.events(Topic.OUTCOMES) == []
    assert await store.get_processed(request.event_id) is None
    status = await store.get_node(NODE)
    assert status is not None
    assert (status.state, status.current_version) == (NodeState.SUCCESS, "2.0.0")
    await running

    assert time.monotonic() - began >= 0.3
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    assert outcome.duration_s >= 0.3
    assert await store.get_processed(request.event_id) == outcomes.record(outcome)
    assert script.calls[f"status:{NODE}"] >= 2  # probes every 0.1 s, the last one at the end of the window


@pytest.mark.parametrize(
    ("probe", "seen"),
    [
        ("unhealthy", "the probe saw failed, running 2.0.0: health check fails"),
        ("drift", "the probe saw success, running 0.0.1-drift"),
        ("refused", "the probe failed: status: permission denied"),
        ("crash", "the probe crashed: RuntimeError: probe boom"),
    ],
)
async def test_node_that_does_not_stay_healthy_fails_at_min_healthy(store: Store, probe: Probe, seen: str) -> None:
    """A probe that finds the node unhealthy, running another version, or cannot probe at all fails the deploy."""
    bus, script = MemoryBus(), Script()
    consumer = worker(store, bus, script)
    await consumer.handle(deploy("1.0.0"))
    script.probes[NODE] = ["healthy", probe]
    request = deploy("2.0.0", min_healthy_s=1.0)
    await consumer.handle(request)

    # Failed at the second probe, without waiting out the window (which takes five probes and one at its end);
    # counted, not timed, so a loaded machine cannot fail it.
    assert script.calls[f"status:{NODE}"] == 2
    outcome = bus.events(Topic.OUTCOMES)[-1]
    assert isinstance(outcome, NodeFailed)
    assert (outcome.step, outcome.version, outcome.prev_version) == ("min_healthy", "2.0.0", "1.0.0")
    assert re.fullmatch(rf"after [0-9]+\.[0-9]s of 1s, {re.escape(seen)}", outcome.error), outcome.error
    status = await store.get_node(NODE)
    assert status is not None
    assert status.state == NodeState.FAILED
    assert status.last_error == f"min_healthy: {outcome.error}"
    assert status.current_version == ("0.0.1-drift" if probe == "drift" else "2.0.0")
    assert await store.get_processed(request.event_id) == outcomes.record(outcome)


async def test_min_healthy_failure_is_rolled_back_to_the_previous_version(store: Store) -> None:
    """NodeFailed at min_healthy with policy node: the rollback consumer asks, the node returns to 1.0.0."""
    bus, script = MemoryBus(), Script()
    consumer = worker(store, bus, script)
    await consumer.handle(deploy("1.0.0"))
    script.probes[NODE] = ["unhealthy"]
    await consumer.handle(deploy("2.0.0", min_healthy_s=0.3, auto_rollback=AutoRollback.NODE))
    failed = bus.events(Topic.OUTCOMES)[-1]
    assert isinstance(failed, NodeFailed)
    assert (failed.step, failed.current_version) == ("min_healthy", "2.0.0")

    await RollbackConsumer(bus).handle(failed)
    [rollback] = bus.events(Topic.COMMANDS)
    assert isinstance(rollback, RollbackRequested)
    assert rollback.causation_id == failed.event_id
    await consumer.handle(rollback)

    status = await store.get_node(NODE)
    assert status is not None
    assert (status.state, status.current_version) == (NodeState.ROLLED_BACK, "1.0.0")
    rolled_back = bus.events(Topic.OUTCOMES)[-1]
    assert isinstance(rolled_back, NodeRolledBack)
    assert (rolled_back.version, rolled_back.from_version) == ("1.0.0", "2.0.0")


async def test_probe_that_cannot_tell_is_tried_again_at_the_next_interval(store: Store) -> None:
    """A retriable probe error decides nothing: later healthy probes, the final one included, pass the node."""
    bus, script = MemoryBus(), Script(probes={NODE: ["unreachable", "unreachable"]})
    await worker(store, bus, script).handle(deploy(min_healthy_s=0.5))
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    assert script.calls[f"status:{NODE}"] >= 3


async def test_window_that_ends_without_a_probe_that_could_tell_fails(store: Store) -> None:
    """Retriable probe errors up to the end of the window fail the deploy at min_healthy, naming the error."""
    bus, script = MemoryBus(), Script(probes={NODE: ["unreachable"] * 20})
    await worker(store, bus, script).handle(deploy(min_healthy_s=0.3))
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeFailed)
    assert outcome.step == "min_healthy"
    assert "no probe could tell by the end of the window" in outcome.error
    assert "cannot be reached right now" in outcome.error
    assert outcome.current_version == "2.0.0"


async def test_cancelled_observation_writes_nothing_and_redelivery_observes_again(store: Store) -> None:
    """A worker stopped within the window records no outcome; the redelivered request deploys (a no-op) and
    observes the whole window again before NodeDeployed."""
    bus, script = MemoryBus(), Script()
    request = deploy(min_healthy_s=0.3)
    running = asyncio.create_task(worker(store, bus, script).handle(request))
    await asyncio.sleep(0.15)
    deployed = await store.get_node(NODE)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert bus.events(Topic.OUTCOMES) == []
    assert await store.get_processed(request.event_id) is None
    assert await store.get_node(NODE) == deployed

    probes_before = script.calls[f"status:{NODE}"]
    began = time.monotonic()
    await worker(store, bus, script).handle(request)
    assert time.monotonic() - began >= 0.3
    assert script.calls[f"deploy:{NODE}"] == 2
    assert script.calls[f"status:{NODE}"] > probes_before
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    assert outcome.prev_version is None
    assert outcome.event_id == derived_event_id(request.event_id, "outcome")


async def test_without_min_healthy_the_node_is_never_probed(store: Store) -> None:
    """min_healthy 0 (the default): NodeDeployed right after the deploy, and status() is never called."""
    bus, script = MemoryBus(), Script(probes={NODE: ["unhealthy"]})
    await worker(store, bus, script).handle(deploy())
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    assert script.calls[f"status:{NODE}"] == 0


async def test_failed_deploy_with_min_healthy_is_not_observed(store: Store) -> None:
    """A deploy that fails on its own reports its own step; there is nothing to observe."""
    bus, script = MemoryBus(), Script(behaviour={NODE: "fail"})
    await worker(store, bus, script).handle(deploy(min_healthy_s=5.0))
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeFailed)
    assert outcome.step == "health"
    assert script.calls[f"status:{NODE}"] == 0


@pytest.mark.parametrize(("window", "interval"), [(0.3, 0.1), (1.5, 0.3), (10, 2.0), (60, 5.0), (86400, 5.0)])
def test_probe_interval_is_a_fifth_of_the_window_within_bounds(window: float, interval: float) -> None:
    assert probe_interval(window) == pytest.approx(interval)


class _ForgetfulStore:
    """Delegates to a store but has no processed record for one event id."""

    def __init__(self, inner: Store, forget: str) -> None:
        self._inner = inner
        self._forget = forget

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def get_processed(self, event_id: str) -> str | None:
        return None if event_id == self._forget else await self._inner.get_processed(event_id)


# --- fencing: one run per node across workers ---------------------------------------------------


async def test_same_request_on_two_workers_runs_once_and_the_second_re_emits_its_outcome(store: Store) -> None:
    """A request delivered to two workers at once (a rebalance): the second finds the node busy under the first
    one's claim and retries; once the first finished it re-emits the recorded outcome and never runs it."""
    bus, script = MemoryBus(), Script(latched=True)
    request = deploy()
    first = worker(store, bus, script, owner="worker-a")
    second = worker(store, bus, script, owner="worker-b")
    running = asyncio.create_task(first.handle(request))
    await until(lambda: script.held == [NODE], "the first worker's deploy is held")

    with pytest.raises(NodeBusy):
        async with asyncio.timeout(5):
            await second.handle(request)
    assert script.calls[f"deploy:{NODE}"] == 1
    retried = asyncio.create_task(_retrying(second.handle, request))
    await asyncio.sleep(0.05)  # let the retries find the node busy a few times
    assert not retried.done()
    script.let_go()
    await running
    async with asyncio.timeout(5):
        await retried

    assert script.calls[f"deploy:{NODE}"] == 1
    first_outcome, second_outcome = bus.events(Topic.OUTCOMES)
    assert isinstance(first_outcome, NodeDeployed)
    assert first_outcome == second_outcome


class _LatchedRecords:
    """Delegates to a store, but recording an outcome waits for `go`: a run between its final status write and its
    outcome record."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def put_processed(self, event_id: str, outcome: str, *, at: datetime | None = None) -> bool:
        self.reached.set()
        await self.go.wait()
        return await self._inner.put_processed(event_id, outcome, at=at)


async def test_redelivery_between_the_final_status_and_the_outcome_record_waits_for_the_record(store: Store) -> None:
    """The first worker wrote the node's final status and is about to record the outcome when the request reaches a
    second worker: it must not derive an outcome of its own (no duration, no `before`: a second, different outcome
    for one request); it retries until the record is there and re-emits it, byte for byte."""
    bus, script = MemoryBus(), Script()
    request = deploy()
    latched = _LatchedRecords(store)
    first = worker(cast(Store, latched), bus, script, owner="worker-a")
    second = worker(store, bus, script, owner="worker-b")
    running = asyncio.create_task(first.handle(request))
    async with asyncio.timeout(5):
        await latched.reached.wait()

    with pytest.raises(NodeBusy):
        await second.handle(request)
    assert bus.events(Topic.OUTCOMES) == []
    retried = asyncio.create_task(_retrying(second.handle, request))
    latched.go.set()
    async with asyncio.timeout(5):
        await running
        await retried

    assert script.calls[f"deploy:{NODE}"] == 1
    first_outcome, second_outcome = bus.events(Topic.OUTCOMES)
    assert isinstance(first_outcome, NodeDeployed)
    assert first_outcome == second_outcome
    assert first_outcome.duration_s > 0


async def test_a_worker_frozen_past_its_lease_before_its_record_tells_the_outcome_recorded_meanwhile(
    store: Store,
) -> None:
    """The first worker wrote the node's final status, then stood still (frozen) for longer than its lease before
    recording the outcome. The request reached a second worker meanwhile, which rebuilt the outcome from the status,
    recorded and published it. The first, thawing, finds that record: it publishes the recorded outcome, not its own
    (found by the chaos test, seed 2: one outcome id, two different outcomes)."""
    bus, script = MemoryBus(), Script()
    request = deploy()
    latched = _LatchedRecords(store)
    frozen = worker(cast(Store, latched), bus, script, owner="worker-a")
    running = asyncio.create_task(frozen.handle(request))
    async with asyncio.timeout(5):
        await latched.reached.wait()

    await worker(store, bus, script, owner="worker-b", clock=a_lease_later).handle(request)
    [rebuilt] = bus.events(Topic.OUTCOMES)
    assert isinstance(rebuilt, NodeDeployed)
    assert rebuilt.duration_s == 0.0  # rebuilt from the status, not the run's own
    latched.go.set()
    async with asyncio.timeout(5):
        await running

    assert script.calls[f"deploy:{NODE}"] == 1
    assert bus.events(Topic.OUTCOMES) == [rebuilt, rebuilt]
    assert await store.get_processed(request.event_id) == outcomes.record(rebuilt)


async def test_run_taken_over_after_its_lease_is_cancelled_and_emits_nothing(store: Store) -> None:
    """A worker whose claim was taken over (it did not renew it for a lease, as a frozen worker would not) learns
    it at its next renewal: its executor is cancelled, its writes are refused (fenced) and it emits no outcome;
    only the new holder's run finishes the node and tells its outcome."""
    bus, script = MemoryBus(), Script(latched=True)
    request = deploy()
    lease = timedelta(seconds=0.3)
    stale = worker(store, bus, script, owner="worker-a", lease=lease)
    running = asyncio.create_task(stale.handle(request))
    await until(lambda: script.held == [NODE], "the first worker's deploy is held")
    # The new holder's clock is a lease past the first claim's last renewal: to it, that worker is dead.
    successor = worker(store, bus, script, owner="worker-b", lease=lease, clock=lambda: utc_now() + timedelta(hours=1))
    taking = asyncio.create_task(_retrying(successor.handle, request))
    await until(lambda: len(script.held) == 2, "the successor's deploy is held")

    async with asyncio.timeout(5):
        with pytest.raises(Fenced):
            await running
    assert script.held == [NODE], "the fenced run's executor was cancelled; only the successor's runs"
    assert bus.events(Topic.OUTCOMES) == []
    held = await store.get_node(NODE)
    assert held is not None
    assert (held.state, held.owner, held.epoch) == (NodeState.DEPLOYING, "worker-b", 2)

    script.let_go()
    async with asyncio.timeout(5):
        await taking
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    status = await store.get_node(NODE)
    assert status is not None
    assert (status.state, status.owner, status.epoch) == (NodeState.SUCCESS, "worker-b", 2)


async def _take_over(store: Store) -> NodeStatus:
    """Claim NODE for another request of another worker, as if the claim there now were a lease old; the new holder."""
    claimed = await store.get_node(NODE)
    assert claimed is not None
    taken = claim(
        claimed,
        request_id="other-request",
        owner="worker-b",
        operation="deploy",
        target_version="3.0.0",
        release_id=None,
        now=utc_now() + timedelta(minutes=2),
        lease=timedelta(minutes=1),
    )
    holder = await store.put_node(taken, expected_revision=claimed.revision)
    assert holder is not None
    return holder


class _Stubborn:
    """An executor that, cancelled while it runs, goes on and reports the deploy done (as a careless one might)."""

    platform: ClassVar[str] = "fake"

    def __init__(self, context: ExecutionContext, entered: asyncio.Event, swallowed: list[int]) -> None:
        self.context = context
        self.entered = entered
        self.swallowed = swallowed

    async def deploy(self) -> NodeStatus:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.swallowed.append(1)
        return self.context.current.model_copy(
            update={"state": NodeState.SUCCESS, "current_version": self.context.target_version}
        )

    async def rollback(self) -> NodeStatus:
        raise NotImplementedError

    async def status(self) -> NodeStatus:
        return self.context.current


async def test_a_fenced_run_whose_executor_ignores_the_cancellation_is_fenced_and_its_task_not_left_cancelled(
    store: Store,
) -> None:
    """The claim's renewal finds the node taken over and cancels the run; its executor catches that and returns as
    if done. The run's final write is refused all the same (Fenced, nothing emitted), and the cancellation the fence
    made is taken back: the handler's task is not left cancelling (which would cut its next wait short)."""
    bus, entered, swallowed = MemoryBus(), asyncio.Event(), list[int]()
    factories: dict[str, ExecutorFactory] = {"fake": lambda context: _Stubborn(context, entered, swallowed)}
    stale = ExecutorWorker(store, bus, factories=factories, owner="worker-a", lease=timedelta(seconds=0.3))
    request = deploy()
    running = asyncio.create_task(stale.handle(request))
    async with asyncio.timeout(5):
        await entered.wait()
    holder = await _take_over(store)

    async with asyncio.timeout(5):
        with pytest.raises(Fenced):
            await running  # the renewal, 0.1 s after the claim, finds it taken
    assert swallowed == [1], "the fence cancelled the executor"
    assert running.cancelling() == 0
    assert await store.get_node(NODE) == holder
    assert bus.events(Topic.OUTCOMES) == []


async def test_final_write_of_a_run_whose_claim_was_taken_over_is_refused(store: Store) -> None:
    """A run that finishes after a newer claim took its node writes nothing and emits nothing (fenced)."""
    bus, script = MemoryBus(), Script(latched=True)
    request = deploy()
    frozen = worker(store, bus, script, owner="worker-a", lease=timedelta(minutes=1))  # renews only after 20 s
    running = asyncio.create_task(frozen.handle(request))
    await until(lambda: script.held == [NODE], "the first worker's deploy is held")
    holder = await _take_over(store)

    script.let_go()
    with pytest.raises(Fenced):
        await running
    assert await store.get_node(NODE) == holder
    assert bus.events(Topic.OUTCOMES) == []
    assert await store.get_processed(request.event_id) is None


async def test_renewals_keep_a_long_run_claimed_past_its_lease(store: Store) -> None:
    """A deploy that runs longer than the lease renews its claim every lease/3, so no one takes it over."""
    bus, script = MemoryBus(), Script(latched=True)
    lease = timedelta(seconds=0.3)
    running = asyncio.create_task(worker(store, bus, script, owner="worker-a", lease=lease).handle(deploy()))
    await until(lambda: script.held == [NODE], "the deploy is held")
    claimed = await store.get_node(NODE)
    assert claimed is not None
    assert claimed.updated_at is not None
    claimed_at = claimed.updated_at

    async def renewed_past_the_lease() -> bool:
        stored = await store.get_node(NODE)
        return stored is not None and stored.updated_at is not None and stored.updated_at - claimed_at >= lease

    await until(renewed_past_the_lease, "the claim is renewed past its lease", timeout_s=5)
    renewed = await store.get_node(NODE)
    assert renewed is not None
    assert renewed.updated_at is not None
    assert (renewed.owner, renewed.epoch, renewed.state) == ("worker-a", 1, NodeState.DEPLOYING)
    # Half a lease after the last renewal, and more than a lease after the claim: still busy.
    late = renewed.updated_at + lease / 2
    other = worker(store, bus, script, owner="worker-b", lease=lease, clock=lambda: late)
    with pytest.raises(NodeBusy):
        await other.handle(deploy("3.0.0"))

    script.let_go()
    await running
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    assert script.calls[f"deploy:{NODE}"] == 1


async def test_renewals_of_several_runs_start_each_after_its_own_delay_and_never_for_a_run_that_ended() -> None:
    """One timer serves every held run of a worker: each run's renewals start `after_s` after it was claimed, in the
    order they are due; a run that ended before (its heartbeat cancelled) never starts any."""
    schedule = _Renewals(0.05)
    loop = asyncio.get_running_loop()
    began = loop.time()
    started: dict[str, float] = {}

    def renewals(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def renew() -> None:
            started[name] = loop.time() - began

        return renew

    first = _Heartbeat(schedule, renewals("first"))
    await asyncio.sleep(0.02)
    ended = _Heartbeat(schedule, renewals("ended"))
    third = _Heartbeat(schedule, renewals("third"))
    ended.cancel()
    await until(lambda: "third" in started, "the third run's renewals started", timeout_s=5)
    assert list(started) == ["first", "third"]  # the ended run, due before the third, never started
    assert started["first"] >= 0.049
    assert started["third"] >= 0.069
    for heartbeat in (first, ended, third):
        heartbeat.cancel()
        await heartbeat.stopped()


async def test_interrupted_request_is_run_again_by_its_own_worker_but_not_by_another_within_the_lease(
    store: Store,
) -> None:
    """A claim left by a worker that died mid-deploy (it could not give it up): another worker waits for the lease,
    the same worker (its redelivery) takes it again at once and finishes the request."""
    bus, script = MemoryBus(), Script()
    request = deploy()
    left = claim(
        pending(NODE, "app"),
        request_id=request.event_id,
        owner="worker-a",
        operation="deploy",
        target_version=request.version,
        release_id=None,
        now=utc_now(),
        lease=timedelta(seconds=60),
    )
    assert await store.put_node(left, expected_revision=0) is not None
    with pytest.raises(NodeBusy):
        async with asyncio.timeout(5):
            await worker(store, bus, script, owner="worker-b").handle(request)
    assert script.calls[f"deploy:{NODE}"] == 0

    await worker(store, bus, script, owner="worker-a").handle(request)
    assert script.calls[f"deploy:{NODE}"] == 1
    status = await store.get_node(NODE)
    assert status is not None
    assert (status.state, status.owner, status.epoch) == (NodeState.SUCCESS, "worker-a", 2)
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)


async def _retrying(handler: Callable[[Event], Awaitable[None]], request: DeployRequested) -> None:
    """Handle `request` as a bus does: a retriable error (a busy node) is tried again after a short pause."""

    async def no_dead_letters(topic: Topic, record: Record, reason: str) -> None:
        pytest.fail(f"dead-lettered from {topic}: {reason}")

    await deliver(
        Topic.COMMANDS, lambda: encode(request, "test"), handler, no_dead_letters, retry_delay_s=0.01, event=request
    )


async def test_a_run_interrupted_by_its_worker_stopping_gives_the_claim_up_at_once(store: Store) -> None:
    """A worker that stops (or loses the partition) mid-deploy cancels the run and gives its claim up once the
    executor stopped: another worker runs the redelivered request at once instead of waiting out the lease."""
    bus, script = MemoryBus(), Script(latched=True)
    request = deploy()
    first = worker(store, bus, script, owner="worker-a")
    running = asyncio.create_task(first.handle(request))
    await until(lambda: script.held == [NODE], "the first worker's deploy is held")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    released = await store.get_node(NODE)
    assert released is not None
    assert (released.state, released.owner) == (NodeState.DEPLOYING, None)

    second = worker(store, bus, script, owner="worker-b")
    taking = asyncio.create_task(second.handle(request))
    await until(lambda: script.held == [NODE], "the second worker runs it without waiting for the lease")
    script.let_go()
    async with asyncio.timeout(5):
        await taking
    assert script.calls[f"deploy:{NODE}"] == 2
    [outcome] = bus.events(Topic.OUTCOMES)
    assert isinstance(outcome, NodeDeployed)
    node = await store.get_node(NODE)
    assert node is not None
    assert (node.state, node.owner, node.epoch) == (NodeState.SUCCESS, "worker-b", released.epoch + 1)
