"""The `k8s` executor against a real API server whose Deployments and StatefulSets really roll (kwok nodes).

Pods become Ready through kwok; a container image ending in `:broken` never does (ImagePullBackOff).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.demo import build_package
from reactor.demo.scenario import free_ports, served_version
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState, NodeStatus, pending
from reactor.events import (
    DeployRequested,
    HealthCheck,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    NodeTarget,
    Package,
    ReleaseCompleted,
    ReleasePlan,
    ReleaseRequested,
    RollbackRequested,
    Strategy,
    Topic,
)
from reactor.executors.k8s import HISTORY_ANNOTATION, PREV_IMAGE_ANNOTATION, VERSION_ANNOTATION, K8sExecutor
from reactor.executors.local import stop_all
from reactor.ports import ExecutionContext, ExecutorSettings, Store
from reactor.runtime import Backends, Role, run_roles
from reactor.settings import Settings
from tests.k8s.conftest import PROXY, Cluster, Kube, pod_image, pod_ready

pytestmark = pytest.mark.k8s

V1 = "registry.test/web:1.0.0"
V2 = "registry.test/web:2.0.0"
BAD = "registry.test/web:broken"  # kwok keeps pods of an image ending in ":broken" Pending (ImagePullBackOff)


class Node:
    """One workload, driven the way the executor worker drives it: the status is carried from call to call."""

    def __init__(self, cluster: Cluster, namespace: str, kind: str, name: str, *, timeout_s: float = 60) -> None:
        self.cluster = cluster
        self.key = f"k8s/{cluster.context}/{namespace}/{kind}/{name}"
        self.status: NodeStatus = pending(self.key, "web")
        self.timeout_s = timeout_s

    def executor(self, version: str | None, image: str | None = None, container: str | None = "app") -> K8sExecutor:
        return K8sExecutor(
            ExecutionContext(
                node_key=self.key,
                service="web",
                host=self.key.rsplit("/", 1)[1],
                current=self.status,
                target_version=version,
                image=image,
                container=container,
                health=HealthCheck(timeout_s=self.timeout_s),
                settings=ExecutorSettings(kubeconfig=self.cluster.path),
            )
        )

    async def deploy(self, version: str, image: str) -> NodeStatus:
        self.status = await self.executor(version, image).deploy()
        return self.status

    async def rollback(self, version: str | None) -> NodeStatus:
        self.status = await self.executor(version, container=None).rollback()
        return self.status


# --- Deployment -----------------------------------------------------------------------------------


async def test_deployment_upgrade_rolls_out_the_new_image_and_records_the_previous_one(
    kubeconfig: Cluster, kube: Kube, namespace: str
) -> None:
    """v1 -> v2 on the named container: every pod Ready on v2, the sidecar untouched, history in annotations."""
    await kube.create_deployment(namespace, "web", V1)
    await kube.settled(namespace, "deployment", "web", V1)
    node = Node(kubeconfig, namespace, "deployment", "web")

    status = await node.deploy("2.0.0", V2)

    assert (status.state, status.current_version, status.prev_version, status.last_error) == (
        NodeState.SUCCESS,
        "2.0.0",
        "1.0.0",
        "",
    )
    assert await kube.healthy_on(namespace, "deployment", "web", V2)
    pods = await kube.pods(namespace, "web")
    assert {pod_image(pod, "sidecar") for pod in pods} == {PROXY}
    obj = await kube.read(namespace, "deployment", "web")
    annotations = obj["metadata"]["annotations"]
    assert annotations[VERSION_ANNOTATION] == "2.0.0"
    assert annotations[PREV_IMAGE_ANNOTATION] == V1
    assert json.loads(annotations[HISTORY_ANNOTATION]) == [["1.0.0", V1], ["2.0.0", V2]]
    probed = await node.executor(None).status()
    assert (probed.state, probed.current_version, probed.prev_version) == (NodeState.SUCCESS, "2.0.0", "1.0.0")


async def test_redeploying_the_same_image_changes_nothing(kubeconfig: Cluster, kube: Kube, namespace: str) -> None:
    """A second deploy of v2 succeeds without writing: same resourceVersion, generation and ReplicaSets."""
    await kube.create_deployment(namespace, "web", V1)
    await kube.settled(namespace, "deployment", "web", V1)
    node = Node(kubeconfig, namespace, "deployment", "web")
    assert (await node.deploy("2.0.0", V2)).state == NodeState.SUCCESS
    before = (await kube.read(namespace, "deployment", "web"))["metadata"]
    replica_sets = await kube.call(kube.apps.list_namespaced_replica_set, namespace)

    again = await node.deploy("2.0.0", V2)

    assert (again.state, again.current_version, again.prev_version) == (NodeState.SUCCESS, "2.0.0", "1.0.0")
    after = (await kube.read(namespace, "deployment", "web"))["metadata"]
    assert (after["resourceVersion"], after["generation"]) == (before["resourceVersion"], before["generation"])
    replica_sets_after = await kube.call(kube.apps.list_namespaced_replica_set, namespace)
    assert [item["metadata"]["uid"] for item in replica_sets_after["items"]] == [
        item["metadata"]["uid"] for item in replica_sets["items"]
    ]


async def test_deployment_bad_image_fails_at_the_progress_deadline_and_leaves_the_old_pods_serving(
    kubeconfig: Cluster, kube: Kube, namespace: str
) -> None:
    """ProgressDeadlineExceeded ends the wait early, names the pods' reason, and v1 is back before the report."""
    await kube.create_deployment(namespace, "web", V1, progress_deadline_s=3)
    await kube.settled(namespace, "deployment", "web", V1)
    node = Node(kubeconfig, namespace, "deployment", "web", timeout_s=120)
    assert (await node.deploy("2.0.0", V2)).state == NodeState.SUCCESS

    status = await node.deploy("3.0.0", BAD)

    assert status.state == NodeState.FAILED
    assert (status.current_version, status.prev_version, status.deploying_version) == ("2.0.0", "1.0.0", "3.0.0")
    assert status.last_error.startswith("rollout: ProgressDeadlineExceeded: ")
    assert "ImagePullBackOff" in status.last_error
    assert f"reverted to {V2}, rolled out" in status.last_error
    assert await kube.healthy_on(namespace, "deployment", "web", V2)


async def test_deployment_rollback_returns_to_the_recorded_image_of_the_previous_version(
    kubeconfig: Cluster, kube: Kube, namespace: str
) -> None:
    """After v1 -> v2, a rollback to 1.0.0 (no container named: the annotation says which) rolls v1 out again."""
    await kube.create_deployment(namespace, "web", V1)
    await kube.settled(namespace, "deployment", "web", V1)
    node = Node(kubeconfig, namespace, "deployment", "web")
    assert (await node.deploy("2.0.0", V2)).state == NodeState.SUCCESS

    status = await node.rollback("1.0.0")

    assert (status.state, status.current_version, status.prev_version) == (NodeState.ROLLED_BACK, "1.0.0", None)
    assert await kube.healthy_on(namespace, "deployment", "web", V1)
    annotations = (await kube.read(namespace, "deployment", "web"))["metadata"]["annotations"]
    assert json.loads(annotations[HISTORY_ANNOTATION]) == [["1.0.0", V1]]


async def test_paused_deployment_is_refused_before_anything_changes(
    kubeconfig: Cluster, kube: Kube, namespace: str
) -> None:
    """A paused Deployment would never roll out: the deploy fails at `prepare` and the spec is untouched."""
    await kube.create_deployment(namespace, "web", V1)
    await kube.settled(namespace, "deployment", "web", V1)
    await kube.call(kube.apps.patch_namespaced_deployment, "web", namespace, {"spec": {"paused": True}})
    before = (await kube.read(namespace, "deployment", "web"))["metadata"]["generation"]
    node = Node(kubeconfig, namespace, "deployment", "web")

    status = await node.deploy("2.0.0", V2)

    assert status.state == NodeState.FAILED
    assert status.last_error == "prepare: the deployment is paused; it would never roll out"
    after = await kube.read(namespace, "deployment", "web")  # the controller may still write its status
    assert after["metadata"]["generation"] == before
    assert VERSION_ANNOTATION not in after["metadata"].get("annotations", {})
    assert [item["image"] for item in after["spec"]["template"]["spec"]["containers"]] == [PROXY, V1]


# --- StatefulSet ----------------------------------------------------------------------------------


async def test_statefulset_upgrade_replaces_every_pod(kubeconfig: Cluster, kube: Kube, namespace: str) -> None:
    """Without a partition the rollout is done when every pod runs v2 and both revisions agree."""
    await kube.create_statefulset(namespace, "db", V1)
    await kube.settled(namespace, "statefulset", "db", V1)
    node = Node(kubeconfig, namespace, "statefulset", "db")

    status = await node.deploy("2.0.0", V2)

    assert (status.state, status.current_version, status.prev_version) == (NodeState.SUCCESS, "2.0.0", "1.0.0")
    assert await kube.healthy_on(namespace, "statefulset", "db", V2)
    obj = await kube.read(namespace, "statefulset", "db")
    assert obj["status"]["currentRevision"] == obj["status"]["updateRevision"]


async def test_partitioned_statefulset_upgrade_updates_only_the_ordinals_at_or_above_the_partition(
    kubeconfig: Cluster, kube: Kube, namespace: str
) -> None:
    """Partition 2 of 3: the deploy is done once db-2 runs v2; db-0 and db-1 stay on v1."""
    await kube.create_statefulset(namespace, "db", V1, partition=2)
    await kube.settled(namespace, "statefulset", "db", V1)
    node = Node(kubeconfig, namespace, "statefulset", "db")

    status = await node.deploy("2.0.0", V2)

    assert status.state == NodeState.SUCCESS
    pods = {pod["metadata"]["name"]: pod for pod in await kube.pods(namespace, "db")}
    assert {name: pod_image(pod) for name, pod in pods.items()} == {"db-0": V1, "db-1": V1, "db-2": V2}
    assert all(pod_ready(pod) for pod in pods.values())
    obj = await kube.read(namespace, "statefulset", "db")
    assert obj["status"]["updatedReplicas"] == 1
    assert obj["status"]["currentRevision"] != obj["status"]["updateRevision"]


async def test_statefulset_bad_image_times_out_and_is_reverted_past_the_broken_pod(
    kubeconfig: Cluster, kube: Kube, namespace: str
) -> None:
    """No progress deadline on a StatefulSet: our deadline ends the wait, and the revert clears the stuck pod."""
    await kube.create_statefulset(namespace, "db", V1)
    await kube.settled(namespace, "statefulset", "db", V1)
    node = Node(kubeconfig, namespace, "statefulset", "db", timeout_s=10)

    status = await node.deploy("3.0.0", BAD)

    assert (status.state, status.current_version, status.deploying_version) == (NodeState.FAILED, "1.0.0", "3.0.0")
    assert status.last_error.startswith("rollout: not rolled out: "), status.last_error
    assert "db-2: app ImagePullBackOff" in status.last_error
    assert f"reverted to {V1}, rolled out" in status.last_error
    assert await kube.healthy_on(namespace, "statefulset", "db", V1)


async def test_rollback_of_a_statefulset_stuck_on_a_broken_pod_deletes_that_pod(
    kubeconfig: Cluster, kube: Kube, namespace: str
) -> None:
    """Someone set a broken image; the controller never replaces db-2 by itself, the rollback does."""
    await kube.create_statefulset(namespace, "db", V1)
    await kube.settled(namespace, "statefulset", "db", V1)
    node = Node(kubeconfig, namespace, "statefulset", "db")
    assert (await node.deploy("2.0.0", V2)).state == NodeState.SUCCESS
    await kube.set_image(namespace, "statefulset", "db", "app", BAD)

    async def stuck() -> bool:
        pods = {pod["metadata"]["name"]: pod for pod in await kube.pods(namespace, "db")}
        broken = pods.get("db-2")
        return broken is not None and pod_image(broken) == BAD and not pod_ready(broken)

    await kube.wait_for("db-2 to be stuck on the broken image", stuck)
    stuck_uid = next(pod["metadata"]["uid"] for pod in await kube.pods(namespace, "db") if pod_image(pod) == BAD)

    status = await node.rollback("1.0.0")

    assert (status.state, status.current_version, status.prev_version, status.last_error) == (
        NodeState.ROLLED_BACK,
        "1.0.0",
        None,
        "",
    )
    assert await kube.healthy_on(namespace, "statefulset", "db", V1)
    assert stuck_uid not in {pod["metadata"]["uid"] for pod in await kube.pods(namespace, "db")}


# --- status, clusters, names ----------------------------------------------------------------------


async def test_status_reports_the_live_image_when_someone_changed_it(
    kubeconfig: Cluster, kube: Kube, namespace: str
) -> None:
    """status() reads the workload: after an out-of-band `set image` it reports drift with the real image."""
    await kube.create_deployment(namespace, "web", V1)
    await kube.settled(namespace, "deployment", "web", V1)
    node = Node(kubeconfig, namespace, "deployment", "web")
    assert (await node.deploy("2.0.0", V2)).state == NodeState.SUCCESS
    await kube.set_image(namespace, "deployment", "web", "app", "registry.test/web:2.1.0")
    await kube.settled(namespace, "deployment", "web", "registry.test/web:2.1.0")

    probed = await node.executor(None).status()

    assert (probed.state, probed.current_version) == (NodeState.FAILED, "2.1.0")
    assert probed.last_error.startswith(f"drift: reactor set {V2}; image registry.test/web:2.1.0, replicas 3 (ready 3")


@contextlib.contextmanager
def counting_listener() -> Iterator[tuple[int, list[int]]]:
    """A TCP port on loopback that counts connections (and closes them): proof of whether anyone called."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.1)
    accepted: list[int] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        done.set()
        thread.join()
        server.close()


def kubeconfig_with(base: Cluster, path: Path, extra: dict[str, str]) -> Path:
    """A copy of the test kubeconfig with extra contexts, each pointing at another server."""
    config = yaml.safe_load(base.path.read_text())
    user = next(item["context"]["user"] for item in config["contexts"] if item["name"] == base.context)
    for name, server in extra.items():
        config["clusters"].append({"name": name, "cluster": {"server": server, "insecure-skip-tls-verify": True}})
        config["contexts"].append({"name": name, "context": {"cluster": name, "user": user}})
    path.write_text(json.dumps(config))
    return path


HOSTILE_NODES = [
    "k8s/{ctx}/default/deployment/web;rm -rf",
    "k8s/{ctx}/default/deployment/..",
    "k8s/{ctx}/default/deployment/Web_App",
    "k8s/{ctx}/kube-system..x/deployment/web",
    "k8s/{ctx}/default/daemonset/web",
    "k8s/{ctx}/default/deployment/web/extra",
    "k8s/{ctx}/-bad/deployment/web",
    "k8s/{ctx}/default/deployment/" + "a" * 254,
]


@pytest.mark.parametrize("template", HOSTILE_NODES)
async def test_hostile_node_keys_are_rejected_before_any_api_call(
    kubeconfig: Cluster, tmp_path: Path, template: str
) -> None:
    """Every part of the key must be a Kubernetes name; the cluster is never contacted otherwise."""
    with counting_listener() as (port, accepted):
        path = kubeconfig_with(kubeconfig, tmp_path / "kubeconfig", {"trap": f"https://127.0.0.1:{port}"})
        key = template.format(ctx="trap")
        for operation in ("deploy", "rollback", "status"):
            executor = K8sExecutor(
                ExecutionContext(
                    node_key=key,
                    service="web",
                    host="web",
                    current=pending("k8s/trap/default/deployment/web", "web"),
                    target_version="2.0.0",
                    image=V2,
                    container="app",
                    settings=ExecutorSettings(kubeconfig=path),
                )
            )
            status = await getattr(executor, operation)()
            assert status.state == NodeState.FAILED, operation
            assert status.last_error.startswith("validate: "), status.last_error
    assert accepted == []


@pytest.mark.parametrize(
    ("container", "image", "version"),
    [
        ("app;ls", V2, "2.0.0"),
        ("App", V2, "2.0.0"),
        ("app", "registry.test/web:2.0.0 --privileged", "2.0.0"),
        ("app", "Registry.test/web:2.0.0", "2.0.0"),
        ("app", V2, "2.0.0;reboot"),
    ],
)
async def test_hostile_container_image_or_version_is_rejected_before_any_api_call(
    kubeconfig: Cluster, tmp_path: Path, container: str, image: str, version: str
) -> None:
    """The executor re-checks what the event patterns already refuse, in case a caller skipped them."""
    with counting_listener() as (port, accepted):
        path = kubeconfig_with(kubeconfig, tmp_path / "kubeconfig", {"trap": f"https://127.0.0.1:{port}"})
        key = "k8s/trap/default/deployment/web"
        executor = K8sExecutor(
            ExecutionContext(
                node_key=key,
                service="web",
                host="web",
                current=pending(key, "web"),
                target_version=version,
                image=image,
                container=container,
                settings=ExecutorSettings(kubeconfig=path),
            )
        )
        status = await executor.deploy()
    assert status.state == NodeState.FAILED
    assert status.last_error.startswith("validate: ")
    assert accepted == []


def test_hostile_node_keys_never_become_commands() -> None:
    """The event contract refuses shell and path tricks in the key before any executor sees them."""
    for key in ("k8s/c/default/deployment/web;id", "k8s/c/default/deployment/$(id)", "k8s/c/../deployment/web"):
        with pytest.raises(ValidationError):
            DeployRequested(node_key=key, service="web", version="2.0.0", image=V2)


async def test_each_cluster_segment_uses_its_own_kubeconfig_context(
    kubeconfig: Cluster, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """The same workload name under two contexts: the test cluster's deploys, the unreachable one fails at read."""
    await kube.create_deployment(namespace, "web", V1)
    await kube.settled(namespace, "deployment", "web", V1)
    dead = free_ports(1)[0]
    path = kubeconfig_with(kubeconfig, tmp_path / "kubeconfig", {"elsewhere": f"https://127.0.0.1:{dead}"})
    here = Node(Cluster(path, kubeconfig.context), namespace, "deployment", "web")
    there = Node(Cluster(path, "elsewhere"), namespace, "deployment", "web")
    nowhere = Node(Cluster(path, "no-such-context"), namespace, "deployment", "web")

    results = await asyncio.gather(there.deploy("2.0.0", V2), here.deploy("2.0.0", V2), nowhere.deploy("2.0.0", V2))

    assert [result.state for result in results] == [NodeState.FAILED, NodeState.SUCCESS, NodeState.FAILED]
    assert results[0].last_error.startswith("read: elsewhere: "), results[0].last_error
    assert results[2].last_error.startswith("connect: cluster 'no-such-context'"), results[2].last_error
    assert await kube.healthy_on(namespace, "deployment", "web", V2)


# --- through the reactor ----------------------------------------------------------------------------


@asynccontextmanager
async def reactor(tmp_path: Path, kubeconfig: Cluster) -> AsyncIterator[tuple[MemoryBus, Store]]:
    """Every role on the in-memory bus and the embedded store, with the test kubeconfig."""
    settings = Settings(state_dir=tmp_path / "state", local_root=tmp_path / "nodes", kubeconfig=kubeconfig.path)
    async with MemoryBus(retry_delay_s=0.05) as bus, EmbeddedStore(":memory:") as store:
        started = asyncio.Event()
        task = asyncio.create_task(
            run_roles(Backends(bus=bus, store=store, memory_bus=bus), settings, {Role.ALL}, started=started)
        )
        await started.wait()
        try:
            yield bus, store
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stop_all(settings.nodes_root)


async def test_bad_image_fails_by_the_progress_deadline_then_rolls_back_automatically(
    kubeconfig: Cluster, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """DeployRequested with a broken image -> NodeFailed (ProgressDeadlineExceeded) -> NodeRolledBack, v1 serving."""
    await kube.create_deployment(namespace, "web", V1, progress_deadline_s=3)
    await kube.settled(namespace, "deployment", "web", V1)
    key = f"k8s/{kubeconfig.context}/{namespace}/deployment/web"
    async with reactor(tmp_path, kubeconfig) as (bus, store):
        await bus.publish(
            DeployRequested(
                node_key=key,
                service="web",
                version="2.0.0",
                image=BAD,
                container="app",
                health=HealthCheck(timeout_s=120),
            )
        )
        await bus.idle(240)
        outcomes = bus.events(Topic.OUTCOMES)
        commands = bus.events(Topic.COMMANDS)
        record = await store.get_node(key)

    assert [type(event) for event in outcomes] == [NodeFailed, NodeRolledBack]
    failed, rolled_back = outcomes
    assert isinstance(failed, NodeFailed)
    assert (failed.step, failed.current_version, failed.version) == ("rollout", "1.0.0", "2.0.0")
    assert failed.error.startswith("ProgressDeadlineExceeded: ")
    assert "ImagePullBackOff" in failed.error
    assert isinstance(commands[-1], RollbackRequested)
    assert isinstance(rolled_back, NodeRolledBack)
    assert (rolled_back.version, rolled_back.from_version) == ("1.0.0", "2.0.0")
    assert record is not None
    assert (record.state, record.current_version) == (NodeState.ROLLED_BACK, "1.0.0")
    assert await kube.healthy_on(namespace, "deployment", "web", V1)


async def test_release_mixing_two_workloads_and_two_local_nodes_completes_everywhere(
    kubeconfig: Cluster, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """One plan, canary first then two at a time: local nodes serve 1.1.0 over HTTP, every pod runs 1.1.0."""
    await kube.create_deployment(namespace, "hello", "registry.test/hello:1.0.0")
    await kube.create_statefulset(namespace, "hello-db", "registry.test/hello:1.0.0")
    await kube.settled(namespace, "deployment", "hello", "registry.test/hello:1.0.0")
    await kube.settled(namespace, "statefulset", "hello-db", "registry.test/hello:1.0.0")
    package = build_package(tmp_path / "dist", "1.1.0")
    ports = free_ports(2)
    plan = ReleasePlan(
        release_id="hello-1.1.0",
        service="hello",
        version="1.1.0",
        package=Package(url=package.url, sha256=package.sha256),
        image="registry.test/hello:1.1.0",
        container="app",
        health=HealthCheck(timeout_s=60),
        nodes=[
            NodeTarget(node_key="local/box-1/hello", port=ports[0]),
            NodeTarget(node_key=f"k8s/{kubeconfig.context}/{namespace}/deployment/hello"),
            NodeTarget(node_key="local/box-2/hello", port=ports[1]),
            NodeTarget(node_key=f"k8s/{kubeconfig.context}/{namespace}/statefulset/hello-db"),
        ],
        strategy=Strategy(batches=[1, "100%"], max_parallel=2, failure_budget=0),
    )
    async with reactor(tmp_path, kubeconfig) as (bus, store):
        await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
        await bus.idle(240)
        served = [served_version(port) for port in ports]
        releases = bus.events(Topic.RELEASES)
        outcomes = bus.events(Topic.OUTCOMES)
        record = await store.get_release(plan.release_id)

    assert isinstance(releases[-1], ReleaseCompleted), releases[-1]
    assert (releases[-1].succeeded, releases[-1].failed) == (4, 0)
    assert sorted(event.node_key for event in outcomes if isinstance(event, NodeDeployed)) == sorted(
        node.node_key for node in plan.nodes
    )
    assert served == ["1.1.0", "1.1.0"]
    assert await kube.healthy_on(namespace, "deployment", "hello", "registry.test/hello:1.1.0")
    assert await kube.healthy_on(namespace, "statefulset", "hello-db", "registry.test/hello:1.1.0")
    assert record is not None
    assert record.state == ReleaseState.COMPLETED
