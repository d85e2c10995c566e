"""kubectl's rollout rules and the executor's bookkeeping, as pure functions over plain objects."""

from __future__ import annotations

import json
from typing import Any

import pytest

from reactor.errors import StepFailed
from reactor.executors.k8s import (
    HISTORY_ANNOTATION,
    Release,
    deployment_rollout,
    label_selector,
    parse_workload,
    pod_problems,
    read_history,
    statefulset_rollout,
    version_of_image,
)

pytestmark = pytest.mark.unit


def deployment(status: dict[str, Any], generation: int = 2, replicas: int = 3) -> dict[str, Any]:
    return {"metadata": {"name": "web", "generation": generation}, "spec": {"replicas": replicas}, "status": status}


def statefulset(status: dict[str, Any], partition: int | None = None, replicas: int = 3) -> dict[str, Any]:
    strategy: dict[str, Any] = {"type": "RollingUpdate"}
    if partition is not None:
        strategy["rollingUpdate"] = {"partition": partition}
    return {"metadata": {"name": "db"}, "spec": {"replicas": replicas, "updateStrategy": strategy}, "status": status}


DONE: dict[str, Any] = {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}


@pytest.mark.parametrize(
    ("status", "done", "message"),
    [
        ({**DONE, "observedGeneration": 1}, False, "spec update to be observed"),
        ({**DONE, "updatedReplicas": 1}, False, "1 out of 3 new replicas have been updated"),
        ({**DONE, "replicas": 4}, False, "1 old replicas are pending termination"),
        ({**DONE, "availableReplicas": 2}, False, "2 of 3 updated replicas are available"),
        (DONE, True, 'deployment "web" successfully rolled out'),
    ],
)
def test_deployment_is_done_only_when_observed_updated_and_available(
    status: dict[str, Any], done: bool, message: str
) -> None:
    """Each of kubectl's conditions, in its order, holds the rollout back."""
    rollout = deployment_rollout(deployment(status), generation=2)
    assert (rollout.done, rollout.failed) == (done, "")
    assert message in rollout.message


def test_deployment_past_its_progress_deadline_has_failed_for_good() -> None:
    """ProgressDeadlineExceeded is final, with the controller's message."""
    condition = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "RS x."}
    rollout = deployment_rollout(deployment({**DONE, "updatedReplicas": 1, "conditions": [condition]}), 2)
    assert rollout.failed == "ProgressDeadlineExceeded: RS x."


def test_statefulset_without_partition_waits_for_equal_revisions() -> None:
    """All ready is not enough: the current revision must have caught up with the update revision."""
    ready: dict[str, Any] = {"observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 3}
    assert not statefulset_rollout(statefulset({**ready, "currentRevision": "a", "updateRevision": "b"}), 2).done
    assert statefulset_rollout(statefulset({**ready, "currentRevision": "b", "updateRevision": "b"}), 2).done
    assert not statefulset_rollout(statefulset({**ready, "readyReplicas": 2, "updateRevision": "b"}), 2).done


def test_partitioned_statefulset_is_done_once_the_pods_above_the_partition_are_updated() -> None:
    """Partition 2 of 3: one updated pod completes it, whatever the revisions say."""
    status: dict[str, Any] = {
        "observedGeneration": 2,
        "readyReplicas": 3,
        "currentRevision": "a",
        "updateRevision": "b",
    }
    assert not statefulset_rollout(statefulset({**status, "updatedReplicas": 0}, partition=2), 2).done
    assert statefulset_rollout(statefulset({**status, "updatedReplicas": 1}, partition=2), 2).done


def test_on_delete_statefulset_cannot_roll_out() -> None:
    """OnDelete never replaces pods by itself; kubectl refuses to wait for it, and so do we."""
    obj = statefulset({"observedGeneration": 2})
    obj["spec"]["updateStrategy"] = {"type": "OnDelete"}
    assert statefulset_rollout(obj, 2).failed


def test_label_selector_renders_labels_and_expressions() -> None:
    """matchLabels and every matchExpressions operator become the API's query form."""
    selector = {
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "x", "operator": "NotIn", "values": ["c"]},
            {"key": "y", "operator": "Exists"},
            {"key": "z", "operator": "DoesNotExist"},
        ],
    }
    assert label_selector(selector) == "app=web,tier in (a,b),x notin (c),y,!z"


def test_pod_problems_name_the_waiting_reasons_of_pods_that_are_not_ready() -> None:
    """Ready and terminating pods are left out; the others say why, as the kubelet does."""
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off"}}
    pods: list[dict[str, Any]] = [
        {"metadata": {"name": "b"}, "status": {"containerStatuses": [{"name": "app", "state": waiting}]}},
        {"metadata": {"name": "a"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
        {"metadata": {"name": "c", "deletionTimestamp": "now"}, "status": {}},
        {
            "metadata": {"name": "d"},
            "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]},
        },
    ]
    assert pod_problems(pods) == "pods not ready: b: app ImagePullBackOff (Back-off); d: PodScheduled=Unschedulable"


def test_history_is_trusted_only_while_the_live_image_is_the_recorded_one() -> None:
    """An out-of-band image change becomes the newest entry, with the version its tag reads as."""
    annotations = {HISTORY_ANNOTATION: json.dumps([["1.0.0", "r/web:1.0.0"], ["2.0.0", "r/web:2.0.0"]])}
    assert read_history(annotations, "app", "r/web:2.0.0")[-1] == Release("2.0.0", "r/web:2.0.0")
    assert read_history(annotations, "app", "r/web:2.1.0")[-1] == Release("2.1.0", "r/web:2.1.0")
    assert read_history({}, "app", "r/web:latest") == [Release(None, "r/web:latest")]


@pytest.mark.parametrize(
    ("image", "version"),
    [("r/web:1.2.3", "1.2.3"), ("localhost:5000/web", None), ("web:latest", None), (f"web:1@sha256:{'a' * 64}", "1")],
)
def test_version_of_image_reads_the_tag(image: str, version: str | None) -> None:
    """A registry port is not a tag, `latest` is not a version, a digest is ignored."""
    assert version_of_image(image) == version


def test_parse_workload_accepts_kubernetes_names_only() -> None:
    """A plain key parses; a key with an uppercase name is refused at the validate step."""
    workload = parse_workload("k8s/prod-eu/shop/statefulset/db.main")
    assert (workload.cluster, workload.namespace, workload.kind, workload.name) == (
        "prod-eu",
        "shop",
        "statefulset",
        "db.main",
    )
    with pytest.raises(StepFailed, match=r"^validate: name 'Db' is not a DNS subdomain"):
        parse_workload("k8s/prod-eu/shop/statefulset/Db")
