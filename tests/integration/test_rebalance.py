"""A worker joins while slow deploys of real `local` nodes run: real `reactor worker` processes on Kafka and FerretDB.

The report this guards against: two `reactor worker --role all` processes, six `local` nodes whose 2.0.0 takes long
to become healthy, max_parallel 6; a third worker joins during the release. Every node logged 'taken over while
deploy ran', the release halted on its budget, all six nodes served 1.0.0, and some had been reported NodeDeployed
2.0.0. What the test checks comes from outside the reactor's state: an evidence log the services write themselves,
the services over HTTP, and the topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import Record, decode
from reactor.demo import SERVICE, BuiltPackage, build_package
from reactor.demo.scenario import free_ports, served_version
from reactor.domain.pacer import FINAL, ReleaseState
from reactor.events import (
    DeployRequested,
    Event,
    HealthCheck,
    NodeDeployed,
    NodeTarget,
    Package,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePlan,
    ReleaseRequested,
    Strategy,
    Topic,
)
from reactor.executors.local import stop_all
from tests import evidence_service
from tests.support import equals, until
from tests.workers import Workers, commands_assigned, worker_group

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

PARTITIONS = 4
NODES = 6
SLOW_VERSION = "2.0.0"
SLOW_S = 8.0  # the slow version listens this long after its start at the earliest, and only once the gate is open
WAIT_S = 120.0
# What a worker logs, bound to the node's key, when a run of it stops before its end (cancelled, or fenced).
INTERRUPTED = {
    "interrupted; claim given up",
    "could not give the interrupted claim up; it frees itself after its lease",
    "fenced",
}


@dataclass
class Process:
    """One service process of a node, as the evidence log tells its start (time on the machine's monotonic clock)."""

    pid: int
    port: int
    version: str
    started: float
    others_alive: list[int]


def processes(evidence: Path) -> list[Process]:
    """Every service process in the evidence log, in the order they started."""
    if not evidence.exists():
        return []
    started = [
        Process(entry["pid"], entry["port"], entry["version"], entry["monotonic"], entry["others_alive"])
        for entry in evidence_service.entries(evidence.read_text().splitlines())
        if entry["event"] == "start"
    ]
    return sorted(started, key=lambda process: process.started)


def service_run(evidence: Path, gate: Path) -> bytes:
    """A package's `run`: the evidence service, writing to `evidence`, its slow version held until `gate` exists."""
    arguments = [sys.executable, evidence_service.__file__, str(evidence), str(gate), SLOW_VERSION, str(SLOW_S)]
    return ("#!/bin/sh\nexec " + " ".join(f"'{argument}'" for argument in arguments) + "\n").encode()


def node_key(host: str) -> str:
    return f"local/{host}/{SERVICE}"


def spread_hosts(count: int) -> list[str]:
    """Hosts whose node keys fall on every commands partition (murmur2, as the reactor's producer puts them), so
    that whatever the group assigns to a new member, some node's request moves to another worker."""
    chosen: list[str] = []
    covered: set[int] = set()
    for index in range(1000):
        host = f"host-{index}"
        partition = (murmur2(node_key(host).encode()) & 0x7FFFFFFF) % PARTITIONS
        if partition not in covered or len(covered) == PARTITIONS:
            chosen.append(host)
            covered.add(partition)
        if len(chosen) == count:
            return chosen
    raise AssertionError("no hosts found")


def plan(release_id: str, package: BuiltPackage, ports: dict[str, int]) -> ReleasePlan:
    """Every node at once (max_parallel 6), no failure tolerated, a health timeout of 60 s as in the report."""
    return ReleasePlan(
        release_id=release_id,
        service=SERVICE,
        version=package.version,
        package=Package(url=package.url, sha256=package.sha256),
        health=HealthCheck(timeout_s=60),
        nodes=[NodeTarget(node_key=node_key(host), port=port) for host, port in ports.items()],
        strategy=Strategy(batches=["100%"], max_parallel=NODES, failure_budget=0),
    )


def split_between(workers: Workers, indexes: list[int]) -> bool:
    """The workers `indexes` hold every commands partition between them, each some and none twice: their group
    settled."""
    held = [commands_assigned(workers, index) for index in indexes]
    return all(held) and sum(map(len, held)) == PARTITIONS and set().union(*held) == set(range(PARTITIONS))


def interruptions(workers: Workers, key: str) -> int:
    """How many runs of node `key` the workers logged as stopped before their end."""
    return sum(
        record.get("node_key") == key and record.get("event") in INTERRUPTED
        for index in range(len(workers.processes))
        for record in workers.records(index)
    )


async def release_state(store: MongoStore, release_id: str) -> ReleaseState | None:
    record = await store.get_release(release_id)
    return None if record is None else record.state


async def ended(store: MongoStore, release_id: str, timeout_s: float) -> ReleaseState | None:
    """The final state the release reached, or the state it was in when `timeout_s` ran out."""
    state = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while (state := await release_state(store, release_id)) not in FINAL:
                await asyncio.sleep(0.2)
    return state


def decoded(records: list[Record]) -> list[Event]:
    return [decode(record)[0] for record in records]


@dataclass
class Findings:
    """What the test saw at the end, from outside the reactor's state."""

    state: ReleaseState | None
    served: dict[str, str | None]
    commands: list[Event]
    outcomes: list[Event]
    releases: list[Event]
    dead_letters: int
    processes: list[Process]
    alive: dict[int, list[int]]  # port -> pids of the node's services still running


def broken_promises(findings: Findings, release: ReleasePlan, ports: dict[str, int], workers: Workers) -> list[str]:
    """Every way the release broke one live run per node and one true outcome per request; empty if none."""
    return [*node_problems(findings, release, ports, workers), *outcome_problems(findings, release, ports)]


def node_problems(findings: Findings, release: ReleasePlan, ports: dict[str, int], workers: Workers) -> list[str]:
    """From the evidence log and over HTTP: runs that overlapped, nodes not on the release's version (or with more
    than its one service running), and starts of the version beyond one plus the runs interrupted."""
    host_of = {port: host for host, port in ports.items()}
    problems = [
        f"{host_of[process.port]}: {process.version} (pid {process.pid}) started while pids {process.others_alive} "
        "of the node still ran"
        for process in findings.processes
        if process.others_alive
    ]
    for host, port in ports.items():
        node = [process for process in findings.processes if process.port == port]
        if findings.served[host] != release.version:
            problems.append(f"{host} serves {findings.served[host]!r} over HTTP, not {release.version}")
        last = node[-1] if node else None
        if last is None or findings.alive.get(port) != [last.pid] or last.version != release.version:
            problems.append(
                f"{host}: running pids {findings.alive.get(port)}; the last one started: "
                f"{None if last is None else (last.version, last.pid)}"
            )
        starts = sum(process.version == release.version for process in node)
        interrupted = interruptions(workers, node_key(host))
        if starts > 1 + interrupted:
            problems.append(f"{host}: {release.version} started {starts} times, its runs interrupted {interrupted}")
    return problems


def outcome_problems(findings: Findings, release: ReleasePlan, ports: dict[str, int]) -> list[str]:
    """From the topics and the store: requests without exactly one outcome that is NodeDeployed of the version,
    commands other than the deploys, a release that did not end completed once, dead letters."""
    problems = []
    requests = {
        event.event_id: event
        for event in findings.commands
        if isinstance(event, DeployRequested) and event.release_id == release.release_id
    }
    if sorted(event.node_key for event in requests.values()) != sorted(map(node_key, ports)):
        problems.append(f"deploy requests of the release: {sorted(event.node_key for event in requests.values())}")
    other_commands = [event for event in findings.commands if not isinstance(event, DeployRequested)]
    if other_commands:
        problems.append(f"commands other than deploys: {[type(event).__name__ for event in other_commands]}")
    told: dict[str, set[str]] = defaultdict(set)
    for event in findings.outcomes:
        if event.causation_id in requests:
            answer = {"kind": type(event).__name__, **event.model_dump(mode="json")}
            told[event.causation_id].add(json.dumps(answer, sort_keys=True))
    for request_id, request in requests.items():
        summary = sorted(f"{answer['kind']} {answer.get('version')}" for answer in map(json.loads, told[request_id]))
        if summary != [f"{NodeDeployed.__name__} {release.version}"]:
            problems.append(f"{request.node_key}: outcomes of its request {request_id}: {summary or 'none'}")
    if findings.state != ReleaseState.COMPLETED:
        problems.append(f"the release is {findings.state}, not completed")
    ends = {
        (type(event).__name__, event.event_id)
        for event in findings.releases
        if isinstance(event, ReleaseCompleted | ReleaseHalted) and event.release_id == release.release_id
    }
    if [kind for kind, _ in ends] != [ReleaseCompleted.__name__]:
        problems.append(f"the releases topic ends the release with {sorted(ends)}")
    if findings.dead_letters:
        problems.append(f"{findings.dead_letters} dead letters")
    return problems


def running_services(root: Path, evidence: Path) -> dict[int, list[int]]:
    """Per port, the pids of the evidence log's services still running under `root`."""
    alive: dict[int, list[int]] = defaultdict(list)
    for process in processes(evidence):
        if evidence_service.alive_in(process.pid, root):
            alive[process.port].append(process.pid)
    return dict(alive)


@pytest.fixture
def workers(kafka_bootstrap: str, mongo_url: str, mongo_database: str, tmp_path: Path) -> Iterator[Workers]:
    """Worker processes with their `local` nodes under tmp_path/nodes; the nodes' services are stopped after them."""
    with worker_group(kafka_bootstrap, mongo_url, mongo_database, tmp_path) as group:
        # A lease of 6 s (renewed every 2 s) keeps renewals on time on a loaded machine.
        group.env.update({"REACTOR_LOCAL_ROOT": str(tmp_path / "nodes"), "REACTOR_LEASE_S": "6"})
        try:
            yield group
        finally:
            group.stop_all()
            stop_all(tmp_path / "nodes")
            # Whatever no pid file names any more (a run left beside another) is found through the evidence log.
            for pids in running_services(tmp_path / "nodes", tmp_path / "evidence.log").values():
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)


@pytest.mark.timeout(660)  # its own waits: up to 120 s each for the group, release 1, the starts, the join, release 2
async def test_a_worker_joining_mid_release_leaves_one_live_run_per_node_and_every_node_on_the_new_version(
    workers: Workers, kafka_bootstrap: str, mongo_url: str, mongo_database: str, tmp_path: Path
) -> None:
    """Two workers deploy 2.0.0 to six local nodes at once; while every node's 2.0.0 is starting (held until the
    group has rebalanced, then slow) a third worker joins. No run of a node starts while another still runs,
    every node ends serving 2.0.0, each request gets exactly one outcome and it is NodeDeployed, the release
    completes, and a node's 2.0.0 starts again only after a run of it was interrupted."""
    evidence, gate, nodes = tmp_path / "evidence.log", tmp_path / "gate", tmp_path / "nodes"
    packages = {
        version: build_package(tmp_path / "dist", version, run=service_run(evidence, gate))
        for version in ("1.0.0", "2.0.0")
    }
    ports = dict(zip(spread_hosts(NODES), free_ports(NODES), strict=True))
    first, second = plan("hello-1", packages["1.0.0"], ports), plan("hello-2", packages["2.0.0"], ports)

    def started_everywhere(version: str) -> bool:
        return {process.port for process in processes(evidence) if process.version == version} == set(ports.values())

    async with (
        KafkaBus(kafka_bootstrap, prefix=workers.env["REACTOR_TOPIC_PREFIX"]) as bus,
        MongoStore(mongo_url, database=mongo_database) as store,
    ):
        await bus.create_topics(partitions=PARTITIONS)
        workers.start()
        workers.start()
        await until(lambda: split_between(workers, [0, 1]), "the two workers share the commands partitions", WAIT_S)
        await bus.publish(ReleaseRequested(release_id=first.release_id, plan=first, actor="test"))
        await until(
            lambda: equals(release_state(store, first.release_id), ReleaseState.COMPLETED),
            "1.0.0 is deployed to every node",
            WAIT_S,
        )

        await bus.publish(ReleaseRequested(release_id=second.release_id, plan=second, actor="test"))
        await until(lambda: started_everywhere("2.0.0"), "every node's 2.0.0 started (held at the gate)", WAIT_S)
        workers.start()
        # The first runs cannot end before the gate opens, so the group rebalances while all six are in flight.
        await until(lambda: commands_assigned(workers, 2), "the third worker is given commands partitions", WAIT_S)
        gate.touch()

        state = await ended(store, second.release_id, WAIT_S)
        served = {host: await asyncio.to_thread(served_version, port) for host, port in ports.items()}
        findings = Findings(
            state=state,
            served=served,
            commands=decoded(await bus.history(Topic.COMMANDS)),
            outcomes=decoded(await bus.history(Topic.OUTCOMES)),
            releases=decoded(await bus.history(Topic.RELEASES)),
            dead_letters=len(await bus.history(Topic.DLQ)),
            processes=processes(evidence),
            alive=running_services(nodes, evidence),
        )
    problems = broken_promises(findings, second, ports, workers)
    assert not problems, "\n".join(problems)
    # The sticky assignment moves one partition of four to the new worker; the runs of the others go on.
    kept = [host for host in ports if interruptions(workers, node_key(host)) == 0]
    assert kept, "every run was interrupted, though most partitions stayed with their worker"
