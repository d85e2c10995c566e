"""Scale-out: one release through 1 and then 3 executor worker processes of one consumer group, same run.

    python bench/scale.py [--nodes 1200] [--delay 0.5] [--concurrency 64] [--partitions 12]

Real Kafka and FerretDB ($REACTOR_KAFKA_BOOTSTRAP / $REACTOR_MONGO_URL when set, else started by the harness),
one `reactor worker --role pacer` process and N `reactor worker --role executor` processes (each with
REACTOR_CONCURRENCY), `noop` nodes whose deploy takes `--delay` seconds (REACTOR_NOOP_DELAY_S), the whole release
in one batch with max_parallel = nodes. Timed from ReleaseRequested to the release completed; every node must be
deployed exactly once, counted from the outcomes topic. With the delay the work itself bounds one worker at
concurrency / delay nodes per second: 3 workers can reach 3x that, the target is >= 2.5x. Each run also prints the CPU
time per node of the pacer process, of the executor processes and of each server the harness started here, and how
busy the whole machine was: a run the machine's cores bound cannot go faster with more processes on them.
The last line is one JSON object: {"bench": "scale", "speedup_3_vs_1": x, "doubles": n, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus import ServerCpu, backends, ferretdb_storage, release
from reactor import logs
from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import decode
from reactor.domain.pacer import ReleaseState
from reactor.errors import BackendUnavailable
from reactor.events import NodeDeployed, ReleaseRequested, Topic
from tests.workers import Workers, commands_assigned, worker_group

TARGET = 2.5
WAIT_S = 900.0


async def through(
    workers_count: int,
    bootstrap: str,
    mongo: str,
    nodes: int,
    delay: float,
    concurrency: int,
    partitions: int,
    keep: Path | None = None,
) -> tuple[float, int, int, ServerCpu]:
    """Seconds for the release with `workers_count` executor processes; nodes deployed more than once; missing; the
    CPU time the processes used meanwhile.

    The workers' logs go to `keep/<workers_count>/` when it is given, else to a directory removed after the run.
    """
    database = f"scale_{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        if keep is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reactor-scale-")))
        else:
            work = keep / str(workers_count)
            work.mkdir(parents=True, exist_ok=True)
        workers = stack.enter_context(worker_group(bootstrap, mongo, database, work))
        workers.env.update(
            {
                "REACTOR_TOPIC_PARTITIONS": str(partitions),
                "REACTOR_CONCURRENCY": str(concurrency),
                "REACTOR_NOOP_DELAY_S": str(delay),
                "REACTOR_RESEND_AFTER_S": "600",
                "REACTOR_LEASE_S": "60",
                "REACTOR_REQUIRE_SIGNED": "false",
            }
        )
        plan = release(nodes, max_parallel=nodes)
        async with (
            KafkaBus(bootstrap, prefix=workers.env["REACTOR_TOPIC_PREFIX"]) as bus,
            MongoStore(mongo, database=database, **ferretdb_storage()) as store,
        ):
            await bus.create_topics(partitions=partitions)
            workers.start("pacer")
            for _ in range(workers_count):
                workers.start("executor")
            await assigned(workers, range(1, workers_count + 1), partitions)
            pids = [process.pid for process in workers.processes]
            cpu = ServerCpu({"pacer process": pids[:1], "executor processes": pids[1:]}).start()
            begin = time.perf_counter()
            await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan, actor="bench"))
            while True:
                try:
                    record = await store.get_release(plan.release_id)
                except BackendUnavailable:
                    record = None
                if record is not None and record.state in (ReleaseState.COMPLETED, ReleaseState.HALTED):
                    break
                if time.perf_counter() - begin > WAIT_S:
                    raise SystemExit(f"{workers_count} worker(s): the release did not end within {WAIT_S:g}s")
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - begin
            cpu.stop()
            if record.state != ReleaseState.COMPLETED:
                raise SystemExit(f"{workers_count} worker(s): the release ended {record.state}")
            deployed = collections.Counter(
                event.node_key
                for event in (decode(item)[0] for item in await bus.history(Topic.OUTCOMES))
                if isinstance(event, NodeDeployed) and event.release_id == plan.release_id
            )
    doubles = sum(count - 1 for count in deployed.values())
    missing = nodes - len(deployed)
    return elapsed, doubles, missing, cpu


async def assigned(workers: Workers, indexes: range, partitions: int) -> None:
    """Until the executor workers share every commands partition, each holding some."""
    deadline = time.monotonic() + 120
    while True:
        held = [commands_assigned(workers, index) for index in indexes]
        if all(held) and set().union(*held) == set(range(partitions)):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"executor workers never shared the commands partitions: {held}")
        await asyncio.sleep(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=1200)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--keep-logs", type=Path, default=None, help="keep the workers' logs in this directory")
    parser.add_argument(
        "--only", type=int, choices=(1, 3), default=None, help="run with this many workers only (no speedup then)"
    )
    args = parser.parse_args()
    logs.configure("console", os.environ.get("BENCH_LOG_LEVEL", "warning"))
    bound = args.concurrency / args.delay
    results = {}
    machine_busy: dict[int, object] = {}
    with backends() as (bootstrap, mongo):
        for count in (1, 3) if args.only is None else (args.only,):
            elapsed, doubles, missing, cpu = await through(
                count, bootstrap, mongo, args.nodes, args.delay, args.concurrency, args.partitions, args.keep_logs
            )
            results[count] = (elapsed, doubles, missing)
            rate = args.nodes / elapsed
            print(
                f"{count} executor worker(s): {elapsed:7.2f} s, {rate:7.1f} nodes/s "
                f"(work bound {bound * count:.0f}/s), deployed twice {doubles}, never {missing}",
                flush=True,
            )
            cpu_line, cpu_figures = cpu.report(args.nodes)
            print(cpu_line, flush=True)
            machine_busy[count] = cpu_figures["machine_busy"]
    doubles = sum(result[1] for result in results.values())
    missing = sum(result[2] for result in results.values())
    print(f"{args.nodes} noop nodes of {args.delay:g} s, concurrency {args.concurrency} per worker, one batch")
    speedup = results[1][0] / results[3][0] if len(results) == 2 else None
    if speedup is not None:
        print(f"3 workers vs 1: {speedup:.2f}x (target >= {TARGET}x: {'met' if speedup >= TARGET else 'NOT met'})")
    line: dict[str, object] = {"bench": "scale", "nodes": args.nodes}
    for count, (elapsed, _, _) in results.items():
        line[f"seconds_{count}"] = round(elapsed, 3)
        line[f"nodes_per_s_{count}"] = round(args.nodes / elapsed, 1)
    line |= {
        "speedup_3_vs_1": None if speedup is None else round(speedup, 3),
        "doubles": doubles,
        "missing": missing,
        **{f"machine_busy_{count}": busy for count, busy in machine_busy.items()},
    }
    print(json.dumps(line))


if __name__ == "__main__":
    asyncio.run(main())
