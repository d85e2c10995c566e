"""`reactor deploy --image`: one Kubernetes workload updated from the command line, no package needed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.k8s.conftest import Cluster, Kube

pytestmark = pytest.mark.k8s

V1 = "registry.test/web:1.0.0"
V2 = "registry.test/web:2.0.0"


def reactor(*args: str, kubeconfig: Path, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REACTOR_STATE_DIR": str(state), "REACTOR_KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        [sys.executable, "-m", "reactor.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


async def test_deploy_with_an_image_updates_the_workload_and_records_the_version(
    kubeconfig: Cluster, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """`reactor deploy k8s/... --version 2.0.0 --image ...` rolls the Deployment out to the image and exits 0; without
    a package or an image it exits 2 and names what is missing."""
    await kube.create_deployment(namespace, "web", V1)
    await kube.settled(namespace, "deployment", "web", V1)
    key = f"k8s/{kubeconfig.context}/{namespace}/deployment/web"

    missing = await asyncio.to_thread(reactor, "deploy", key, "--version", "2.0.0", kubeconfig=kubeconfig.path,
                                      state=tmp_path)  # fmt: skip
    done = await asyncio.to_thread(reactor, "deploy", key, "--version", "2.0.0", "--image", V2, "--container", "app",
                                   kubeconfig=kubeconfig.path, state=tmp_path)  # fmt: skip

    assert missing.returncode == 2
    assert "--package-url with --sha256, or --image" in missing.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    await kube.settled(namespace, "deployment", "web", V2)
    status = await asyncio.to_thread(reactor, "status", "-o", "json", kubeconfig=kubeconfig.path, state=tmp_path)
    [node] = json.loads(status.stdout)["nodes"]
    assert (node["node_key"], node["state"], node["current_version"]) == (key, "success", "2.0.0")
