"""Real `reactor worker` processes on Kafka and FerretDB: one is SIGKILLed in the middle of a release."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import Record, decode
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState
from reactor.events import (
    DeployRequested,
    Event,
    NodeDeployed,
    NodeTarget,
    Package,
    ReleaseCompleted,
    ReleasePlan,
    ReleaseRequested,
    Strategy,
    Topic,
)
from reactor.ports import ReleaseNode
from reactor.runtime import Role
from reactor.settings import Settings
from tests.fakes import Script, scripted
from tests.support import peak_in_flight, running_roles, until
from tests.workers import Workers, worker_group

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

NODES = 200
ZONES = ("a", "b", "c")
PACKAGE = Package(url="https://packages.example.test/app-3.0.0.tar.gz", sha256="e" * 64)


@pytest.fixture
def workers(kafka_bootstrap: str, mongo_url: str, mongo_database: str, tmp_path: Path) -> Iterator[Workers]:
    with worker_group(kafka_bootstrap, mongo_url, mongo_database, tmp_path) as group:
        yield group


@pytest.mark.timeout(400)  # its own waits: 5 s to join, 120 s to the kill, 180 s to the end
@pytest.mark.parametrize("moment", ["during a batch", "during a pause"])
async def test_sigkilled_worker_mid_release_leaves_every_node_final_exactly_once(
    workers: Workers, kafka_bootstrap: str, mongo_url: str, mongo_database: str, moment: str
) -> None:
    """200 nodes, two workers (every role), one SIGKILLed during a batch or during the pause between batches:
    each node gets one outcome id, none is stuck, one completion; the pause timer survives in the store."""
    prefix = workers.env["REACTOR_TOPIC_PREFIX"]
    async with (
        KafkaBus(kafka_bootstrap, prefix=prefix) as bus,
        MongoStore(mongo_url, database=mongo_database) as store,
    ):
        await bus.create_topics(partitions=4)
        victim = workers.start()
        workers.start()
        await asyncio.sleep(5)  # both members join the groups before the release arrives
        release = ReleasePlan(
            release_id="noop-200",
            service="app",
            version="3.0.0",
            package=PACKAGE,
            nodes=[NodeTarget(node_key=f"noop/host-{index:03d}/app") for index in range(NODES)],
            strategy=Strategy(
                batches=["50%"],
                max_parallel=10,
                failure_budget=0,
                pause_between_batches_s=4.0 if moment == "during a pause" else 0.0,
            ),
        )
        await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release, actor="test"))

        async with asyncio.timeout(120):
            if moment == "during a batch":
                while sum(node.state == NodeState.SUCCESS for node in await store.list_nodes()) < NODES // 3:
                    await asyncio.sleep(0.1)
            else:
                while (record := await store.get_release(release.release_id)) is None or (
                    record.state != ReleaseState.WAITING
                ):
                    await asyncio.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)

        async with asyncio.timeout(180):
            while True:
                record = await store.get_release(release.release_id)
                if record is not None and record.state not in {ReleaseState.RUNNING, ReleaseState.WAITING}:
                    break
                await asyncio.sleep(0.2)
        assert record.state == ReleaseState.COMPLETED, record.reason

        nodes = await store.list_nodes()
        assert len(nodes) == NODES
        assert {(node.state, node.current_version) for node in nodes} == {(NodeState.SUCCESS, "3.0.0")}

        outcomes = _decoded(await bus.history(Topic.OUTCOMES))
        deployed_ids: dict[str, set[str]] = defaultdict(set)
        for event in outcomes:
            assert isinstance(event, NodeDeployed), f"unexpected outcome {event!r}"
            deployed_ids[event.node_key].add(event.event_id)
        assert len(deployed_ids) == NODES
        assert {len(ids) for ids in deployed_ids.values()} == {1}, "a node has two different outcomes"

        commands = _decoded(await bus.history(Topic.COMMANDS))
        command_ids: dict[str, set[str]] = defaultdict(set)
        for event in commands:
            assert isinstance(event, DeployRequested)
            command_ids[event.node_key].add(event.event_id)
        assert {len(ids) for ids in command_ids.values()} == {1}, "a node was asked to deploy twice"

        completions = {
            e.event_id for e in _decoded(await bus.history(Topic.RELEASES)) if isinstance(e, ReleaseCompleted)
        }
        assert len(completions) == 1
        assert await bus.history(Topic.DLQ) == []


def _decoded(records: list[Record]) -> list[object]:
    return [decode(record)[0] for record in records]


def zone_of(node_key: str) -> str:
    return ZONES[int(node_key.split("/")[1].removeprefix("host-")) % 3]


async def at_rest(store: MongoStore, releases: list[ReleasePlan], script: Script) -> bool:
    """Every node dispatched is held by `script` and counted as in flight, every slot is a held node's, and no
    node left fits under the limits (overall 4, 2 per zone, 4 per release): nothing can move until the test lets
    a deploy go."""
    if None in [await store.get_release(release.release_id) for release in releases]:
        return False
    held = set(script.held)
    slots = await store.list_slots()
    if any(slot.node_key not in held for slot in slots):
        return False  # a slot taken for a node on its way, or not given back yet
    dispatched: set[str] = set()
    queued: list[ReleaseNode] = []
    for release in releases:
        dispatched |= {
            node.node_key for node in await store.list_release_nodes(release.release_id, state=ItemState.DISPATCHED)
        }
        queued += await store.list_release_nodes(release.release_id, state=ItemState.QUEUED)
    if dispatched != held:
        return False  # a command on its way, or an outcome not counted yet
    used = Counter(slot.scope for slot in slots)
    return all(
        used["all"] >= 4 or used[f"label/zone={zone_of(node.node_key)}"] >= 2 or used[f"release/{node.release_id}"] >= 4
        for node in queued
    )


async def test_limits_across_two_releases_hold_on_kafka_with_two_workers(
    workers: Workers, kafka_bootstrap: str, mongo_url: str, mongo_database: str, tmp_path: Path
) -> None:
    """Two services released at once through two pacer processes with overall 4 and 2 per zone in flight, their
    nodes deployed by an executor in the test that holds each deploy until the test lets it go, one at a time.

    Whenever the pacers can dispatch nothing more (every free slot's node waits behind a full scope), the held
    nodes keep to the limits, and at such a moment all 4 overall are in flight; the Kafka log shows the limits
    reached and never exceeded, and both releases complete.
    """
    workers.env.update(
        {
            "REACTOR_MAX_IN_FLIGHT": "4",
            "REACTOR_MAX_IN_FLIGHT_PER_LABEL": '{"zone": 2}',
            "REACTOR_RESEND_AFTER_S": "600",
        }
    )
    releases = [
        ReleasePlan(
            release_id=f"{service}-3",
            service=service,
            version="3.0.0",
            package=PACKAGE,
            nodes=[
                NodeTarget(node_key=f"fake/host-{index:02d}/{service}", labels={"zone": ZONES[index % 3]})
                for index in range(12)
            ],
            strategy=Strategy(batches=["100%"], max_parallel=4),
        )
        for service in ("app", "web")
    ]
    script = Script(latched=True)
    prefix = workers.env["REACTOR_TOPIC_PREFIX"]
    async with (
        KafkaBus(kafka_bootstrap, prefix=prefix) as bus,
        MongoStore(mongo_url, database=mongo_database) as store,
    ):
        await bus.create_topics(partitions=4)
        workers.start(role="pacer")
        workers.start(role="pacer")
        async with running_roles(
            bus, store, Settings(state_dir=tmp_path / "executor"), {Role.EXECUTOR}, {"fake": scripted(script)}
        ):
            await asyncio.sleep(5)  # every member joins its group before the releases arrive
            for release in releases:
                await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release, actor="test"))
            held_at_rest: list[int] = []
            while True:
                await until(lambda: at_rest(store, releases, script), "the pacers can dispatch nothing more", 60)
                held = script.held
                held_at_rest.append(len(held))
                assert len(held) <= 4, held
                assert all(count <= 2 for count in Counter(zone_of(node_key) for node_key in held).values()), held
                if not held:
                    break
                script.let_go(1)

            async def both_completed() -> bool:
                records = [await store.get_release(release.release_id) for release in releases]
                return all(record is not None and record.state == ReleaseState.COMPLETED for record in records)

            await until(both_completed, "both releases complete", 60)
        assert max(held_at_rest) == 4, held_at_rest

        commands = [event for event in _decoded(await bus.history(Topic.COMMANDS)) if isinstance(event, Event)]
        outcomes = [event for event in _decoded(await bus.history(Topic.OUTCOMES)) if isinstance(event, Event)]
        assert len({event.event_id for event in commands}) == 24, "each node was asked once"

        def scopes(release_id: str, node_key: str) -> list[str]:
            return ["all", f"zone={zone_of(node_key)}", f"release={release_id}"]

        peaks = peak_in_flight(commands, outcomes, scopes)
        assert peaks["all"] == 4, peaks
        assert max(peaks[f"zone={zone}"] for zone in ZONES) == 2, peaks
        assert all(peaks[f"zone={zone}"] <= 2 for zone in ZONES), peaks
        assert all(peaks[f"release={release.release_id}"] <= 4 for release in releases), peaks
        assert await store.list_slots() == [], "every slot given back"
