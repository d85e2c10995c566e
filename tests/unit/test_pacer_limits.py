"""In-flight limits across releases, exact max_parallel across pacers, leftover slots and the timer lease,
through the real consumers on every store backend (the `store` fixture). Limits are checked from the event
log: a node is in flight from its command to its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from itertools import cycle
from pathlib import Path
from typing import cast

import pytest

from reactor.adapters.memory_bus import MemoryBus
from reactor.consumers.pacer import TIMER_LEASE, Pacer
from reactor.domain.limits import InFlightLimits, scopes_for
from reactor.domain.pacer import ReleaseState
from reactor.events import (
    DeployRequested,
    NodeTarget,
    ReleasePlan,
    ReleaseRequested,
    RollbackRequested,
    Strategy,
    Topic,
    utc_now,
)
from reactor.ports import ReleaseNode, Store
from reactor.runtime import Role
from tests.control import TimerTicks, WatchedBus, settle
from tests.fakes import Script
from tests.pacing import PACKAGE, reactor, state_of
from tests.support import equals, peak_in_flight, until

ZONES = ("a", "b", "c")


def zoned_plan(service: str, count: int, strategy: Strategy) -> ReleasePlan:
    """`count` nodes of `service` spread over three zones, round robin."""
    return ReleasePlan(
        release_id=f"{service}-2",
        service=service,
        version="2.0.0",
        package=PACKAGE,
        nodes=[
            NodeTarget(node_key=f"fake/host-{index:02d}/{service}", labels={"zone": ZONES[index % 3]})
            for index in range(count)
        ],
        strategy=strategy,
    )


def zone_of(node_key: str) -> str:
    return ZONES[int(node_key.split("/")[1].removeprefix("host-")) % 3]


def log_peaks(bus: MemoryBus) -> dict[str, int]:
    commands = [event for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested | RollbackRequested)]
    return peak_in_flight(
        commands,
        bus.events(Topic.OUTCOMES),
        lambda release_id, node_key: ["all", f"zone={zone_of(node_key)}", f"release={release_id}"],
    )


def test_scopes_of_a_node_follow_the_limits_in_a_fixed_order() -> None:
    limits = InFlightLimits(overall=10, per_service=4, per_label={"zone": 2, "cluster": 3}, release_parallel=True)
    zoned = NodeTarget(node_key="physical/web-1/shop", labels={"zone": "eu-1"})
    assert scopes_for(
        limits, release_id="r1", service="shop", max_parallel=5, node_key=zoned.node_key, target=zoned
    ) == [("all", 10), ("service/shop", 4), ("label/zone=eu-1", 2), ("release/r1", 5)]
    # A Kubernetes node's cluster is its context unless it is labelled; an unlabelled host has neither.
    pod = "k8s/prod-east/shop/deployment/api"
    assert scopes_for(limits, release_id="r1", service="shop", max_parallel=5, node_key=pod, target=None) == [
        ("all", 10),
        ("service/shop", 4),
        ("label/cluster=prod-east", 3),
        ("release/r1", 5),
    ]
    assert (
        scopes_for(InFlightLimits(), release_id="r1", service="shop", max_parallel=5, node_key=pod, target=None) == []
    )


async def test_global_and_zone_limits_hold_across_two_concurrent_releases(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two services released at once, each allowed 4 in parallel; overall 3 and one per zone across both.

    Deploys are held until the test lets them go, a few at a time: whenever the reactor can do nothing more,
    one node of each zone that has nodes left is in flight, never more; the log shows the limits reached and
    never exceeded, and both releases in flight at the same time.
    """
    script = Script(latched=True)
    first = zoned_plan("app", 9, Strategy(batches=["100%"], max_parallel=4))
    second = zoned_plan("web", 9, Strategy(batches=["100%"], max_parallel=4))
    every_node = [node.node_key for node in (*first.nodes, *second.nodes)]
    bus, ticks = WatchedBus(), TimerTicks(store, monkeypatch)
    async with reactor(store, script, tmp_path, bus, max_in_flight=3, max_in_flight_per_label={"zone": 1}):
        await bus.publish(ReleaseRequested(release_id=first.release_id, plan=first))
        await bus.publish(ReleaseRequested(release_id=second.release_id, plan=second))
        finished: list[str] = []
        for group in cycle((1, 2, 3)):
            await settle(bus, script, ticks)
            # Two held nodes of one zone break the zone limit; a zone with nodes left and none held is a slot unused.
            zones_left = sorted({zone_of(node_key) for node_key in every_node if node_key not in finished})
            assert sorted(zone_of(node_key) for node_key in script.held) == zones_left, (script.held, finished)
            if not script.held:
                break
            finished += script.let_go(group)
        await until(lambda: equals(state_of(store, first.release_id), ReleaseState.COMPLETED), "the first completes")
        await until(lambda: equals(state_of(store, second.release_id), ReleaseState.COMPLETED), "the second completes")
    peaks = log_peaks(bus)
    assert peaks["all"] == 3, peaks
    assert {zone: peaks[f"zone={zone}"] for zone in ZONES} == {"a": 1, "b": 1, "c": 1}, peaks
    assert script.peak_in_flight == 3
    assert sorted(script.order) == sorted(every_node), "every node deployed once"
    assert await store.list_slots() == [], "every slot given back"
    # Both releases made progress side by side, not one after the other.
    deploys = [event for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested)]
    first_of = {
        release: min(i for i, e in enumerate(deploys) if e.release_id == release) for release in ("app-2", "web-2")
    }
    last_of = {
        release: max(i for i, e in enumerate(deploys) if e.release_id == release) for release in ("app-2", "web-2")
    }
    assert max(first_of.values()) < min(last_of.values()), "the releases interleave"


async def test_two_pacers_never_exceed_max_parallel_with_strict_slots(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pacer members share one release's outcomes; slots keep it at max_parallel across them.

    Deploys are held until the test lets them go, 1, 2 or 3 at a time. Whenever the reactor can do nothing more,
    at most max_parallel are in flight, each holding a slot, and while nodes wait no slot is free: the first
    window is full. Two pacers that race for one node may both take a slot for it, and the second is given back
    with that node's outcome, so in between fewer than max_parallel may be in flight; never more.
    """
    script = Script(latched=True)
    release = zoned_plan("app", 24, Strategy(batches=["100%"], max_parallel=3))
    bus, ticks = WatchedBus(), TimerTicks(store, monkeypatch)
    async with (
        reactor(store, script, tmp_path, bus, strict_max_parallel=True),
        reactor(store, script, tmp_path, bus, roles=frozenset({Role.PACER}), strict_max_parallel=True),
    ):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await settle(bus, script, ticks)
        assert len(script.held) == 3, "the first window is full"
        finished: list[str] = []
        for group in cycle((1, 2, 3)):
            slots = await store.list_slots()
            waiting = len(release.nodes) - len(finished) - len(script.held)
            assert len(script.held) <= 3, (script.held, finished)
            assert {slot.node_key for slot in slots} == set(script.held), "each node in flight holds a slot"
            assert len(slots) == 3 if waiting else len(slots) <= 3, (slots, script.held)
            if not script.held:
                break
            finished += script.let_go(group)
            await settle(bus, script, ticks)
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
    assert log_peaks(bus)["release=app-2"] == 3
    assert script.peak_in_flight == 3
    assert sorted(script.order) == sorted(node.node_key for node in release.nodes), "each node deployed once"


async def test_a_leftover_slot_is_freed_and_the_release_goes_on(store: Store, tmp_path: Path) -> None:
    """A pacer died holding the only overall slot for a node it never sent: the sweep frees it."""
    script = Script()
    release = zoned_plan("app", 2, Strategy(batches=["100%"], max_parallel=2))
    long_ago = utc_now() - timedelta(minutes=5)
    assert await store.take_slots("old-1", "fake/host-99/app", [("all", 1)], now=long_ago)
    async with reactor(store, script, tmp_path, max_in_flight=1) as bus:
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
    assert sorted(script.order) == ["fake/host-00/app", "fake/host-01/app"]
    assert await store.list_slots() == []


async def test_a_fresh_slot_of_a_node_being_dispatched_is_not_swept(store: Store) -> None:
    """Between taking its slots and recording the dispatch a node is not in flight yet; the sweep waits."""
    release = zoned_plan("app", 1, Strategy())
    await store.add_release_nodes(
        [ReleaseNode(release_id="app-2", node_key=release.nodes[0].node_key, batch=0, position=0)]
    )
    assert await store.take_slots("app-2", release.nodes[0].node_key, [("all", 1)], now=utc_now())
    pacer = Pacer(store, MemoryBus(), limits=InFlightLimits(overall=1))
    await pacer.tick()
    assert [slot.node_key for slot in await store.list_slots()] == [release.nodes[0].node_key]


async def test_only_the_lease_holder_fires_timers(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another pacer holds the timer lease: a due pause is not fired until that lease lapses."""
    script = Script()
    release = zoned_plan("app", 2, Strategy(batches=[1], pause_between_batches_s=0.01))
    ticks = TimerTicks(store, monkeypatch)
    async with reactor(store, script, tmp_path) as bus:
        assert await store.take_lease(TIMER_LEASE, "someone-else", now=utc_now(), ttl_s=60)
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.WAITING), "the pause")
        skipped = ticks.refused.total()
        await until(lambda: ticks.refused.total() >= skipped + 3, "the pacer skips ticks with the pause due")
        assert await state_of(store, release.release_id) == ReleaseState.WAITING, "nobody fired the timer"
        assert await store.take_lease(TIMER_LEASE, "someone-else", now=utc_now(), ttl_s=0.2)  # lapses soon
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion", 10)
    assert len(script.order) == 2


async def test_a_pacer_that_stops_hands_the_timer_lease_over_at_once(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a pacer runs, its timer lease is refused to others; once it stops, another takes it at once."""
    ticks = TimerTicks(store, monkeypatch)
    async with reactor(store, Script(), tmp_path):
        await until(lambda: ticks.begun.total() > 0, "the pacer has taken the timer lease")
        assert not await store.take_lease(TIMER_LEASE, "another-pacer", now=utc_now(), ttl_s=60)
    assert await store.take_lease(TIMER_LEASE, "another-pacer", now=utc_now(), ttl_s=60)


def test_a_release_that_fits_in_its_max_parallel_needs_no_slot_of_its_own() -> None:
    strict = InFlightLimits(release_parallel=True)
    node = "fake/host-00/app"
    assert scopes_for(strict, release_id="r1", service="app", max_parallel=4, node_key=node, target=None) == [
        ("release/r1", 4)
    ]
    assert scopes_for(
        strict, release_id="r1", service="app", max_parallel=4, node_key=node, target=None, release_size=5
    ) == [("release/r1", 4)]
    assert (
        scopes_for(strict, release_id="r1", service="app", max_parallel=4, node_key=node, target=None, release_size=4)
        == []
    )
    assert strict.holds(max_parallel=4, release_size=5)
    assert not strict.holds(max_parallel=4, release_size=4)
    # A limit across releases still takes slots.
    assert InFlightLimits(overall=10, release_parallel=True).holds(max_parallel=4, release_size=4)


async def test_strict_max_parallel_takes_no_slots_for_a_release_that_fits_in_it(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 nodes with max_parallel 4 and strict slots: all four go at once, none holding a slot (none could be over
    the limit), and the release completes."""
    script = Script(latched=True)
    release = zoned_plan("app", 4, Strategy(batches=["100%"], max_parallel=4))
    bus, ticks = WatchedBus(), TimerTicks(store, monkeypatch)
    async with reactor(store, script, tmp_path, bus, strict_max_parallel=True):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await settle(bus, script, ticks)
        assert len(script.held) == 4
        assert await store.list_slots() == []
        script.let_go(4)
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
    assert sorted(script.order) == sorted(node.node_key for node in release.nodes)


class _LatchedSlots:
    """A store whose `take_slots` lets no call through until `together` calls are in it at once (or a few seconds
    went by: then the call fails), so a pacer that took a window's slots one node after another fails."""

    def __init__(self, store: Store, together: int) -> None:
        self._store = store
        self._together = together
        self._inside = 0
        self._all_in = asyncio.Event()
        self.peak = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def take_slots(
        self, release_id: str, node_key: str, scopes: Sequence[tuple[str, int]], *, now: datetime
    ) -> bool:
        self._inside += 1
        self.peak = max(self.peak, self._inside)
        if self._inside >= self._together:
            self._all_in.set()
        try:
            async with asyncio.timeout(5):
                await self._all_in.wait()
            return await self._store.take_slots(release_id, node_key, scopes, now=now)
        finally:
            self._inside -= 1


async def test_a_window_takes_the_slots_of_its_nodes_at_once(store: Store) -> None:
    """A release larger than its max_parallel holds it with slots: the first window's eight nodes take theirs at
    once (one after another, a window took the store's round trip times its size), and exactly eight go."""
    release = zoned_plan("app", 20, Strategy(batches=["100%"], max_parallel=8))
    latched = _LatchedSlots(store, together=8)
    async with MemoryBus() as bus:
        pacer = Pacer(cast(Store, latched), bus, limits=InFlightLimits(release_parallel=True))
        await pacer.handle(ReleaseRequested(release_id=release.release_id, plan=release))
        sent = [event for event in bus.events(Topic.COMMANDS) if isinstance(event, DeployRequested)]
    assert latched.peak == 8
    assert sorted(event.node_key for event in sent) == [node.node_key for node in release.nodes[:8]]
    assert sorted(slot.node_key for slot in await store.list_slots()) == [node.node_key for node in release.nodes[:8]]
