"""`reactor demo`: two good releases to three local nodes, then a bad one that must roll back.

Every claim is checked from outside, over HTTP, against the running services.
"""

from __future__ import annotations

import asyncio
import random
import socket
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reactor.demo import SERVICE, BuiltPackage, build_package
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState
from reactor.events import NodeFailed, NodeTarget, Package, ReleasePlan, ReleaseRequested, Strategy, Topic
from reactor.executors.local import stop_all
from reactor.session import Observer, embedded
from reactor.settings import Settings

NODES = ("node-1", "node-2", "node-3")
WRONG_SHA256 = "0" * 64


@dataclass
class DemoResult:
    """What the demo checked, and which checks failed."""

    checks: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, claim: str, holds: bool) -> None:
        """Record one claim and whether it held."""
        self.checks.append((claim, holds))

    @property
    def ok(self) -> bool:
        """Every claim held."""
        return bool(self.checks) and all(holds for _, holds in self.checks)


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on the loopback interface, for services started later.

    Taken below the kernel's ephemeral range where it has one (Linux): a port from that range may meanwhile become
    the local end of any outgoing connection (a worker's to Kafka or the store), and a service then fails to bind it.
    """
    low = _ephemeral_low()
    if low is None or low <= 1024 + 4 * count:
        return _kernel_ports(count)
    candidates = random.SystemRandom().sample(range(max(1024, low - 12_000), low), min(low - 1024, 12_000))
    sockets: list[socket.socket] = []
    try:
        for port in candidates:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
            if len(sockets) == count:
                return [held.getsockname()[1] for held in sockets]
    finally:
        for held in sockets:
            held.close()
    return _kernel_ports(count)


def _ephemeral_low() -> int | None:
    """The first port of the kernel's ephemeral range, or None where it cannot be read."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kernel_ports(count: int) -> list[int]:
    """Distinct ports the kernel hands out as free (from its ephemeral range)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def release_plan(
    release_id: str, package: BuiltPackage, ports: dict[str, int], *, bad_node: str | None = None
) -> ReleasePlan:
    """The demo's plan: canary of one node, then the rest, two at a time; budget 0; per-node rollback."""
    return ReleasePlan(
        release_id=release_id,
        service=SERVICE,
        version=package.version,
        package=Package(url=package.url, sha256=package.sha256),
        nodes=[
            NodeTarget(
                node_key=f"local/{node}/{SERVICE}",
                port=port,
                package=Package(url=package.url, sha256=WRONG_SHA256) if node == bad_node else None,
            )
            for node, port in ports.items()
        ],
        strategy=Strategy(batches=[1, "100%"], max_parallel=2, failure_budget=0, auto_rollback="node"),
    )


def write_plan(path: Path, plan: ReleasePlan) -> Path:
    """Save a plan as a YAML release file."""
    path.write_text(yaml.safe_dump(plan.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
    return path


def served_version(port: int) -> str | None:
    """What the service on `port` says its version is, or None if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as response:
            return str(response.read().decode().strip())
    except OSError:
        return None


async def run_demo(
    workdir: Path, *, observer: Observer | None = None, say: Callable[[str], None] | None = None
) -> DemoResult:
    """Run the whole scenario in `workdir`; stops every service it started before returning."""
    result = DemoResult()
    dist = workdir / "dist"
    packages = {version: build_package(dist, version) for version in ("1.0.0", "1.1.0", "1.2.0")}
    ports = dict(zip(NODES, free_ports(len(NODES)), strict=True))
    settings = Settings(state_dir=workdir / "state", local_root=workdir / "nodes")
    plans = [
        release_plan("hello-1.0.0", packages["1.0.0"], ports),
        release_plan("hello-1.1.0", packages["1.1.0"], ports),
        release_plan("hello-1.2.0-bad", packages["1.2.0"], ports, bad_node=NODES[0]),
    ]
    for plan in plans:
        write_plan(workdir / f"release-{plan.release_id}.yaml", plan)

    async def versions() -> dict[str, str | None]:
        found = await asyncio.gather(*(asyncio.to_thread(served_version, port) for port in ports.values()))
        return dict(zip(ports, found, strict=True))

    try:
        async with embedded(settings, observer=observer) as session:
            for plan, expected in ((plans[0], "1.0.0"), (plans[1], "1.1.0")):
                await session.submit(ReleaseRequested(release_id=plan.release_id, plan=plan, actor="demo"))
                state = await session.release_state(plan.release_id)
                result.check(f"release {plan.release_id} completed", state == ReleaseState.COMPLETED)
                served = await versions()
                result.check(
                    f"all nodes serve {expected} over HTTP (they serve {served})",
                    all(version == expected for version in served.values()),
                )
            bad = plans[2]
            await session.submit(ReleaseRequested(release_id=bad.release_id, plan=bad, actor="demo"))
            state = await session.release_state(bad.release_id)
            result.check(f"release {bad.release_id} halted on its bad canary", state == ReleaseState.HALTED)
            canary = await session.backends.store.get_node(f"local/{NODES[0]}/{SERVICE}")
            result.check(
                f"the failed canary was rolled back (state {canary.state.value if canary else 'unknown'})",
                canary is not None and canary.state == NodeState.ROLLED_BACK,
            )
            failures = [
                event
                for event in session.bus.events(Topic.OUTCOMES)
                if isinstance(event, NodeFailed) and event.release_id == bad.release_id
            ]
            result.check(
                "exactly the canary failed, at the SHA256 check, before anything changed",
                [(event.node_key, event.step, event.current_version) for event in failures]
                == [(f"local/{NODES[0]}/{SERVICE}", "verify", "1.1.0")],
            )
            served = await versions()
            result.check(
                f"every node still serves 1.1.0 over HTTP (they serve {served})",
                all(version == "1.1.0" for version in served.values()),
            )
    finally:
        stopped = await asyncio.to_thread(stop_all, settings.nodes_root)
        if say is not None:
            say(f"stopped {len(stopped)} service processes")
    return result
