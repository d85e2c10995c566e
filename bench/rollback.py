"""Wall time of a fast release rollback against a normal one, embedded mode, noop nodes that take time.

    python bench/rollback.py [--nodes 50] [--max-parallel 5] [--delay 0.2]

Each run: the nodes run 0.9.0, a release of 1.0.0 completes (max_parallel at a time), then the release is
rolled back; timed from ReleaseRollbackRequested to the release rolled back, every node on 0.9.0 again. Every
deploy and rollback of the noop executor takes `--delay` seconds (default: $REACTOR_NOOP_DELAY_S, else 0.2).
Baseline in the same run: the normal rollback (newest first, max_parallel at a time); the floor is one executor
delay (every node at once, no overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus import release
from reactor import logs
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState, pending
from reactor.events import ReleaseRequested, ReleaseRollbackRequested
from reactor.ports import Store
from reactor.runtime import Backends, Role, run_roles, tune_gc
from reactor.settings import Settings


async def state_of(store: Store, release_id: str) -> ReleaseState | None:
    record = await store.get_release(release_id)
    return None if record is None else record.state


async def wait_for(store: Store, release_id: str, states: set[ReleaseState]) -> ReleaseState:
    while (state := await state_of(store, release_id)) not in states:
        await asyncio.sleep(0.01)
    assert state is not None
    return state


async def rollback_seconds(nodes: int, max_parallel: int, delay_s: float, *, fast: bool) -> tuple[float, int]:
    """Seconds from the rollback request to the release rolled back, and how many nodes went back."""
    plan = release(nodes, max_parallel=max_parallel)
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as work:
        settings = Settings(state_dir=Path(work), noop_delay_s=delay_s)
        async with MemoryBus(concurrency=settings.concurrency) as bus, EmbeddedStore(Path(work) / "b.db") as store:
            for target in plan.nodes:
                running = pending(target.node_key, plan.service).model_copy(
                    update={"state": NodeState.SUCCESS, "current_version": "0.9.0"}
                )
                await store.put_node(running, expected_revision=0)
            started = asyncio.Event()
            roles = asyncio.create_task(
                run_roles(Backends(bus=bus, store=store), settings, {Role.ALL}, started=started)
            )
            await started.wait()
            try:
                await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
                ended = await wait_for(store, plan.release_id, {ReleaseState.COMPLETED, ReleaseState.HALTED})
                if ended != ReleaseState.COMPLETED:
                    raise SystemExit(f"the release ended {ended}")
                begin = time.perf_counter()
                await bus.publish(ReleaseRollbackRequested(release_id=plan.release_id, actor="bench", fast=fast))
                await wait_for(store, plan.release_id, {ReleaseState.ROLLED_BACK})
                elapsed = time.perf_counter() - begin
            finally:
                roles.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await roles
            back = sum(node.current_version == "0.9.0" for node in await store.list_nodes())
    return elapsed, back


async def main() -> None:
    logs.configure("json", "warning")
    tune_gc()  # the garbage collector as the `reactor` command sets it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--max-parallel", type=int, default=5)
    parser.add_argument(
        "--delay",
        type=float,
        default=float(os.environ.get("REACTOR_NOOP_DELAY_S", "0.2")),
        help="seconds per noop deploy and rollback",
    )
    args = parser.parse_args()
    nodes, max_parallel, delay = args.nodes, args.max_parallel, args.delay
    normal_s, normal_back = await rollback_seconds(nodes, max_parallel, delay, fast=False)
    fast_s, fast_back = await rollback_seconds(nodes, max_parallel, delay, fast=True)
    if (normal_back, fast_back) != (nodes, nodes):
        raise SystemExit(f"not every node went back: normal {normal_back}, fast {fast_back} of {nodes}")
    rounds = -(-nodes // max_parallel)
    print(f"nodes: {nodes} noop, {delay:g} s per rollback, max_parallel {max_parallel}, embedded mode")
    work = f"{rounds} rounds of {delay:g} s = {rounds * delay:.1f} s of work"
    print(f"normal rollback ({max_parallel} at a time): {normal_s:7.3f} s  (baseline; {work})")
    print(
        f"fast rollback (all at once):   {fast_s:7.3f} s  = {fast_s / normal_s:.2f}x the baseline,"
        f" {normal_s / fast_s:.1f}x faster"
    )
    print(f"floor (one executor delay):    {delay:7.3f} s  fast rollback = {fast_s / delay:.2f}x the floor")


if __name__ == "__main__":
    asyncio.run(main())
