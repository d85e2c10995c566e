"""deploy/rbac.yaml: exactly the verbs the `k8s` executor needs, and they are enough on a real API server."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import RbacAuthorizationV1Api

from reactor.domain.status import NodeState
from tests.k8s.conftest import Cluster, Kube, pod_image, pod_ready
from tests.k8s.test_k8s_executor import BAD, V1, V2, Node

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "rbac.yaml"
EXPECTED = {
    ("apps", "deployments"): {"get", "list", "watch", "patch"},
    ("apps", "statefulsets"): {"get", "list", "watch", "patch"},
    ("", "pods"): {"get", "list", "watch", "delete"},
}


def documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


@pytest.mark.unit
def test_rbac_manifest_grants_exactly_the_executors_verbs_in_one_namespace() -> None:
    """A ServiceAccount, a namespaced Role with only these verbs (no wildcards), and a binding between them."""
    docs = documents()
    assert [doc["kind"] for doc in docs] == ["ServiceAccount", "Role", "RoleBinding"]
    account, role, binding = docs
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == EXPECTED
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]


@pytest.mark.k8s
async def test_the_rbac_role_is_enough_to_deploy_and_to_free_a_stuck_statefulset(
    kubeconfig: Cluster, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """Acting as the manifest's ServiceAccount (a real token), deploy, then roll back past a broken pod."""
    account, role, binding = (copy.deepcopy(doc) for doc in documents())
    for doc in (account, role, binding):
        doc["metadata"]["namespace"] = namespace
    binding["subjects"][0]["namespace"] = namespace
    name = account["metadata"]["name"]
    rbac = RbacAuthorizationV1Api(kube.client)
    await kube.call(kube.core.create_namespaced_service_account, namespace, account)
    await kube.call(rbac.create_namespaced_role, namespace, role)
    await kube.call(rbac.create_namespaced_role_binding, namespace, binding)
    token = await kube.call(
        kube.core.create_namespaced_service_account_token, name, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    config = yaml.safe_load(kubeconfig.path.read_text())
    cluster = next(item for item in config["contexts"] if item["name"] == kubeconfig.context)["context"]["cluster"]
    config["users"] = [{"name": "worker", "user": {"token": token["status"]["token"]}}]
    config["contexts"] = [{"name": "as-worker", "context": {"cluster": cluster, "user": "worker"}}]
    config["current-context"] = "as-worker"
    path = tmp_path / "worker.kubeconfig"
    path.write_text(json.dumps(config))

    await kube.create_statefulset(namespace, "db", V1)
    await kube.settled(namespace, "statefulset", "db", V1)
    node = Node(Cluster(path, "as-worker"), namespace, "statefulset", "db")
    deployed = await node.deploy("2.0.0", V2)
    assert deployed.state == NodeState.SUCCESS, deployed.last_error
    await kube.set_image(namespace, "statefulset", "db", "app", BAD)

    async def stuck() -> bool:
        return any(pod_image(pod) == BAD and not pod_ready(pod) for pod in await kube.pods(namespace, "db"))

    await kube.wait_for("a pod stuck on the broken image", stuck)
    rolled_back = await node.rollback("2.0.0")

    assert rolled_back.state == NodeState.ROLLED_BACK, rolled_back.last_error
    assert await kube.healthy_on(namespace, "statefulset", "db", V2)
