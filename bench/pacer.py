"""Pure orchestration overhead of the embedded reactor: one release, no-op executor, no work to wait for.

    python bench/pacer.py [--nodes 10000] [--batches 10] [--max-parallel 500]

The executor does nothing, so everything measured is the reactor's own cost per node: pacing, the bus,
the claim and status writes, the outcome and its counting. Baseline in the same run: the same number of
no-op executor calls made directly in a loop (what the work itself costs).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus import release, rss_mb, run_release
from reactor import logs
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.domain.status import pending
from reactor.events import Strategy
from reactor.executors.noop import NoopExecutor
from reactor.ports import ExecutionContext
from reactor.settings import Settings


async def direct_calls(count: int) -> float:
    """Seconds for `count` no-op executor deploys called directly."""
    begin = time.perf_counter()
    for index in range(count):
        key = f"noop/host-{index:05d}/app"
        context = ExecutionContext(
            node_key=key, service="app", host=f"host-{index:05d}", current=pending(key, "app"), target_version="1"
        )
        await NoopExecutor(context).deploy()
    return time.perf_counter() - begin


async def main() -> None:
    logs.configure("json", "warning")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--max-parallel", type=int, default=500)
    args = parser.parse_args()
    nodes: int = args.nodes
    plan = release(nodes, max_parallel=args.max_parallel)
    plan = plan.model_copy(
        update={"strategy": Strategy(batches=[nodes // args.batches], max_parallel=args.max_parallel)}
    )
    before = rss_mb()
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as work:
        settings = Settings(state_dir=Path(work), concurrency=args.max_parallel + 64)
        async with MemoryBus(concurrency=args.max_parallel + 64) as bus, EmbeddedStore(Path(work) / "b.db") as store:
            reactor_s, peak = await run_release(bus, store, plan, settings, sample_rss=True)
    work_s = await direct_calls(nodes)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    overhead_ms = (reactor_s - work_s) / nodes * 1000
    print(f"nodes: {nodes} in {args.batches} batches, max_parallel {args.max_parallel}, embedded mode")
    print(f"executor work alone (direct no-op calls): {work_s:8.3f} s  (baseline)")
    print(f"reactor, whole release:                   {reactor_s:8.3f} s  = {reactor_s / work_s:.0f}x the work")
    print(f"orchestration overhead per node: {overhead_ms:.3f} ms (target <= 0.2 ms)")
    print(f"RSS: {before:.0f} MB before, {peak:.0f} MB peak sampled, {max_rss:.0f} MB max (target <= 200 MB)")


if __name__ == "__main__":
    asyncio.run(main())
