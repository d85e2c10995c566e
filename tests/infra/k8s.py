"""A real Kubernetes control plane for tests, with kwok fake nodes, built from Go modules only.

kube-apiserver, kube-controller-manager, kube-scheduler and kubectl come from ``k8s.io/kubernetes``
through our wrapper module ``tests/infra/k8sbin`` (its go.mod replaces every staging module with the
matching published tag, so the build is reproducible from go.sum); etcd is etcd's own server main
(``k8sbin/etcd``) at the version Kubernetes pins; ``k8sbin/pki`` writes the throwaway certificates;
kwok comes from ``go install sigs.k8s.io/kwok/cmd/kwok@<version>``. kwokctl is not needed: we run the
components ourselves, which gives us the ports, flags and shutdown order, and one pid to stop.

Binaries are cached in ``<cache>/k8s-<version>/bin`` (``<cache>`` = ``$REACTOR_CACHE_DIR`` or
``~/.cache/deploy-reactor``); the entry counts once its marker (with a hash of the wrapper's sources)
is written, so an interrupted or outdated build is redone.

``start_k8s(workdir)`` starts a supervisor process (this module run as a script) that owns etcd,
the API server, the controller manager, the scheduler and kwok, on free 127.0.0.1 ports; it creates
two fake nodes, waits until they are Ready and writes ``<workdir>/kubeconfig`` (context
``reactor-test``). SIGTERM to the supervisor stops everything in reverse order; its children die with
it even on SIGKILL (PR_SET_PDEATHSIG), and they are in its process group, which ``Service.stop`` sweeps.
The supervisor itself dies with the process that started it (a test session), unless started with
``outlive_parent=True``: ``scripts/testenv up k8s`` does, so the cluster runs until ``scripts/testenv
down k8s``. Pods become Ready through kwok; pods with any container image ending in ``:broken`` stay
Pending with ``ImagePullBackOff``, for failure tests.

Pure standard library, like ``testenv``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.infra import testenv

K8S_VERSION = "1.34.2"  # must match k8s.io/kubernetes in k8sbin/go.mod
KWOK_VERSION = "v0.8.0"
CONTEXT = "reactor-test"
NODES = 2
BROKEN_IMAGE_SUFFIX = ":broken"
K8SBIN_SRC = Path(__file__).resolve().parent / "k8sbin"
_SOURCES = ("go.mod", "go.sum", "etcd/main.go", "pki/main.go")
_KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
BINARIES = (*_KUBE_COMMANDS, "etcd", "pki", "kwok")

START_TIMEOUT = 180.0
STOP_GRACE = 30.0
_COMPONENT_GRACE = 10.0
_REPO = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------
# build


def _src_hash() -> str:
    digest = hashlib.sha256(f"kwok {KWOK_VERSION}\0".encode())
    for name in _SOURCES:
        digest.update(name.encode() + b"\0" + (K8SBIN_SRC / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not go:
        raise testenv.TestEnvError("go not found on PATH (Go >= 1.26 builds kwok v0.8.0; 1.24 builds Kubernetes)")
    return go


def ensure_k8s(version: str = K8S_VERSION) -> Path:
    """The folder with ``bin/<component>`` for Kubernetes `version` + etcd + kwok, built once into the cache."""
    dest = testenv.CACHE / f"k8s-{version}"
    src_hash = _src_hash()

    def cached() -> bool:
        try:
            marker = json.loads((dest / ".complete").read_text())
        except (OSError, ValueError):
            return False
        return marker.get("src") == src_hash and all((dest / "bin" / name).exists() for name in BINARIES)

    if cached():
        return dest
    with testenv._locked(testenv.CACHE / f".k8s-{version}.lock"):
        if cached():
            return dest
        if f"\tk8s.io/kubernetes v{version} " not in (K8SBIN_SRC / "go.mod").read_text():
            raise testenv.TestEnvError(f"{K8SBIN_SRC / 'go.mod'} does not pin k8s.io/kubernetes v{version}")
        go = _go()
        testenv.log(f"building Kubernetes v{version}, etcd and kwok {KWOK_VERSION} from Go modules into {dest}")
        testenv.log("a cold build takes 10-20 min on 2 cores and ~5 GB of Go module and build cache")
        started = time.monotonic()
        testenv._clean_stale(dest, f".tmp-k8s-{version}-")
        with tempfile.TemporaryDirectory(prefix=f".tmp-k8s-{version}-", dir=testenv.CACHE) as tmp:
            work = Path(tmp)
            for name in _SOURCES:
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(K8SBIN_SRC / name, work / name)
            bindir = work / "out" / "bin"
            bindir.mkdir(parents=True)
            env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=readonly -buildvcs=false -trimpath")
            major, minor, _ = version.split(".")
            ldflags = " ".join(
                [
                    "-s -w",
                    f"-X k8s.io/component-base/version.gitVersion=v{version}",
                    f"-X k8s.io/component-base/version.gitMajor={major}",
                    f"-X k8s.io/component-base/version.gitMinor={minor}",
                    "-X k8s.io/component-base/version.gitTreeState=clean",
                ]
            )
            packages = [f"k8s.io/kubernetes/cmd/{name}" for name in _KUBE_COMMANDS] + ["./etcd", "./pki"]
            testenv._run(
                [go, "build", "-ldflags", ldflags, "-o", str(bindir) + "/", *packages],
                cwd=work,
                env=env,
                what=f"go build of Kubernetes v{version} and etcd",
            )
            testenv._run(
                [go, "install", "-ldflags", "-s -w", f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"],
                cwd=work,
                env=dict(env, GOBIN=str(bindir), GOFLAGS="-buildvcs=false -trimpath"),
                what=f"go install of kwok {KWOK_VERSION}",
            )
            missing = [name for name in BINARIES if not (bindir / name).exists()]
            if missing:
                raise testenv.TestEnvError(f"the build left no {', '.join(missing)} in {bindir}")
            elapsed = time.monotonic() - started
            marker = {"version": version, "kwok": KWOK_VERSION, "src": src_hash, "build_s": round(elapsed, 1)}
            (work / "out" / ".complete").write_text(json.dumps(marker))
            (work / "out").rename(dest)
        testenv.log(f"Kubernetes v{version} built in {elapsed:.0f}s")
    return dest


# --------------------------------------------------------------------------
# start / stop (the caller's side)


def start_k8s(workdir: Path, version: str = K8S_VERSION, *, outlive_parent: bool = False) -> testenv.Service:
    """Start the cluster under `workdir` (wiped first) and wait until both fake nodes are Ready.

    The cluster dies with the thread that calls this (a test session's), unless `outlive_parent`
    (`scripts/testenv up`, whose services run until `scripts/testenv down`).
    """
    home = ensure_k8s(version)
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(_REPO))
    svc = testenv._spawn(
        "k8s",
        [sys.executable, "-m", "tests.infra.k8s", "supervise", str(home), str(workdir)],
        workdir,
        workdir / "supervisor.log",
        stop_grace=STOP_GRACE,
        env=env,
        outlive_parent=outlive_parent,
    )
    ready = workdir / "ready.json"
    svc.env = {"REACTOR_KUBECONFIG": str(workdir / "kubeconfig")}
    testenv._wait_until(svc, ready.exists, START_TIMEOUT, "the API server answers and the nodes are Ready")
    info = json.loads(ready.read_text())
    testenv.log(f"Kubernetes v{version} ready on {info['server']} (pid {svc.pid}) in {time.monotonic() - started:.1f}s")
    return svc


# --------------------------------------------------------------------------
# the supervisor (runs as `python -m tests.infra.k8s supervise <home> <workdir>`)

_KWOK_STAGES = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-initialize
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: NotIn
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
      conditions:
      {{ range NodeConditions }}
      - lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $lastTransitionTime | Quote }}
        message: {{ .message | Quote }}
        reason: {{ .reason | Quote }}
        status: {{ .status | Quote }}
        type: {{ .type  | Quote}}
      {{ end }}
      addresses:
      - address: {{ NodeIP | Quote }}
        type: InternalIP
      - address: {{ NodeName | Quote }}
        type: Hostname
      allocatable: {cpu: "64", memory: 256Gi, pods: "500"}
      capacity: {cpu: "64", memory: 256Gi, pods: "500"}
      nodeInfo:
        architecture: amd64
        containerRuntimeVersion: kwok
        kernelVersion: kwok
        kubeProxyVersion: kwok
        kubeletVersion: kwok
        operatingSystem: linux
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-heartbeat-with-lease
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.phase'
      operator: In
      values: ['Running']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: In
      values: ['True']
  delay:
    durationMilliseconds: 600000
    jitterDurationMilliseconds: 610000
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
      conditions:
      {{ range NodeConditions }}
      - lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ $lastTransitionTime | Quote }}
        message: {{ .message | Quote }}
        reason: {{ .reason | Quote }}
        status: {{ .status | Quote }}
        type: {{ .type | Quote }}
      {{ end }}
---
# Every pod becomes Ready at once, except those with an image ending in ":broken" (see pod-broken-image).
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: DoesNotExist
    - key: '.status.phase'
      operator: In
      values: ['Pending']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: NotIn
      values: ['True']
    - key: '[ .spec.containers.[].image | endswith("BROKEN") ] | any'
      operator: NotIn
      values: ['true']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      {{ range .spec.readinessGates }}
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: {{ .conditionType | Quote }}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        started: true
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
---
# A container whose image ends in ":broken" can never be pulled: the pod stays Pending, not Ready, with the
# waiting reason a kubelet would report. Matches once (no containerStatuses yet), so it does not loop.
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-broken-image
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: DoesNotExist
    - key: '.status.phase'
      operator: In
      values: ['Pending']
    - key: '.status.containerStatuses'
      operator: DoesNotExist
    - key: '[ .spec.containers.[].image | endswith("BROKEN") ] | any'
      operator: In
      values: ['true']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        reason: ContainersNotReady
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "False"
        reason: ContainersNotReady
        type: ContainersReady
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: PodScheduled
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: false
        restartCount: 0
        started: false
        state:
          waiting:
            reason: ImagePullBackOff
            message: {{ printf "Back-off pulling image %q" .image | Quote }}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      phase: Pending
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: Exists
  next:
    delete: true
""".replace("BROKEN", BROKEN_IMAGE_SUFFIX)


def _kubeconfig(server: str, pki: Path) -> str:
    def data(name: str) -> str:
        import base64

        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": server, "certificate-authority-data": data("ca.crt")}}],
        "users": [
            {
                "name": f"{CONTEXT}-admin",
                "user": {"client-certificate-data": data("admin.crt"), "client-key-data": data("admin.key")},
            }
        ],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": f"{CONTEXT}-admin"}}],
        "current-context": CONTEXT,
    }
    return json.dumps(config, indent=1)  # JSON is YAML: every kubeconfig reader takes it


_Call = Callable[[str, str, "dict[str, Any] | None"], tuple[int, dict[str, Any]]]


class _Supervisor:
    """Owns the component processes; stops them in reverse order."""

    def __init__(self, home: Path, workdir: Path) -> None:
        self.bin = home / "bin"
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False

    def log(self, msg: str) -> None:
        print(f"[k8s] {time.strftime('%H:%M:%S')} {msg}", flush=True)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        libc = ctypes.CDLL(None, use_errno=True)

        def die_with_parent() -> None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        logfile = self.workdir / "logs" / f"{name}.log"
        logfile.parent.mkdir(exist_ok=True)
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                [str(self.bin / args[0]), *args[1:]],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509 (single-threaded supervisor; children die with it)
            )
        self.procs.append((name, proc))
        self.log(f"started {name} (pid {proc.pid}), log {logfile}")
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = testenv._tail(self.workdir / "logs" / f"{name}.log")
                raise testenv.TestEnvError(f"{name} exited with code {proc.returncode}:\n{tail}")

    def wait(self, what: str, ready: Callable[[], bool], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise testenv.TestEnvError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.2)

    def stop_all(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(_COMPONENT_GRACE)
                except subprocess.TimeoutExpired:
                    self.log(f"{name} ignored SIGTERM; killing it")
                    proc.kill()
                    proc.wait()
            self.log(f"stopped {name}")
        self.procs.clear()


def _https(server: str, pki: Path) -> _Call:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def call(method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 (https to our own loopback API server)
            server + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
                raw = response.read()
                is_json = response.headers.get_content_type() == "application/json"
                return response.status, json.loads(raw) if is_json and raw else {}
        except urllib.error.HTTPError as exc:
            return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    return call


def _node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok"},
        },
    }


def supervise(home: Path, workdir: Path) -> int:
    """Run the cluster until SIGTERM; write ``ready.json`` once it is usable."""
    sup = _Supervisor(home, workdir)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        _run_cluster(sup)
        sup.log("cluster ready")
        while True:
            sup.check_alive()
            time.sleep(1.0)
    except testenv.TestEnvError as exc:
        sup.log(f"error: {exc}")
        return 1
    finally:
        sup.stop_all()


def _run_cluster(sup: _Supervisor) -> None:
    workdir = sup.workdir
    pki = workdir / "pki"
    subprocess.run([str(sup.bin / "pki"), str(pki)], check=True)
    etcd_port, peer_port, api_port, kcm_port, sched_port = testenv._free_ports(5)
    server = f"https://{testenv.HOST}:{api_port}"
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(_kubeconfig(server, pki))
    kubeconfig.chmod(0o600)
    # Components get their own copy: tests may rewrite theirs.
    component_kubeconfig = workdir / "component.kubeconfig"
    shutil.copy2(kubeconfig, component_kubeconfig)
    (workdir / "kwok.yaml").write_text(_KWOK_STAGES)

    etcd_url = f"http://{testenv.HOST}:{etcd_port}"
    peer_url = f"http://{testenv.HOST}:{peer_port}"
    sup.spawn(
        "etcd",
        [
            "etcd",
            "--name=etcd0",
            f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=etcd0={peer_url}",
            "--unsafe-no-fsync",  # a throwaway test store: durability buys nothing, fsync costs a lot
            "--log-level=warn",
        ],
    )

    def etcd_healthy() -> bool:
        try:
            with urllib.request.urlopen(etcd_url + "/health", timeout=2) as response:  # noqa: S310 (loopback)
                health: object = json.loads(response.read()).get("health")
                return health == "true"
        except (OSError, ValueError):
            return False

    sup.wait("etcd /health", etcd_healthy)

    sup.spawn(
        "kube-apiserver",
        [
            "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            f"--bind-address={testenv.HOST}",
            f"--advertise-address={testenv.HOST}",
            f"--secure-port={api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--authorization-mode=Node,RBAC",
            # No kubelet mounts tokens here, and the admission check would race the controller that creates
            # each namespace's `default` ServiceAccount.
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",  # 127.0.0.1 is not a valid endpoint for the kubernetes Service
            "--profiling=false",
        ],
    )
    call = _https(server, pki)
    sup.wait("kube-apiserver /readyz", lambda: call("GET", "/readyz", None)[0] == 200)

    sup.spawn(
        "kube-controller-manager",
        [
            "kube-controller-manager",
            f"--kubeconfig={component_kubeconfig}",
            f"--bind-address={testenv.HOST}",
            f"--secure-port={kcm_port}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
            "--concurrent-statefulset-syncs=10",
            "--profiling=false",
        ],
    )
    sup.spawn(
        "kube-scheduler",
        [
            "kube-scheduler",
            f"--kubeconfig={component_kubeconfig}",
            f"--authentication-kubeconfig={component_kubeconfig}",
            f"--authorization-kubeconfig={component_kubeconfig}",
            f"--bind-address={testenv.HOST}",
            f"--secure-port={sched_port}",
            "--leader-elect=false",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--profiling=false",
        ],
    )
    sup.spawn(
        "kwok",
        [
            "kwok",
            f"--kubeconfig={component_kubeconfig}",
            f"--config={workdir / 'kwok.yaml'}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.244.0.1/16",
            "--node-ip=10.0.0.1",
            "--node-lease-duration-seconds=40",
        ],
        env=dict(os.environ, KWOK_WORKDIR=str(workdir / "kwok-home")),
    )

    names = [f"kwok-node-{index}" for index in range(NODES)]
    for name in names:
        status, _ = call("POST", "/api/v1/nodes", _node(name))
        if status not in (201, 409):
            raise testenv.TestEnvError(f"creating node {name} answered HTTP {status}")

    def nodes_ready() -> bool:
        status, body = call("GET", "/api/v1/nodes?labelSelector=type%3Dkwok", None)
        if status != 200:
            return False
        ready = {
            item["metadata"]["name"]
            for item in body.get("items", [])
            for condition in item.get("status", {}).get("conditions", [])
            if condition.get("type") == "Ready"
            and condition.get("status") == "True"
            and not any(t.get("key") == "node.kubernetes.io/not-ready" for t in item.get("spec", {}).get("taints", []))
        }
        return ready >= set(names)

    sup.wait("the fake nodes to be Ready and untainted", nodes_ready)

    def default_namespace() -> bool:
        return call("GET", "/api/v1/namespaces/default", None)[0] == 200

    sup.wait("the default namespace", default_namespace)
    info = {"server": server, "kubeconfig": str(workdir / "kubeconfig"), "context": CONTEXT, "nodes": names}
    staging = workdir / "ready.json.tmp"
    staging.write_text(json.dumps(info))
    staging.replace(workdir / "ready.json")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "supervise":
        return supervise(Path(argv[1]), Path(argv[2]))
    if len(argv) == 1 and argv[0] == "build":
        print(ensure_k8s())
        return 0
    print("usage: python -m tests.infra.k8s supervise <home> <workdir> | build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
