"""The `physical` platform through Ansible: playbooks/deploy.yml, rollback.yml and status.yml via ansible-runner.

Requests for the same change (same playbook and variables) that arrive within BATCH_WINDOW_S are coalesced
into one ansible-playbook run with one fork per host, as an operator would run it; each request gets its
own host's result back. The run happens in ansible-runner's thread: the event loop is never blocked.
Per-task events name the failed step: every task is called "<step>: <what it does>", and the playbook's
final report carries "<step>: <message>" as the reactor's executors do.

Hosts are found as the ssh driver finds them (hostcontract.resolve_host) and passed in a generated
inventory, with host keys checked against `physical_known_hosts` (StrictHostKeyChecking=yes).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from reactor import logs
from reactor.domain.status import NodeState, NodeStatus
from reactor.errors import StepFailed
from reactor.executors.hostcontract import (
    HostAddress,
    Probe,
    finished,
    health_spec,
    judge,
    recorded_history,
    resolve_host,
    validate,
)
from reactor.ports import ExecutionContext, ExecutorSettings
from reactor.trust.keys import private_file_problem

log = logs.get_logger(__name__)

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
# Long enough for the commands of one pacer window to arrive, short next to a playbook run.
BATCH_WINDOW_S = 0.2
REPORT_TASK = "report: the outcome"
_STEP = re.compile(r"^([a-z][a-z0-9_-]{0,31}): (.*)$", re.DOTALL)

Operation = Literal["deploy", "rollback", "status"]


@dataclass
class HostResult:
    """What one run said about one host."""

    report: dict[str, Any] | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (task name, message)
    unreachable: tuple[str, str] | None = None
    run_error: str = ""
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step, from the task events


@dataclass
class _Run:
    """One ansible-playbook run being collected: its request and the hosts waiting for it."""

    operation: Operation
    extravars: dict[str, str]
    settings: ExecutorSettings
    waiting: dict[str, tuple[HostAddress, asyncio.Future[HostResult]]] = field(default_factory=dict)


class _Coalescer:
    """Collects requests for the same change for BATCH_WINDOW_S, then runs them as one playbook run."""

    def __init__(self) -> None:
        self.open: dict[tuple[object, ...], _Run] = {}
        self.running: set[asyncio.Task[None]] = set()

    async def submit(
        self, operation: Operation, extravars: dict[str, str], settings: ExecutorSettings, address: HostAddress
    ) -> HostResult:
        loop = asyncio.get_running_loop()
        key = (operation, json.dumps(extravars, sort_keys=True), settings)
        run = self.open.get(key)
        if run is None or address.name in run.waiting:
            run = _Run(operation, extravars, settings)
            self.open[key] = run
            loop.call_later(BATCH_WINDOW_S, self._launch, key, run)
        future: asyncio.Future[HostResult] = loop.create_future()
        run.waiting[address.name] = (address, future)
        # A cancelled caller leaves the run going: the other hosts in it still need their results.
        return await asyncio.shield(future)

    def _launch(self, key: tuple[object, ...], run: _Run) -> None:
        if self.open.get(key) is run:
            del self.open[key]
        task = asyncio.get_running_loop().create_task(self._execute(run))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _execute(self, run: _Run) -> None:
        addresses = [address for address, _ in run.waiting.values()]
        try:
            results = await run_playbook(run.operation, run.extravars, addresses, run.settings)
        except Exception as exc:  # every waiting request must get an answer, whatever went wrong
            log.exception("ansible run failed")
            results = {a.name: HostResult(run_error=f"{type(exc).__name__}: {exc}") for a in addresses}
        for name, (_, future) in run.waiting.items():
            if not future.done():
                future.set_result(results.get(name, HostResult(run_error="the run said nothing about this host")))


_coalescers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Coalescer] = weakref.WeakKeyDictionary()


def _coalescer() -> _Coalescer:
    loop = asyncio.get_running_loop()
    if loop not in _coalescers:
        _coalescers[loop] = _Coalescer()
    return _coalescers[loop]


class AnsibleExecutor:
    """Executor for `physical/<host>/<service>` nodes through the project's playbooks."""

    platform: ClassVar[str] = "physical"

    def __init__(self, context: ExecutionContext) -> None:
        self.context = context
        self.settings = context.settings
        self.step_times: dict[str, float] = {}  # seconds per step on the host, for benchmarks and logs

    async def deploy(self) -> NodeStatus:
        """deploy.yml on the node's host."""
        return await self._change("deploy", NodeState.SUCCESS)

    async def rollback(self) -> NodeStatus:
        """rollback.yml on the node's host, to the target (previous) version."""
        return await self._change("rollback", NodeState.ROLLED_BACK)

    async def status(self) -> NodeStatus:
        """status.yml on the node's host, then the same drift judgement as the ssh driver."""
        context = self.context
        try:
            validate(context, "status")
            address = resolve_host(context.host, self.settings.physical_inventory, self.settings.physical_user)
        except StepFailed as exc:
            return finished(
                context, NodeState.FAILED, history=recorded_history(context), step=exc.step, error=exc.message
            )
        result = await _coalescer().submit("status", {"service": context.service}, self.settings, address)
        report = result.report
        if report is None:
            step, message = _failure(result, address, "status")
            return finished(context, NodeState.FAILED, history=recorded_history(context), step=step, error=message)
        healthy = report.get("healthy")
        probe = Probe(
            history=_strings(report.get("history")),
            running=_strings(report.get("running")),
            current_link=str(report.get("link") or "") or None,
            healthy=None if healthy is None else bool(healthy),
        )
        return judge(context, probe)

    async def _change(self, operation: Literal["deploy", "rollback"], success: NodeState) -> NodeStatus:
        context = self.context
        history = recorded_history(context)
        try:
            validate(context, operation)
            address = resolve_host(context.host, self.settings.physical_inventory, self.settings.physical_user)
        except StepFailed as exc:
            return finished(context, NodeState.FAILED, history=history, step=exc.step, error=exc.message)
        result = await _coalescer().submit(operation, self._extravars(), self.settings, address)
        self.step_times = dict(result.steps)
        report = result.report
        if report is None:
            step, message = _failure(result, address, operation)
            return finished(context, NodeState.FAILED, history=history, step=step, error=message)
        history = _strings(report.get("history"))
        error = str(report.get("error") or "")
        if error:
            step, message = _split(error, operation)
            return finished(context, NodeState.FAILED, history=history, step=step, error=message)
        return finished(context, success, history=history)

    def _extravars(self) -> dict[str, str]:
        context = self.context
        spec = health_spec(context)
        extravars = {
            "service": context.service,
            "version": str(context.target_version),
            "service_port": "" if context.port is None else str(context.port),
            "health_kind": "tcp" if spec.kind == "tcp" else "http",
            "health_path": spec.path,
            "health_timeout": f"{spec.timeout_s:g}",
        }
        if context.package is not None:
            extravars["package_url"] = context.package.url
            extravars["package_sha256"] = context.package.sha256
        return extravars


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _split(text: str, default_step: str) -> tuple[str, str]:
    match = _STEP.match(text)
    return (match.group(1), match.group(2)) if match else (default_step, text or "failed without a message")


def _failure(result: HostResult, address: HostAddress, operation: str) -> tuple[str, str]:
    """The step and message of a host that produced no report."""
    where = f"{address.name} ({address.address})"
    if result.unreachable is not None:
        task, message = result.unreachable
        step = _split(task, "connect")[0]
        # Nothing changes before the first probe answers: unreachable there means "could not connect".
        return ("connect" if step == "probe" else step), f"{where} unreachable: {message}"
    if result.failures:
        task, message = result.failures[0]
        return _split(task, operation)[0], message
    return "ansible", result.run_error or f"ansible-playbook gave no result for {where}"


def _message(res: Mapping[str, Any]) -> str:
    """A failed task's message (the first failed item's, for loops)."""
    for item in res.get("results") or []:
        if isinstance(item, Mapping) and item.get("failed") and item.get("msg"):
            return str(item["msg"])
    text = str(res.get("msg") or "").strip()
    stderr = str(res.get("stderr") or "").strip()
    return f"{text}: {stderr}" if text and stderr else text or stderr or "failed without a message"


def _inventory(addresses: list[HostAddress], settings: ExecutorSettings) -> dict[str, Any]:
    ssh_args = ["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
    if settings.physical_known_hosts is not None:
        ssh_args += ["-o", f"UserKnownHostsFile={settings.physical_known_hosts}"]
    if settings.physical_private_key is not None:
        ssh_args += ["-o", "IdentitiesOnly=yes"]
    hosts: dict[str, dict[str, object]] = {}
    for address in addresses:
        host_vars: dict[str, object] = {
            "ansible_host": address.address,
            "ansible_port": address.port,
            "ansible_user": address.user,
            "ansible_ssh_common_args": shlex.join(ssh_args),
        }
        if settings.physical_private_key is not None:
            host_vars["ansible_ssh_private_key_file"] = str(settings.physical_private_key)
        hosts[address.name] = host_vars
    return {"all": {"hosts": hosts}}


def _control_path_dir(settings: ExecutorSettings) -> str:
    """ssh master connections per trust settings: a master opened under one known_hosts never serves another."""
    trust = f"{settings.physical_known_hosts}\0{settings.physical_private_key}\0{settings.physical_user}"
    return str(Path.home() / ".ansible" / f"cp-{hashlib.sha256(trust.encode()).hexdigest()[:12]}")


def _search_path() -> str:
    """PATH with this interpreter's bin folder first: ansible-playbook is installed beside it."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


class _Collector:
    """Per-host results from ansible-runner's events (called in the runner's thread)."""

    def __init__(self, addresses: list[HostAddress]) -> None:
        self.results = {address.name: HostResult() for address in addresses}
        self.lock = threading.Lock()

    def on_event(self, event: dict[str, Any]) -> bool:
        data = event.get("event_data") or {}
        task = str(data.get("task") or "")
        res = data.get("res") or {}
        kind = event.get("event")
        with self.lock:
            result = self.results.get(str(data.get("host")))
            if result is None:
                return False
            if isinstance(data.get("duration"), int | float):
                step = _split(task, "ansible")[0] if ":" in task else "ansible"
                result.steps[step] = result.steps.get(step, 0.0) + float(data["duration"])
            if kind == "runner_on_ok" and task == REPORT_TASK and isinstance(res.get("msg"), dict):
                result.report = dict(res["msg"])
            elif kind == "runner_on_failed" and not data.get("ignore_errors"):
                result.failures.append((task, _message(res)))
            elif kind == "runner_on_unreachable":
                result.unreachable = (task, _message(res))
        return False  # no per-event files in the artifacts


def _runner_options(
    operation: Operation,
    extravars: dict[str, str],
    addresses: list[HostAddress],
    settings: ExecutorSettings,
    private: Path,
) -> dict[str, Any]:
    if settings.physical_private_key is not None:
        problem = private_file_problem(settings.physical_private_key, "SSH private key")
        if problem is not None:
            raise StepFailed("connect", f"{settings.physical_private_key}: {problem}")
    inventory = private / "inventory.json"
    inventory.write_text(json.dumps(_inventory(addresses, settings)))
    return {
        "private_data_dir": str(private),
        "project_dir": str(PLAYBOOKS),
        "playbook": f"{operation}.yml",
        "inventory": str(inventory),
        "extravars": extravars,
        "limit": ",".join(a.name for a in addresses),
        "forks": max(1, min(len(addresses), settings.physical_concurrency)),
        "envvars": {
            "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"),
            "ANSIBLE_TIMEOUT": str(max(1, int(settings.physical_connect_timeout_s))),
            "ANSIBLE_NOCOLOR": "1",
            # ansible-runner turns host key checking off unless this is set: keep it on.
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": _control_path_dir(settings),
            "PATH": _search_path(),
        },
        # A backstop only: dead links are noticed by ssh keepalives, slow steps by their own timeouts.
        "timeout": int(settings.physical_command_timeout_s * 5 + float(extravars.get("health_timeout", "0")) * 2),
        "quiet": True,
    }


async def run_playbook(
    operation: Operation, extravars: dict[str, str], addresses: list[HostAddress], settings: ExecutorSettings
) -> dict[str, HostResult]:
    """Run playbooks/<operation>.yml on `addresses` with `extravars`; each host's result by host name."""
    import ansible_runner  # type: ignore[import-untyped]  # noqa: PLC0415 (only the ansible driver needs it)

    if not (PLAYBOOKS / f"{operation}.yml").exists():
        raise StepFailed("prepare", f"no playbook {operation}.yml in {PLAYBOOKS}")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    cancelled = threading.Event()
    collector = _Collector(addresses)

    def settle(status: str) -> None:
        if not done.done():
            done.set_result(status)

    def on_finished(runner: Any) -> None:
        loop.call_soon_threadsafe(settle, str(runner.status))

    private = Path(tempfile.mkdtemp(prefix="reactor-ansible-"))
    try:
        options = await asyncio.to_thread(_runner_options, operation, extravars, addresses, settings, private)
        thread, runner = await asyncio.to_thread(
            lambda: ansible_runner.run_async(
                **options,
                event_handler=collector.on_event,
                finished_callback=on_finished,
                cancel_callback=cancelled.is_set,  # also keeps ansible-runner off our signal handlers
            )
        )
        try:
            status = await done
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            await asyncio.to_thread(thread.join)
        results = collector.results
        silent = [r for r in results.values() if r.report is None and not r.failures and r.unreachable is None]
        if silent:
            tail = _stdout_tail(runner)
            for result in silent:
                result.run_error = f"ansible-playbook ended {status} without a result for the host: {tail}"
        log.info("ansible run finished", operation=operation, hosts=len(addresses), status=status)
        return results
    finally:
        await asyncio.to_thread(shutil.rmtree, private, True)


def _stdout_tail(runner: Any) -> str:
    from ansible_runner.exceptions import AnsibleRunnerException  # type: ignore[import-untyped]  # noqa: PLC0415

    try:
        with runner.stdout as handle:
            text = str(handle.read())
    except (AnsibleRunnerException, OSError, ValueError):
        return "(no output)"
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-5:]) or "(no output)"
