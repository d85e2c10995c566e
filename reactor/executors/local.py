"""The `local` platform: deploys a real package into a folder on this machine and runs it.

Layout per node, mirroring the host contract: `<root>/<host>/<service>/releases/<version>/` unpacked,
`current` -> the active release, `state.json` with the version history, `run/pid` of the running process.
The package must have an executable `run` at its top; it is started with `PORT` and `SERVICE_VERSION` set.

What answers the health check must be what this node started: the port's listening socket must belong to the
running process (or a process of its session, e.g. a child it forked), and a version is not started while a
process nobody of this node started holds the port. A leftover of this node's own (a process in its releases
whose pid file was lost) is stopped first.

Every change to the node (stop, start, switch `current`, history) is made under the node's lock `run/lock` and
only once the run's fence says it still holds the node's claim: a run taken over while it waited (its worker froze
past its lease) stops and starts nothing, not even the previous version after its interrupted switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse

from reactor import logs
from reactor.domain.status import NodeState, NodeStatus
from reactor.errors import ReactorError, StepFailed
from reactor.events import Package
from reactor.ports import ExecutionContext

log = logs.get_logger(__name__)

_CHUNK = 1 << 16
# Services this process started, so they are reaped when they exit (they outlive the request, not the process).
_children: dict[int, subprocess.Popen[bytes]] = {}
_DOWNLOAD_TIMEOUT_S = 60.0
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


class LocalExecutor:
    """Executor for nodes of the form `local/<host>/<service>`."""

    platform: ClassVar[str] = "local"

    def __init__(self, context: ExecutionContext) -> None:
        self.context = context
        self.base = context.settings.local_root / context.host / context.service

    # --- the Executor contract ---

    async def deploy(self) -> NodeStatus:
        """Fetch, verify, unpack, stop the old, start the new, health-check, switch; restore on failure."""
        target = self.context.target_version
        package = self.context.package
        if target is None or package is None:
            return self._result(NodeState.FAILED, step="prepare", error="deploy needs a version and a package")
        history = self._history()
        current = history[-1] if history else None
        if current == target and self._running_version() == target and await self._healthy_once():
            log.info("already running the target version; nothing to do", version=target)
            return self._result(NodeState.SUCCESS, history=history)
        try:
            await self._install(target, package)
        except StepFailed as exc:
            return self._result(NodeState.FAILED, step=exc.step, error=exc.message, history=history)
        try:
            await self._switch_process(target)
        except asyncio.CancelledError:
            await self._interrupted(current)
            raise
        except StepFailed as exc:
            return self._result(
                NodeState.FAILED, step=exc.step, error=exc.message + await self._restore(current), history=history
            )
        new_history = [*history, target] if current != target else history
        async with self._changing():
            self._switch_current(target)
            self._write_history(new_history)
        return self._result(NodeState.SUCCESS, history=new_history)

    async def rollback(self) -> NodeStatus:
        """Run the target (previous) version again from the releases already on the node."""
        target = self.context.target_version
        history = self._history()
        if target is None:
            return self._result(NodeState.FAILED, step="rollback", error="no previous version to roll back to")
        if not (self.base / "releases" / target / "run").exists():
            return self._result(
                NodeState.FAILED, step="rollback", error=f"release {target} is not on the node", history=history
            )
        current = history[-1] if history else None
        if not (current == target and self._running_version() == target and await self._healthy_once()):
            try:
                await self._switch_process(target)
            except asyncio.CancelledError:
                await self._interrupted(current)
                raise
            except StepFailed as exc:
                return self._result(
                    NodeState.FAILED, step=exc.step, error=exc.message + await self._restore(current), history=history
                )
        new_history = _rewind(history, target)
        async with self._changing():
            self._switch_current(target)
            self._write_history(new_history)
        return self._result(NodeState.ROLLED_BACK, history=new_history)

    async def status(self) -> NodeStatus:
        """Probe the node: which version runs, and does it answer its health check."""
        history = self._history()
        running = self._running_version()
        current = history[-1] if history else None
        if current is None:
            return self._result(NodeState.PENDING, history=history)
        if running != current:
            return self._result(
                NodeState.FAILED, error=f"{current} should run but {running or 'nothing'} does", history=history
            )
        if not await self._healthy_once():
            return self._result(NodeState.FAILED, error="health check fails", history=history)
        return self._result(NodeState.SUCCESS, history=history)

    # --- steps ---

    async def _install(self, version: str, package: Package) -> None:
        """Download and verify before anything changes; unpack into releases/<version>."""
        release = self.base / "releases" / version
        marker = release / ".sha256"
        if release.is_dir() and marker.exists():
            installed = marker.read_text().strip()
            if installed == package.sha256:
                return
            raise StepFailed(
                "verify", f"{version} is installed with sha256 {installed}, the request says {package.sha256}"
            )
        downloads = self.base / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        archive = downloads / f"{version}.tar.gz"
        digest = await asyncio.to_thread(_download, package.url, archive.with_suffix(".part"))
        if digest != package.sha256:
            archive.with_suffix(".part").unlink(missing_ok=True)
            raise StepFailed("verify", f"sha256 mismatch: expected {package.sha256}, got {digest}")
        archive.with_suffix(".part").replace(archive)
        await asyncio.to_thread(_unpack, archive, release, package.sha256)

    async def _switch_process(self, version: str) -> None:
        """Stop whatever runs, start `version`, wait for it to be healthy."""
        async with self._changing():
            await self._stop()
            await self._free_port(version)
            process = self._start(version)
        await self._wait_healthy(process, version)

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """Change the node only while this run still holds its claim (Fenced if not), under the node's lock: a run
        taken over while it waited (its worker froze past its lease) must not stop or start what the new holder
        runs, and one whose check passed finishes its step before the new holder's first one begins."""
        (self.base / "run").mkdir(parents=True, exist_ok=True)
        with (self.base / "run" / "lock").open("a") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    await asyncio.sleep(0.05)  # polled: a cancelled wait must not take the lock later
                else:
                    break
            try:
                await self.context.fence()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    async def _interrupted(self, previous: str | None) -> None:
        """A switch cancelled half way (the worker stops, or the node's request moved to another worker): put
        back what ran before, as a failed switch does, so the node never serves a version nobody recorded."""
        log.warning("interrupted during the switch; restoring the previous version", previous=previous)
        restoring = asyncio.ensure_future(self._restore(previous))
        # The run ends (and its claim is given up) only once the node is back: a second cancellation waits too.
        # Bounded: a restore stops within the stop timeout and waits at most one health timeout.
        while not restoring.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([restoring])
        try:
            outcome = restoring.result().removeprefix("; ")
        except ReactorError as exc:  # fenced (the node is another run's now), or its claim could not be checked
            log.warning("not restored after the interruption", error=str(exc))
        else:
            log.info("restored after the interruption", outcome=outcome)

    async def _free_port(self, version: str) -> None:
        """Make sure nobody holds the node's port before `version` starts: a leftover of this node's own is
        stopped; anyone else's is refused (StepFailed), never started beside."""
        port = self.context.port
        if port is None:
            return
        for pid in await asyncio.to_thread(port_holders, port):
            if self._is_ours(pid):
                log.warning("stopping a leftover process of this node that holds its port", pid=pid, port=port)
                await self._stop_pid(pid)
            else:
                raise StepFailed(
                    "start",
                    f"port {port} is held by pid {pid} ({_command_line(pid)}), not by this node; {version} "
                    "was not started beside it",
                )

    async def _restore(self, previous: str | None) -> str:
        """Put the previous version back after a failed switch; the text says how that went."""
        try:
            async with self._changing():
                await self._stop()
                if previous is None:
                    return "; nothing ran before, so nothing was restored"
                await self._free_port(previous)
                process = self._start(previous)
            await self._wait_healthy(process, previous)
        except StepFailed as exc:
            return f"; restoring {previous} failed too: {exc}"
        async with self._changing():
            self._switch_current(previous)
        return f"; {previous} restored and serving"

    def _start(self, version: str) -> subprocess.Popen[bytes]:
        release = self.base / "releases" / version
        program = release / "run"
        if not os.access(program, os.X_OK):
            raise StepFailed("start", f"release {version} has no executable 'run'")
        (self.base / "run").mkdir(exist_ok=True)
        (self.base / "logs").mkdir(exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SERVICE_VERSION": version,
            "SERVICE_NAME": self.context.service,
        }
        if self.context.port is not None:
            env["PORT"] = str(self.context.port)
        with (self.base / "logs" / f"{version}.log").open("ab") as output:
            process = subprocess.Popen(  # noqa: S603 (the program is the unpacked, verified release's own `run`)
                [str(program)],
                cwd=release,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the service outlives the worker, as under systemd
            )
        _children[process.pid] = process
        (self.base / "run" / "pid").write_text(f"{process.pid} {version}\n")
        log.info("started", version=version, pid=process.pid)
        return process

    async def _stop(self) -> None:
        pid_file = self.base / "run" / "pid"
        pid = self._running_pid()
        if pid is not None:
            await self._stop_pid(pid)
        pid_file.unlink(missing_ok=True)

    async def _stop_pid(self, pid: int) -> None:
        """SIGTERM the process group of `pid`, SIGKILL it after the stop timeout; return once `pid` is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.context.settings.stop_timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while _alive(pid):
                await asyncio.sleep(0.05)
        log.info("stopped", pid=pid)

    async def _wait_healthy(self, process: subprocess.Popen[bytes], version: str) -> None:
        deadline = time.monotonic() + self.context.health.timeout_s
        why = "it never answered"
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise StepFailed("start", f"{version} exited with code {code}: {self._log_tail(version)}")
            why = await self._unhealthy(process.pid)
            if not why:
                return
            await asyncio.sleep(0.1)
        raise StepFailed("health", f"{version} not healthy within {self.context.health.timeout_s:g}s: {why}")

    async def _healthy_once(self) -> bool:
        """Whether the node's running process answers its health check itself."""
        pid = self._running_pid()
        return pid is not None and not await self._unhealthy(pid)

    async def _unhealthy(self, pid: int) -> str:
        """Why the process `pid` does not pass the health check ("" when it does): the port must be held by it
        (or its session) alone, and answer."""
        port = self.context.port
        if port is None:
            return "" if _alive(pid) else "it is not running"
        why = await asyncio.to_thread(_held_by_others, port, pid)
        if why:
            return why
        return "" if await self._answers(port) else f"port {port} does not pass the {self.context.health.kind} check"

    async def _answers(self, port: int) -> bool:
        try:
            async with asyncio.timeout(2.0):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    if self.context.health.kind == "tcp":
                        return True
                    writer.write(f"GET {self.context.health.path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    await writer.drain()
                    status_line = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        parts = status_line.split()
        return len(parts) >= 2 and parts[1].startswith(b"2")

    # --- node files ---

    def _running_pid(self) -> int | None:
        pid_file = self.base / "run" / "pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if not _alive(pid):
            return None
        # A reused pid belongs to some other program: ours runs inside this node's releases.
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        """Whether `pid` runs inside this node's releases (a service of this node, whoever started it)."""
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            return False
        return (self.base / "releases") in cwd.parents

    def _running_version(self) -> str | None:
        if self._running_pid() is None:
            return None
        return (self.base / "run" / "pid").read_text().split()[1]

    def _switch_current(self, version: str) -> None:
        link = self.base / "current"
        staging = self.base / "current.new"
        staging.unlink(missing_ok=True)
        staging.symlink_to(Path("releases") / version)
        staging.replace(link)

    def _history(self) -> list[str]:
        try:
            data = json.loads((self.base / "state.json").read_text())
        except (OSError, ValueError):
            return []
        history = data.get("history", [])
        return [str(version) for version in history] if isinstance(history, list) else []

    def _write_history(self, history: list[str]) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        staging = self.base / "state.json.new"
        current = history[-1] if history else None
        previous = history[-2] if len(history) > 1 else None
        staging.write_text(json.dumps({"current": current, "previous": previous, "history": history[-20:]}))
        staging.replace(self.base / "state.json")

    def _log_tail(self, version: str) -> str:
        try:
            text = (self.base / "logs" / f"{version}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-3:]) or "(empty log)"

    def _result(
        self, state: NodeState, *, step: str = "", error: str = "", history: list[str] | None = None
    ) -> NodeStatus:
        history = self._history() if history is None else history
        return self.context.current.model_copy(
            update={
                "state": state,
                "current_version": history[-1] if history else None,
                "prev_version": history[-2] if len(history) > 1 else None,
                "deploying_version": self.context.target_version if state == NodeState.FAILED else None,
                "last_error": f"{step}: {error}" if step else error,
            }
        )


def _rewind(history: list[str], target: str) -> list[str]:
    """The history after going back to `target`: everything after its last run is dropped."""
    if target in history:
        last = len(history) - 1 - history[::-1].index(target)
        return history[: last + 1]
    return [*history, target]


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def listening_inodes(table: str, port: int) -> set[str]:
    """The socket inodes listening on `port` in a /proc/net/tcp or tcp6 table."""
    inodes = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        local_port = fields[1].rsplit(":", 1)[-1]
        if int(local_port, 16) == port:
            inodes.add(fields[9])
    return inodes


def listening(port: int) -> set[str]:
    """The inodes of the TCP sockets listening on `port` (any address, IPv4 or IPv6), from /proc."""
    inodes: set[str] = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            inodes |= listening_inodes(Path(f"/proc/net/{name}").read_text(), port)
    return inodes


def socket_holders(inodes: set[str], pids: list[int] | None = None) -> dict[str, int]:
    """Which of `pids` (default: every process) holds each of the socket `inodes`; one pid per inode found."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    found: dict[str, int] = {}
    for pid in _all_pids() if pids is None else pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    inode = wanted.get(os.readlink(fd))
                    if inode is not None:
                        found.setdefault(inode, pid)
        if len(found) == len(wanted):
            break
    return found


def port_holders(port: int) -> list[int]:
    """The pids of the processes holding a listening TCP socket on `port`."""
    return sorted(set(socket_holders(listening(port)).values()))


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _held_by_others(port: int, pid: int) -> str:
    """Why `port` is not held by `pid`'s session alone ("" when it is)."""
    inodes = listening(port)
    if not inodes:
        return f"nothing listens on port {port}"
    session = _session(pid)
    members = [member for member in _all_pids() if _session(member) == session]
    strangers = inodes - socket_holders(inodes, members).keys()
    if not strangers:
        return ""
    holders = sorted(set(socket_holders(strangers).values()))
    who = ", ".join(f"pid {holder} ({_command_line(holder)})" for holder in holders) or "a process out of sight"
    return f"port {port} is held by {who}, not by pid {pid}"


def _session(pid: int) -> int | None:
    """The session id of `pid` (a service and every process it forks share the one it was started in)."""
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200] or "?"


def stop_all(root: Path) -> list[int]:
    """Stop every service process started under `root` (the demo cleans up with this); their pids."""
    stopped = []
    for pid_file in root.glob("*/*/run/pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            stopped.append(pid)
        pid_file.unlink(missing_ok=True)
    return stopped


def _download(url: str, destination: Path) -> str:
    """Copy `url` to `destination`, hashing as it goes; the hex SHA256."""
    digest = hashlib.sha256()
    parsed = urlparse(url)
    try:
        if parsed.scheme == "file":
            source = Path(unquote(parsed.path)).open("rb")  # noqa: SIM115 (closed by the `with source` below)
        else:
            source = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)  # noqa: S310 (scheme is checked by the URL pattern)
        with source, destination.open("wb") as target:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                target.write(chunk)
    except OSError as exc:
        destination.unlink(missing_ok=True)
        raise StepFailed("download", f"{url}: {exc}") from exc
    return digest.hexdigest()


def _unpack(archive: Path, release: Path, sha256: str) -> None:
    staging = release.with_name(release.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise StepFailed("unpack", f"{archive.name}: {exc}") from exc
    (staging / ".sha256").write_text(sha256 + "\n")
    shutil.rmtree(release, ignore_errors=True)
    staging.replace(release)
