"""Throughput of the full reactor loop against raw Kafka, measured in the same run.

    python bench/bus.py [--nodes 10000] [--in-flight 1000] [--backends sqlite,postgresql] [--unbatched-baseline]
                        [--signing]

Full loop per node: DeployRequested -> executor worker (no-op executor) -> status write -> NodeDeployed -> pacer
(and the rollback consumer reads every outcome too). Baseline: raw aiokafka produce -> consume of the same
number of messages of the same size. Also: the embedded mode (in-memory bus, SQLite store), and the resident
memory of one process running every role while `--in-flight` nodes are in flight on Kafka + FerretDB (a fresh
process, so that what the runs before it left in this one is not counted).
Uses $REACTOR_KAFKA_BOOTSTRAP / $REACTOR_MONGO_URL when set (that FerretDB's storage named by $REACTOR_MONGO_BACKEND,
sqlite by default), otherwise starts Kafka and one FerretDB per `--backends` entry with the test harness.
Each distributed run also prints the store's requests per node by kind, and the CPU time per node of this process and
of each server the run started (Kafka, FerretDB, its PostgreSQL), with the machine's load: where the remaining time
goes, and the most the servers' own CPU time per node allows on this machine's cores. With
`--unbatched-baseline` the same release runs again with every store call sent alone (REACTOR_MONGO_BATCH=false).
With `--signing` the first storage's loop runs twice more, unsigned and with signatures required (every event
Ed25519-signed and checked, one process with every role): the cost per node is the difference of this process's
CPU seconds (FerretDB and Kafka run elsewhere, so their time is not in it).
The last line is one JSON object: {"bench": "bus", "nodes": N, "raw_msgs_per_s": x, "embedded_nodes_per_s": x,
"distributed": {"<backend>": {"nodes_per_s": x, "ratio_to_raw": x, "requests_per_node": x, ...}, ...}, "rss_mb": x}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reactor import logs
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.memory_bus import MemoryBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import encode
from reactor.domain.pacer import ReleaseState
from reactor.errors import BackendUnavailable
from reactor.events import (
    DeployRequested,
    NodeTarget,
    Package,
    ReleasePlan,
    ReleaseRequested,
    Strategy,
)
from reactor.ports import EventBus, Store
from reactor.runtime import Backends, Role, run_roles, tune_gc
from reactor.settings import Settings
from reactor.trust import generate_key, load_signing_key, load_trust_file
from reactor.trust.enforcement import NO_SIGNATURES, Signatures
from tests.infra import testenv

PACKAGE = Package(url="https://packages.example.test/app-1.0.0.tar.gz", sha256="f" * 64)


def rss_mb() -> float:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def release(nodes: int, max_parallel: int) -> ReleasePlan:
    return ReleasePlan(
        release_id=f"bench-{uuid.uuid4().hex[:8]}",
        service="app",
        version="1.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"noop/host-{index:05d}/app") for index in range(nodes)],
        strategy=Strategy(batches=["100%"], max_parallel=max_parallel),
    )


async def run_release(
    bus: EventBus, store: Store, plan: ReleasePlan, settings: Settings, *, sample_rss: bool = False
) -> tuple[float, float]:
    """Seconds from ReleaseRequested to ReleaseCompleted, and the peak RSS sampled meanwhile."""
    started = asyncio.Event()
    roles = asyncio.create_task(run_roles(Backends(bus=bus, store=store), settings, {Role.ALL}, started=started))
    starting = asyncio.create_task(started.wait())
    await asyncio.wait([starting, roles], return_when=asyncio.FIRST_COMPLETED)
    starting.cancel()
    _still_running(roles)
    peak = rss_mb()
    begin = time.perf_counter()
    await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
    try:
        while True:
            try:
                record = await store.get_release(plan.release_id)
            except BackendUnavailable:  # a store saturated by the run itself: look again
                continue
            if record is not None and record.state != ReleaseState.RUNNING:
                break
            _still_running(roles)
            if sample_rss:
                peak = max(peak, rss_mb())
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - begin
    finally:
        roles.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await roles
    if record.state != ReleaseState.COMPLETED:
        raise SystemExit(f"release ended {record.state}: {record.reason}")
    return elapsed, peak


def _still_running(roles: asyncio.Task[None]) -> None:
    """Stop the benchmark with the reason when the reactor's roles stopped (a release would never end)."""
    if roles.done():
        error = None if roles.cancelled() else roles.exception()
        raise SystemExit(f"the reactor stopped before the release ended: {error!r}")


async def raw_kafka(bootstrap: str, count: int, size: int) -> float:
    """Seconds for raw aiokafka to produce `count` messages of `size` bytes and consume them in a group."""
    topic = f"raw-{uuid.uuid4().hex[:8]}"
    payload = os.urandom(size)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=2)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=topic, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await producer.start()
    await consumer.start()
    try:
        await producer.send_and_wait(topic, b"warm-up", key=b"warm-up")
        async for _ in consumer:
            break
        begin = time.perf_counter()
        sends = [await producer.send(topic, payload, key=f"host-{index:05d}".encode()) for index in range(count)]
        await asyncio.gather(*sends)
        received = 0
        while received < count:
            batch = await consumer.getmany(timeout_ms=1000)
            received += sum(len(messages) for messages in batch.values())
        await consumer.commit()
        return time.perf_counter() - begin
    finally:
        await consumer.stop()
        await producer.stop()


# The processes of the servers this run started, by what they are ("Kafka", "FerretDB", "PostgreSQL"), while they
# run: their CPU time is measured beside the reactor's (`ServerCpu`). Servers named by the environment are not in it.
SERVERS: dict[str, int] = {}


@contextlib.contextmanager
def backends() -> Iterator[tuple[str, str]]:
    """Kafka bootstrap and MongoDB URL: from the environment, or started by the harness for this run."""
    bootstrap, mongo = os.environ.get("REACTOR_KAFKA_BOOTSTRAP"), os.environ.get("REACTOR_MONGO_URL")
    started: list[testenv.Service] = []
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as work, contextlib.ExitStack() as measured:
        try:
            if bootstrap is None:
                testenv.ensure_kafka()
                started.append(testenv.start_kafka(Path(work) / "kafka"))
                bootstrap = started[-1].env["REACTOR_KAFKA_BOOTSTRAP"]
                measured.enter_context(_server("Kafka", started[-1]))
            if mongo is None:
                testenv.ensure_ferretdb()
                started.append(testenv.start_ferretdb(Path(work) / "mongo", backend=testenv.mongo_backend()))
                mongo = started[-1].env["REACTOR_MONGO_URL"]
                measured.enter_context(_server("FerretDB", started[-1]))
                for part in started[-1].parts:  # its PostgreSQL
                    measured.enter_context(_server("PostgreSQL", part))
            with exported(*(service.env for service in started)):
                yield bootstrap, mongo
        finally:
            for service in started:
                service.stop()


@contextlib.contextmanager
def _server(name: str, service: testenv.Service) -> Iterator[None]:
    SERVERS[name] = service.pid
    try:
        yield
    finally:
        SERVERS.pop(name, None)


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by process `root` and its descendants (the live ones, and those that exited and were
    waited for, as their parents' children time). 0 for a process that is gone."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        used[pid] = sum(int(value) for value in fields[11:15]) / ticks  # utime, stime, cutime, cstime
    total = 0.0
    for pid, seconds in used.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parent:
            ancestor = parent[ancestor]
        if ancestor == root:
            total += seconds
    return total


def machine_busy_s() -> tuple[float, float]:
    """CPU seconds the whole machine was busy and its total CPU seconds, since boot (from /proc/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    # user, nice, system, idle, iowait, irq, softirq, steal (guest time is counted in user and nice already)
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / ticks, sum(values) / ticks


class ServerCpu:
    """CPU seconds of this process (or of the reactor `processes` named, each with its descendants), of each server
    this run started and of the whole machine, over a stretch."""

    def __init__(self, processes: dict[str, list[int]] | None = None) -> None:
        self.processes = processes
        self.used: dict[str, float] = {}

    def start(self) -> ServerCpu:
        self._start = self._sample()
        return self

    def stop(self) -> None:
        end = self._sample()
        self.used = {name: end[name] - self._start.get(name, 0.0) for name in end}

    def __enter__(self) -> ServerCpu:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _sample(self) -> dict[str, float]:
        busy, total = machine_busy_s()
        sample: dict[str, float] = {}
        if self.processes is None:
            sample["reactor (this process)"] = time.process_time()
        else:
            sample.update({name: sum(map(tree_cpu_s, pids)) for name, pids in self.processes.items()})
        sample.update({name: tree_cpu_s(pid) for name, pid in SERVERS.items()})
        return sample | {"machine busy": busy, "machine total": total}

    def report(self, nodes: int) -> tuple[str, dict[str, object]]:
        """A line of milliseconds of CPU per node by process, the machine's load, and the same as figures."""
        cores = os.cpu_count() or 1
        per_node = {
            name: seconds * 1000 / nodes for name, seconds in self.used.items() if not name.startswith("machine")
        }
        load = self.used["machine busy"] / self.used["machine total"] if self.used["machine total"] else 0.0
        servers = sum(per_node[name] for name in SERVERS if name in per_node)
        line = "  CPU milliseconds per node: " + ", ".join(f"{name} {ms:.2f}" for name, ms in per_node.items())
        line += f"; machine {load:.0%} busy over its {cores} cores"
        if servers:
            line += (
                f"; the servers alone ({servers:.2f} ms a node) would allow at most {cores * 1000 / servers:.0f}"
                f" nodes/s on {cores} cores"
            )
        figures: dict[str, object] = {"cpu_ms_per_node": {name: round(ms, 3) for name, ms in per_node.items()}}
        figures["machine_busy"] = round(load, 3)
        return line, figures


@contextlib.contextmanager
def kafka() -> Iterator[str]:
    """Kafka's bootstrap address: from the environment, or a broker started by the harness for this run."""
    if bootstrap := os.environ.get("REACTOR_KAFKA_BOOTSTRAP"):
        yield bootstrap
        return
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as work:
        testenv.ensure_kafka()
        with testenv.start_kafka(Path(work) / "kafka") as service, _server("Kafka", service):
            yield service.env["REACTOR_KAFKA_BOOTSTRAP"]


@contextlib.contextmanager
def mongo(backend: str) -> Iterator[str]:
    """A MongoDB URL: $REACTOR_MONGO_URL when set, or FerretDB on `backend` started by the harness for this run."""
    if url := os.environ.get("REACTOR_MONGO_URL"):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as work:
        testenv.install_ferretdb(backend)
        with (
            testenv.start_ferretdb(Path(work) / "mongo", backend=backend) as service,
            exported(service.env),
            _server("FerretDB", service),
            contextlib.ExitStack() as parts,
        ):
            for part in service.parts:  # its PostgreSQL
                parts.enter_context(_server("PostgreSQL", part))
            yield service.env["REACTOR_MONGO_URL"]


def in_flight_rss(bootstrap: str, url: str, in_flight: int) -> tuple[float, float]:
    """MB of RSS of this process before, and at the peak of, a release of `in_flight` no-op nodes of 5 s each, all in
    flight at once through every role here (run it in a fresh process: see `main`)."""
    logs.configure("json", "warning")
    tune_gc()  # the garbage collector as the `reactor` command sets it

    async def measure() -> tuple[float, float]:
        plan = release(in_flight, max_parallel=in_flight)
        slow = Settings(state_dir=Path(tempfile.gettempdir()), noop_delay_s=5.0, concurrency=in_flight + 64)
        async with distributed(bootstrap, url) as (bus, store):
            before = rss_mb()
            _, peak = await run_release(bus, store, plan, slow, sample_rss=True)
        return before, peak

    return asyncio.run(measure())


@contextlib.contextmanager
def exported(*environments: dict[str, str]) -> Iterator[None]:
    """The variables of services this run started, in the environment while they run, as `scripts/testenv up`
    exports them: FerretDB names where it stores (REACTOR_FERRETDB_POSTGRESQL_URL or REACTOR_FERRETDB_SQLITE_DIR), for
    the stores here and the workers this run starts."""
    added = {key: value for environment in environments for key, value in environment.items()}
    before = {key: os.environ.get(key) for key in added}
    os.environ.update(added)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ferretdb_storage() -> dict[str, Any]:
    """Where FerretDB stores, as `scripts/testenv up` exports it: the store makes the indexes FerretDB's requests can
    use there (MongoStore's `postgresql_url` or `sqlite_dir`)."""
    directory = os.environ.get("REACTOR_FERRETDB_SQLITE_DIR")
    return {
        "postgresql_url": os.environ.get("REACTOR_FERRETDB_POSTGRESQL_URL"),
        "sqlite_dir": Path(directory) if directory else None,
    }


@contextlib.asynccontextmanager
async def distributed(
    bootstrap: str, mongo: str, *, batch: bool = True, signatures: Signatures = NO_SIGNATURES
) -> AsyncIterator[tuple[KafkaBus, MongoStore]]:
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    async with (
        KafkaBus(bootstrap, prefix=prefix, concurrency=64, max_buffered=2000, signatures=signatures) as bus,
        MongoStore(mongo, database=f"bench_{uuid.uuid4().hex[:8]}", batch=batch, **ferretdb_storage()) as store,
    ):
        await bus.create_topics(partitions=6)
        yield bus, store


async def timed_release(
    bootstrap: str, url: str, plan: ReleasePlan, *, batch: bool
) -> tuple[float, Counter[str], dict[str, float], ServerCpu]:
    """Seconds of one distributed release, the store requests it made and the seconds they took, by kind, and the CPU
    time of this process and of the servers over it."""
    async with distributed(bootstrap, url, batch=batch) as (bus, store):
        # As a distributed deployment runs it: max_parallel held with store slots across pacers.
        settings = Settings(mode="distributed", require_signed=False, state_dir=Path(tempfile.gettempdir()))
        opened, opened_s = store.round_trips.copy(), dict(store.round_trip_s)
        with ServerCpu() as cpu:
            seconds, _ = await run_release(bus, store, plan, settings)
        spent = {what: total - opened_s.get(what, 0.0) for what, total in store.round_trip_s.items()}
        return seconds, store.round_trips - opened, spent, cpu


async def signing_cost(bootstrap: str, url: str, plan: ReleasePlan) -> dict[str, float]:
    """The distributed loop unsigned, then with signatures required; each one's wall and CPU seconds."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="reactor-bench-keys-") as work:
        keys = Path(work)
        generate_key("reactor", keys)
        (keys / "trust.yaml").write_text("- name: reactor\n  public_key: reactor.pub\n  reactor: true\n")
        signed = Signatures(
            key=load_signing_key(keys / "reactor.key"), trust=load_trust_file(keys / "trust.yaml"), required=True
        )
        for name, signatures in (("unsigned", NO_SIGNATURES), ("signed", signed)):
            settings = Settings(
                mode="distributed",
                state_dir=Path(tempfile.gettempdir()),
                require_signed=signatures.required,
                signing_key=keys / "reactor.key" if signatures.required else None,
                trust_file=keys / "trust.yaml" if signatures.required else None,
            )
            run_plan = plan.model_copy(update={"release_id": f"{plan.release_id}-{name}"})
            async with distributed(bootstrap, url, signatures=signatures) as (bus, store):
                cpu_before = time.process_time()
                seconds, _ = await run_release(bus, store, run_plan, settings)
                figures[f"{name}_s"], figures[f"{name}_cpu_s"] = seconds, time.process_time() - cpu_before
    return figures


async def measure_distributed(
    bootstrap: str, url: str, backend: str, plan: ReleasePlan, raw_rate: float, *, unbatched_baseline: bool
) -> dict[str, object]:
    """The full loop on Kafka + FerretDB/`backend`, and where asked the same with every store call sent alone."""
    nodes = len(plan.nodes)
    reactor_s, trips, trip_s, cpu = await timed_release(bootstrap, url, plan, batch=True)
    rate = nodes / reactor_s
    print(
        f"reactor full loop, Kafka+FerretDB/{backend}: {reactor_s:8.2f} s  {rate:9.0f} nodes/s  "
        f"= {rate / raw_rate:.1%} of raw (target >= 20%)",
        flush=True,
    )
    print(
        f"  store requests per node: {trips.total() / nodes:.2f}: "
        + ", ".join(f"{what} {count / nodes:.2f}" for what, count in trips.most_common()),
        flush=True,
    )
    print(
        "  their milliseconds per node (summed over concurrent requests): "
        + ", ".join(
            f"{what} {seconds * 1000 / nodes:.1f}"
            for what, seconds in sorted(trip_s.items(), key=lambda item: -item[1])[:8]
        ),
        flush=True,
    )
    cpu_line, cpu_figures = cpu.report(nodes)
    print(cpu_line, flush=True)
    figures: dict[str, object] = {
        "nodes_per_s": round(rate, 1),
        "ratio_to_raw": round(rate / raw_rate, 4),
        "requests_per_node": round(trips.total() / nodes, 2),
        **cpu_figures,
    }
    if unbatched_baseline:
        unbatched_s, unbatched_trips, _, _ = await timed_release(bootstrap, url, plan, batch=False)
        unbatched_rate = nodes / unbatched_s
        figures["unbatched_nodes_per_s"] = round(unbatched_rate, 1)
        figures["unbatched_requests_per_node"] = round(unbatched_trips.total() / nodes, 2)
        figures["batched_to_unbatched"] = round(rate / unbatched_rate, 2)
        print(
            f"  the same, every store call sent alone: {unbatched_s:8.2f} s  {unbatched_rate:9.0f} nodes/s"
            f"  (batched = {rate / unbatched_rate:.2f}x), {unbatched_trips.total() / nodes:.2f} requests per node",
            flush=True,
        )
    return figures


async def main() -> None:
    logs.configure("json", "warning")
    tune_gc()  # the garbage collector as the `reactor` command sets it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=1_000)
    parser.add_argument(
        "--backends",
        default=None,
        help="FerretDB storages to run the distributed loop on, comma-separated (default: sqlite,postgresql;"
        " with $REACTOR_MONGO_URL set, only $REACTOR_MONGO_BACKEND, else sqlite)",
    )
    parser.add_argument(
        "--signing",
        action="store_true",
        help="also run the first storage's loop unsigned and signed, and report the signing cost per node",
    )
    parser.add_argument(
        "--unbatched-baseline",
        action="store_true",
        help="also run each distributed loop with the store's round trips unbatched (REACTOR_MONGO_BATCH=false)",
    )
    args = parser.parse_args()
    nodes: int = args.nodes
    if os.environ.get("REACTOR_MONGO_URL"):
        chosen = [testenv.mongo_backend()]
    else:
        chosen = (args.backends or ",".join(testenv.FERRETDB_BACKENDS)).split(",")
    plan = release(nodes, max_parallel=1000)
    size = len(
        encode(
            DeployRequested(node_key="noop/host-00000/app", service="app", version="1.0.0", package=PACKAGE), "/r"
        ).value
    )

    print(f"nodes: {nodes}, message size: {size} bytes, machine: {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as work:
        settings = Settings(state_dir=Path(work), concurrency=512)
        async with MemoryBus(concurrency=512) as bus, EmbeddedStore(Path(work) / "bench.db") as store:
            embedded_s, _ = await run_release(bus, store, plan, settings)
    print(
        f"reactor full loop, embedded: {embedded_s:8.2f} s  {nodes / embedded_s:9.0f} nodes/s  (target >= 10000/s)",
        flush=True,
    )

    distributed_rates: dict[str, dict[str, object]] = {}  # per FerretDB storage
    signing: dict[str, object] | None = None
    peak_rss = baseline_rss = float("nan")
    with kafka() as bootstrap:
        raw_s = await raw_kafka(bootstrap, nodes, size)
        raw_rate = nodes / raw_s
        print(f"raw aiokafka produce->consume: {raw_s:8.2f} s  {raw_rate:9.0f} msg/s   (baseline)", flush=True)
        for backend in chosen:
            with mongo(backend) as url:
                distributed_rates[backend] = await measure_distributed(
                    bootstrap, url, backend, plan, raw_rate, unbatched_baseline=args.unbatched_baseline
                )
                if backend != chosen[0]:
                    continue
                if args.signing:
                    cost = await signing_cost(bootstrap, url, plan)
                    per_node_ms = (cost["signed_cpu_s"] - cost["unsigned_cpu_s"]) * 1000 / nodes
                    signing = {
                        "backend": backend,
                        "cost_ms_per_node": round(per_node_ms, 4),
                        "cpu_ratio": round(cost["signed_cpu_s"] / cost["unsigned_cpu_s"], 2),
                        "unsigned_nodes_per_s": round(nodes / cost["unsigned_s"], 1),
                        "signed_nodes_per_s": round(nodes / cost["signed_s"], 1),
                    }
                    print(
                        f"signing, Kafka+FerretDB/{backend}, one process with every role (wall / CPU of this process):"
                        f"\n  unsigned: {cost['unsigned_s']:8.2f} s / {cost['unsigned_cpu_s']:8.2f} s CPU  (baseline)"
                        f"\n  signed:   {cost['signed_s']:8.2f} s / {cost['signed_cpu_s']:8.2f} s CPU"
                        f"\n  cost {per_node_ms:.3f} ms CPU per node (target <= 0.25 ms),"
                        f" {signing['cpu_ratio']:.2f}x the unsigned CPU",
                        flush=True,
                    )
                # In a process of its own: this one's size is what the runs above left in it (Python keeps the
                # memory it freed), which at 10,000 nodes was more than a worker's whole peak.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
                    baseline_rss, peak_rss = await asyncio.get_running_loop().run_in_executor(
                        fresh, in_flight_rss, bootstrap, url, args.in_flight
                    )
    print(
        f"RSS, a fresh process with every role, {args.in_flight} nodes in flight: peak {peak_rss:.0f} MB"
        f" (the process before the release: {baseline_rss:.0f} MB; target <= 150 MB)"
    )
    print(
        json.dumps(
            {
                "bench": "bus",
                "nodes": nodes,
                "raw_msgs_per_s": round(raw_rate, 1),
                "embedded_nodes_per_s": round(nodes / embedded_s, 1),
                "distributed": distributed_rates,
                "rss_mb": round(peak_rss, 1),
                **({"signing": signing} if signing is not None else {}),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
