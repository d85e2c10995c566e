"""Upgrading 20 Deployments at once: the reactor against `kubectl set image` + `kubectl rollout status`.

    python bench/k8s.py [--deployments 20] [--replicas 3] [--rounds 3]

Same cluster, same run, rounds alternate (reactor, kubectl, reactor, ...), each round to a new image on
every Deployment. Reactor: one release of all Deployments (one batch, all in flight) through every role on the
in-memory bus and the embedded store; wall time from publishing the release to its ReleaseCompleted.
kubectl: for each Deployment, in parallel, `kubectl set image` then `kubectl rollout status`; wall time until
the last one returns. kubectl is the one built with the test cluster (same Kubernetes module set), or $KUBECTL.
Uses $REACTOR_KUBECONFIG when set (its current context), otherwise starts the test cluster with the harness.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reactor import logs
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.domain.pacer import ReleaseState
from reactor.events import (
    HealthCheck,
    NodeTarget,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePlan,
    ReleaseRequested,
    Strategy,
    Topic,
)
from reactor.runtime import Backends, Role, run_roles, tune_gc
from reactor.settings import Settings
from tests.infra import k8s
from tests.k8s.conftest import Cluster, Kube, current_context

IMAGE = "registry.test/bench:{}"


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """$REACTOR_KUBECONFIG's cluster, or a fresh one from the harness (stopped afterwards)."""
    if path := os.environ.get("REACTOR_KUBECONFIG"):
        yield Cluster(Path(path), current_context(Path(path)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-k8s-") as tmp:
        service = k8s.start_k8s(Path(tmp) / "k8s")
        try:
            yield Cluster(Path(service.env["REACTOR_KUBECONFIG"]), k8s.CONTEXT)
        finally:
            service.stop()


def kubectl() -> str:
    return os.environ.get("KUBECTL") or str(k8s.ensure_k8s() / "bin" / "kubectl")


async def settle_all(kube: Kube, namespace: str, names: list[str], image: str) -> None:
    await asyncio.gather(*(kube.settled(namespace, "deployment", name, image, timeout_s=300) for name in names))


@contextlib.asynccontextmanager
async def reactor(state: Path, config: Cluster) -> AsyncIterator[MemoryBus]:
    settings = Settings(state_dir=state, kubeconfig=config.path, concurrency=256)
    async with MemoryBus(concurrency=256) as bus, EmbeddedStore(":memory:") as store:
        started = asyncio.Event()
        task = asyncio.create_task(
            run_roles(Backends(bus=bus, store=store, memory_bus=bus), settings, {Role.ALL}, started=started)
        )
        await started.wait()
        try:
            yield bus
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def reactor_round(bus: MemoryBus, config: Cluster, namespace: str, names: list[str], version: str) -> float:
    plan = ReleasePlan(
        release_id=f"bench-{version.replace('.', '-')}",
        service="bench",
        version=version,
        image=IMAGE.format(version),
        container="app",
        health=HealthCheck(timeout_s=300),
        nodes=[NodeTarget(node_key=f"k8s/{config.context}/{namespace}/deployment/{name}") for name in names],
        strategy=Strategy(batches=["100%"], max_parallel=len(names)),
    )
    started = time.perf_counter()
    await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
    await bus.idle(600)
    return time.perf_counter() - started


async def kubectl_round(binary: str, config: Cluster, namespace: str, names: list[str], version: str) -> float:
    base = [binary, f"--kubeconfig={config.path}", f"--context={config.context}", "-n", namespace]

    async def one(name: str) -> None:
        for args in (
            ["set", "image", f"deployment/{name}", f"app={IMAGE.format(version)}"],
            ["rollout", "status", f"deployment/{name}", "--timeout=300s"],
        ):
            process = await asyncio.create_subprocess_exec(
                *base, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
            _, err = await process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"kubectl {' '.join(args)}: {err.decode().strip()}")

    started = time.perf_counter()
    await asyncio.gather(*(one(name) for name in names))
    return time.perf_counter() - started


async def main(deployments: int, replicas: int, rounds: int) -> None:
    logs.configure("console", level="warning")
    tune_gc()  # the garbage collector as the `reactor` command sets it
    binary = kubectl()
    with cluster() as config, tempfile.TemporaryDirectory(prefix="bench-k8s-state-") as state:
        async with Kube.open(config) as kube:
            namespace = f"bench-{os.getpid()}"
            await kube.create_namespace(namespace)
            names = [f"web-{index:02d}" for index in range(deployments)]
            try:
                await asyncio.gather(
                    *(
                        kube.call(kube.apps.create_namespaced_deployment, namespace, deployment(name, replicas))
                        for name in names
                    )
                )
                await settle_all(kube, namespace, names, IMAGE.format("1.0.0"))
                timings: dict[str, list[float]] = {"reactor": [], "kubectl": []}
                async with reactor(Path(state), config) as bus:
                    for number in range(rounds * 2):
                        version = f"1.{number + 1}.0"
                        who = "reactor" if number % 2 == 0 else "kubectl"
                        if who == "reactor":
                            elapsed = await reactor_round(bus, config, namespace, names, version)
                        else:
                            elapsed = await kubectl_round(binary, config, namespace, names, version)
                        await settle_all(kube, namespace, names, IMAGE.format(version))
                        timings[who].append(elapsed)
                        print(f"round {number + 1}: {who:8s} {elapsed:6.2f}s  ({deployments} x {replicas} replicas)")
                    ends = release_ends(bus)
                if ends != [ReleaseState.COMPLETED] * rounds:
                    raise RuntimeError(f"every reactor release should have completed: {ends}")
            finally:
                await kube.call(kube.core.delete_namespace, namespace)
    reactor_s, kubectl_s = (statistics.median(timings[who]) for who in ("reactor", "kubectl"))
    print(
        f"median wall time: reactor {reactor_s:.2f}s, kubectl {kubectl_s:.2f}s, "
        f"ratio reactor/kubectl {reactor_s / kubectl_s:.2f} (target <= 1.10)"
    )


def release_ends(bus: MemoryBus) -> list[ReleaseState]:
    """How each release of the run ended, in order."""
    ends = [event for event in bus.events(Topic.RELEASES) if isinstance(event, ReleaseCompleted | ReleaseHalted)]
    return [ReleaseState.COMPLETED if isinstance(event, ReleaseCompleted) else ReleaseState.HALTED for event in ends]


def deployment(name: str, replicas: int) -> dict[str, object]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": IMAGE.format("1.0.0")}]},
            },
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.deployments, args.replicas, args.rounds))
