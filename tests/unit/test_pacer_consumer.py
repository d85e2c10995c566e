"""The Pacer with the executor worker and rollback consumer: batches, window, budget, redelivery, restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.consumers.pacer import _FAN_OUT, Pacer
from reactor.domain.limits import InFlightLimits
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState, pending
from reactor.errors import BackendUnavailable
from reactor.events import (
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeTarget,
    Package,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePlan,
    ReleaseRequested,
    RollbackRequested,
    Strategy,
    Topic,
    derived_event_id,
)
from reactor.ports import ReleaseRecord, Store
from reactor.runtime import Role
from tests.control import TimerTicks, WatchedBus, settle
from tests.fakes import Script
from tests.pacing import PACKAGE, plan, reactor

# Tier: `unit` on the in-memory backends, `mongo` on FerretDB (from the `store` fixture parameter).


async def test_batches_run_in_order_within_the_window(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 nodes, batches [1, 50%], max_parallel 2: canary first, then batches of 3 and 1; never over 2 in flight.

    Deploys are held until the test lets them go, one at a time; in flight whenever the reactor can do nothing
    more: the canary, the window of 2 over batch 1 and its last node alone, then batch 2.
    """
    script = Script(latched=True)
    release = plan(5, Strategy(batches=[1, "50%"], max_parallel=2))
    bus, ticks = WatchedBus(), TimerTicks(store, monkeypatch)
    held: list[list[str]] = []
    async with reactor(store, script, tmp_path, bus):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        while True:
            await settle(bus, script, ticks)
            held.append(sorted(script.held))
            if not script.held:
                break
            script.let_go(1)

    assert [len(nodes) for nodes in held] == [1, 2, 2, 1, 1, 0], held
    assert held[0] == ["fake/host-00/app"]
    assert all("fake/host-04/app" not in nodes for nodes in held[:4]), "batch 2 waits for all of batch 1"
    record = await store.get_release(release.release_id)
    assert record is not None
    assert record.state == ReleaseState.COMPLETED
    assert record.batch_sizes == [1, 3, 1]
    assert script.peak_in_flight == 2
    assert script.order[0] == "fake/host-00/app"
    assert sorted(script.order) == [node.node_key for node in release.nodes]
    progress = [event for event in bus.events(Topic.RELEASES) if not isinstance(event, ReleaseRequested)]
    kinds = [type(event).__name__ for event in progress]
    assert kinds == ["BatchStarted", "BatchCompleted"] * 3 + ["ReleaseCompleted"]
    assert [event.batch for event in progress if isinstance(event, BatchStarted)] == [0, 1, 2]
    completed = progress[-1]
    assert isinstance(completed, ReleaseCompleted)
    assert (completed.succeeded, completed.failed) == (5, 0)


async def test_next_batch_waits_for_every_outcome_of_the_current_one(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No node of batch 2 is dispatched while a node of batch 1 has no outcome."""
    script = Script(latched=True)
    release = plan(4, Strategy(batches=[2], max_parallel=2))
    bus, ticks = WatchedBus(), TimerTicks(store, monkeypatch)
    first_batch = {"fake/host-00/app", "fake/host-01/app"}

    def dispatched() -> set[str]:
        return {event.node_key for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested)}

    async with reactor(store, script, tmp_path, bus):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await settle(bus, script, ticks)
        assert set(script.held) == first_batch
        [finished] = script.let_go(1)
        await settle(bus, script, ticks)
        assert script.held == sorted(first_batch - {finished})
        assert dispatched() == first_batch
        script.let_go()
        await settle(bus, script, ticks)
        assert set(script.held) == {"fake/host-02/app", "fake/host-03/app"}
        script.let_go()
        await settle(bus, script, ticks)
    record = await store.get_release(release.release_id)
    assert record is not None
    assert record.state == ReleaseState.COMPLETED


async def test_spent_budget_halts_and_rolls_back_the_failed_node(store: Store, tmp_path: Path) -> None:
    """Budget 0: the failing canary halts the release, gets rolled back, and no other node is touched."""
    script = Script(behaviour={"fake/host-00/app": "fail"})
    release = plan(3, Strategy(batches=[1, "100%"], max_parallel=2, failure_budget=0))
    for node in release.nodes:
        running = pending(node.node_key, "app").model_copy(
            update={"state": NodeState.SUCCESS, "current_version": "1.0.0"}
        )
        assert await store.put_node(running, expected_revision=0) is not None
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await bus.idle()

    record = await store.get_release(release.release_id)
    assert record is not None
    assert record.state == ReleaseState.HALTED
    assert "failure budget spent" in record.reason
    assert script.order == ["fake/host-00/app", "fake/host-00/app"]  # the deploy, then its rollback
    assert script.calls["rollback:fake/host-00/app"] == 1
    counts = await store.count_release_nodes(release.release_id)
    assert (counts[ItemState.FAILED], counts[ItemState.QUEUED]) == (1, 2)
    halted = [event for event in bus.events(Topic.RELEASES) if isinstance(event, ReleaseHalted)]
    assert len(halted) == 1
    rollbacks = [event for event in bus.events(Topic.COMMANDS) if isinstance(event, RollbackRequested)]
    assert [event.node_key for event in rollbacks] == ["fake/host-00/app"]
    canary = await store.get_node("fake/host-00/app")
    assert canary is not None
    assert (canary.state, canary.current_version) == (NodeState.ROLLED_BACK, "1.0.0")


async def test_failures_within_budget_let_the_release_complete(store: Store, tmp_path: Path) -> None:
    """Budget 1 of 4 nodes: one failure is tolerated and the release completes with it counted."""
    script = Script(behaviour={"fake/host-02/app": "fail"})
    release = plan(4, Strategy(batches=[2], max_parallel=2, failure_budget=1, auto_rollback="none"))
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await bus.idle()
    completed = [event for event in bus.events(Topic.RELEASES) if isinstance(event, ReleaseCompleted)]
    assert [(event.succeeded, event.failed) for event in completed] == [(3, 1)]
    assert not [event for event in bus.events(Topic.COMMANDS) if isinstance(event, RollbackRequested)]


async def test_redelivered_outcomes_and_requests_are_not_counted_twice(store: Store, tmp_path: Path) -> None:
    """Replaying every outcome and the release request changes nothing: counts and events stay the same."""
    script = Script()
    release = plan(3, Strategy(batches=[1, "100%"], max_parallel=3))
    async with reactor(store, script, tmp_path) as bus:
        request = ReleaseRequested(release_id=release.release_id, plan=release)
        await bus.publish(request)
        await bus.idle()
        before = await store.count_release_nodes(release.release_id)
        pacer = Pacer(store, bus)
        for outcome in bus.events(Topic.OUTCOMES):
            await pacer.handle(outcome)
        await pacer.handle(request)
        await bus.idle()
    assert await store.count_release_nodes(release.release_id) == before
    assert sum(script.calls.values()) == 3
    ends = [event for event in bus.events(Topic.RELEASES) if isinstance(event, ReleaseCompleted | BatchCompleted)]
    assert len({event.event_id for event in ends}) == 3  # batch 1, batch 2, release: re-emissions share ids


async def test_restarted_pacer_resends_dispatched_nodes_and_finishes(store: Store, tmp_path: Path) -> None:
    """A pacer that stopped after dispatching resumes from the store; each node is deployed exactly once."""
    script = Script()
    release = plan(4, Strategy(batches=[2], max_parallel=2))
    # First life: only the pacer runs, so its dispatched nodes never get an outcome.
    async with reactor(store, script, tmp_path, roles=frozenset({Role.PACER})) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await bus.idle()
        assert (await store.count_release_nodes(release.release_id))[ItemState.DISPATCHED] == 2
    # Second life, on a fresh bus (the commands of the first life are lost): recovery resends them.
    async with reactor(store, script, tmp_path) as bus:
        await bus.idle()
        outcomes = [event for event in bus.events(Topic.OUTCOMES) if isinstance(event, NodeDeployed)]
    record = await store.get_release(release.release_id)
    assert record is not None
    assert record.state == ReleaseState.COMPLETED
    assert sorted(script.order) == [node.node_key for node in release.nodes]
    assert len(outcomes) == 4


async def test_release_min_healthy_is_carried_into_every_deploy_request(store: Store, tmp_path: Path) -> None:
    """Strategy min_healthy_s 0.2: every DeployRequested carries it, and each node is probed before it counts."""
    script = Script()
    release = plan(3, Strategy(batches=[1, "100%"], max_parallel=2, min_healthy_s=0.2))
    async with reactor(store, script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await bus.idle()

    requests = [event for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested)]
    assert sorted(event.node_key for event in requests) == [node.node_key for node in release.nodes]
    assert {event.min_healthy_s for event in requests} == {0.2}
    record = await store.get_release(release.release_id)
    assert record is not None
    assert record.state == ReleaseState.COMPLETED
    assert all(script.calls[f"status:{node.node_key}"] >= 1 for node in release.nodes)


class _HeldCommandsBus(MemoryBus):
    """A MemoryBus whose publish of a DeployRequested waits, once `hold` is cleared, until the test sets it."""

    def __init__(self) -> None:
        super().__init__(retry_delay_s=0.01)
        self.hold = asyncio.Event()
        self.hold.set()
        self.waiting = asyncio.Event()

    async def publish(self, event: Event) -> None:
        if isinstance(event, DeployRequested) and not self.hold.is_set():
            self.waiting.set()
            await self.hold.wait()
        await super().publish(event)


async def test_an_outcome_is_counted_while_a_pass_dispatching_the_release_is_held(store: Store) -> None:
    """An outcome's handler does not wait behind a pass of its release that is still dispatching (it would hold one
    of the bus's concurrent handlers for as long): it counts the node and returns, and the held pass runs again
    once it is let go, so the window it freed is filled."""
    release = plan(4, Strategy(batches=["100%"], max_parallel=2))
    async with _HeldCommandsBus() as bus:
        pacer = Pacer(store, bus)
        await pacer.handle(ReleaseRequested(release_id=release.release_id, plan=release))

        def deployed(index: int) -> NodeDeployed:
            return NodeDeployed(
                node_key=f"fake/host-{index:02d}/app", service="app", version="2.0.0", release_id=release.release_id
            )

        bus.hold.clear()
        # Its pass sends node 2 and is held there.
        first = asyncio.create_task(pacer.handle(deployed(0)))
        await asyncio.wait_for(bus.waiting.wait(), 5)
        await asyncio.wait_for(pacer.handle(deployed(1)), 5)
        counts = await store.count_release_nodes(release.release_id)
        assert counts[ItemState.SUCCEEDED] == 2, counts
        bus.hold.set()
        await asyncio.wait_for(first, 5)
        sent = sorted(event.node_key for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested))
    assert sent == [node.node_key for node in release.nodes], "the pass ran again and sent node 3 too"


async def test_a_node_whose_sent_record_landed_unanswered_is_still_sent(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store write that records a node as sent lands but its answer is lost (a timeout): the node's command is
    published all the same, in the same pass, rather than waiting for the resend timer."""
    release = plan(3, Strategy(batches=["100%"], max_parallel=3))
    lost = "fake/host-01/app"
    move = store.move_release_nodes
    failed: list[str] = []

    async def landed_unanswered(release_id: str, node_keys: list[str], **changes: Any) -> set[str]:
        moved = await move(release_id, node_keys, **changes)
        if lost in node_keys and not failed:
            failed.append(lost)
            raise BackendUnavailable("MongoDB update release_nodes: timed out")
        return moved

    monkeypatch.setattr(store, "move_release_nodes", landed_unanswered)
    async with MemoryBus(retry_delay_s=0.01) as bus:
        pacer = Pacer(store, bus)
        request = ReleaseRequested(release_id=release.release_id, plan=release)
        try:
            await pacer.handle(request)
        except BackendUnavailable:
            await pacer.handle(request)  # as the bus retries it
        sent = sorted(event.node_key for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested))
    assert failed == [lost]
    assert sent == [node.node_key for node in release.nodes]


async def test_a_node_whose_sent_record_stays_unanswered_is_sent_by_the_next_pass(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write recording a node as sent lands unanswered and the second try gets no answer either (the first
    one's lock is still held): the pass fails, and its retry sends the node, which is no longer queued."""
    release = plan(3, Strategy(batches=["100%"], max_parallel=3))
    lost = "fake/host-01/app"
    move = store.move_release_nodes
    failed: list[str] = []

    async def unanswered(release_id: str, node_keys: list[str], **changes: Any) -> set[str]:
        if lost in node_keys and len(failed) < 2:
            if not failed:
                await move(release_id, node_keys, **changes)
            failed.append(lost)
            raise BackendUnavailable("MongoDB update release_nodes: timed out")
        return await move(release_id, node_keys, **changes)

    monkeypatch.setattr(store, "move_release_nodes", unanswered)
    async with MemoryBus(retry_delay_s=0.01) as bus:
        pacer = Pacer(store, bus)
        request = ReleaseRequested(release_id=release.release_id, plan=release)
        with pytest.raises(BackendUnavailable):
            await pacer.handle(request)
        await pacer.handle(request)  # as the bus retries it
        sent = sorted(event.node_key for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested))
    assert failed == [lost, lost]
    assert sent == [node.node_key for node in release.nodes]
    counts = await store.count_release_nodes(release.release_id)
    assert counts[ItemState.DISPATCHED] == 3, counts


class _CountingStore:
    """A store that records how the pacer counts release nodes; `legacy`: it drops each release record's
    `settled`, as a record stored before the field has none."""

    def __init__(self, store: Store, *, legacy: bool) -> None:
        self._store = store
        self._legacy = legacy
        self.counted: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def put_release(self, record: ReleaseRecord, *, expected_revision: int) -> ReleaseRecord | None:
        if self._legacy:
            record = record.model_copy(update={"settled": None})
        return await self._store.put_release(record, expected_revision=expected_revision)

    async def count_release_nodes(self, release_id: str, *, batch: int | None = None) -> dict[ItemState, int]:
        self.counted.append("release" if batch is None else f"batch {batch}")
        return await self._store.count_release_nodes(release_id, batch=batch)

    async def count_release_batches(self, release_id: str) -> dict[int, dict[ItemState, int]]:
        self.counted.append("every batch")
        return await self._store.count_release_batches(release_id)


@pytest.mark.parametrize("legacy", [False, True], ids=["settled", "record-without-settled"])
async def test_a_release_rolling_forward_counts_its_current_batch_and_keeps_the_failures_of_earlier_ones(
    store: Store, tmp_path: Path, legacy: bool
) -> None:
    """Batches [2, 2, 1], budget 1: the canary batch's failure and the last batch's make two, so the release halts
    in its last batch; only the current batch is counted on each pass (every batch for a record without
    `settled`, which the pacer still paces right)."""
    script = Script(behaviour={"fake/host-00/app": "fail", "fake/host-04/app": "fail"})
    release = plan(5, Strategy(batches=[2, 2, 1], max_parallel=2, failure_budget=1, auto_rollback="none"))
    counting = _CountingStore(store, legacy=legacy)
    async with reactor(cast(Store, counting), script, tmp_path) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await bus.idle()

    record = await store.get_release(release.release_id)
    assert record is not None
    assert (record.state, record.batch) == (ReleaseState.HALTED, 2), record.reason
    assert record.reason == "failure budget spent: 2 failed, budget 1"
    halted = [event for event in bus.events(Topic.RELEASES) if isinstance(event, ReleaseHalted)]
    assert [(event.succeeded, event.failed) for event in halted] == [(3, 2)]
    assert sorted(script.order) == [node.node_key for node in release.nodes]
    if legacy:
        assert record.settled is None
        assert set(counting.counted) == {"every batch"}, counting.counted
    else:
        assert record.settled is not None
        settled = {state: count for state, count in record.settled.items() if count}
        assert settled == {ItemState.SUCCEEDED: 3, ItemState.FAILED: 1}, "batches 0 and 1, as counted"
        assert set(counting.counted) == {"batch 0", "batch 1", "batch 2"}, counting.counted


@pytest.mark.parametrize("store", ["embedded"], indirect=True)
async def test_outcomes_that_come_together_are_counted_before_one_pass_serves_them_all(store: Store) -> None:
    """Six outcomes handled at once: each is counted, and a single pass then sees all six and completes the
    release (a pass per outcome read the release and its counts six times to decide the same)."""
    release = plan(6, Strategy(batches=[6], max_parallel=6))
    counting = _CountingStore(store, legacy=False)
    async with MemoryBus() as bus:
        pacer = Pacer(cast(Store, counting), bus)
        await pacer.handle(ReleaseRequested(release_id=release.release_id, plan=release))
        sent = [event for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested)]
        assert len(sent) == 6
        counting.counted.clear()
        outcomes = [
            NodeDeployed(
                node_key=request.node_key,
                service=request.service,
                version=request.version,
                release_id=release.release_id,
                causation_id=request.event_id,
            )
            for request in sent
        ]
        await asyncio.gather(*(pacer.handle(outcome) for outcome in outcomes))
    record = await store.get_release(release.release_id)
    assert record is not None
    assert record.state == ReleaseState.COMPLETED
    assert counting.counted == ["batch 0"], "one pass, after the six counts"
    assert (await store.count_release_nodes(release.release_id))[ItemState.SUCCEEDED] == 6


@pytest.mark.unit
@pytest.mark.parametrize("release_artifact", [True, False], ids=["release-package", "node-artifacts-only"])
async def test_each_nodes_command_is_the_command_its_fields_validate_to_with_its_own_overrides(
    release_artifact: bool,
) -> None:
    """A release's commands after the first are copies of the first with each node's own fields: each must be
    exactly the command built and validated from that node's fields, its overrides included."""
    own_package = Package(url="https://packages.example.test/app-2.0.1.tar.gz", sha256="d" * 64)
    image = "registry.example.test/app:2.0.0"
    targets = [
        NodeTarget(node_key="fake/host-00/app", package=None if release_artifact else own_package),
        NodeTarget(node_key="fake/host-01/app", package=own_package, port=8081),
        NodeTarget(node_key="fake/host-02/app", image=image, container="web"),
        NodeTarget(node_key="k8s/default/app", image=image, container="app", port=9000),
        NodeTarget(node_key="fake/host-03/app", package=None if release_artifact else PACKAGE),
    ]
    release = ReleasePlan(
        release_id="app-2",
        service="app",
        version="2.0.0",
        package=PACKAGE if release_artifact else None,
        nodes=targets,
        strategy=Strategy(batches=["100%"], max_parallel=len(targets)),
    )
    async with MemoryBus() as bus, EmbeddedStore() as store:
        pacer = Pacer(store, bus)
        await pacer.handle(ReleaseRequested(release_id=release.release_id, plan=release))
        record = await store.get_release(release.release_id)
        assert record is not None
        rows = {row.node_key: row for row in await store.list_release_nodes(release.release_id)}
        commands = [event for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested)]

    assert [command.node_key for command in commands] == [target.node_key for target in targets]
    for command, target in zip(commands, targets, strict=True):
        built = DeployRequested(
            event_id=derived_event_id(release.release_id, target.node_key, "deploy"),
            occurred_at=command.occurred_at,
            node_key=target.node_key,
            service="app",
            version="2.0.0",
            package=target.package or release.package,
            image=target.image,
            container=target.container,
            port=target.port,
            release_id=release.release_id,
            causation_id=record.request_id,
        )
        assert command == built
        assert command == DeployRequested.model_validate_json(command.model_dump_json())
        assert command == pacer._full_deploy_request(record, rows[target.node_key]).model_copy(
            update={"occurred_at": command.occurred_at}
        )


class _HeldMoves:
    """A store whose writes recording nodes as sent wait until let go, counting how many are under way at once."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.go = asyncio.Event()
        self.under_way = 0
        self.peak = 0
        self.reached = asyncio.Event()
        self.expected_peak = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def move_release_nodes(self, release_id: str, node_keys: list[str], **changes: Any) -> set[str]:
        self.under_way += len(node_keys)
        self.peak = max(self.peak, self.under_way)
        if self.peak >= self.expected_peak:
            self.reached.set()
        try:
            await self.go.wait()
            return await self._store.move_release_nodes(release_id, node_keys, **changes)
        finally:
            self.under_way -= len(node_keys)


@pytest.mark.unit
@pytest.mark.parametrize("limits", [InFlightLimits(), InFlightLimits(overall=1000)], ids=["no-limits", "slots"])
async def test_a_window_never_has_more_than_its_fan_out_of_sent_records_under_way(limits: InFlightLimits) -> None:
    """A window of 100 nodes on a store whose writes wait: at most `_FAN_OUT` writes recording nodes as sent are
    under way at once, with or without in-flight slots (all 100 at once swamped FerretDB); once the writes go, every
    node is sent exactly once."""
    release = plan(100, Strategy(batches=["100%"], max_parallel=100))
    async with MemoryBus() as bus, EmbeddedStore() as embedded:
        store = _HeldMoves(embedded)
        store.expected_peak = _FAN_OUT
        pacer = Pacer(cast(Store, store), bus, limits=limits)
        started = asyncio.create_task(pacer.handle(ReleaseRequested(release_id=release.release_id, plan=release)))
        await asyncio.wait_for(store.reached.wait(), 5)
        for _ in range(50):  # every start that could follow the ones under way runs now, if any could
            await asyncio.sleep(0)
        assert store.peak == _FAN_OUT
        store.go.set()
        await asyncio.wait_for(started, 5)
        sent = [event.node_key for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested)]
    assert sorted(sent) == [node.node_key for node in release.nodes]
