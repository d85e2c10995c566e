"""The `physical` platform over asyncssh: the host contract (see hostcontract.py) done with a few commands.

One connection per request; every command is built from argument lists joined with `shlex.join`, so no
field can change a command's meaning (and every field was checked against the contract's patterns first).
Host keys are always verified against `physical_known_hosts` (default ~/.ssh/known_hosts); the client
authenticates with `physical_private_key` or the ssh agent and the default keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import PurePosixPath
from typing import ClassVar

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    # asyncssh names cryptography's DSA key types as it loads, and cryptography 51 warns on that name: the warning
    # is about the library's import, not about a key in use, and would stop every command that loads this module.
    warnings.filterwarnings("ignore", "DSA is deprecated", CryptographyDeprecationWarning)
    import asyncssh

from reactor import logs
from reactor.domain.status import NodeState, NodeStatus
from reactor.errors import StepFailed
from reactor.executors.hostcontract import (
    WANTS_DIR,
    HealthSpec,
    HostAddress,
    Layout,
    Probe,
    advanced,
    env_text,
    finished,
    health_spec,
    judge,
    parse_history,
    recorded_history,
    resolve_host,
    rewound,
    state_text,
    unit_text,
    validate,
)
from reactor.ports import ExecutionContext
from reactor.trust.keys import private_file_problem

log = logs.get_logger(__name__)

# A cut cable is noticed after about KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT_MAX seconds.
KEEPALIVE_INTERVAL_S = 2.0
KEEPALIVE_COUNT_MAX = 3
HEALTH_POLL_S = 0.25
PROBE_TIMEOUT_S = 5.0
PROBE_ATTEMPTS = 3
PROBE_RETRY_S = 0.5
_EXIT_STATUS = re.compile(r"Main process exited, code=\w+, status=(\d+)")
_SEPARATOR = "----reactor-probe----"
_RUNNING = frozenset({"active", "activating", "reloading"})

_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def _limit(size: int) -> asyncio.Semaphore:
    """The process-wide bound on hosts worked on at once (per event loop and configured size)."""
    per_size = _limits.setdefault(asyncio.get_running_loop(), {})
    if size not in per_size:
        per_size[size] = asyncio.Semaphore(size)
    return per_size[size]


def command(*argv: str | PurePosixPath) -> str:
    """One remote command line from its arguments, each quoted."""
    return shlex.join(str(arg) for arg in argv)


class _Host:
    """An open connection to one host; failures become StepFailed naming the step."""

    def __init__(
        self, connection: asyncssh.SSHClientConnection, address: HostAddress, timeout_s: float, steps: dict[str, float]
    ) -> None:
        self.connection = connection
        self.address = address
        self.timeout_s = timeout_s
        self.steps = steps

    def _where(self) -> str:
        return f"{self.address.name} ({self.address.address})"

    async def run(
        self, step: str, line: str, *, stdin: str | None = None, timeout_s: float | None = None
    ) -> asyncssh.SSHCompletedProcess:
        """Run one command line; raise StepFailed(step) if the host cannot be asked (any exit status returns)."""
        limit = timeout_s or self.timeout_s
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                return await self.connection.run(line, input=stdin, check=False)
        except TimeoutError as exc:
            raise StepFailed(step, f"{self._where()} gave no answer within {limit:g}s") from exc
        except (asyncssh.Error, OSError) as exc:
            raise StepFailed(step, f"{self._where()} unreachable: {_describe(exc)}") from exc
        finally:
            self.steps[step] = self.steps.get(step, 0.0) + time.monotonic() - started

    async def check(self, step: str, line: str, *, stdin: str | None = None, timeout_s: float | None = None) -> str:
        """Run a command that must succeed; its stdout."""
        result = await self.run(step, line, stdin=stdin, timeout_s=timeout_s)
        if result.exit_status != 0:
            raise StepFailed(step, f"`{line}` exited {result.exit_status}: {_text(result.stderr).strip()[-500:]}")
        return _text(result.stdout)


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data if isinstance(data, str) else ""


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


class SshExecutor:
    """Executor for `physical/<host>/<service>` nodes over asyncssh."""

    platform: ClassVar[str] = "physical"

    def __init__(self, context: ExecutionContext) -> None:
        self.context = context
        self.settings = context.settings
        self.layout = Layout(context.service)
        self.health = health_spec(context)
        self.history: list[str] = []
        self.step_times: dict[str, float] = {}  # seconds spent per step on the host, for benchmarks and logs

    # --- the Executor contract ---

    async def deploy(self) -> NodeStatus:
        """Download and verify on the host, unpack, stop the old, start the new, check, switch; restore on failure."""
        return await self._guarded(self._deploy)

    async def rollback(self) -> NodeStatus:
        """Run the target (previous) version again from the releases already on the host."""
        return await self._guarded(self._rollback)

    async def status(self) -> NodeStatus:
        """Probe the host (state file, `current`, running instances, health) and report drift from the record."""
        return await self._guarded(self._status)

    async def _guarded(self, operation: Callable[[], Awaitable[NodeStatus]]) -> NodeStatus:
        """Run an operation; a failed step becomes a failed status with the host's history as last read."""
        self.history = recorded_history(self.context)
        try:
            return await operation()
        except StepFailed as exc:
            return finished(self.context, NodeState.FAILED, history=self.history, step=exc.step, error=exc.message)

    async def _deploy(self) -> NodeStatus:
        context = self.context
        validate(context, "deploy")
        target, package = context.target_version, context.package
        if target is None or package is None:
            raise StepFailed("prepare", "deploy needs a version and a package")
        async with self._connect(self._address()) as host:
            probe, enabled = await self._probe(host)
            self.history = probe.history
            if await self._serving(host, probe, target):
                log.info("already running the target version; nothing to do", version=target)
                return finished(context, NodeState.SUCCESS, history=self.history)
            await self._install(host, target, package.url, package.sha256)
            await self._switch_or_restore(host, target, probe, enabled)
            self.history = advanced(self.history, target)
            await self._write_state(host, self.history)
            return finished(context, NodeState.SUCCESS, history=self.history)

    async def _rollback(self) -> NodeStatus:
        context = self.context
        validate(context, "rollback")
        target = context.target_version
        if target is None:
            raise StepFailed("rollback", "no previous version to roll back to")
        async with self._connect(self._address()) as host:
            probe, enabled = await self._probe(host)
            self.history = probe.history
            marker = await host.run("rollback", command("test", "-f", self.layout.marker(target)))
            if marker.exit_status != 0:
                raise StepFailed("rollback", f"release {target} is not on the host")
            if not await self._serving(host, probe, target):
                await self._switch_or_restore(host, target, probe, enabled)
            self.history = rewound(self.history, target)
            await self._write_state(host, self.history)
            return finished(context, NodeState.ROLLED_BACK, history=self.history)

    async def _status(self) -> NodeStatus:
        validate(self.context, "status")
        async with self._connect(self._address()) as host:
            probe, _ = await self._probe(host)
            host_current = probe.history[-1] if probe.history else None
            healthy = None
            if host_current is not None and probe.running == [host_current]:
                healthy = await self._healthy_once(host, host_current)
            return judge(self.context, Probe(probe.history, probe.running, probe.current_link, healthy))

    def _address(self) -> HostAddress:
        return resolve_host(self.context.host, self.settings.physical_inventory, self.settings.physical_user)

    # --- connection ---

    @contextlib.asynccontextmanager
    async def _connect(self, address: HostAddress) -> AsyncIterator[_Host]:
        settings = self.settings
        known_hosts = str(settings.physical_known_hosts) if settings.physical_known_hosts else ()
        client_keys = [str(settings.physical_private_key)] if settings.physical_private_key else ()
        where = f"{address.user}@{address.address}:{address.port}"
        if settings.physical_private_key is not None:
            problem = private_file_problem(settings.physical_private_key, "SSH private key")
            if problem is not None:
                raise StepFailed("connect", f"{where}: {settings.physical_private_key}: {problem}")
        async with _limit(settings.physical_concurrency):
            started = time.monotonic()
            try:
                connection = await asyncssh.connect(
                    address.address,
                    port=address.port,
                    username=address.user,
                    known_hosts=known_hosts,  # never None: that would switch host key checking off
                    client_keys=client_keys,
                    config=None,  # only the reactor's settings decide how hosts are reached
                    connect_timeout=settings.physical_connect_timeout_s,
                    login_timeout=settings.physical_connect_timeout_s,
                    keepalive_interval=KEEPALIVE_INTERVAL_S,
                    keepalive_count_max=KEEPALIVE_COUNT_MAX,
                )
            except asyncssh.HostKeyNotVerifiable as exc:
                raise StepFailed("connect", f"{where}: host key not verified: {exc}") from exc
            except asyncssh.PermissionDenied as exc:
                raise StepFailed("connect", f"{where}: authentication failed: {exc}") from exc
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                raise StepFailed("connect", f"{where} unreachable: {_describe(exc)}") from exc
            finally:
                self.step_times["connect"] = time.monotonic() - started
            try:
                yield _Host(connection, address, settings.physical_command_timeout_s, self.step_times)
            finally:
                connection.close()
                with contextlib.suppress(Exception):  # the peer may be gone; closing is best effort
                    async with asyncio.timeout(2):
                        await connection.wait_closed()

    # --- steps ---

    async def _probe(self, host: _Host) -> tuple[Probe, set[str]]:
        """History from the state file, `current`'s target, running and enabled instances: one round trip."""
        layout = self.layout
        parts = [
            command("cat", layout.state_file),
            command("readlink", layout.current),
            command("systemctl", "list-units", "--all", "--plain", "--no-legend", "--type=service", layout.unit_glob),
            command("ls", WANTS_DIR),
        ]
        line = f"; echo {_SEPARATOR}; ".join(f"{part} 2>/dev/null" for part in parts)
        result = await host.run("probe", line, timeout_s=min(host.timeout_s, PROBE_TIMEOUT_S * 4))
        sections = [*_text(result.stdout).split(_SEPARATOR + "\n"), "", "", "", ""][:4]
        state, link, units, wants = sections
        running = []
        for row in units.splitlines():
            fields = row.split()
            version = layout.version_of(fields[0]) if fields else None
            if version is not None and len(fields) >= 3 and fields[2] in _RUNNING:
                running.append(version)
        enabled = {v for name in wants.split() if (v := layout.version_of(name)) is not None}
        probe = Probe(parse_history(state), sorted(running), link.strip() or None, None)
        return probe, enabled

    async def _serving(self, host: _Host, probe: Probe, target: str) -> bool:
        """The host already runs `target` as its current release and it answers."""
        current = probe.history[-1] if probe.history else None
        if current != target or probe.running != [target] or probe.current_link != f"releases/{target}":
            return False
        return await self._healthy_once(host, target)

    async def _install(self, host: _Host, version: str, url: str, sha256: str) -> None:
        """Fetch and verify before anything changes; unpack into releases/<version>."""
        layout = self.layout
        marker = await host.run("install", command("cat", layout.marker(version)))
        if marker.exit_status == 0:
            installed = _text(marker.stdout).strip()
            if installed == sha256:
                return
            raise StepFailed("verify", f"{version} is installed with sha256 {installed}, the request says {sha256}")
        archive = layout.download(version)
        partial = PurePosixPath(f"{archive}.part")
        timeout = self.settings.physical_command_timeout_s
        fetch = (
            command("mkdir", "-p", layout.downloads)
            + " && "
            + command("curl", "-fsS", "--max-time", str(max(1, int(timeout) - 1)), "-o", partial, url)
        )
        await host.check("download", fetch, timeout_s=timeout + 5)
        digest = (await host.check("verify", command("sha256sum", partial))).split(" ", 1)[0]
        if digest != sha256:
            await host.run("verify", command("rm", "-f", partial))
            raise StepFailed("verify", f"sha256 mismatch: expected {sha256}, got {digest}")
        release = layout.release(version)
        staging = PurePosixPath(f"{release}.unpacking")
        unpack = " && ".join(
            [
                command("mv", "-f", partial, archive),
                command("rm", "-rf", staging),
                command("mkdir", "-p", staging),
                command("tar", "-xzf", archive, "-C", staging, "--no-same-owner"),
                command("printf", "%s\n", sha256) + " > " + shlex.quote(str(staging / ".sha256")),
                command("rm", "-rf", release),
                command("mv", "-T", staging, release),
            ]
        )
        result = await host.run("unpack", unpack)
        if result.exit_status != 0:
            await host.run("unpack", command("rm", "-rf", staging))
            raise StepFailed("unpack", f"{archive.name}: {_text(result.stderr).strip()[-300:]}")

    async def _install_unit(self, host: _Host) -> None:
        """Write the template unit and the env file where they differ (reloading systemd if the unit did)."""
        layout = self.layout
        await host.check(
            "install",
            _write_if_changed(layout.unit_file, then=command("systemctl", "daemon-reload")),
            stdin=unit_text(layout.service),
        )
        await host.check(
            "install",
            command("mkdir", "-p", layout.base) + " && " + _write_if_changed(layout.env_file),
            stdin=env_text(self.context.port),
        )

    async def _switch_or_restore(self, host: _Host, target: str, probe: Probe, enabled: set[str]) -> None:
        """Stop the others, start `target`, check it, switch `current`; on failure put the previous one back."""
        previous = next((v for v in probe.running if v != target), None)
        if previous is None and probe.history and probe.history[-1] != target:
            previous = probe.history[-1]
        await self._install_unit(host)  # nothing runs differently yet: no restore needed if this fails
        try:
            await self._activate(host, target, others=set(probe.running) | enabled)
        except StepFailed as exc:
            raise StepFailed(exc.step, exc.message + await self._restore(host, target, previous)) from exc

    async def _activate(self, host: _Host, version: str, *, others: set[str]) -> None:
        layout = self.layout
        unit = layout.unit(version)
        stop = sorted(layout.unit(v) for v in others if v != version)
        # Stopped, not yet disabled: a host that loses power before the switch boots the release it ran.
        if stop:
            await host.check("stop", command("systemctl", "stop", "--", *stop))
        await host.run("start", command("systemctl", "reset-failed", unit) + " 2>/dev/null")
        result = await host.run("start", command("systemctl", "restart", unit))
        if result.exit_status != 0:
            raise StepFailed("start", await self._exited(host, unit))
        await self._wait_healthy(host, version)
        link = PurePosixPath(f"{layout.current}.new")
        await host.check(
            "switch",
            " && ".join(
                [
                    # Enabled before the others are disabled: a host is never left with none enabled. The links
                    # count at boot only, so no daemon reload (each costs the host's manager a full reload).
                    command("systemctl", "enable", "--no-reload", "--quiet", unit),
                    *([command("systemctl", "disable", "--no-reload", "--quiet", "--", *stop)] if stop else []),
                    command("ln", "-sfn", f"releases/{version}", link),
                    command("mv", "-Tf", link, layout.current),
                ]
            ),
        )

    async def _restore(self, host: _Host, failed: str, previous: str | None) -> str:
        """Stop the failed release and start the previous one; the text says how that went."""
        try:
            await host.check("restore", command("systemctl", "disable", "--now", self.layout.unit(failed)))
            if previous is None:
                return "; nothing ran before, so nothing was restored"
            await self._activate(host, previous, others=set())
        except StepFailed as exc:
            return f"; restoring {previous or 'the host'} failed too: {exc}"
        return f"; {previous} restored and serving"

    async def _wait_healthy(self, host: _Host, version: str) -> None:
        """Until the unit runs and its check passes; StepFailed(start) if it exits, (health) at the deadline."""
        unit = self.layout.unit(version)
        spec = self.health
        deadline = time.monotonic() + spec.timeout_s
        show = command("systemctl", "show", "--property=ActiveState,SubState,NRestarts", unit)
        last = "no check ran"
        while True:
            remaining = max(1.0, deadline - time.monotonic())
            shown = await host.check("health", show, timeout_s=min(remaining + 5, host.timeout_s))
            if _process_ended(dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)):
                raise StepFailed("start", await self._exited(host, unit))
            if "ActiveState=active" in shown.splitlines():
                probe = await host.run(
                    "health", _health_command(spec, unit), timeout_s=min(remaining + 5, PROBE_TIMEOUT_S)
                )
                if probe.exit_status == 0:
                    return
                last = _text(probe.stderr).strip() or f"exit {probe.exit_status}"
            if time.monotonic() >= deadline:
                raise StepFailed("health", f"{unit} not healthy within {spec.timeout_s:g}s ({spec.kind}: {last})")
            await asyncio.sleep(HEALTH_POLL_S)

    async def _healthy_once(self, host: _Host, version: str) -> bool:
        """One health check, retried briefly: a single slow answer on a busy host is not a verdict."""
        for attempt in range(PROBE_ATTEMPTS):
            result = await host.run("probe", _health_command(self.health, self.layout.unit(version)), timeout_s=10)
            if result.exit_status == 0:
                return True
            if attempt + 1 < PROBE_ATTEMPTS:
                await asyncio.sleep(PROBE_RETRY_S)
        return False

    async def _exited(self, host: _Host, unit: str) -> str:
        """Why a unit is not running: its exit status and the end of its journal."""
        line = (
            command("systemctl", "show", "--property=ExecMainStatus", "--value", unit)
            + f"; echo {_SEPARATOR}; "
            + command("journalctl", "-u", unit, "-n", "10", "--no-pager", "-o", "cat")
        )
        try:
            result = await host.run("start", line, timeout_s=10)
        except StepFailed:
            return f"{unit} exited (its status and journal are unreadable)"
        shown, _, journal = _text(result.stdout).partition(_SEPARATOR)
        lines = [text for text in journal.splitlines() if text.strip()]
        # systemd resets ExecMainStatus when it restarts the unit: the journal keeps the last exit.
        statuses = [match.group(1) for text in lines if (match := _EXIT_STATUS.search(text))]
        status = statuses[-1] if statuses else shown.strip() or "?"
        return f"{unit} exited with status {status}: {' | '.join(lines[-3:]) or '(empty journal)'}"

    async def _write_state(self, host: _Host, history: list[str]) -> None:
        path = self.layout.state_file
        staging = PurePosixPath(f"{path}.new")
        await host.check(
            "switch",
            f"cat > {shlex.quote(str(staging))} && {command('mv', '-f', staging, path)}",
            stdin=state_text(history),
        )


def _write_if_changed(path: PurePosixPath, *, then: str = "") -> str:
    """A command line writing stdin to `path` unless it already holds exactly that, then running `then`."""
    target, staging = shlex.quote(str(path)), shlex.quote(f"{path}.new")
    after = f" && {then}" if then else ""
    keep_or_replace = f"if cmp -s {staging} {target}; then rm -f {staging}; else mv -f {staging} {target}{after}; fi"
    return f"cat > {staging} && {keep_or_replace}"


def _process_ended(unit_state: dict[str, str]) -> bool:
    """The instance's process ended: systemd restarted it, or it is down for good."""
    return (
        unit_state.get("NRestarts", "0") not in ("0", "")
        or unit_state.get("SubState") in ("auto-restart", "failed", "dead", "exited")
        or unit_state.get("ActiveState") in ("failed", "inactive")
    )


# The port's listening sockets must all belong to the unit's processes (a path component of each holder's
# cgroup is the unit): an answer from anything else (a stray, another version, another program) is no proof.
HELD_BY_UNIT = (
    'pids=$(ss -Hltnp "sport = :$1" | grep -o "pid=[0-9]*" | cut -d= -f2 | sort -u); '
    '[ -n "$pids" ] || { echo "nothing listens on port $1" >&2; exit 1; }; '
    "for pid in $pids; do "
    'tr / "\\n" < "/proc/$pid/cgroup" 2>/dev/null | grep -qxF "$2" || '
    '{ echo "port $1 is held by pid $pid ($(tr "\\0" " " < "/proc/$pid/cmdline" 2>/dev/null)), not by $2" >&2; '
    "exit 1; }; done"
)


def _health_command(spec: HealthSpec, unit: str) -> str:
    """The host-side check: the port held by the unit, then curl for HTTP or bash's /dev/tcp for TCP; systemctl
    for a unit without a port."""
    if spec.kind == "systemd" or spec.port is None:
        return command("systemctl", "is-active", "--quiet", unit)
    held = command("bash", "-c", HELD_BY_UNIT, "held-by-unit", str(spec.port), unit)
    if spec.kind == "http":
        url = f"http://127.0.0.1:{spec.port}{spec.path}"
        return held + " && " + command("curl", "-fsS", "-o", "/dev/null", "--max-time", "3", url)
    return (
        held
        + " && "
        + command("timeout", "2", "bash", "-c", 'exec 3<>"/dev/tcp/127.0.0.1/$1"', "tcp-check", str(spec.port))
    )
