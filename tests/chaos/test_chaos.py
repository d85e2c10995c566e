"""Chaos on real Kafka, FerretDB, `reactor worker --role all` processes and `local` nodes, judged from outside.

Two releases in sequence (1.0.0 to twelve empty nodes, then 2.0.0) run while a seeded schedule of faults hits
them: workers SIGKILLed at random points (each replaced a moment later), joining and leaving, one frozen with
SIGSTOP past its Kafka session and its lease and then woken, the Kafka broker SIGKILLed and started again on its
port and data, FerretDB the same (every worker must answer 503 on /healthz while it is down, claim nothing, and
carry on by itself once it is back). Each release's last batch holds two slow nodes whose new version cannot
become healthy before the test opens the release's gate, which it does only once the release's faults are all
done: every fault lands in the middle of a release, by construction.

The verdict comes from the services' own evidence log, their ports over HTTP and the topics (tests/chaos/judge.py),
never from the store. Every broken promise is collected and reported together with the seed, which replays the
same schedule: REACTOR_CHAOS_SEED=<seed> runs only that seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import decode
from reactor.demo import SERVICE, BuiltPackage, build_package
from reactor.demo.scenario import free_ports, served_version
from reactor.domain.pacer import FINAL, ReleaseState
from reactor.errors import ReactorError
from reactor.events import Event, HealthCheck, NodeTarget, Package, ReleasePlan, ReleaseRequested, Strategy, Topic
from reactor.executors.local import stop_all
from tests import evidence_service
from tests.chaos import judge
from tests.chaos.schedule import Planned, draw
from tests.infra import testenv
from tests.workers import Workers, commands_assigned, worker_group

pytestmark = [pytest.mark.chaos, pytest.mark.kafka, pytest.mark.mongo]

SEED_VARIABLE = "REACTOR_CHAOS_SEED"
FIXED_SEEDS = (1, 2)
KILLS = 7  # per seed: three seeds make 21 SIGKILLs a run
VERSIONS = ("1.0.0", "2.0.0")
PARTITIONS = 4
NODES = 12
BATCH = 4  # three batches of explicit nodes
MAX_PARALLEL = 3
SLOW = (1, 5)  # nodes whose new version listens SLOW_S after it starts
HELD = (9, 11)  # slow too, and held until the release's gate opens; both in the last batch
SLOW_S = 4.0
HEALTH_TIMEOUT_S = 180.0  # a held node waits at its gate through all of its release's faults
LEASE_S = 5.0
GRACE_S = 1.5
SESSION_S = 10.0  # aiokafka's default session timeout: a member that stops heartbeating is out of the group after it
FREEZE_S = SESSION_S + LEASE_S + 2.0  # a frozen worker sleeps past its session and its lease
REACH_S = SESSION_S + LEASE_S + GRACE_S + 5.0  # how long after a fault its rebalance can still interrupt a run
WAIT_S = 240.0
HTTP_TIMEOUT_S = 20.0  # /healthz takes up to 5 s to say a backend does not answer


def seeds() -> list[Any]:
    """The fixed seeds and one drawn now (its id names it), or only the seed REACTOR_CHAOS_SEED replays."""
    replay = os.environ.get(SEED_VARIABLE)
    if replay:
        return [pytest.param(int(replay), id=f"seed-{replay}")]
    drawn = random.SystemRandom().randrange(1_000, 1_000_000)
    return [*(pytest.param(seed, id=f"seed-{seed}") for seed in FIXED_SEEDS), pytest.param(drawn, id=f"seed-{drawn}")]


@dataclass
class Backing:
    """A Kafka broker and a FerretDB of this module's own: its tests kill them and start them again."""

    kafka: testenv.Service
    ferretdb: testenv.Service

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka.env["REACTOR_KAFKA_BOOTSTRAP"]

    @property
    def mongo_url(self) -> str:
        return self.ferretdb.env["REACTOR_MONGO_URL"]


@pytest.fixture(scope="module")
def backing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backing]:
    """Started here, on the main thread (they die with the test process, as the harness's own do)."""
    started: list[testenv.Service] = []
    try:
        started.append(testenv.start_kafka(tmp_path_factory.mktemp("chaos-kafka")))
        started.append(testenv.start_ferretdb(tmp_path_factory.mktemp("chaos-ferretdb")))
    except (testenv.TestEnvError, OSError) as exc:
        for service in started:
            service.stop()
        pytest.fail(f"Kafka or FerretDB could not be started for the chaos tier: {exc}")
    services = Backing(*started)
    try:
        yield services
    finally:
        services.kafka.stop()
        services.ferretdb.stop()


@dataclass
class Nodes:
    """The local nodes and the files their services share with the test."""

    keys: list[str]
    ports: dict[str, int]  # node key -> port
    root: Path
    evidence: Path
    gates: Path  # <gates>/<version> opens the held nodes of that version

    def packages(self, dist: Path) -> dict[str, BuiltPackage]:
        run = self.service_run()
        return {version: build_package(dist, version, run=run) for version in VERSIONS}

    def service_run(self) -> bytes:
        """A package's `run`: the evidence service, slow or held by the node's port."""
        always = self.gates / "open"

        def start(gate: str, slow_version: str, slow_s: float) -> str:
            program = f"'{sys.executable}' '{evidence_service.__file__}' '{self.evidence}'"
            return f"exec {program} {gate} {slow_version} {slow_s}"

        slow = "|".join(str(self.ports[self.keys[index]]) for index in SLOW)
        held = "|".join(str(self.ports[self.keys[index]]) for index in HELD)
        version = '"$SERVICE_VERSION"'
        lines = [
            "#!/bin/sh",
            'case "$PORT" in',
            f"  {slow}) " + start(f"'{always}'", version, SLOW_S) + " ;;",
            f"  {held}) " + start(f"'{self.gates}'/{version}", version, SLOW_S) + " ;;",
            "  *) " + start(f"'{always}'", "-", 0) + " ;;",
            "esac",
        ]
        return ("\n".join(lines) + "\n").encode()

    def plan(self, package: BuiltPackage) -> ReleasePlan:
        """Three explicit batches of four, three nodes in flight at once, no failure tolerated."""
        return ReleasePlan(
            release_id=f"{SERVICE}-{package.version}",
            service=SERVICE,
            version=package.version,
            package=Package(url=package.url, sha256=package.sha256),
            health=HealthCheck(timeout_s=HEALTH_TIMEOUT_S),
            nodes=[NodeTarget(node_key=key, port=self.ports[key]) for key in self.keys],
            strategy=Strategy(
                batches=[self.keys[start : start + BATCH] for start in range(0, NODES, BATCH)],
                max_parallel=MAX_PARALLEL,
                failure_budget=0,
            ),
        )

    def starts(self) -> list[judge.Start]:
        key_of = {port: key for key, port in self.ports.items()}
        return [
            judge.Start(
                node_key=key_of[entry["port"]],
                pid=entry["pid"],
                version=entry["version"],
                wall=entry["wall"],
                others_alive=tuple(entry["others_alive"]),
            )
            for entry in self.entries()
            if entry["event"] == "start"
        ]

    def entries(self) -> list[dict[str, Any]]:
        if not self.evidence.exists():
            return []
        return evidence_service.entries(self.evidence.read_text().splitlines())

    def running(self) -> dict[str, list[tuple[int, str]]]:
        """Per node, its services still alive (pid, version), in the order they started."""
        alive: dict[str, list[tuple[int, str]]] = {}
        for start in sorted(self.starts(), key=lambda start: start.wall):
            if evidence_service.alive_in(start.pid, self.root):
                alive.setdefault(start.node_key, []).append((start.pid, start.version))
        return alive

    def stop_services(self) -> None:
        stop_all(self.root)
        # Whatever no pid file names any more (a run left beside another) is found through the evidence log.
        for services in self.running().values():
            for pid, _ in services:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    keys = [f"local/host-{index:02d}/{SERVICE}" for index in range(NODES)]
    found = Nodes(
        keys=keys,
        ports=dict(zip(keys, free_ports(NODES), strict=True)),
        root=tmp_path / "nodes",
        evidence=tmp_path / "evidence.log",
        gates=tmp_path / "gates",
    )
    found.gates.mkdir()
    (found.gates / "open").touch()
    try:
        yield found
    finally:
        found.stop_services()


async def waiting(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Poll `condition` every quarter second (it reads log files) until it holds; fail naming `what` after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting until {what}")
        await asyncio.sleep(0.25)


def parent(pid: int) -> int | None:
    """The parent of process `pid`, None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def healthz(port: int) -> int | None:
    """The status /healthz answers on `port`, None if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=HTTP_TIMEOUT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class Chaos:
    """Causes planned faults to the workers, Kafka and FerretDB; keeps a log of them (`faults`) and of what went
    wrong on the way (`observed`)."""

    def __init__(self, workers: Workers, backing: Backing, nodes: Nodes) -> None:
        self.workers = workers
        self.backing = backing
        self.nodes = nodes
        self.version = ""  # of the release under way
        self.faults: list[judge.Fault] = []
        self.observed: list[str] = []
        self.told: set[int] = set()  # workers the test killed or stopped
        self.frozen: set[int] = set()
        self.exited: set[int] = set()  # workers found gone without being told
        self.outages: list[tuple[float, float]] = []  # FerretDB: from every worker answering 503 to its restart
        self.consuming: set[int] = set()  # workers that logged they run their consumers

    def note(self, kind: str, detail: str = "") -> None:
        self.faults.append(judge.Fault(kind=kind, wall=time.time(), detail=detail))

    def live(self) -> list[int]:
        """Workers running and awake, in start order."""
        return [
            index
            for index, process in enumerate(self.workers.processes)
            if process.poll() is None and index not in self.told | self.frozen
        ]

    def start_worker(self, why: str) -> int:
        self.workers.start()
        index = len(self.workers.processes) - 1
        self.note("join", f"worker {index} {why}")
        return index

    async def victim(self, planned: Planned) -> int:
        """The worker `planned` picks among those awake that run their consumers, once two of them do (one must
        stay): a fault hits a working member, not a process still starting."""
        if len(self.live()) < 2:
            self.start_worker("joins so that one stays")
        await waiting(lambda: len(self.running()) >= 2, "two workers are running their consumers", WAIT_S)
        running = self.running()
        return running[min(int(planned.pick * len(running)), len(running) - 1)]

    def running(self) -> list[int]:
        """The live workers that run their consumers (they logged so; each log is read until it does)."""
        for index in self.live():
            if index not in self.consuming and any(
                record.get("event") == "worker running" for record in self.workers.records(index)
            ):
                self.consuming.add(index)
        return [index for index in self.live() if index in self.consuming]

    async def apply(self, planned: Planned) -> None:
        await asyncio.sleep(planned.delay_s)
        match planned.kind:
            case "kill":
                await self.kill(planned)
            case "freeze":
                await self.freeze(planned)
            case "join":
                self.start_worker("joins")
            case "leave":
                await self.leave(planned)
            case "kafka":
                await self.kafka_outage(planned)
            case "ferretdb":
                await self.ferretdb_outage(planned)
        self.check_exits()

    async def kill(self, planned: Planned) -> None:
        index = await self.victim(planned)
        process = self.workers.processes[index]
        process.send_signal(signal.SIGKILL)
        self.told.add(index)
        await asyncio.to_thread(process.wait)
        self.note("kill", f"worker {index}")
        await asyncio.sleep(planned.pause_s)
        self.start_worker(f"replaces worker {index}")

    async def freeze(self, planned: Planned) -> None:
        """Freeze the worker that runs a held node's switch (the release cannot end before it), past its session
        and its lease: another worker takes the node over; then wake it up."""
        if len(self.live()) < 2:
            self.start_worker("joins so that one stays")
        found: list[int] = []

        def switching() -> bool:
            found[:] = self.switching()
            return bool(found)

        await waiting(switching, f"a worker runs the switch of a held node to {self.version}", WAIT_S)
        index = found[min(int(planned.pick * len(found)), len(found) - 1)]
        process = self.workers.processes[index]
        process.send_signal(signal.SIGSTOP)
        self.frozen.add(index)
        self.note("freeze", f"worker {index}")
        await asyncio.sleep(FREEZE_S)
        process.send_signal(signal.SIGCONT)
        self.frozen.discard(index)
        self.note("thaw", f"worker {index}")

    def switching(self) -> list[int]:
        """The live workers running the switch of a held node to the current version: the parent of its new
        service, which started and does not listen yet (the gate holds it)."""
        listening = {entry["pid"] for entry in self.nodes.entries() if entry["event"] == "listening"}
        held = {self.nodes.keys[index] for index in HELD}
        parents = {
            parent(start.pid)
            for start in self.nodes.starts()
            if start.node_key in held and start.version == self.version and start.pid not in listening
        }
        pids = {process.pid: index for index, process in enumerate(self.workers.processes)}
        return sorted(index for pid, index in pids.items() if pid in parents and index in self.running())

    async def leave(self, planned: Planned) -> None:
        index = await self.victim(planned)
        process = self.workers.processes[index]
        process.send_signal(signal.SIGTERM)
        self.told.add(index)
        self.note("leave", f"worker {index}")
        try:
            await asyncio.to_thread(process.wait, WAIT_S)
        except subprocess.TimeoutExpired:
            self.observed.append(f"leave: worker {index} did not stop within {WAIT_S:g}s of SIGTERM")
            process.kill()
            await asyncio.to_thread(process.wait)

    async def settled(self) -> None:
        """Wait until every live worker runs its consumers: an outage hits running workers (one still starting
        needs both backends to start, and exits if one does not answer, for its supervisor to start it again)."""
        await waiting(lambda: self.running() == self.live(), "every live worker runs its consumers", WAIT_S)

    async def kafka_outage(self, planned: Planned) -> None:
        await self.settled()
        self.backing.kafka.kill()
        self.note("kafka", "killed")
        await asyncio.sleep(planned.pause_s)
        # Started from this (the main) thread: it dies with the test process, never lingers after it.
        self.backing.kafka = testenv.relaunch(self.backing.kafka)
        self.note("kafka", "started again")
        await asyncio.to_thread(self.backing.kafka.wait_ready, testenv.KAFKA_START_TIMEOUT)
        self.note("kafka", "ready again")  # the group rebalances from here
        await self.answering(self.watched(), 200, "after Kafka came back")

    async def ferretdb_outage(self, planned: Planned) -> None:
        await self.settled()
        watched = self.watched()
        self.backing.ferretdb.kill()
        self.note("ferretdb", "killed")
        await self.answering(watched, 503, "while FerretDB was down")
        down = time.time()
        await asyncio.sleep(planned.pause_s)
        self.backing.ferretdb = testenv.relaunch(self.backing.ferretdb)
        self.outages.append((down, time.time()))
        self.note("ferretdb", "started again")
        await asyncio.to_thread(self.backing.ferretdb.wait_ready, testenv.FERRETDB_START_TIMEOUT)
        await self.answering(watched, 200, "after FerretDB came back")
        for index in watched:
            if self.workers.processes[index].poll() is not None:
                self.observed.append(f"ferretdb: worker {index} did not wait for FerretDB: it exited")

    def watched(self) -> dict[int, int]:
        """The live workers that serve /healthz already: index -> port."""
        ports = {index: self.workers.http_port(index) for index in self.live()}
        return {index: port for index, port in ports.items() if port is not None}

    async def answering(self, watched: dict[int, int], status: int, when: str) -> None:
        """Wait until each watched worker's /healthz answers `status` (the same process: none restarted)."""

        async def one(index: int, port: int) -> None:
            seen: int | None = None
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and self.workers.processes[index].poll() is None:
                if (seen := await asyncio.to_thread(healthz, port)) == status:
                    return
                await asyncio.sleep(0.5)
            self.observed.append(f"healthz: worker {index} never answered {status} {when} (last: {seen})")

        await asyncio.gather(*(one(index, port) for index, port in watched.items()))

    def check_exits(self) -> None:
        """Note workers that exited without being told to; start one if none runs any more."""
        for index, process in enumerate(self.workers.processes):
            if process.poll() is not None and index not in self.told | self.exited:
                self.exited.add(index)
                tail = " | ".join(self.workers.log_path(index).read_text(errors="replace").splitlines()[-3:])
                self.observed.append(f"exit: worker {index} exited by itself (code {process.returncode}): {tail}")
        if not self.live() and not self.frozen:
            self.start_worker("joins: no worker was left")

    def claims_during_outages(self) -> list[str]:
        """Claims the workers logged while FerretDB was down and every one of them had said so on /healthz."""
        found = []
        for index in range(len(self.workers.processes)):
            for record in self.workers.records(index):
                if record.get("event") != "claimed node" or "timestamp" not in record:
                    continue
                at = datetime.fromisoformat(record["timestamp"]).timestamp()
                if any(begin < at < end for begin, end in self.outages):
                    found.append(f"ferretdb: worker {index} claimed {record.get('node_key')} at {at:.1f} while down")
        return found

    def thaw(self) -> None:
        for index in self.frozen:
            self.workers.processes[index].send_signal(signal.SIGCONT)
        self.frozen.clear()


async def ended(store: MongoStore, release_id: str) -> ReleaseState | None:
    """The final state the release reached, or the state it was in after WAIT_S (control only, never judged)."""
    state = None
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(ReactorError):
            record = await store.get_release(release_id)
            state = None if record is None else record.state
            if state in FINAL:
                return state
        await asyncio.sleep(0.5)
    return state


def decoded(records: list[Any]) -> list[Event]:
    return [decode(record)[0] for record in records]


@pytest.mark.timeout(600)  # its own waits: up to 240 s per release, 180 s per broker start; ~2 minutes when well
@pytest.mark.parametrize("seed", seeds())
async def test_releases_under_chaos_keep_one_live_run_per_node_and_one_true_outcome_per_request(
    seed: int, backing: Backing, nodes: Nodes, tmp_path: Path
) -> None:
    """Two releases run through a seeded schedule of faults (workers killed, frozen, joining, leaving; Kafka and
    FerretDB killed and started again): no two runs of a node overlap, a version starts on a node at most once
    more than the faults that could interrupt it, each request has one outcome, each node ends serving what its
    final outcome says, both releases complete as planned, nothing is dead-lettered, and no worker exits or
    claims a node unbidden (it waits out a FerretDB outage, answering 503 on /healthz)."""
    replay = f"chaos seed {seed} (replay: {SEED_VARIABLE}={seed})"
    origin = time.time()
    print(replay)
    plan = draw(seed, releases=len(VERSIONS), kills=KILLS)
    print("schedule:", [[planned.describe() for planned in part] for part in plan])
    packages = nodes.packages(tmp_path / "dist")
    releases = [nodes.plan(packages[version]) for version in VERSIONS]
    database = f"chaos_{uuid4().hex[:12]}"
    durations: list[float] = []

    with worker_group(backing.kafka_bootstrap, backing.mongo_url, database, tmp_path) as workers:
        workers.env.update(
            {"REACTOR_LOCAL_ROOT": str(nodes.root), "REACTOR_LEASE_S": str(LEASE_S), "REACTOR_GRACE_S": str(GRACE_S)}
        )
        # This module's FerretDB is not the session's: the workers make their indexes where it stores, not where the
        # session's does (they would refuse to start, finding no database of theirs there).
        for variable in testenv.FERRETDB_STORAGE_VARIABLES:
            workers.env.pop(variable, None)
        workers.env.update(
            {name: value for name, value in backing.ferretdb.env.items() if name in testenv.FERRETDB_STORAGE_VARIABLES}
        )
        chaos = Chaos(workers, backing, nodes)
        try:
            async with (
                KafkaBus(backing.kafka_bootstrap, prefix=workers.env["REACTOR_TOPIC_PREFIX"]) as bus,
                MongoStore(backing.mongo_url, database=database) as store,
            ):
                await bus.create_topics(partitions=PARTITIONS)
                workers.start()
                workers.start()
                await waiting(
                    lambda: commands_assigned(workers, 0) | commands_assigned(workers, 1) == set(range(PARTITIONS)),
                    "the first two workers hold every commands partition",
                    WAIT_S,
                )
                for release, faults in zip(releases, plan, strict=True):
                    began = time.monotonic()
                    chaos.version = release.version
                    await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release, actor="chaos"))
                    await waiting(
                        lambda: any(start.version == release.version for start in nodes.starts()),  # noqa: B023
                        f"a node of {release.release_id} starts",
                        WAIT_S,
                    )
                    for planned in faults:
                        await chaos.apply(planned)
                    (nodes.gates / release.version).touch()
                    state = await ended(store, release.release_id)
                    durations.append(time.monotonic() - began)
                    if state not in FINAL:
                        chaos.observed.append(f"release {release.release_id} still {state} after {WAIT_S:g}s")
                chaos.check_exits()
                evidence = judge.Evidence(
                    nodes=nodes.keys,
                    starts=nodes.starts(),
                    served={key: await asyncio.to_thread(served_version, port) for key, port in nodes.ports.items()},
                    running=nodes.running(),
                    releases=releases,
                    commands=decoded(await bus.history(Topic.COMMANDS)),
                    outcomes=decoded(await bus.history(Topic.OUTCOMES)),
                    release_events=decoded(await bus.history(Topic.RELEASES)),
                    dead_letters=len(await bus.history(Topic.DLQ)),
                    faults=chaos.faults,
                    reach_s=REACH_S,
                    observed=[*chaos.observed, *chaos.claims_during_outages()],
                )
        finally:
            chaos.thaw()

    kinds = [fault.kind for fault in chaos.faults]
    print(
        f"{replay}: {kinds.count('kill')} kills, {kinds.count('join')} joins, {kinds.count('leave')} leaves, "
        f"{kinds.count('freeze')} freezes, {len([f for f in chaos.faults if f.detail == 'killed'])} outages; "
        f"{len(workers.processes)} worker processes; releases took {', '.join(f'{d:.0f}s' for d in durations)}"
    )
    log = "\n".join(f"  {fault.wall - origin:6.1f}s {fault.kind} {fault.detail}" for fault in chaos.faults)
    print(f"faults:\n{log}")
    again = judge.restarts(evidence)
    print(
        f"{len(nodes.starts())} starts; started again (node, version, times again, faults matched): "
        f"{[(key.split('/')[1], version, len(windows), len(matched)) for key, version, windows, matched in again]}"
    )
    problems = judge.violations(evidence)
    assert not problems, f"{replay}: {len(problems)} broken promises\n" + "\n".join(problems) + f"\nfaults:\n{log}"
