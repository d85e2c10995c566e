"""The `k8s` platform: one node is one Deployment or StatefulSet, `k8s/<cluster>/<namespace>/<kind>/<name>`.

`<cluster>` is a kubeconfig context (the file from `ExecutorSettings.kubeconfig`, else `$KUBECONFIG`, else
`~/.kube/config`); `in-cluster` means the ServiceAccount of the pod the worker runs in.

Deploy sets the image of one container, records the version history in annotations on the workload
(`deploy-reactor.dev/*`), then waits for the rollout with `kubectl rollout status`'s rules. If the rollout
fails (ProgressDeadlineExceeded, or no rollout within `health.timeout_s`), the executor reverts to the
previous image and waits for that too *before* reporting the failure, as the host executors do: a NodeFailed
always means "the previous version is back" (`current_version`), and its message says whether the revert
completed. The automatic rollback that follows is then a cheap confirmation. Rollback sets the image recorded
for the target version and waits; on a StatefulSet it deletes pods left on the bad revision that are not
Ready, which the controller would otherwise wait for forever (kubernetes/kubernetes#67250).

Waiting watches the workload (one object, by field selector) and re-reads it every `WATCH_RESYNC_S` or after
any watch error; every API call has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
from kubernetes_asyncio.client import ApiClient, AppsV1Api, Configuration, CoreV1Api
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

from reactor import logs
from reactor.domain.status import NodeState, NodeStatus
from reactor.errors import StepFailed
from reactor.events import IMAGE, VERSION
from reactor.ports import ExecutionContext

log = logs.get_logger(__name__)

IN_CLUSTER = "in-cluster"
API_TIMEOUT_S = 30.0
WATCH_RESYNC_S = 30
_RETRY_PAUSE_S = 1.0
_PATCH_ATTEMPTS = 5
_HISTORY_LENGTH = 10
_MESSAGE_LIMIT = 3500

PREFIX = "deploy-reactor.dev/"
VERSION_ANNOTATION = PREFIX + "version"
IMAGE_ANNOTATION = PREFIX + "image"
PREV_VERSION_ANNOTATION = PREFIX + "prev-version"
PREV_IMAGE_ANNOTATION = PREFIX + "prev-image"
CONTAINER_ANNOTATION = PREFIX + "container"
HISTORY_ANNOTATION = PREFIX + "history"

KINDS = ("deployment", "statefulset")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$")
_CONTEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_IMAGE = re.compile(IMAGE)
_VERSION = re.compile(VERSION)
_REVISION_LABEL = "controller-revision-hash"

Json = dict[str, Any]


# --- what the node key names ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """One Deployment or StatefulSet in one cluster."""

    cluster: str
    namespace: str
    kind: str
    name: str

    @property
    def title(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class InvalidWorkload(StepFailed):
    """A node key, container, image or version the executor refuses before calling any API."""

    def __init__(self, message: str) -> None:
        super().__init__("validate", message)


def parse_workload(node_key: str) -> Workload:
    """The workload a node key names; InvalidWorkload unless every part is a valid Kubernetes name."""
    parts = node_key.split("/")
    if len(parts) != 5 or parts[0] != "k8s":
        raise InvalidWorkload(f"node key {node_key!r} is not k8s/<cluster>/<namespace>/<kind>/<name>")
    _, cluster, namespace, kind, name = parts
    if not _CONTEXT.match(cluster):
        raise InvalidWorkload(f"cluster {cluster!r} is not a valid kubeconfig context name")
    if not _DNS_LABEL.match(namespace):
        raise InvalidWorkload(f"namespace {namespace!r} is not a DNS label (RFC 1123)")
    if kind not in KINDS:
        raise InvalidWorkload(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if not _DNS_SUBDOMAIN.match(name):
        raise InvalidWorkload(f"name {name!r} is not a DNS subdomain (RFC 1123)")
    return Workload(cluster, namespace, kind, name)


# --- kubectl's rollout rules, as pure functions ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rollout:
    """Where a rollout is: finished, failed for good, or still going (with kubectl's words for it)."""

    done: bool
    message: str
    failed: str = ""  # the reason a rollout can no longer finish (e.g. ProgressDeadlineExceeded)


def _replicas(obj: Json) -> int:
    value = obj.get("spec", {}).get("replicas")
    return 1 if value is None else int(value)


def deployment_rollout(obj: Json, generation: int) -> Rollout:
    """kubectl's DeploymentStatusViewer, with the generation our patch produced."""
    name = obj["metadata"]["name"]
    status = obj.get("status", {})
    if int(status.get("observedGeneration", 0)) < generation:
        return Rollout(False, "waiting for the deployment spec update to be observed")
    for condition in status.get("conditions", []):
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return Rollout(
                False, "progress deadline exceeded", failed=f"ProgressDeadlineExceeded: {condition.get('message', '')}"
            )
    wanted = _replicas(obj)
    updated = int(status.get("updatedReplicas", 0))
    total = int(status.get("replicas", 0))
    available = int(status.get("availableReplicas", 0))
    if updated < wanted:
        return Rollout(False, f"{updated} out of {wanted} new replicas have been updated")
    if total > updated:
        return Rollout(False, f"{total - updated} old replicas are pending termination")
    if available < updated:
        return Rollout(False, f"{available} of {updated} updated replicas are available")
    return Rollout(True, f'deployment "{name}" successfully rolled out')


def statefulset_rollout(obj: Json, generation: int) -> Rollout:
    """kubectl's StatefulSetStatusViewer: ready replicas, then the partitioned count or equal revisions."""
    spec = obj.get("spec", {})
    status = obj.get("status", {})
    strategy = spec.get("updateStrategy", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        return Rollout(False, "", failed=f"update strategy {strategy.get('type')} never rolls pods by itself")
    observed = int(status.get("observedGeneration", 0))
    if observed == 0 or observed < generation:
        return Rollout(False, "waiting for the statefulset spec update to be observed")
    wanted = _replicas(obj)
    ready = int(status.get("readyReplicas", 0))
    if ready < wanted:
        return Rollout(False, f"waiting for {wanted - ready} pods to be ready")
    partition = int((strategy.get("rollingUpdate") or {}).get("partition") or 0)
    updated = int(status.get("updatedReplicas", 0))
    if partition > 0:
        if updated < wanted - partition:
            return Rollout(False, f"partitioned roll out: {updated} out of {wanted - partition} new pods updated")
        return Rollout(True, f"partitioned roll out complete: {updated} new pods have been updated")
    if status.get("updateRevision") != status.get("currentRevision"):
        return Rollout(False, f"waiting for the rolling update to complete {updated} pods at the update revision")
    return Rollout(
        True, f"statefulset rolling update complete {wanted} pods at revision {status.get('currentRevision')}"
    )


def rollout_of(kind: str, obj: Json, generation: int) -> Rollout:
    """The rollout state of a Deployment or StatefulSet."""
    return deployment_rollout(obj, generation) if kind == "deployment" else statefulset_rollout(obj, generation)


def label_selector(selector: Json) -> str:
    """A LabelSelector object as the query-string form the API takes."""
    terms = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif operator == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif operator == "Exists":
            terms.append(key)
        elif operator == "DoesNotExist":
            terms.append(f"!{key}")
    return ",".join(terms)


def _pod_ready(pod: Json) -> bool:
    return any(
        condition.get("type") == "Ready" and condition.get("status") == "True"
        for condition in pod.get("status", {}).get("conditions", [])
    )


def pod_problems(pods: list[Json]) -> str:
    """Why pods are not Ready, as a kubelet reports it (ImagePullBackOff, CrashLoopBackOff, Unschedulable...)."""
    problems = []
    for pod in sorted(pods, key=lambda item: str(item["metadata"]["name"])):
        if _pod_ready(pod) or pod["metadata"].get("deletionTimestamp"):
            continue
        status = pod.get("status", {})
        reasons = []
        for container in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
            state = container.get("state", {})
            detail = state.get("waiting") or state.get("terminated")
            if detail and detail.get("reason"):
                message = f" ({detail['message']})" if detail.get("message") else ""
                reasons.append(f"{container['name']} {detail['reason']}{message}")
        if not reasons:
            for condition in status.get("conditions", []):
                if condition.get("status") == "False" and condition.get("reason"):
                    reasons.append(f"{condition['type']}={condition['reason']}")
        reasons = reasons or [f"phase {status.get('phase', 'Unknown')}"]
        problems.append(f"{pod['metadata']['name']}: {', '.join(reasons)}")
    if not problems:
        return ""
    shown = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
    return "pods not ready: " + "; ".join(shown)


# --- history kept in annotations ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Release:
    """A version and the image it ran as."""

    version: str | None
    image: str


@dataclass(slots=True)
class Recorded:
    """What the annotations say, plus the live spec."""

    container: str
    image: str  # live image of the container
    history: list[Release] = field(default_factory=list)  # oldest first; the last entry runs now

    @property
    def current(self) -> Release:
        return self.history[-1]

    @property
    def previous(self) -> Release | None:
        return self.history[-2] if len(self.history) > 1 else None

    def annotations(self) -> dict[str, str]:
        previous = self.previous
        return {
            VERSION_ANNOTATION: self.current.version or "",
            IMAGE_ANNOTATION: self.current.image,
            PREV_VERSION_ANNOTATION: (previous.version or "") if previous else "",
            PREV_IMAGE_ANNOTATION: previous.image if previous else "",
            CONTAINER_ANNOTATION: self.container,
            HISTORY_ANNOTATION: json.dumps(
                [[item.version, item.image] for item in self.history[-_HISTORY_LENGTH:]], separators=(",", ":")
            ),
        }


def version_of_image(image: str) -> str | None:
    """The tag of an image when it reads as a version (`app:1.2.3` -> `1.2.3`); None otherwise."""
    name = image.split("@", 1)[0]
    tail = name.rsplit("/", 1)[-1]
    if ":" not in tail:
        return None
    tag = tail.rsplit(":", 1)[1]
    return tag if _VERSION.match(tag) and tag != "latest" else None


def read_history(annotations: dict[str, str], container: str, live_image: str) -> list[Release]:
    """The recorded history, trusted only while the live image is the one we recorded (else: drift)."""
    history: list[Release] = []
    try:
        raw = json.loads(annotations.get(HISTORY_ANNOTATION, "[]"))
        for version, image in raw:
            if (version is None or _VERSION.match(str(version))) and _IMAGE.match(str(image)):
                history.append(Release(None if version is None else str(version), str(image)))
    except (ValueError, TypeError):
        history = []
    recorded_container = annotations.get(CONTAINER_ANNOTATION)
    if recorded_container not in (None, container):
        history = []
    if not history or history[-1].image != live_image:
        history.append(Release(version_of_image(live_image), live_image))
    return history


# --- the executor -----------------------------------------------------------------------------------


class K8sApiError(StepFailed):
    """The API server refused a call, or could not be reached."""

    def __init__(self, step: str, message: str, status: int = 0) -> None:
        super().__init__(step, message)
        self.status = status


class K8sExecutor:
    """Executor for nodes of the form `k8s/<cluster>/<namespace>/<kind>/<name>`."""

    platform: ClassVar[str] = "k8s"

    def __init__(self, context: ExecutionContext) -> None:
        self.context = context
        self.timeout_s = context.health.timeout_s

    # --- the Executor contract ---

    async def deploy(self) -> NodeStatus:
        """Set the image, wait for the rollout; on failure put the previous image back before reporting."""
        try:
            workload = self._validated(deploying=True)
        except StepFailed as exc:
            return self._failed(exc)
        target, image = self.context.target_version or "", self.context.image or ""  # both checked by _validated
        try:
            async with self._client(workload) as api:
                obj = await api.read()
                recorded = self._recorded(obj, self.context.container)
                before = list(recorded.history)
                self._check_rollable(obj)
                log.info("deploying", workload=workload.title, image=image, previous=recorded.image)
                # The same image again only names its version; a new image is a new entry.
                kept = before[:-1] if before[-1].image == image else before
                history = [*kept, Release(target, image)]
                obj = await api.set_image(obj, recorded.container, image, history)
                rollout = await api.wait(obj, deadline=time.monotonic() + self.timeout_s)
                if rollout.done:
                    return self._result(NodeState.SUCCESS, history)
                problem = await api.explain(rollout)
                log.warning("rollout failed; reverting", workload=workload.title, error=problem)
                return await self._revert(api, recorded.container, before, problem)
        except StepFailed as exc:
            return self._failed(exc)

    async def rollback(self) -> NodeStatus:
        """Set the image recorded for the target version, wait, and clear a StatefulSet's stuck pods."""
        try:
            workload = self._validated(deploying=False)
        except StepFailed as exc:
            return self._failed(exc)
        target = self.context.target_version
        if target is None:
            return self._failed(StepFailed("rollback", "no previous version to roll back to"))
        try:
            async with self._client(workload) as api:
                obj = await api.read()
                recorded = self._recorded(obj, None)
                history = _rewind(recorded.history, target)
                log.info("rolling back", workload=workload.title, version=target, image=history[-1].image)
                obj = await api.set_image(obj, recorded.container, history[-1].image, history)
                rollout = await api.wait(obj, deadline=time.monotonic() + self.timeout_s, clear_stuck=True)
                if rollout.done:
                    return self._result(NodeState.ROLLED_BACK, history)
                problem = await api.explain(rollout)
                return self._result(NodeState.FAILED, history, error=f"rollout: {problem}")
        except StepFailed as exc:
            return self._failed(exc)

    async def status(self) -> NodeStatus:
        """Read the live workload: its image, versions, replicas and conditions."""
        try:
            workload = self._validated(deploying=False)
            async with self._client(workload) as api:
                obj = await api.read()
                recorded = self._recorded(obj, None)
                rollout = rollout_of(workload.kind, obj, int(obj["metadata"].get("generation", 0)))
                summary = describe(obj, recorded.container)
        except StepFailed as exc:
            return self._failed(exc)
        annotated = obj["metadata"].get("annotations", {}).get(IMAGE_ANNOTATION)
        if annotated and annotated != recorded.image:
            return self._result(NodeState.FAILED, recorded.history, error=f"drift: reactor set {annotated}; {summary}")
        if rollout.failed:
            return self._result(NodeState.FAILED, recorded.history, error=f"rollout: {rollout.failed}; {summary}")
        if not rollout.done:
            return self._result(NodeState.DEPLOYING, recorded.history, error=f"rollout: {rollout.message}; {summary}")
        return self._result(NodeState.SUCCESS, recorded.history)

    # --- steps ---

    async def _revert(self, api: _Api, container: str, before: list[Release], problem: str) -> NodeStatus:
        previous = before[-1]
        try:
            obj = await api.read()
            obj = await api.set_image(obj, container, previous.image, before)
            rollout = await api.wait(obj, deadline=time.monotonic() + self.timeout_s, clear_stuck=True)
        except StepFailed as exc:
            return self._result(
                NodeState.FAILED, before, error=f"rollout: {problem}; revert to {previous.image}: {exc}"
            )
        if rollout.done:
            note = f"reverted to {previous.image}, rolled out"
        else:
            note = f"reverted to {previous.image}, not rolled out yet: {await api.explain(rollout)}"
        return self._result(NodeState.FAILED, before, error=f"rollout: {problem}; {note}")

    def _validated(self, *, deploying: bool) -> Workload:
        """Refuse anything that is not a plain Kubernetes name before any API call."""
        workload = parse_workload(self.context.node_key)
        container = self.context.container
        if container is not None and not _DNS_LABEL.match(container):
            raise InvalidWorkload(f"container {container!r} is not a DNS label (RFC 1123)")
        target = self.context.target_version
        if target is not None and not _VERSION.match(target):
            raise InvalidWorkload(f"version {target!r} does not match {VERSION}")
        if deploying:
            image = self.context.image
            if target is None or image is None:
                raise InvalidWorkload("a k8s deploy needs a version and an image")
            if not _IMAGE.match(image):
                raise InvalidWorkload(f"image {image!r} does not match {IMAGE}")
        return workload

    def _recorded(self, obj: Json, container: str | None) -> Recorded:
        annotations = obj["metadata"].get("annotations") or {}
        containers = obj["spec"]["template"]["spec"]["containers"]
        names = [str(item["name"]) for item in containers]
        chosen = container or annotations.get(CONTAINER_ANNOTATION) or (names[0] if len(names) == 1 else None)
        if chosen is None:
            raise StepFailed("prepare", f"the pod template has containers {', '.join(names)}: name one")
        if chosen not in names:
            raise StepFailed("prepare", f"no container {chosen!r} in the pod template (it has {', '.join(names)})")
        image = str(containers[names.index(chosen)]["image"])
        return Recorded(chosen, image, read_history(annotations, chosen, image))

    def _check_rollable(self, obj: Json) -> None:
        spec = obj["spec"]
        if spec.get("paused"):
            raise StepFailed("prepare", "the deployment is paused; it would never roll out")
        strategy = spec.get("updateStrategy", {}).get("type")
        if strategy == "OnDelete":
            raise StepFailed("prepare", "the statefulset's update strategy is OnDelete; it would never roll out")

    @asynccontextmanager
    async def _client(self, workload: Workload) -> AsyncIterator[_Api]:
        configuration = Configuration()
        try:
            if workload.cluster == IN_CLUSTER:
                load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                kubeconfig = self.context.settings.kubeconfig
                await load_kube_config(
                    config_file=str(kubeconfig) if kubeconfig is not None else None,
                    context=workload.cluster,
                    client_configuration=configuration,
                    persist_config=False,
                )
        except (ConfigException, OSError, ValueError) as exc:
            raise StepFailed("connect", f"cluster {workload.cluster!r}: {exc}") from exc
        async with ApiClient(configuration=configuration) as client:
            yield _Api(client, workload)

    def _result(self, state: NodeState, history: list[Release], *, error: str = "") -> NodeStatus:
        current = history[-1] if history else None
        previous = history[-2] if len(history) > 1 else None
        return self.context.current.model_copy(
            update={
                "state": state,
                "current_version": current.version if current else None,
                "prev_version": previous.version if previous else None,
                "deploying_version": self.context.target_version if state == NodeState.FAILED else None,
                "last_error": _clip(error),
            }
        )

    def _failed(self, exc: StepFailed) -> NodeStatus:
        """Failed before the workload changed (or before it could be read): versions stay as recorded."""
        return self.context.current.model_copy(
            update={
                "state": NodeState.FAILED,
                "deploying_version": self.context.target_version,
                "last_error": _clip(str(exc)),
            }
        )


def describe(obj: Json, container: str) -> str:
    """The live image, replica counts and conditions of a workload, in one line."""
    containers = obj["spec"]["template"]["spec"]["containers"]
    image = next((item["image"] for item in containers if item["name"] == container), "?")
    status = obj.get("status", {})
    counts = ", ".join(
        f"{key} {status.get(key + 'Replicas', 0)}" for key in ("ready", "updated", "available", "current")
    )
    conditions = "; ".join(
        f"{item.get('type')}={item.get('status')} {item.get('reason', '')}".rstrip()
        for item in status.get("conditions", [])
    )
    text = f"image {image}, replicas {_replicas(obj)} ({counts})"
    return f"{text}, conditions: {conditions}" if conditions else text


def _rewind(history: list[Release], target: str) -> list[Release]:
    """The history after going back to `target`: everything after its last run is dropped."""
    for index in range(len(history) - 1, -1, -1):
        if history[index].version == target:
            return history[: index + 1]
    known = ", ".join(sorted({item.version for item in history if item.version})) or "none"
    raise StepFailed("rollback", f"no image recorded for version {target} (recorded: {known})")


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"


# --- the API calls ----------------------------------------------------------------------------------


class _Api:
    """The few calls the executor makes, each with a timeout, answers as plain JSON."""

    def __init__(self, client: ApiClient, workload: Workload) -> None:
        self.workload = workload
        self.apps = AppsV1Api(client)
        self.core = CoreV1Api(client)
        kind = "stateful_set" if workload.kind == "statefulset" else workload.kind  # the client's spelling
        self._read: Callable[..., Awaitable[Any]] = getattr(self.apps, f"read_namespaced_{kind}")
        self._list: Callable[..., Awaitable[Any]] = getattr(self.apps, f"list_namespaced_{kind}")
        self._patch: Callable[..., Awaitable[Any]] = getattr(self.apps, f"patch_namespaced_{kind}")

    async def _json(self, step: str, call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Json:
        try:
            async with asyncio.timeout(API_TIMEOUT_S):
                response = await call(*args, _preload_content=False, _request_timeout=API_TIMEOUT_S, **kwargs)
                async with response:
                    status = int(response.status)
                    text = await response.text()
        except (aiohttp.ClientError, OSError) as exc:
            raise K8sApiError(step, f"{self.workload.cluster}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise K8sApiError(step, f"{self.workload.cluster}: no answer within {API_TIMEOUT_S:g}s") from exc
        try:
            body: Json = json.loads(text) if text else {}
        except ValueError:
            body = {"message": text[:300]}
        if not 200 <= status < 300:
            reason = body.get("reason") or f"HTTP {status}"
            raise K8sApiError(step, f"{reason}: {body.get('message', '')}".rstrip(": "), status)
        return body

    async def read(self) -> Json:
        """The workload as it is now."""
        workload = self.workload
        try:
            return await self._json("read", self._read, workload.name, workload.namespace)
        except K8sApiError as exc:
            if exc.status == 404:
                raise StepFailed("read", f"{workload.title} does not exist") from exc
            raise

    async def set_image(self, obj: Json, container: str, image: str, history: list[Release]) -> Json:
        """Set the container's image and the annotations (a no-op when both are already so); the new object.

        The patch carries the resourceVersion it was computed from, so a concurrent writer makes it fail
        with a conflict instead of being overwritten; the patch is then recomputed on a fresh read.
        """
        recorded = Recorded(container, image, history)
        for attempt in range(_PATCH_ATTEMPTS):
            operations = _patch_operations(obj, container, image, recorded.annotations())
            if not operations:
                return obj
            try:
                return await self._json(
                    "patch",
                    self._patch,
                    self.workload.name,
                    self.workload.namespace,
                    operations,
                    _content_type="application/json-patch+json",
                )
            except K8sApiError as exc:
                if exc.status != 409 or attempt == _PATCH_ATTEMPTS - 1:
                    raise
                log.info("the workload changed under the patch; re-reading", attempt=attempt + 1)
                obj = await self.read()
        raise AssertionError("unreachable")  # pragma: no cover

    async def wait(self, obj: Json, *, deadline: float, clear_stuck: bool = False) -> Rollout:
        """Watch the workload until its rollout is done, failed, or the deadline passes."""
        generation = int(obj["metadata"].get("generation", 0))
        kind = self.workload.kind
        rollout = rollout_of(kind, obj, generation)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while True:
                    if rollout.done or rollout.failed:
                        return rollout
                    if clear_stuck and kind == "statefulset":
                        await self.delete_stuck_pods(obj, generation)
                    watched = time.monotonic()
                    try:
                        async for event in self._watch(str(obj["metadata"]["resourceVersion"])):
                            obj = event
                            rollout = rollout_of(kind, obj, generation)
                            if rollout.done or rollout.failed:
                                return rollout
                            if clear_stuck and kind == "statefulset":
                                await self.delete_stuck_pods(obj, generation)
                    except K8sApiError as exc:
                        log.info("watch interrupted; reading again", error=str(exc))
                    if time.monotonic() - watched < _RETRY_PAUSE_S:  # a watch that ends at once: no tight loop
                        await asyncio.sleep(_RETRY_PAUSE_S)
                    try:
                        obj = await self.read()  # a deleted workload raises StepFailed, which ends the wait
                    except K8sApiError as exc:
                        log.info("read failed; trying again", error=str(exc))
                        await asyncio.sleep(_RETRY_PAUSE_S)
                        continue
                    rollout = rollout_of(kind, obj, generation)
        except TimeoutError:
            return Rollout(False, rollout.message)

    async def _watch(self, resource_version: str) -> AsyncIterator[Json]:
        """Changes of the workload after `resource_version`, until the server ends the watch (resync)."""
        workload = self.workload
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=API_TIMEOUT_S, sock_read=WATCH_RESYNC_S + 15)
        try:
            response = await self._list(
                workload.namespace,
                field_selector=f"metadata.name={workload.name}",
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_RESYNC_S,
                watch=True,
                _preload_content=False,
                _request_timeout=timeout,
            )
            async with response:
                if response.status != 200:
                    raise K8sApiError("watch", f"HTTP {response.status}", int(response.status))
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, item = event.get("type"), event.get("object", {})
                    if kind == "ERROR":  # e.g. 410 Gone: the resource version is too old; re-read
                        raise K8sApiError("watch", str(item.get("message", "watch error")), int(item.get("code", 0)))
                    if kind == "DELETED":
                        raise StepFailed("rollout", f"{workload.title} was deleted")
                    if kind in ("ADDED", "MODIFIED"):
                        yield item
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise K8sApiError("watch", f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:  # the socket read timeout, not our deadline (that one cancels)
            raise K8sApiError("watch", "the watch stalled") from exc

    async def pods(self, obj: Json) -> list[Json]:
        """The pods the workload owns."""
        selector = label_selector(obj["spec"].get("selector") or {})
        body = await self._json("pods", self.core.list_namespaced_pod, self.workload.namespace, label_selector=selector)
        if self.workload.kind == "statefulset":
            uid = obj["metadata"]["uid"]
            return [
                pod
                for pod in body.get("items", [])
                if any(owner.get("uid") == uid for owner in pod["metadata"].get("ownerReferences", []))
            ]
        return list(body.get("items", []))

    async def delete_stuck_pods(self, obj: Json, generation: int) -> None:
        """Delete pods on an old revision that are not Ready: the StatefulSet controller waits for them forever."""
        status = obj.get("status", {})
        if int(status.get("observedGeneration", 0)) < generation or not status.get("updateRevision"):
            return
        for pod in await self.pods(obj):
            meta = pod["metadata"]
            revision = meta.get("labels", {}).get(_REVISION_LABEL)
            stuck = revision != status["updateRevision"] and not _pod_ready(pod)
            if stuck and not meta.get("deletionTimestamp"):
                log.warning("deleting a pod stuck on a bad revision", pod=meta["name"], revision=revision)
                try:
                    await self._json(
                        "delete",
                        self.core.delete_namespaced_pod,
                        meta["name"],
                        self.workload.namespace,
                        body={"preconditions": {"uid": meta["uid"]}},
                    )
                except K8sApiError as exc:
                    if exc.status not in (404, 409):
                        raise

    async def explain(self, rollout: Rollout) -> str:
        """Why a rollout did not finish: the failed condition (or kubectl's waiting line) and the pods' reasons."""
        reason = rollout.failed or f"not rolled out: {rollout.message}"
        try:
            obj = await self.read()
            problems = pod_problems(await self.pods(obj))
        except StepFailed as exc:
            problems = f"pods unknown ({exc})"
        return f"{reason}; {problems}" if problems else reason


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _patch_operations(obj: Json, container: str, image: str, annotations: dict[str, str]) -> list[Json]:
    """The JSON patch that sets `image` and `annotations`, guarded by the object's resourceVersion."""
    containers = obj["spec"]["template"]["spec"]["containers"]
    index = next(i for i, item in enumerate(containers) if item["name"] == container)
    present = obj["metadata"].get("annotations")
    operations: list[Json] = []
    if containers[index]["image"] != image:
        path = f"/spec/template/spec/containers/{index}"
        operations += [
            {"op": "test", "path": f"{path}/name", "value": container},
            {"op": "replace", "path": f"{path}/image", "value": image},
        ]
    if present is None:
        operations.append({"op": "add", "path": "/metadata/annotations", "value": annotations})
    else:
        operations += [
            {"op": "add", "path": f"/metadata/annotations/{_pointer(key)}", "value": value}
            for key, value in annotations.items()
            if present.get(key) != value
        ]
    if operations:
        resource_version = obj["metadata"]["resourceVersion"]
        operations.append({"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version})
    return operations
