"""A release of 100,000 nodes in distributed mode (Kafka + FerretDB): its request, its planning, its first batches.

    python bench/large_release.py [--nodes 100000] [--batch 1000] [--max-parallel 500] [--batches 2] [--complete]

One process runs every role (no-op executor) against Kafka and FerretDB, as `bench/bus.py` does. Measured: the size
of the ReleaseRequested (one message on the releases topic); the seconds from its publish until the release is planned
(every node row stored, the record written, the first batch started); the seconds until `--batches` batches are done
(or, with `--complete`, the whole release), as nodes per second; and this process's resident memory, sampled
throughout. Baseline in the same run: the same request's bytes produced to and read back from the releases topic
alone (what the bus itself costs for it).

Uses $REACTOR_KAFKA_BOOTSTRAP / $REACTOR_MONGO_URL when set, else starts them with the test harness
($REACTOR_MONGO_BACKEND: sqlite by default; FerretDB on SQLite filters nothing in its storage, so a release this large
wants postgresql). The last line is one JSON object: {"bench": "large_release", "nodes": N, "request_mb": x,
"raw_round_trip_s": x, "planned_s": x, "planned_vs_raw": x, "batches_done": n, "nodes_per_s": x, "rss_mb": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus import backends, distributed, release, rss_mb
from reactor import logs
from reactor.codec import encode
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.errors import BackendUnavailable
from reactor.events import ReleaseRequested, Strategy, Topic
from reactor.ports import ReleaseRecord
from reactor.runtime import Backends, Role, run_roles, tune_gc
from reactor.settings import Settings


async def main() -> None:  # noqa: PLR0915 (one measured run, start to end)
    logs.configure("json", "warning")
    tune_gc()  # the garbage collector as the `reactor` command sets it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="nodes per batch")
    parser.add_argument("--max-parallel", type=int, default=500)
    parser.add_argument("--batches", type=int, default=2, help="batches to wait for (without --complete)")
    parser.add_argument("--complete", action="store_true", help="run the whole release")
    args = parser.parse_args()
    plan = release(args.nodes, args.max_parallel)
    plan = plan.model_copy(update={"strategy": Strategy(batches=[args.batch], max_parallel=args.max_parallel)})
    request = ReleaseRequested(release_id=plan.release_id, plan=plan)
    size = len(encode(request, "/bench").value)
    rss: dict[str, float] = {"before": round(rss_mb(), 1)}
    with backends() as (bootstrap, url):
        # Baseline: the request's record alone through a releases topic of its own, produced and read back.
        async with distributed(bootstrap, url) as (raw_bus, _store):
            begin = time.perf_counter()
            await raw_bus.publish_raw(Topic.RELEASES, encode(request, "/bench"))
            await raw_bus.history(Topic.RELEASES)
            raw_s = time.perf_counter() - begin
        rss["after_baseline"] = round(rss_mb(), 1)
        async with distributed(bootstrap, url) as (bus, store):
            settings = Settings(mode="distributed", require_signed=False, state_dir=Path(tempfile.gettempdir()))
            started = asyncio.Event()
            roles = asyncio.create_task(
                run_roles(Backends(bus=bus, store=store), settings, {Role.ALL}, started=started)
            )
            await started.wait()
            peak = rss_mb()
            begin = time.perf_counter()
            await bus.publish(request)
            planned_s: float | None = None
            record: ReleaseRecord | None = None
            wanted = len(plan.nodes) if args.complete else min(len(plan.nodes), args.batches * args.batch)
            done = 0
            try:
                while True:
                    await asyncio.sleep(0.5)
                    peak = max(peak, rss_mb())
                    try:
                        record = await store.get_release(plan.release_id)
                        if record is None:
                            continue
                        if planned_s is None:
                            planned_s = time.perf_counter() - begin
                            rss["planned"] = round(rss_mb(), 1)
                        if record.state != ReleaseState.RUNNING:
                            break
                        if record.batch * args.batch >= wanted:
                            break
                    except BackendUnavailable:  # a store saturated by the run itself: look again
                        continue
                elapsed = time.perf_counter() - begin
                # The batches done are counted in the record (a count of every row would decode them all).
                done = (record.settled or {}).get(ItemState.SUCCEEDED, 0)
                if record.state == ReleaseState.COMPLETED:
                    done = len(plan.nodes)
            finally:
                roles.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await roles
    assert record is not None
    assert planned_s is not None
    if record.state not in (ReleaseState.RUNNING, ReleaseState.COMPLETED):
        raise SystemExit(f"release ended {record.state}: {record.reason}")
    rss["peak"] = round(peak, 1)
    running_s = elapsed - planned_s
    rate = done / running_s if running_s > 0 else 0.0
    print(f"release: {len(plan.nodes):,} nodes in batches of {args.batch:,}, max_parallel {args.max_parallel}")
    print(f"request: {size / 1e6:.1f} MB on the releases topic")
    print(f"raw produce and read back of that message:  {raw_s:7.2f} s  (baseline)")
    print(f"published to planned (rows, record, batch): {planned_s:7.2f} s  = {planned_s / raw_s:.1f}x the raw")
    print(f"then {done:,} nodes deployed in {running_s:.1f} s: {rate:.0f} nodes/s (release {record.state.value})")
    print(
        f"RSS: {rss['before']:.0f} MB before, {rss['planned']:.0f} MB once planned, {rss['peak']:.0f} MB peak sampled"
    )
    result = {
        "bench": "large_release",
        "nodes": len(plan.nodes),
        "request_mb": round(size / 1e6, 2),
        "raw_round_trip_s": round(raw_s, 3),
        "planned_s": round(planned_s, 2),
        "planned_vs_raw": round(planned_s / raw_s, 1),
        "batches_done": record.batch,
        "nodes_deployed": done,
        "nodes_per_s": round(rate, 1),
        "rss_mb": rss,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
