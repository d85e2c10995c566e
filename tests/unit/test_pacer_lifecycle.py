"""The release lifecycle through the real consumers: gates, timers, commands, deadlines, release rollback,
and a pacer stopped in the middle. Runs on every store backend (the `store` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partialmethod
from pathlib import Path
from typing import cast

import pytest

from reactor.adapters.memory_bus import MemoryBus
from reactor.consumers.pacer import DEADLINE_ANNOUNCED, Pacer
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState, pending
from reactor.errors import BackendUnavailable
from reactor.events import (
    AutoRollback,
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    NodeFailed,
    ReleaseAborted,
    ReleaseApproved,
    ReleaseAwaitingApproval,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePaused,
    ReleasePlan,
    ReleaseRequested,
    ReleaseResumed,
    ReleaseRollbackRequested,
    ReleaseRolledBack,
    RollbackRequested,
    Strategy,
    Topic,
    derived_event_id,
    event_document,
    utc_now,
)
from reactor.ports import ReleaseNode, ReleaseRecord, Store
from reactor.runtime import Backends, Role, run_roles
from reactor.settings import Settings
from tests.fakes import Script, scripted
from tests.pacing import plan, reactor, state_of
from tests.support import equals, until


async def completion_announced(store: Store, bus: MemoryBus, release_id: str, timeout_s: float = 10.0) -> None:
    """Wait until the release is completed and subscribers were told (ReleaseCompleted on the bus)."""
    await until(lambda: equals(state_of(store, release_id), ReleaseState.COMPLETED), "completion", timeout_s)
    await until(lambda: of_type(bus, Topic.RELEASES, ReleaseCompleted), "ReleaseCompleted", timeout_s)


def of_type(bus: MemoryBus, topic: Topic, kind: type[Event]) -> list[Event]:
    return [event for event in bus.events(topic) if isinstance(event, kind)]


async def seed_running(store: Store, release: ReleasePlan, version: str = "1.0.0") -> None:
    for node in release.nodes:
        status = pending(node.node_key, "app").model_copy(
            update={"state": NodeState.SUCCESS, "current_version": version, "prev_version": "0.9.0"}
        )
        assert await store.put_node(status, expected_revision=0) is not None


async def test_approval_gate_holds_the_next_batch_until_approved(store: Store, tmp_path: Path) -> None:
    """After batch 1 the release waits for approval, dispatching nothing; ReleaseApproved lets it finish."""
    script = Script()
    release = plan(4, Strategy(batches=[2], max_parallel=2, approval_after_batches=[1]))
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(
            lambda: equals(state_of(store, release.release_id), ReleaseState.AWAITING_APPROVAL), "approval is awaited"
        )
        await bus.idle()
        assert sorted(script.order) == ["fake/host-00/app", "fake/host-01/app"]
        assert [event.batch for event in of_type(bus, Topic.RELEASES, ReleaseAwaitingApproval)] == [0]  # type: ignore[attr-defined]
        await bus.publish(ReleaseApproved(release_id=release.release_id, actor="alice"))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
    assert len(script.order) == 4


async def test_pause_stops_dispatch_and_resume_continues(store: Store, tmp_path: Path) -> None:
    """Paused mid-batch: the in-flight node finishes, no other starts; after resume the release completes."""
    gate = asyncio.Event()
    script = Script(behaviour={"fake/host-00/app": "hang"}, release=gate)
    release = plan(3, Strategy(batches=["100%"], max_parallel=1))
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: script.in_flight == 1, "the first node is in flight")
        await bus.publish(ReleasePaused(release_id=release.release_id, actor="alice", reason="metrics look odd"))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.PAUSED), "the pause")
        gate.set()
        await until(lambda: script.in_flight == 0, "the in-flight node finishes")
        await bus.idle()
        assert script.order == ["fake/host-00/app"]
        counts = await store.count_release_nodes(release.release_id)
        assert (counts[ItemState.SUCCEEDED], counts[ItemState.QUEUED]) == (1, 2)
        await bus.publish(ReleaseResumed(release_id=release.release_id, actor="alice"))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
    assert len(script.order) == 3


async def test_abort_with_nodes_in_flight_lets_them_finish_and_dispatches_nothing_more(
    store: Store, tmp_path: Path
) -> None:
    """Abort: the release is halted at once with the reason; in-flight nodes still report; queued ones never go."""
    gate = asyncio.Event()
    script = Script(behaviour={"fake/host-00/app": "hang", "fake/host-01/app": "hang"}, release=gate)
    release = plan(5, Strategy(batches=["100%"], max_parallel=2))
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: script.in_flight == 2, "two nodes are in flight")
        await bus.publish(ReleaseAborted(release_id=release.release_id, actor="bob", reason="wrong build"))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.ABORTED), "the abort")
        gate.set()
        await until(lambda: script.in_flight == 0, "the in-flight nodes finish")
        await bus.idle()
    assert sorted(script.order) == ["fake/host-00/app", "fake/host-01/app"]
    counts = await store.count_release_nodes(release.release_id)
    assert (counts[ItemState.SUCCEEDED], counts[ItemState.QUEUED]) == (2, 3)
    halted = of_type(bus, Topic.RELEASES, ReleaseHalted)
    assert [event.reason for event in halted] == ["aborted by bob: wrong build"]  # type: ignore[attr-defined]


async def test_pause_between_batches_is_a_durable_timer(store: Store, tmp_path: Path) -> None:
    """The next batch starts no sooner than the pause after the previous one ended, from a timer in the store."""
    script = Script()
    release = plan(2, Strategy(batches=[1], pause_between_batches_s=0.4))
    async with reactor(store, script, tmp_path) as bus:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.WAITING), "the pause")
        record = await store.get_release(release.release_id)
        assert record is not None
        assert record.resume_at is not None
        await completion_announced(store, bus, release.release_id)
        assert loop.time() - started >= 0.4
    kinds = [type(event).__name__ for event in bus.events(Topic.RELEASES)]
    assert kinds[1:] == ["BatchStarted", "BatchCompleted", "BatchStarted", "BatchCompleted", "ReleaseCompleted"]


async def test_node_without_outcome_fails_by_deadline_and_the_policy_applies(store: Store, tmp_path: Path) -> None:
    """A node whose worker never answers is failed by the pacer with step `deadline`; budget 0 halts."""
    script = Script(behaviour={"fake/host-00/app": "hang"}, release=asyncio.Event())
    release = plan(2, Strategy(batches=["100%"], max_parallel=1, node_deadline_s=0.3, auto_rollback="none"))
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.HALTED), "the halt")
        failures = of_type(bus, Topic.OUTCOMES, NodeFailed)
        assert [(event.node_key, event.step) for event in failures] == [("fake/host-00/app", "deadline")]  # type: ignore[attr-defined]
        assert script.release is not None
        script.release.set()
    counts = await store.count_release_nodes(release.release_id)
    assert (counts[ItemState.FAILED], counts[ItemState.QUEUED]) == (1, 1)


async def test_node_deadline_leaves_room_for_the_min_healthy_window(store: Store, tmp_path: Path) -> None:
    """Deadline 0.5 s, min_healthy 1 s: a node observed for its whole window is not failed by the deadline."""
    script = Script()
    release = plan(1, Strategy(node_deadline_s=0.5, min_healthy_s=1.0, auto_rollback="none"))
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
        assert of_type(bus, Topic.OUTCOMES, NodeFailed) == []


async def test_spent_budget_with_release_policy_rolls_back_every_deployed_node_newest_first(
    store: Store, tmp_path: Path
) -> None:
    """Policy `release`: a failure in batch 2 rolls back batch 2's and batch 1's deployed nodes, newest first."""
    script = Script(behaviour={"fake/host-03/app": "fail"})
    release = plan(4, Strategy(batches=[2], max_parallel=1, auto_rollback=AutoRollback.RELEASE))
    await seed_running(store, release)
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(
            lambda: equals(state_of(store, release.release_id), ReleaseState.ROLLED_BACK), "the release rollback"
        )
        await bus.idle()
    release_rollbacks = [
        event.node_key  # type: ignore[attr-defined]
        for event in of_type(bus, Topic.COMMANDS, RollbackRequested)
        if event.reason.startswith("release rollback")  # type: ignore[attr-defined]
    ]
    assert release_rollbacks == ["fake/host-02/app", "fake/host-01/app", "fake/host-00/app"]
    for index in range(4):
        node = await store.get_node(f"fake/host-{index:02d}/app")
        assert node is not None
        assert (node.state, node.current_version) == (NodeState.ROLLED_BACK, "1.0.0")
    [done] = of_type(bus, Topic.RELEASES, ReleaseRolledBack)
    assert (done.rolled_back, done.failed) == (3, 0)  # type: ignore[attr-defined]


async def test_rollback_command_after_completion_returns_every_node(store: Store, tmp_path: Path) -> None:
    """A completed release rolled back on request: every node returns to its previous version."""
    script = Script()
    release = plan(3, Strategy(batches=["100%"], max_parallel=3))
    await seed_running(store, release)
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
        await bus.publish(ReleaseRollbackRequested(release_id=release.release_id, actor="carol", reason="bad metrics"))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.ROLLED_BACK), "the rollback")
    nodes = await store.list_nodes()
    assert {(node.state, node.current_version) for node in nodes} == {(NodeState.ROLLED_BACK, "1.0.0")}


async def test_pacer_stopped_during_a_pause_is_replaced_and_dispatches_each_node_once(
    store: Store, tmp_path: Path
) -> None:
    """The pause timer lives in the store: a new pacer on a new bus fires it; every node is deployed once."""
    script = Script()
    release = plan(3, Strategy(batches=[1], pause_between_batches_s=0.3))
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.WAITING), "the first pause")
    async with reactor(store, script, tmp_path) as second_bus:
        await completion_announced(store, second_bus, release.release_id, 15)
    assert sorted(script.calls.elements()) == [f"deploy:fake/host-{index:02d}/app" for index in range(3)]
    deploys = [event for event in second_bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested)]
    assert len({event.event_id for event in deploys}) == 2
    started = [event.batch for event in second_bus.events(Topic.RELEASES) if isinstance(event, BatchStarted)]
    completed = {
        event.event_id: event.batch
        for bus_ in (bus, second_bus)
        for event in bus_.events(Topic.RELEASES)
        if isinstance(event, BatchCompleted)
    }
    # The second pacer reports the batches it started and finished; batch 0 was reported by the first one, or
    # by the second from the outbox when the first stopped before announcing it (same id either way).
    assert started == [1, 2]
    assert sorted(completed.values()) == [0, 1, 2]


async def test_second_release_of_a_service_queues_until_the_first_ends(store: Store, tmp_path: Path) -> None:
    """One active release per service: the second waits in `queued`, then runs once the first completes."""
    gate = asyncio.Event()
    script = Script(behaviour={"fake/host-00/app": "hang"}, release=gate)
    first = plan(2, Strategy(batches=["100%"], max_parallel=2), release_id="app-2")
    second = plan(2, Strategy(batches=["100%"], max_parallel=2), release_id="app-3")
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=first.release_id, plan=first))
        await until(lambda: script.in_flight == 1, "the first release is deploying")
        await bus.publish(ReleaseRequested(release_id=second.release_id, plan=second))
        await until(lambda: equals(state_of(store, second.release_id), ReleaseState.QUEUED), "the second is queued")
        assert script.calls["deploy:fake/host-00/app"] == 1
        gate.set()
        await until(lambda: equals(state_of(store, second.release_id), ReleaseState.COMPLETED), "the second completes")
        assert await state_of(store, first.release_id) == ReleaseState.COMPLETED
    started = [event.release_id for event in bus.events(Topic.RELEASES) if isinstance(event, BatchStarted)]
    assert started == ["app-2", "app-3"]


async def test_second_release_of_a_service_is_refused_when_so_configured(store: Store, tmp_path: Path) -> None:
    """With concurrent_releases=refuse the second release halts at once, naming the active one."""
    gate = asyncio.Event()
    script = Script(behaviour={"fake/host-00/app": "hang"}, release=gate)
    first = plan(1, Strategy(), release_id="app-2")
    second = plan(1, Strategy(), release_id="app-3")
    bus = MemoryBus(retry_delay_s=0.01)
    started = asyncio.Event()
    settings = Settings(state_dir=tmp_path, timer_tick_s=0.02, concurrent_releases="refuse")
    task = asyncio.create_task(
        run_roles(
            Backends(bus=bus, store=store, memory_bus=bus),
            settings,
            {Role.ALL},
            factories={"fake": scripted(script)},
            started=started,
        )
    )
    await started.wait()
    try:
        await bus.publish(ReleaseRequested(release_id=first.release_id, plan=first))
        await until(lambda: script.in_flight == 1, "the first release is deploying")
        await bus.publish(ReleaseRequested(release_id=second.release_id, plan=second))
        await until(lambda: equals(state_of(store, second.release_id), ReleaseState.HALTED), "the refusal")
        record = await store.get_release(second.release_id)
        assert record is not None
        assert record.reason == "refused: release app-2 of app is active"
        gate.set()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_release_events_decided_before_a_crash_are_published_by_the_next_pacer(
    store: Store, tmp_path: Path
) -> None:
    """A pacer died after recording the release completed but before announcing it: the events wait in the
    record's outbox, and the next pacer publishes them, once each."""
    release = plan(1, Strategy())
    await store.add_release_nodes(
        [ReleaseNode(release_id=release.release_id, node_key=release.nodes[0].node_key, batch=0, position=0)]
    )
    announced = [
        BatchCompleted(
            event_id=derived_event_id("app-2", "batch", "0", "completed"),
            release_id="app-2",
            batch=0,
            succeeded=1,
            failed=0,
        ),
        ReleaseCompleted(event_id=derived_event_id("app-2", "completed"), release_id="app-2", succeeded=1, failed=0),
    ]
    now = utc_now()
    record = ReleaseRecord(
        release_id=release.release_id,
        plan=release.spec(),
        batch_sizes=[1],
        state=ReleaseState.COMPLETED,
        request_id=derived_event_id("app-2", "request"),
        created_at=now,
        updated_at=now,
        outbox=[event_document(event) for event in announced],
    )
    assert await store.put_release(record, expected_revision=0) is not None
    async with reactor(store, Script(), tmp_path) as bus:
        await until(lambda: of_type(bus, Topic.RELEASES, ReleaseCompleted), "the completion is announced")
        await bus.idle()
    assert [event.event_id for event in bus.events(Topic.RELEASES)] == [event.event_id for event in announced]
    saved = await store.get_release(release.release_id)
    assert saved is not None
    assert (saved.state, saved.outbox) == (ReleaseState.COMPLETED, [])


class _FlakyBus(MemoryBus):
    """Refuses the first ReleaseCompleted, as a broker that is briefly away would."""

    refused = 0

    async def publish(self, event: Event) -> None:
        if isinstance(event, ReleaseCompleted) and not self.refused:
            self.refused += 1
            raise BackendUnavailable("broker away")
        await super().publish(event)


async def test_an_announcement_that_fails_stays_in_the_outbox_until_published(store: Store, tmp_path: Path) -> None:
    """The completion is recorded but its event cannot be published: the outcome is retried, the outbox is
    published on the next pass, and subscribers see ReleaseCompleted once."""
    release = plan(2, Strategy(batches=["100%"], max_parallel=2))
    bus = _FlakyBus(retry_delay_s=0.01)
    async with reactor(store, Script(), tmp_path, bus):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await completion_announced(store, bus, release.release_id)
        await bus.idle()
    assert bus.refused == 1
    assert len(of_type(bus, Topic.RELEASES, ReleaseCompleted)) == 1
    saved = await store.get_release(release.release_id)
    assert saved is not None
    assert saved.outbox == []


async def test_a_deadline_failure_recorded_but_not_announced_is_announced_on_recovery(
    store: Store, tmp_path: Path
) -> None:
    """A pacer failed a node by deadline and died before publishing it: the next one publishes that NodeFailed
    (same id), so the rollback policy still applies."""
    release = plan(2, Strategy(batches=["100%"], max_parallel=2, node_deadline_s=600, failure_budget=1))
    await seed_running(store, release)
    node_key = release.nodes[0].node_key
    await store.add_release_nodes(
        [
            ReleaseNode(release_id=release.release_id, node_key=node.node_key, batch=0, position=index)
            for index, node in enumerate(release.nodes)
        ]
    )
    now = utc_now()
    record = ReleaseRecord(
        release_id=release.release_id,
        plan=release.spec(),
        batch_sizes=[2],
        budget=1,
        request_id=derived_event_id("app-2", "request"),
        created_at=now,
        updated_at=now,
    )
    assert await store.put_release(record, expected_revision=0) is not None
    assert await store.move_release_node(
        release.release_id, node_key, from_states=[ItemState.QUEUED], to_state=ItemState.FAILED, outcome="deadline"
    )
    script = Script()
    async with reactor(store, script, tmp_path) as bus:
        await completion_announced(store, bus, release.release_id)
        await until(lambda: of_type(bus, Topic.COMMANDS, RollbackRequested), "the node's rollback")
        await bus.idle()
    failures = [event for event in of_type(bus, Topic.OUTCOMES, NodeFailed) if event.node_key == node_key]  # type: ignore[attr-defined]
    assert [event.step for event in failures] == ["deadline"], "announced once"  # type: ignore[attr-defined]
    assert script.calls[f"rollback:{node_key}"] == 1
    [failed] = await store.list_release_nodes(release.release_id, state=ItemState.FAILED)
    assert failed.outcome == DEADLINE_ANNOUNCED, "marked, so later recoveries do not announce it again"


class _UnansweringAtFirst:
    """A store whose first `failures` calls to list the releases find it unavailable (a lock a dead pacer left on a
    release record, or the server down)."""

    def __init__(self, store: Store, failures: int) -> None:
        self._store = store
        self.failures = failures

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def list_releases(self) -> list[ReleaseRecord]:
        if self.failures:
            self.failures -= 1
            raise BackendUnavailable("MongoDB lock releases/app-2 is held by another writer")
        return await self._store.list_releases()


async def test_a_worker_whose_pacer_cannot_recover_yet_waits_and_recovers(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker starts while the store cannot answer the pacer's recovery: it tries again rather than exit, then
    sends the nodes a pacer before it dispatched, and the release completes."""
    monkeypatch.setattr(Pacer, "recover_when_possible", partialmethod(Pacer.recover_when_possible, retry_s=0.01))
    script = Script()
    release = plan(2, Strategy(batches=["100%"], max_parallel=2))
    async with reactor(store, script, tmp_path, roles=frozenset({Role.PACER})) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await bus.idle()
    assert (await store.count_release_nodes(release.release_id))[ItemState.DISPATCHED] == 2
    flaky = _UnansweringAtFirst(store, failures=3)
    async with reactor(cast(Store, flaky), script, tmp_path):
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
    assert flaky.failures == 0
    assert sorted(script.order) == [node.node_key for node in release.nodes]
