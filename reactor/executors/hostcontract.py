"""The host contract both `physical` drivers (ssh, ansible) implement, and what they share.

On a host, per service:
  /opt/<service>/releases/<version>/      the unpacked package (its `run` is the program), `.sha256` inside
  /opt/<service>/current -> releases/<v>  the active release
  /opt/<service>/env                      PORT=<port> for the unit
  /opt/<service>/state.json               {"current", "previous", "history"} (the host's own record)
  /opt/<service>/downloads/               fetched archives
  /etc/systemd/system/<service>@.service  template unit; `<service>@<version>` runs, enabled; others stopped
                                          and disabled, so only one version runs and it survives a reboot.

Node keys are `physical/<host>/<service>`. `<host>` is looked up in the Ansible INI inventory of
`physical_inventory` (`ansible_host`, `ansible_port`, `ansible_user` of the host, its groups or `all`);
a host not listed there is used as the address itself (IPv4 address or DNS name).

One platform, `physical`; the driver is a setting (`REACTOR_PHYSICAL_DRIVER=ssh|ansible`): a node is the
same host whichever tool reaches it, so its key must not change with the driver.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from reactor import events
from reactor.domain.status import NodeState, NodeStatus
from reactor.errors import ExecutorNotFound, StepFailed
from reactor.ports import ExecutionContext, Executor

ROOT = PurePosixPath("/opt")
UNIT_DIR = PurePosixPath("/etc/systemd/system")
WANTS_DIR = UNIT_DIR / "multi-user.target.wants"
HISTORY_KEPT = 20
# systemd unit names cannot hold '+', which the event contract allows in versions (semver build metadata).
UNIT_SAFE_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")

HealthKind = Literal["http", "tcp", "systemd"]


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths and unit names of one service on a host."""

    service: str

    @property
    def base(self) -> PurePosixPath:
        return ROOT / self.service

    @property
    def releases(self) -> PurePosixPath:
        return self.base / "releases"

    def release(self, version: str) -> PurePosixPath:
        return self.releases / version

    def marker(self, version: str) -> PurePosixPath:
        """Holds the SHA256 the release was verified with; a release without it is not installed."""
        return self.release(version) / ".sha256"

    @property
    def current(self) -> PurePosixPath:
        return self.base / "current"

    @property
    def env_file(self) -> PurePosixPath:
        return self.base / "env"

    @property
    def state_file(self) -> PurePosixPath:
        return self.base / "state.json"

    @property
    def downloads(self) -> PurePosixPath:
        return self.base / "downloads"

    def download(self, version: str) -> PurePosixPath:
        return self.downloads / f"{version}.tar.gz"

    @property
    def unit_file(self) -> PurePosixPath:
        return UNIT_DIR / f"{self.service}@.service"

    def unit(self, version: str) -> str:
        return f"{self.service}@{version}.service"

    @property
    def unit_glob(self) -> str:
        return f"{self.service}@*.service"

    def version_of(self, unit: str) -> str | None:
        """The version of an instance unit name of this service, or None."""
        prefix, suffix = f"{self.service}@", ".service"
        if unit.startswith(prefix) and unit.endswith(suffix) and len(unit) > len(prefix) + len(suffix):
            return unit[len(prefix) : -len(suffix)]
        return None


def unit_text(service: str) -> str:
    """The systemd template unit; playbooks/roles/release/templates/service@.service.j2 renders the same text."""
    base = ROOT / service
    return f"""\
# Installed by Deploy Reactor. One instance per release: {service}@<version>; only one runs at a time.
[Unit]
Description={service} %i (Deploy Reactor)
After=network.target

[Service]
Type=exec
EnvironmentFile=-{base}/env
Environment=SERVICE_NAME={service} SERVICE_VERSION=%i
WorkingDirectory={base}/releases/%i
ExecStart={base}/releases/%i/run
Restart=on-failure
RestartSec=2
TimeoutStopSec=10

[Install]
WantedBy=multi-user.target
"""


def env_text(port: int | None) -> str:
    """The unit's environment file."""
    return "" if port is None else f"PORT={port}\n"


# --- the host's state file ------------------------------------------------------------------------


def state_text(history: list[str]) -> str:
    """The state file for a version history (oldest first)."""
    kept = history[-HISTORY_KEPT:]
    current = kept[-1] if kept else None
    previous = kept[-2] if len(kept) > 1 else None
    return json.dumps({"current": current, "previous": previous, "history": kept}) + "\n"


def parse_history(text: str) -> list[str]:
    """The version history in a state file; empty when there is none or it is unreadable."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    history = data.get("history") if isinstance(data, dict) else None
    if not isinstance(history, list):
        return []
    return [str(version) for version in history if isinstance(version, str) and UNIT_SAFE_VERSION.match(version)]


def advanced(history: list[str], version: str) -> list[str]:
    """The history after `version` went live."""
    return history if history and history[-1] == version else [*history, version][-HISTORY_KEPT:]


def rewound(history: list[str], version: str) -> list[str]:
    """The history after going back to `version`: everything after its last run is dropped."""
    if version in history:
        last = len(history) - 1 - history[::-1].index(version)
        return history[: last + 1]
    return [*history, version][-HISTORY_KEPT:]


# --- the health check ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """How a driver decides the new instance serves: HTTP 2xx, a TCP connect, or the unit being active."""

    kind: HealthKind
    port: int | None
    path: str
    timeout_s: float


def health_spec(context: ExecutionContext) -> HealthSpec:
    """The request's check; without a port only `systemctl is-active` can tell."""
    kind: HealthKind = "systemd" if context.port is None else context.health.kind
    return HealthSpec(kind=kind, port=context.port, path=context.health.path, timeout_s=context.health.timeout_s)


# --- checking a request before anything reaches a host ------------------------------------------------


def _check(field: str, value: object, pattern: str | re.Pattern[str]) -> None:
    if not isinstance(value, str) or re.fullmatch(pattern, value) is None:
        raise StepFailed("prepare", f"{field} {value!r} is not allowed (must match {_pattern_text(pattern)})")


def _pattern_text(pattern: str | re.Pattern[str]) -> str:
    return pattern if isinstance(pattern, str) else pattern.pattern


def validate(context: ExecutionContext, operation: Literal["deploy", "rollback", "status"]) -> None:
    """Reject any field that could reach a host unless it matches the contract's patterns (StepFailed).

    The events already enforce these; the executor checks again because an ExecutionContext can be made
    without them, and because its values end up in shell commands and playbook variables.
    """
    _check("service", context.service, events.SERVICE)
    _check("host", context.host, events.HOST)
    if operation == "status":
        return
    if context.target_version is None:
        what = "a version and a package" if operation == "deploy" else "a version to roll back to"
        raise StepFailed("prepare" if operation == "deploy" else "rollback", f"{operation} needs {what}")
    _check("version", context.target_version, UNIT_SAFE_VERSION)
    if context.port is not None and (not isinstance(context.port, int) or not 1 <= context.port <= 65535):
        raise StepFailed("prepare", f"port {context.port!r} is not allowed (1-65535)")
    _check("health path", context.health.path, events.HTTP_PATH)
    if context.health.kind not in ("http", "tcp"):
        raise StepFailed("prepare", f"health kind {context.health.kind!r} is not allowed (http or tcp)")
    if operation == "deploy":
        if context.package is None:
            raise StepFailed("prepare", "deploy needs a version and a package")
        _check("package url", context.package.url, events.URL)
        if not context.package.url.startswith(("http://", "https://")):
            raise StepFailed("prepare", f"package url {context.package.url!r}: hosts fetch packages over http(s)")
        _check("package sha256", context.package.sha256, events.SHA256)


# --- finding a host ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostAddress:
    """Where and as whom to reach a node's host."""

    name: str
    address: str
    port: int
    user: str


@functools.lru_cache(maxsize=16)
def _inventory(path: Path, _mtime: float) -> dict[str, dict[str, str]]:
    """Host variables from an Ansible INI inventory (hosts, [group:vars], [group:children], [all:vars])."""
    hosts: dict[str, dict[str, str]] = {}
    members: dict[str, set[str]] = {}
    children: dict[str, set[str]] = {}
    group_vars: dict[str, dict[str, str]] = {}
    group, kind = "ungrouped", "hosts"
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            group, _, kind = line[1:-1].partition(":")
            kind = kind or "hosts"
            continue
        if kind == "vars":
            key, _, value = line.partition("=")
            group_vars.setdefault(group, {})[key.strip()] = value.strip().strip("'\"")
        elif kind == "children":
            children.setdefault(group, set()).add(line)
        else:
            name, *assignments = shlex.split(line, comments=True)
            host_vars = hosts.setdefault(name, {})
            for assignment in assignments:
                key, sep, value = assignment.partition("=")
                if sep:
                    host_vars[key] = value
            members.setdefault(group, set()).add(name)

    def merged(host: str) -> dict[str, str]:
        """[all:vars], then ancestor groups' vars, then the host's own groups', then its own line."""
        levels = [{g for g, names in members.items() if host in names}]
        seen = set(levels[0])
        while parents := {p for p, kids in children.items() if kids & levels[-1]} - seen:
            levels.append(parents)
            seen |= parents
        result = dict(group_vars.get("all", {}))
        for level in reversed(levels):
            for group in sorted(level):
                result.update(group_vars.get(group, {}))
        return result | hosts[host]

    return {name: merged(name) for name in hosts}


def resolve_host(host: str, inventory: Path | None, default_user: str) -> HostAddress:
    """The address of a node's host: its inventory entry if it has one, else the name itself."""
    host_vars: dict[str, str] = {}
    if inventory is not None:
        try:
            host_vars = _inventory(inventory, inventory.stat().st_mtime).get(host, {})
        except (OSError, ValueError) as exc:
            raise StepFailed("prepare", f"cannot read the inventory {inventory}: {exc}") from exc
    address = host_vars.get("ansible_host", host)
    _check("host address", address, events.HOST)
    port_text = host_vars.get("ansible_port", "22")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise StepFailed("prepare", f"inventory port {port_text!r} of {host} is not a port")
    user = host_vars.get("ansible_user", default_user)
    _check("user", user, r"^[a-z_][a-z0-9_-]{0,31}$")
    return HostAddress(name=host, address=address, port=int(port_text), user=user)


# --- what a host runs, and the status that follows -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """What a driver found on the host."""

    history: list[str]
    running: list[str]
    current_link: str | None
    healthy: bool | None


def finished(
    context: ExecutionContext, state: NodeState, *, history: list[str], step: str = "", error: str = ""
) -> NodeStatus:
    """The executor's result: versions from the host's history, the error as "<step>: <message>"."""
    return context.current.model_copy(
        update={
            "state": state,
            "current_version": history[-1] if history else None,
            "prev_version": history[-2] if len(history) > 1 else None,
            "deploying_version": context.target_version if state == NodeState.FAILED else None,
            "last_error": f"{step}: {error}" if step else error,
        }
    )


def recorded_history(context: ExecutionContext) -> list[str]:
    """The history the record knows, for failures before the host could be read."""
    current = context.current
    return [v for v in (current.prev_version, current.current_version) if v is not None]


def judge(context: ExecutionContext, probe: Probe) -> NodeStatus:
    """The node's status from a probe: success, pending, or failed with the drift from the record spelled out."""
    layout = Layout(context.service)
    host_current = probe.history[-1] if probe.history else None
    if host_current is None and not probe.running:
        return finished(context, NodeState.PENDING, history=[])
    problems = []
    record = context.current.current_version
    if record is not None and record != host_current:
        problems.append(f"the record says {record} but the host's state file says {host_current or 'nothing'}")
    if probe.running != ([host_current] if host_current else []):
        running = ", ".join(layout.unit(v) for v in probe.running) or "nothing"
        problems.append(f"{host_current} should run but {running} does")
    expected_link = f"releases/{host_current}"
    if probe.current_link not in (expected_link, str(layout.release(host_current or ""))):
        problems.append(f"current points to {probe.current_link or 'nothing'}")
    if not problems and probe.healthy is False:
        problems.append("the health check fails")
    history = probe.history
    if len(probe.running) == 1 and probe.running[0] != host_current:
        history = [*probe.history, probe.running[0]]  # report what actually runs
    if problems:
        return finished(context, NodeState.FAILED, history=history, step="drift", error="; ".join(problems))
    return finished(context, NodeState.SUCCESS, history=history)


def physical_executor(context: ExecutionContext) -> Executor:
    """The `physical` platform's entry point: the driver the settings name."""
    driver = context.settings.physical_driver
    if driver == "ssh":
        from reactor.executors.ssh import SshExecutor  # noqa: PLC0415 (each driver pulls in its own libraries)

        return SshExecutor(context)
    if driver == "ansible":
        from reactor.executors.ansible import AnsibleExecutor  # noqa: PLC0415 (as above)

        return AnsibleExecutor(context)
    raise ExecutorNotFound(f"no physical driver {driver!r} (ssh or ansible)")
