"""Release rollback through the real consumers, fast and normal: how many nodes go back at once, in which order,
past which gates. Every rollback is held by the executor until the test lets it go, so the counts are those of a
moment when the reactor can send nothing more, never of a lucky sleep.

The tests that take `wired` run on the in-memory bus and store (`unit`) and on Kafka with FerretDB (`kafka`,
`mongo`; pacer slots on, as in a distributed deployment); those that take `store` run on every store backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from pymongo import AsyncMongoClient

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.adapters.mongo_store import MongoStore
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState, pending
from reactor.events import (
    AutoRollback,
    Event,
    ReleaseApproved,
    ReleaseHalted,
    ReleasePaused,
    ReleasePlan,
    ReleaseRequested,
    ReleaseRollbackRequested,
    ReleaseRolledBack,
    RollbackRequested,
    Strategy,
    Topic,
)
from reactor.ports import EventBus, Store
from tests.conftest import fresh_kafka_bus
from tests.fakes import Script
from tests.pacing import plan, published, running, state_of
from tests.support import equals, until

WAIT_S = 60.0  # Kafka consumer groups take seconds to form on a loaded machine


@dataclass
class Wired:
    """A bus and a store to run the reactor on, and whether they are the distributed ones."""

    bus: EventBus
    store: Store
    distributed: bool

    def settings(self, **changes: Any) -> dict[str, Any]:
        """Settings as the mode runs them: distributed pacers hold each release's window with store slots."""
        return {"strict_max_parallel": self.distributed, **changes}


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.unit),
        pytest.param("kafka", marks=[pytest.mark.kafka, pytest.mark.mongo]),
    ]
)
async def wired(request: pytest.FixtureRequest) -> AsyncIterator[Wired]:
    """The in-memory bus and embedded store, or Kafka and FerretDB (started only for the `kafka` runs)."""
    if request.param == "kafka":
        bootstrap: str = request.getfixturevalue("kafka_bootstrap")
        url: str = request.getfixturevalue("mongo_url")
        database = f"test_{uuid4().hex[:12]}"
        try:
            async with (
                fresh_kafka_bus(bootstrap, retry_delay_s=0.01, grace_s=5.0) as kafka,
                MongoStore(url, database=database) as mongo,
            ):
                yield Wired(kafka, mongo, distributed=True)
        finally:
            async with AsyncMongoClient[dict[str, object]](url, serverSelectionTimeoutMS=5000) as client:
                await client.drop_database(database)
        return
    async with MemoryBus(retry_delay_s=0.01) as memory, EmbeddedStore(":memory:") as embedded:
        yield Wired(memory, embedded, distributed=False)


async def seed_running(store: Store, release: ReleasePlan) -> None:
    """Every node of the release runs 1.0.0 before it, so each has a version to go back to."""
    for node in release.nodes:
        status = pending(node.node_key, "app").model_copy(
            update={"state": NodeState.SUCCESS, "current_version": "1.0.0"}
        )
        assert await store.put_node(status, expected_revision=0) is not None


async def rollbacks_at_rest(
    store: Store, release_id: str, script: Script, window: int, *, besides: frozenset[str] = frozenset()
) -> bool:
    """Nothing can move until the test lets a rollback go: every rollback the pacer sent is held by the executor
    and counted as in flight (the held nodes `besides` are not the pacer's), every slot is a held node's, and
    either no deployed node is left or `window` are held."""
    if await state_of(store, release_id) != ReleaseState.ROLLING_BACK:
        return False
    # Read in the order nodes move (deployed, then sent, then out once let go), so a node the pacer sends between
    # two reads is seen in one of them, never in neither.
    left = await store.list_release_nodes(release_id, state=ItemState.SUCCEEDED)
    sent = {node.node_key for node in await store.list_release_nodes(release_id, state=ItemState.ROLLBACK_DISPATCHED)}
    if sent != set(script.held) - besides:
        return False  # a command on its way to the executor, or an outcome not counted yet
    if any(slot.node_key not in sent for slot in await store.list_slots()):
        return False  # a slot not given back yet, or taken for a node on its way
    return not left or len(sent) >= window


async def deployed(store: Store, release_id: str, count: int) -> bool:
    return (await store.count_release_nodes(release_id)).get(ItemState.SUCCEEDED, 0) == count


def node(index: int) -> str:
    return f"fake/host-{index:02d}/app"


async def rolled_back(bus: EventBus) -> ReleaseRolledBack | None:
    """The release's end as a subscriber reads it, once published."""
    ends = [event for event in await published(bus, Topic.RELEASES) if isinstance(event, ReleaseRolledBack)]
    assert len(ends) <= 1, ends
    return ends[0] if ends else None


def release_rollbacks(events: list[Event]) -> list[RollbackRequested]:
    """The rollbacks the pacer sent for the release (not the rollback consumer's of failed nodes)."""
    return [event for event in events if isinstance(event, RollbackRequested) and "release rollback" in event.reason]


async def gated_release(wired: Wired, script: Script, release: ReleasePlan) -> None:
    """Run `release` (unheld) until it waits for an approval, then hold every later run."""
    await wired.bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
    await until(
        lambda: equals(state_of(wired.store, release.release_id), ReleaseState.AWAITING_APPROVAL), "the gate", WAIT_S
    )
    script.latched = True


# 7 nodes: a canary, then batches of 3; after the second batch a human must approve. 4 deployed, 3 queued.
GATED = Strategy(canary=1, batches=[3], max_parallel=2, approval_after_batches=[2])
DEPLOYED = [node(index) for index in range(4)]


async def test_fast_rollback_puts_every_deployed_node_in_flight_at_once(wired: Wired, tmp_path: Path) -> None:
    """A release waiting for approval (canary and one batch deployed, max_parallel 2) is rolled back fast: all 4
    deployed nodes are in flight at once, the gate and the canary order aside; the queued nodes are not touched,
    and every event says the rollback was fast."""
    script = Script()
    release = plan(7, GATED)
    await seed_running(wired.store, release)
    async with running(wired.bus, wired.store, script, tmp_path, **wired.settings()):
        await gated_release(wired, script, release)
        await wired.bus.publish(
            ReleaseRollbackRequested(release_id=release.release_id, actor="carol", reason="errors", fast=True)
        )
        await until(lambda: rollbacks_at_rest(wired.store, release.release_id, script, len(DEPLOYED)), "rest", WAIT_S)
        assert sorted(script.held) == DEPLOYED
        script.let_go()
        await until(lambda: rolled_back(wired.bus), "ReleaseRolledBack", WAIT_S)
        done = await rolled_back(wired.bus)
        commands = await published(wired.bus, Topic.COMMANDS)
    assert script.peak_in_flight == 4, "all at once, twice max_parallel"
    assert sorted(key for key, count in script.calls.items() if key.startswith("deploy:")) == [
        f"deploy:{key}" for key in DEPLOYED
    ]
    rollbacks = release_rollbacks(commands)
    assert sorted(event.node_key for event in rollbacks) == DEPLOYED
    assert {event.reason for event in rollbacks} == {"fast release rollback: rollback requested by carol: errors"}
    assert done is not None
    assert (done.rolled_back, done.failed, done.fast) == (4, 0, True)
    counts = await wired.store.count_release_nodes(release.release_id)
    assert (counts[ItemState.ROLLED_BACK], counts[ItemState.QUEUED]) == (4, 3)
    record = await wired.store.get_release(release.release_id)
    assert record is not None
    assert record.fast_rollback
    for key in DEPLOYED:
        status = await wired.store.get_node(key)
        assert status is not None
        assert (status.state, status.current_version) == (NodeState.ROLLED_BACK, "1.0.0")


async def test_normal_rollback_keeps_max_parallel_and_goes_newest_first(wired: Wired, tmp_path: Path) -> None:
    """The same release rolled back without `fast`: at every moment of rest exactly max_parallel (2) are in flight
    while nodes wait, and they are the newest deployed ones left; the end event says it was not fast."""
    script = Script()
    release = plan(7, GATED)
    await seed_running(wired.store, release)
    async with running(wired.bus, wired.store, script, tmp_path, **wired.settings()):
        await gated_release(wired, script, release)
        await wired.bus.publish(ReleaseRollbackRequested(release_id=release.release_id, actor="carol"))
        left = list(DEPLOYED)
        while left:
            await until(lambda: rollbacks_at_rest(wired.store, release.release_id, script, 2), "rest", WAIT_S)
            assert sorted(script.held) == left[-2:], (script.held, left)
            [finished] = script.let_go(1)
            left.remove(finished)
        await until(lambda: rolled_back(wired.bus), "ReleaseRolledBack", WAIT_S)
        done = await rolled_back(wired.bus)
        releases = await published(wired.bus, Topic.RELEASES)
        commands = await published(wired.bus, Topic.COMMANDS)
    assert script.peak_in_flight == 2
    assert {event.reason for event in release_rollbacks(commands)} == {"release rollback: rollback requested by carol"}
    assert done is not None
    assert (done.rolled_back, done.fast) == (4, False)
    assert not [event for event in releases if isinstance(event, ReleaseApproved)], "nobody approved anything"


@pytest.mark.parametrize(
    ("rollback_parallel", "limits", "window"),
    [
        (3, {}, 3),
        (None, {"max_in_flight": 2}, 2),
        (4, {"max_in_flight": 3}, 3),
        (2, {"max_in_flight": 5}, 2),
        (None, {"max_in_flight_per_service": 4, "strict_max_parallel": True}, 4),
        (None, {"strict_max_parallel": True}, 8),
    ],
    ids=["rollback_parallel", "overall-limit", "limit-below-parallel", "parallel-below-limit", "service", "slots"],
)
async def test_fast_rollback_keeps_to_rollback_parallel_or_the_limits_whichever_is_lower(
    store: Store, tmp_path: Path, rollback_parallel: int | None, limits: dict[str, Any], window: int
) -> None:
    """8 deployed nodes, max_parallel 1, rolled back fast: at every moment of rest exactly the lower of
    rollback_parallel and the limits across releases are in flight while nodes wait (all 8 with neither, even
    with each release's window held by slots), and never more."""
    script = Script()
    release = plan(8, Strategy(batches=["100%"], max_parallel=1, rollback_parallel=rollback_parallel))
    await seed_running(store, release)
    bus = MemoryBus(retry_delay_s=0.01)
    async with running(bus, store, script, tmp_path, **limits):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
        assert script.peak_in_flight == 1
        script.latched = True
        await bus.publish(ReleaseRollbackRequested(release_id=release.release_id, fast=True))
        remaining = 8
        while remaining:
            await until(lambda: rollbacks_at_rest(store, release.release_id, script, window), "rest")
            assert len(script.held) == min(window, remaining), script.held
            script.let_go(1)
            remaining -= 1
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.ROLLED_BACK), "the end")
    assert script.peak_in_flight == window
    assert await store.list_slots() == [], "every slot given back"


async def test_fast_rollback_of_a_paused_release_sends_every_deployed_node_at_once(
    store: Store, tmp_path: Path
) -> None:
    """Paused after 3 of 5 nodes (max_parallel 1): a fast rollback does not wait for a resume and sends all 3."""
    script = Script(latched=True)
    release = plan(5, Strategy(batches=["100%"], max_parallel=1))
    await seed_running(store, release)
    bus = MemoryBus(retry_delay_s=0.01)
    async with running(bus, store, script, tmp_path):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        for index in range(3):
            await until(lambda: len(script.held) == 1, "a deploy is held")
            if index == 2:
                await bus.publish(ReleasePaused(release_id=release.release_id, actor="alice"))
                await until(lambda: equals(state_of(store, release.release_id), ReleaseState.PAUSED), "the pause")
            script.let_go()
        await until(lambda: deployed(store, release.release_id, 3), "three nodes deployed")
        assert await state_of(store, release.release_id) == ReleaseState.PAUSED
        await bus.publish(ReleaseRollbackRequested(release_id=release.release_id, fast=True))
        await until(lambda: rollbacks_at_rest(store, release.release_id, script, 3), "rest")
        assert sorted(script.held) == [node(index) for index in range(3)]
        script.let_go()
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.ROLLED_BACK), "the end")
    assert sum(1 for key in script.calls if key.startswith("deploy:")) == 3


async def test_automatic_release_rollback_is_fast_when_the_strategy_says_so(store: Store, tmp_path: Path) -> None:
    """Policy `release` with fast_rollback: the failure in batch 3 rolls back the 4 nodes of batches 1 and 2 at
    once (max_parallel 1), beside the failed node's own rollback; the halt comes first, the end says fast."""
    script = Script(latched=True, behaviour={node(4): "fail"})
    strategy = Strategy(batches=[2], max_parallel=1, auto_rollback=AutoRollback.RELEASE, fast_rollback=True)
    release = plan(6, strategy)
    await seed_running(store, release)
    bus = MemoryBus(retry_delay_s=0.01)
    async with running(bus, store, script, tmp_path):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        for _ in range(5):  # the deploys of nodes 0 to 4, one at a time
            await until(lambda: len(script.held) == 1, "a deploy is held")
            script.let_go()
        await until(lambda: node(4) in script.held, "the failed node's own rollback is held")
        await until(
            lambda: rollbacks_at_rest(store, release.release_id, script, 4, besides=frozenset({node(4)})), "rest"
        )
        assert sorted(script.held) == [node(index) for index in range(5)], "4 release rollbacks and the failed node"
        script.let_go()
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.ROLLED_BACK), "the end")
        await bus.idle()
    kinds = [type(event) for event in bus.events(Topic.RELEASES)]
    assert kinds.index(ReleaseHalted) < kinds.index(ReleaseRolledBack)
    [done] = [event for event in bus.events(Topic.RELEASES) if isinstance(event, ReleaseRolledBack)]
    assert (done.rolled_back, done.fast) == (4, True)
    assert sorted(event.node_key for event in release_rollbacks(bus.events(Topic.COMMANDS))) == [
        node(index) for index in range(4)
    ]


async def test_a_fast_request_speeds_up_a_normal_rollback_under_way(store: Store, tmp_path: Path) -> None:
    """A normal rollback of 5 nodes at max_parallel 1 is under way with one node held; a fast request sends the
    other 4 at once, and the end event says fast."""
    script = Script()
    release = plan(5, Strategy(batches=["100%"], max_parallel=1))
    await seed_running(store, release)
    bus = MemoryBus(retry_delay_s=0.01)
    async with running(bus, store, script, tmp_path):
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.COMPLETED), "completion")
        script.latched = True
        await bus.publish(ReleaseRollbackRequested(release_id=release.release_id, actor="carol"))
        await until(lambda: rollbacks_at_rest(store, release.release_id, script, 1), "the first rollback is held")
        assert script.held == [node(4)], "newest first"
        await bus.publish(ReleaseRollbackRequested(release_id=release.release_id, actor="dave", fast=True))
        await until(lambda: rollbacks_at_rest(store, release.release_id, script, 5), "every rollback is held")
        assert sorted(script.held) == [node(index) for index in range(5)]
        script.let_go()
        await until(lambda: equals(state_of(store, release.release_id), ReleaseState.ROLLED_BACK), "the end")
        await bus.idle()
    [done] = [event for event in bus.events(Topic.RELEASES) if isinstance(event, ReleaseRolledBack)]
    assert (done.rolled_back, done.fast) == (5, True)
    record = await store.get_release(release.release_id)
    assert record is not None
    assert record.reason == "rollback requested by carol", "the first request's reason stands"
