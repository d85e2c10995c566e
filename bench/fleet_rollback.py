"""Fast rollback of a release on N fleet hosts against each host's own rollback alone (ssh driver, embedded mode).

    python bench/fleet_rollback.py [--hosts 20] [--max-parallel 5]

1. 1.0.0, then 2.0.0 to every host (releases of `max_parallel` nodes at a time).
2. Baseline: each host rolled back alone (a RollbackRequested for its node, nothing else running), timed from the
   request to its outcome; the slowest of these is "the slowest single host's rollback".
3. 2.0.0 again, then its release rolled back with `fast`: every node at once, timed from ReleaseRollbackRequested
   to the release rolled back.
4. 2.0.0 again, then the normal rollback (newest first, `max_parallel` at a time), for comparison.
After each rollback every host must serve 1.0.0 (asked over HTTP on the host). Target: the fast rollback's wall
time <= 1.5x the slowest single host's rollback. The test hosts are containers sharing this machine's cores with
the reactor, unlike real hosts: 20 rollbacks at once cannot end before the CPU they need has been spent, so the
run also reports the machine's busy CPU-seconds during the fast rollback divided by its cores (that floor), the
reactor's own CPU time, and how soon after the request every host's rollback had begun.
The last line is one JSON object with the figures.
Uses the fleet in $REACTOR_FLEET_DIR when it has enough hosts, else boots one with the test harness (root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fleet import StepTimes, check_served, fleet_of, step_table, wipe
from reactor import logs
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.demo import build_package
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState
from reactor.events import (
    HealthCheck,
    NodeTarget,
    Package,
    ReleasePlan,
    ReleaseRequested,
    ReleaseRollbackRequested,
    RollbackRequested,
    Strategy,
)
from reactor.executors.hostcontract import physical_executor
from reactor.ports import ExecutionContext, Executor
from reactor.runtime import Backends, Role, run_roles, tune_gc
from reactor.settings import Settings
from tests.infra.fleet import Fleet

SERVICE = "rollbench"
PORT = 18700
VERSIONS = ("1.0.0", "2.0.0")
TARGET = 1.5
BEGUN: dict[str, float] = {}  # host -> when its last executor run began (perf_counter)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (every process: the hosts' and the reactor's), /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Reactor:
    """The embedded reactor (pacer, executor worker, rollback consumer) driving the fleet over ssh."""

    bus: MemoryBus
    store: EmbeddedStore
    hosts: list[str]
    packages: dict[str, Package]
    max_parallel: int
    executors: dict[str, Executor]
    releases: int = 0

    def key(self, host: str) -> str:
        return f"physical/{host}/{SERVICE}"

    async def release(self, version: str) -> str:
        """A release of `version` to every host; its id once it completed."""
        self.releases += 1
        plan = ReleasePlan(
            release_id=f"{SERVICE}-{version}-{self.releases}",
            service=SERVICE,
            version=version,
            package=self.packages[version],
            health=HealthCheck(timeout_s=60),
            nodes=[NodeTarget(node_key=self.key(host), port=PORT) for host in self.hosts],
            strategy=Strategy(max_parallel=self.max_parallel),
        )
        await self.bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan, actor="bench"))
        ended = await self.ended(plan.release_id, {ReleaseState.COMPLETED, ReleaseState.HALTED})
        if ended != ReleaseState.COMPLETED:
            raise SystemExit(f"release {plan.release_id} ended {ended}")
        return plan.release_id

    async def ended(self, release_id: str, states: set[ReleaseState]) -> ReleaseState:
        while True:
            record = await self.store.get_release(release_id)
            if record is not None and record.state in states:
                return record.state
            await asyncio.sleep(0.01)

    async def rollback_release(self, release_id: str, *, fast: bool) -> float:
        self.executors.clear()
        begin = time.perf_counter()
        await self.bus.publish(ReleaseRollbackRequested(release_id=release_id, actor="bench", fast=fast))
        await self.ended(release_id, {ReleaseState.ROLLED_BACK})
        return time.perf_counter() - begin

    async def rollback_alone(self, host: str) -> float:
        """One node rolled back to 1.0.0 with nothing else running: request to outcome."""
        self.executors.clear()
        begin = time.perf_counter()
        request = RollbackRequested(node_key=self.key(host), service=SERVICE, to_version="1.0.0", actor="bench")
        await self.bus.publish(request)
        await self.bus.idle(timeout_s=300)
        elapsed = time.perf_counter() - begin
        status = await self.store.get_node(self.key(host))
        if status is None or (status.state, status.current_version) != (NodeState.ROLLED_BACK, "1.0.0"):
            raise SystemExit(f"rollback of {host} alone: {status}")
        return elapsed


@contextlib.asynccontextmanager
async def reactor_on(
    fleet: Fleet, hosts: list[str], packages: dict[str, Package], max_parallel: int, state: Path
) -> AsyncIterator[Reactor]:
    settings = Settings(
        state_dir=state,
        physical_driver="ssh",
        physical_inventory=fleet.inventory,
        physical_known_hosts=fleet.known_hosts,
        physical_private_key=fleet.private_key,
        resend_after_s=900.0,
    )
    executors: dict[str, Executor] = {}
    begun = BEGUN

    def capture(context: ExecutionContext) -> Executor:
        executor = physical_executor(context)
        executors[context.host] = executor
        begun[context.host] = time.perf_counter()
        return executor

    async with EmbeddedStore(":memory:") as store:
        bus = MemoryBus()
        started = asyncio.Event()
        backends = Backends(bus=bus, store=store, memory_bus=bus)
        roles = asyncio.create_task(
            run_roles(backends, settings, {Role.ALL}, factories={"physical": capture}, started=started)
        )
        await started.wait()
        try:
            yield Reactor(bus, store, hosts, packages, max_parallel, executors)
        finally:
            roles.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await roles


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--max-parallel", type=int, default=5)
    args = parser.parse_args()
    logs.configure("console", os.environ.get("BENCH_LOG_LEVEL", "warning"))
    tune_gc()  # the garbage collector as the `reactor` command sets it
    with fleet_of(args.hosts) as fleet, tempfile.TemporaryDirectory(prefix="bench-rollback-") as state:
        hosts = [host.name for host in fleet.hosts[: args.hosts]]
        packages = {}
        for version in VERSIONS:
            built = build_package(fleet.package_dir / "rollbench", version)
            packages[version] = Package(url=fleet.package_url + "rollbench/" + built.path.name, sha256=built.sha256)
        wipe(fleet, hosts, SERVICE)
        try:
            async with reactor_on(fleet, hosts, packages, args.max_parallel, Path(state)) as reactor:
                await reactor.release("1.0.0")
                await reactor.release("2.0.0")
                alone = {}
                steps: dict[str, StepTimes] = {"alone": {}}
                for host in hosts:
                    alone[host] = await reactor.rollback_alone(host)
                    steps["alone"][host] = dict(getattr(reactor.executors[host], "step_times", {}))
                check_served(fleet, hosts, PORT, "single-host rollbacks", version="1.0.0")
                again = await reactor.release("2.0.0")
                BEGUN.clear()
                cpu_before, own_before, asked = busy_cpu_s(), time.process_time(), time.perf_counter()
                fast_s = await reactor.rollback_release(again, fast=True)
                busy_s, own_s = busy_cpu_s() - cpu_before, time.process_time() - own_before
                spread_s = max(BEGUN.values()) - asked
                steps["fast"] = {h: dict(getattr(e, "step_times", {})) for h, e in reactor.executors.items()}
                check_served(fleet, hosts, PORT, "fast rollback", version="1.0.0")
                normal_s = await reactor.rollback_release(await reactor.release("2.0.0"), fast=False)
                check_served(fleet, hosts, PORT, "normal rollback", version="1.0.0")
        finally:
            wipe(fleet, hosts, SERVICE)

    slowest_host, slowest = max(alone.items(), key=lambda item: item[1])
    ordered = sorted(alone.values())
    ratio = fast_s / slowest
    print(f"{len(hosts)} fleet hosts, ssh driver, embedded mode, max_parallel {args.max_parallel}")
    print(f"(machine: {os.cpu_count()} cores, 1-min load average now {os.getloadavg()[0]:.1f})")
    print(
        f"single-host rollback alone: slowest {slowest:.2f} s ({slowest_host}), "
        f"median {ordered[len(ordered) // 2]:.2f} s, fastest {ordered[0]:.2f} s"
    )
    print(f"fast release rollback, all {len(hosts)} at once: {fast_s:.2f} s = {ratio:.2f}x the slowest single host")
    cores = os.cpu_count() or 1
    floor = busy_s / cores
    print(
        f"  every host's rollback began within {spread_s * 1000:.0f} ms of the request; the machine was busy "
        f"{busy_s:.1f} CPU-s meanwhile (hosts and reactor on the same {cores} cores: a floor of {floor:.2f} s), "
        f"the reactor process {own_s:.2f} CPU-s; fast = {fast_s / max(slowest, floor):.2f}x max(slowest, floor)"
    )
    print(f"normal release rollback ({args.max_parallel} at a time): {normal_s:.2f} s = {normal_s / slowest:.2f}x")
    print("per-host step times, each host alone and all at once (fast):")
    print("\n".join(step_table(steps)))
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"target: fast <= {TARGET}x the slowest single host: {verdict}")
    print(
        json.dumps(
            {
                "bench": "fleet_rollback",
                "hosts": len(hosts),
                "slowest_single_s": round(slowest, 3),
                "fast_s": round(fast_s, 3),
                "normal_s": round(normal_s, 3),
                "fast_vs_slowest_single": round(ratio, 3),
                "dispatch_spread_s": round(spread_s, 3),
                "machine_busy_cpu_s": round(busy_s, 2),
                "reactor_cpu_s": round(own_s, 3),
                "fast_vs_max_slowest_cpu_floor": round(fast_s / max(slowest, floor), 3),
                "target": TARGET,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
