"""The test Kubernetes cluster and small helpers to arrange and inspect workloads through its real API."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from kubernetes_asyncio.client import ApiClient, AppsV1Api, Configuration, CoreV1Api
from kubernetes_asyncio.config import list_kube_config_contexts, load_kube_config

from tests.infra import k8s, testenv

Json = dict[str, Any]
PROXY = "registry.test/proxy:1.0"  # the sidecar every test Deployment has next to its `app` container


@dataclass(frozen=True)
class Cluster:
    """A kubeconfig file and the context of the test cluster in it (the `<cluster>` of node keys)."""

    path: Path
    context: str


def current_context(path: Path) -> str:
    _, current = list_kube_config_contexts(str(path))
    if not current:
        pytest.fail(f"{path} has no current-context")
    return str(current["name"])


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster for the session: $REACTOR_KUBECONFIG (its current context), else one started by the harness."""
    if path := os.environ.get("REACTOR_KUBECONFIG"):
        cluster = Cluster(Path(path), current_context(Path(path)))
        try:
            asyncio.run(_answers(cluster))
        except Exception as exc:  # noqa: BLE001 - any failure to reach it is the same verdict
            pytest.fail(f"the cluster of REACTOR_KUBECONFIG={path} does not answer: {exc}")
        yield cluster
        return
    try:
        k8s.ensure_k8s()
        service = k8s.start_k8s(tmp_path_factory.mktemp("k8s"))
    except (testenv.TestEnvError, OSError) as exc:
        pytest.fail(f"the test Kubernetes cluster could not be started: {exc}")
    try:
        yield Cluster(Path(service.env["REACTOR_KUBECONFIG"]), k8s.CONTEXT)
    finally:
        service.stop()


async def _answers(cluster: Cluster) -> None:
    async with Kube.open(cluster) as kube:
        await kube.call(kube.core.list_node)


class KubeError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: Json) -> None:
        super().__init__(f"HTTP {status}: {body.get('message', body)}")
        self.status = status


class Kube:
    """The test's own API client: arrange workloads and look at them, as plain JSON."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.apps = AppsV1Api(client)
        self.core = CoreV1Api(client)

    @classmethod
    def open(cls, cluster: Cluster) -> _KubeContext:
        return _KubeContext(cluster)

    async def call(self, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Json:
        async with asyncio.timeout(30):
            response = await method(*args, _preload_content=False, _request_timeout=30, **kwargs)
            async with response:
                status = int(response.status)
                body: Json = json.loads(await response.text() or "{}")
        if not 200 <= status < 300:
            raise KubeError(status, body)
        return body

    # --- arrange ---

    async def create_namespace(self, name: str) -> None:
        await self.call(self.core.create_namespace, {"metadata": {"name": name}})

    async def create_deployment(
        self, namespace: str, name: str, image: str, *, replicas: int = 3, progress_deadline_s: int = 600
    ) -> Json:
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "progressDeadlineSeconds": progress_deadline_s,
                "selector": {"matchLabels": {"app": name}},
                "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "sidecar", "image": PROXY}, _app(image)]},
                },
            },
        }
        return await self.call(self.apps.create_namespaced_deployment, namespace, body)

    async def create_statefulset(
        self, namespace: str, name: str, image: str, *, replicas: int = 3, partition: int | None = None
    ) -> Json:
        rolling: Json = {"type": "RollingUpdate"}
        if partition is not None:
            rolling["rollingUpdate"] = {"partition": partition}
        body = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "serviceName": name,
                "selector": {"matchLabels": {"app": name}},
                "updateStrategy": rolling,
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [_app(image)]}},
            },
        }
        return await self.call(self.apps.create_namespaced_stateful_set, namespace, body)

    async def set_image(self, namespace: str, kind: str, name: str, container: str, image: str) -> None:
        """What `kubectl set image` does: a strategic merge patch of one container's image."""
        patch = {"spec": {"template": {"spec": {"containers": [{"name": container, "image": image}]}}}}
        method = (
            self.apps.patch_namespaced_deployment if kind == "deployment" else self.apps.patch_namespaced_stateful_set
        )
        await self.call(method, name, namespace, patch)

    # --- look ---

    async def read(self, namespace: str, kind: str, name: str) -> Json:
        method = (
            self.apps.read_namespaced_deployment if kind == "deployment" else self.apps.read_namespaced_stateful_set
        )
        return await self.call(method, name, namespace)

    async def pods(self, namespace: str, app: str) -> list[Json]:
        body = await self.call(self.core.list_namespaced_pod, namespace, label_selector=f"app={app}")
        return list(body["items"])

    async def wait_for(self, what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
            await asyncio.sleep(0.2)

    async def settled(self, namespace: str, kind: str, name: str, image: str, timeout_s: float = 60.0) -> None:
        """Wait until every replica is ready on `image`, no other pod is left, and the workload's status says so.

        The pods settle before the controller's status counters do (it may still count a terminating pod as ready),
        and `status()` reports those counters, so both are waited for.
        """

        async def check() -> bool:
            if not await self.healthy_on(namespace, kind, name, image):
                return False
            obj = await self.read(namespace, kind, name)
            status, wanted = obj["status"], obj["spec"]["replicas"]
            return bool(
                status.get("observedGeneration", 0) >= obj["metadata"]["generation"]
                and status.get("replicas", 0) == wanted
                and status.get("readyReplicas", 0) == wanted
            )

        await self.wait_for(f"{kind} {name} healthy on {image}", check, timeout_s)

    async def healthy_on(self, namespace: str, kind: str, name: str, image: str) -> bool:
        """Every wanted replica is a Ready pod running `image`, and there is no other pod."""
        obj = await self.read(namespace, kind, name)
        pods = [pod for pod in await self.pods(namespace, name) if not pod["metadata"].get("deletionTimestamp")]
        wanted = obj["spec"]["replicas"]
        return (
            obj["status"].get("observedGeneration", 0) >= obj["metadata"]["generation"]
            and len(pods) == wanted
            and all(pod_image(pod) == image and pod_ready(pod) for pod in pods)
        )


class _KubeContext:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.client: ApiClient | None = None

    async def __aenter__(self) -> Kube:
        configuration = Configuration()
        await load_kube_config(
            config_file=str(self.cluster.path),
            context=self.cluster.context,
            client_configuration=configuration,
            persist_config=False,
        )
        self.client = ApiClient(configuration=configuration)
        return Kube(self.client)

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.close()


def _app(image: str) -> Json:
    return {"name": "app", "image": image}


def pod_image(pod: Json, container: str = "app") -> str:
    return str(next(item["image"] for item in pod["spec"]["containers"] if item["name"] == container))


def pod_ready(pod: Json) -> bool:
    return any(
        condition["type"] == "Ready" and condition["status"] == "True"
        for condition in pod.get("status", {}).get("conditions", [])
    )


@pytest.fixture
async def kube(kubeconfig: Cluster) -> AsyncIterator[Kube]:
    """An API client for arranging and checking, closed after the test."""
    async with Kube.open(kubeconfig) as opened:
        yield opened


@pytest.fixture
async def namespace(kube: Kube) -> AsyncIterator[str]:
    """A fresh namespace, deleted after the test."""
    name = f"t-{uuid4().hex[:10]}"
    await kube.create_namespace(name)
    try:
        yield name
    finally:
        await kube.call(kube.core.delete_namespace, name)
