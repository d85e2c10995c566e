"""The `local` executor against real packages and real processes on this machine, checked over HTTP."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from reactor.demo import BuiltPackage, build_package
from reactor.demo.scenario import free_ports, served_version
from reactor.domain.status import NodeState, NodeStatus, pending
from reactor.errors import Fenced
from reactor.events import HealthCheck, Package
from reactor.executors.local import LocalExecutor, stop_all
from reactor.ports import ExecutionContext, ExecutorSettings, unfenced
from tests.support import until

pytestmark = pytest.mark.e2e

NODE = "local/box-1/hello"


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """The nodes' root; every service started under it is stopped after the test."""
    nodes = tmp_path / "nodes"
    yield nodes
    stop_all(nodes)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltPackage]:
    dist = tmp_path_factory.mktemp("dist")
    built = {version: build_package(dist, version) for version in ("1.0.0", "1.1.0")}
    built["broken"] = build_package(dist, "2.0.0", broken=True)
    return built


class Node:
    """One local node: runs executors for it the way the worker would, carrying the status along."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_ports(1)[0]
        self.status: NodeStatus = pending(NODE, "hello")

    def executor(
        self,
        version: str | None,
        package: BuiltPackage | None = None,
        sha256: str | None = None,
        fence: Callable[[], Awaitable[None]] = unfenced,
    ) -> LocalExecutor:
        return LocalExecutor(
            ExecutionContext(
                node_key=NODE,
                service="hello",
                host="box-1",
                current=self.status,
                target_version=version,
                package=None if package is None else Package(url=package.url, sha256=sha256 or package.sha256),
                port=self.port,
                health=HealthCheck(timeout_s=5),
                settings=ExecutorSettings(local_root=self.root, stop_timeout_s=5),
                fence=fence,
            )
        )

    async def deploy(self, package: BuiltPackage, *, sha256: str | None = None) -> NodeStatus:
        self.status = await self.executor(package.version, package, sha256).deploy()
        return self.status

    async def rollback(self, version: str | None) -> NodeStatus:
        self.status = await self.executor(version).rollback()
        return self.status

    def pid(self) -> int:
        return int((self.root / "box-1" / "hello" / "run" / "pid").read_text().split()[0])

    def served(self) -> str | None:
        return served_version(self.port)


async def test_first_deploy_then_upgrade_serve_each_version(root: Path, packages: dict[str, BuiltPackage]) -> None:
    """A first deploy starts the service; an upgrade replaces it; `current` and state.json follow."""
    node = Node(root)
    first = await node.deploy(packages["1.0.0"])
    assert (first.state, first.current_version, first.prev_version) == (NodeState.SUCCESS, "1.0.0", None)
    assert node.served() == "1.0.0"

    second = await node.deploy(packages["1.1.0"])
    assert (second.state, second.current_version, second.prev_version) == (NodeState.SUCCESS, "1.1.0", "1.0.0")
    assert node.served() == "1.1.0"
    base = root / "box-1" / "hello"
    assert os.readlink(base / "current") == "releases/1.1.0"
    assert json.loads((base / "state.json").read_text())["previous"] == "1.0.0"


async def test_redeploy_of_the_running_version_does_not_restart(root: Path, packages: dict[str, BuiltPackage]) -> None:
    """Deploying the version that already runs and answers is a no-op: same process, success."""
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    pid = node.pid()
    again = await node.deploy(packages["1.0.0"])
    assert again.state == NodeState.SUCCESS
    assert node.pid() == pid


async def test_sha256_mismatch_changes_nothing(root: Path, packages: dict[str, BuiltPackage]) -> None:
    """A wrong checksum fails at verify before any change: same process, same version, nothing unpacked."""
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    pid = node.pid()
    failed = await node.deploy(packages["1.1.0"], sha256="f" * 64)
    assert failed.state == NodeState.FAILED
    assert failed.last_error.startswith("verify: sha256 mismatch")
    assert failed.current_version == "1.0.0"
    assert node.pid() == pid
    assert node.served() == "1.0.0"
    assert not (root / "box-1" / "hello" / "releases" / "1.1.0").exists()


async def test_new_version_that_does_not_start_restores_the_previous(
    root: Path, packages: dict[str, BuiltPackage]
) -> None:
    """A release whose process exits at once fails at start; the previous version serves again."""
    node = Node(root)
    await node.deploy(packages["1.1.0"])
    failed = await node.deploy(packages["broken"])
    assert failed.state == NodeState.FAILED
    assert failed.last_error.startswith("start: 2.0.0 exited with code 3")
    assert "1.1.0 restored and serving" in failed.last_error
    assert failed.current_version == "1.1.0"
    assert node.served() == "1.1.0"
    assert os.readlink(root / "box-1" / "hello" / "current") == "releases/1.1.0"


async def test_unreachable_package_fails_at_download(root: Path, packages: dict[str, BuiltPackage]) -> None:
    """A package URL that cannot be read fails at download and leaves the node as it was."""
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    missing = BuiltPackage(version="1.1.0", path=root / "nowhere.tar.gz", sha256="c" * 64)
    failed = await node.deploy(missing)
    assert failed.last_error.startswith("download:")
    assert node.served() == "1.0.0"


async def test_rollback_returns_to_the_previous_version(root: Path, packages: dict[str, BuiltPackage]) -> None:
    """Rollback after an upgrade runs the previous release again from disk, without downloading."""
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    await node.deploy(packages["1.1.0"])
    rolled = await node.rollback("1.0.0")
    assert (rolled.state, rolled.current_version, rolled.prev_version) == (NodeState.ROLLED_BACK, "1.0.0", None)
    assert node.served() == "1.0.0"


async def test_rollback_to_a_version_not_on_the_node_fails(root: Path, packages: dict[str, BuiltPackage]) -> None:
    """A rollback target that was never installed fails clearly and the running version keeps serving."""
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    failed = await node.rollback("0.9.0")
    assert failed.state == NodeState.FAILED
    assert "0.9.0 is not on the node" in failed.last_error
    assert node.served() == "1.0.0"


async def test_status_probes_the_process_and_reports_drift(root: Path, packages: dict[str, BuiltPackage]) -> None:
    """Status reads the real node: healthy when serving, failed when someone killed the service."""
    node = Node(root)
    assert (await node.executor(None).status()).state == NodeState.PENDING
    await node.deploy(packages["1.0.0"])
    assert (await node.executor(None).status()).state == NodeState.SUCCESS
    stop_all(root)
    drifted = await node.executor(None).status()
    assert drifted.state == NodeState.FAILED
    assert "1.0.0 should run but nothing does" in drifted.last_error


async def test_package_fetched_over_http_is_verified_and_deployed(
    root: Path, packages: dict[str, BuiltPackage]
) -> None:
    """An http:// package URL (a server on loopback) is downloaded, checked against its SHA256 and deployed."""
    directory = packages["1.0.0"].path.parent
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{packages['1.0.0'].path.name}"
        remote = BuiltPackage(version="1.0.0", path=packages["1.0.0"].path, sha256=packages["1.0.0"].sha256)
        node = Node(root)
        status = await LocalExecutor(
            ExecutionContext(
                node_key=NODE,
                service="hello",
                host="box-1",
                current=node.status,
                target_version="1.0.0",
                package=Package(url=url, sha256=remote.sha256),
                port=node.port,
                health=HealthCheck(timeout_s=5),
                settings=ExecutorSettings(local_root=root, stop_timeout_s=5),
            )
        ).deploy()
        assert status.state == NodeState.SUCCESS, status.last_error
        assert node.served() == "1.0.0"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200 and a version of its own, as any program could on a node's port."""

    def do_GET(self) -> None:
        body = b"9.9.9"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


def gone(pid: int) -> bool:
    """The process `pid` exited (a zombie waiting for its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def impostor() -> Iterator[int]:
    """A server of this test process (not of any node) answering 200 on a port; the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_ports(1)[0]), _Impostor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


async def test_a_port_held_by_another_program_is_refused_not_reported_healthy(
    root: Path, packages: dict[str, BuiltPackage], impostor: int
) -> None:
    """Another program answers 200 on the node's port: the deploy fails at start naming it, nothing is started,
    and the impostor is left alone (a 2xx from a process the node did not start is no proof of health)."""
    node = Node(root)
    node.port = impostor
    failed = await node.deploy(packages["1.0.0"])
    assert failed.state == NodeState.FAILED
    assert failed.last_error.startswith(f"start: port {impostor} is held by pid {os.getpid()}"), failed.last_error
    assert not (root / "box-1" / "hello" / "run" / "pid").exists()
    assert node.served() == "9.9.9"
    assert (await node.executor(None).status()).state != NodeState.SUCCESS


async def test_status_fails_while_another_program_answers_for_the_node(
    root: Path, packages: dict[str, BuiltPackage], impostor: int
) -> None:
    """The node's service runs but another program holds the port it should serve on: status is not success."""
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    node.port = impostor  # the record says the service serves where the impostor listens
    seen = await node.executor(None).status()
    assert seen.state == NodeState.FAILED
    assert "health check fails" in seen.last_error


async def test_a_leftover_of_the_node_on_its_port_is_stopped_before_the_new_version_starts(
    root: Path, packages: dict[str, BuiltPackage]
) -> None:
    """1.0.0 runs but its pid file is lost (its starter died before writing it): the next deploy stops that
    leftover first, then starts 1.1.0, which alone answers."""
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    leftover = node.pid()
    (root / "box-1" / "hello" / "run" / "pid").unlink()
    deployed = await node.deploy(packages["1.1.0"])
    assert deployed.state == NodeState.SUCCESS, deployed.last_error
    assert gone(leftover)
    assert node.pid() != leftover
    assert node.served() == "1.1.0"


async def test_a_service_whose_listener_is_a_forked_child_is_its_own(root: Path, tmp_path: Path) -> None:
    """`run` forks the server instead of exec'ing it: the listener is in the service's session, so it counts."""
    forked = build_package(tmp_path / "dist", "1.2.0", run=b'#!/bin/sh\npython3 "$(dirname "$0")/app.py"\n')
    node = Node(root)
    deployed = await node.deploy(forked)
    assert deployed.state == NodeState.SUCCESS, deployed.last_error
    assert (await node.executor(None).status()).state == NodeState.SUCCESS
    assert node.served() == "1.2.0"


def recorded(root: Path) -> tuple[int, str] | None:
    """The pid and version in the node's pid file, if any."""
    try:
        pid, version = (root / "box-1" / "hello" / "run" / "pid").read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid), version


async def test_a_deploy_interrupted_during_its_switch_puts_the_previous_version_back(
    root: Path, packages: dict[str, BuiltPackage], tmp_path: Path
) -> None:
    """The run is cancelled while 1.3.0 starts (its worker stops, or the request moved): 1.3.0 is stopped and
    1.0.0 serves again before the cancellation goes on, so the node never serves a version nobody recorded."""
    slow = build_package(
        tmp_path / "dist", "1.3.0", run=b'#!/bin/sh\nsleep 30\nexec python3 "$(dirname "$0")/app.py"\n'
    )
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    deploying = asyncio.create_task(node.executor("1.3.0", slow).deploy())
    await until(lambda: (recorded(root) or (0, ""))[1] == "1.3.0", "1.3.0 started", timeout_s=60)
    started = recorded(root)
    assert started is not None
    deploying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deploying
    assert gone(started[0])
    assert (recorded(root) or (0, ""))[1] == "1.0.0"
    assert node.served() == "1.0.0"
    assert os.readlink(root / "box-1" / "hello" / "current") == "releases/1.0.0"


class Takeover:
    """The fence of a run that another worker takes over once `happened` is set (its claim's epoch moved on)."""

    def __init__(self) -> None:
        self.happened = False

    async def fence(self) -> None:
        if self.happened:
            raise Fenced("taken over")


SLOW_RUN = b'#!/bin/sh\nsleep 30\nexec python3 "$(dirname "$0")/app.py"\n'


async def test_a_run_taken_over_while_it_waited_leaves_the_new_holders_service_alone(
    root: Path, packages: dict[str, BuiltPackage], tmp_path: Path
) -> None:
    """A run's worker froze while its 1.3.0 started; another run took the node over, stopped that 1.3.0 and
    deployed 1.1.0. The old run wakes to find its process gone: it stops nothing and starts nothing (not the
    previous version either) and ends Fenced; 1.1.0 keeps serving."""
    slow = build_package(tmp_path / "dist", "1.3.0", run=SLOW_RUN)
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    takeover = Takeover()
    old = asyncio.create_task(node.executor("1.3.0", slow, fence=takeover.fence).deploy())
    await until(lambda: (recorded(root) or (0, ""))[1] == "1.3.0", "1.3.0 started", timeout_s=60)
    takeover.happened = True
    await node.executor("1.1.0", packages["1.1.0"]).deploy()
    serving = recorded(root)
    assert serving is not None
    assert serving[1] == "1.1.0"
    with pytest.raises(Fenced):
        await old
    assert recorded(root) == serving
    assert not gone(serving[0])
    assert node.served() == "1.1.0"


async def test_a_run_cancelled_after_it_was_taken_over_restores_nothing(
    root: Path, packages: dict[str, BuiltPackage], tmp_path: Path
) -> None:
    """A run is cancelled during its switch because it was fenced (its heartbeat found a newer claim): the node
    is the new holder's, so the cancelled run does not stop what runs there nor put the previous version back."""
    slow = build_package(tmp_path / "dist", "1.3.0", run=SLOW_RUN)
    node = Node(root)
    await node.deploy(packages["1.0.0"])
    takeover = Takeover()
    old = asyncio.create_task(node.executor("1.3.0", slow, fence=takeover.fence).deploy())
    await until(lambda: (recorded(root) or (0, ""))[1] == "1.3.0", "1.3.0 started", timeout_s=60)
    started = recorded(root)
    assert started is not None
    takeover.happened = True
    old.cancel()
    with pytest.raises(asyncio.CancelledError):
        await old
    assert recorded(root) == started
    assert not gone(started[0])
    assert os.readlink(root / "box-1" / "hello" / "current") == "releases/1.0.0"
