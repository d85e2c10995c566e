"""One release of the example service to N test hosts in one batch, three ways, measured in the same run.

    python bench/fleet.py [--hosts 20] [--rounds 3]

1. raw `ansible-playbook -f N playbooks/deploy.yml` (the project's playbook, by hand, no reactor);
2. the reactor (embedded mode: pacer, executor worker, rollback consumer) with the ansible driver;
3. the reactor with the ssh driver.
Each way deploys a service of its own (a first deploy: download, verify, unpack, unit, start, health, switch)
to every host, checks every host serves it, and is timed from the request to the last host done.
Targets: ssh driver >= 5x faster than raw ansible-playbook; reactor+ansible within 1.1x of it.
Per-host step times come from the drivers (and the junit callback of ansible-core for the raw run).
Uses the fleet in $REACTOR_FLEET_DIR when it has enough hosts, else boots one with the test harness (root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reactor import logs
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.demo import build_package
from reactor.domain.pacer import ReleaseState
from reactor.events import HealthCheck, NodeTarget, Package, ReleasePlan, ReleaseRequested, Strategy
from reactor.executors import ansible as ansible_driver
from reactor.executors.hostcontract import physical_executor
from reactor.ports import ExecutionContext, Executor, ExecutorSettings
from reactor.runtime import Backends, Role, run_roles, tune_gc
from reactor.settings import Settings
from tests.infra import fleet as fleet_harness
from tests.infra.fleet import Fleet

PLAYBOOKS = Path(__file__).resolve().parents[1] / "playbooks"
VERSION = "1.0.0"
PORT = 18500
STEP_ORDER = [
    "connect",
    "prepare",
    "probe",
    "install",
    "verify",
    "download",
    "unpack",
    "stop",
    "start",
    "health",
    "switch",
    "report",
    "ansible",
]

StepTimes = dict[str, dict[str, float]]  # host -> step -> seconds


@contextlib.contextmanager
def fleet_of(hosts: int) -> Iterator[Fleet]:
    """$REACTOR_FLEET_DIR if it has `hosts` hosts, else a fleet booted for this run."""
    if directory := os.environ.get("REACTOR_FLEET_DIR"):
        running = Fleet.load(Path(directory))
        if len(running.hosts) >= hosts:
            yield running
            return
        print(f"$REACTOR_FLEET_DIR has {len(running.hosts)} hosts, {hosts} wanted: booting a fleet", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-")) / "fleet"
    service = fleet_harness.start_fleet(workdir, hosts, owned=True)
    try:
        yield Fleet.load(workdir)
    finally:
        service.stop()
        shutil.rmtree(workdir.parent, ignore_errors=True)


def on_hosts(fleet: Fleet, hosts: list[str], command: str) -> list[str]:
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        return list(pool.map(lambda host: fleet.ssh(host, command, check=False).strip(), hosts))


def wipe(fleet: Fleet, hosts: list[str], service: str) -> None:
    on_hosts(
        fleet,
        hosts,
        f"systemctl disable --now '{service}@*' >/dev/null 2>&1; rm -rf /opt/{service} "
        f"/etc/systemd/system/{service}@.service; systemctl daemon-reload; systemctl reset-failed",
    )


def check_served(fleet: Fleet, hosts: list[str], port: int, way: str, version: str = VERSION) -> None:
    served = on_hosts(fleet, hosts, f"curl -fsS --max-time 3 http://127.0.0.1:{port}/version")
    wrong = {host: text for host, text in zip(hosts, served, strict=True) if text != version}
    if wrong:
        raise SystemExit(f"{way}: hosts not serving {version}: {wrong}")


def raw_ansible(fleet: Fleet, hosts: list[str], service: str, port: int, package: Package) -> tuple[float, StepTimes]:
    """ansible-playbook as an operator runs it; per-host task times from ansible-core's junit callback."""
    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        extravars = Path(tmp) / "vars.json"
        extravars.write_text(
            json.dumps(
                {
                    "service": service,
                    "version": VERSION,
                    "service_port": str(port),
                    "package_url": package.url,
                    "package_sha256": package.sha256,
                    "health_timeout": "30",
                }
            )
        )
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(Path(tmp) / "cp"),  # no master connections from earlier runs
            "ANSIBLE_CALLBACKS_ENABLED": "junit",
            "JUNIT_OUTPUT_DIR": str(Path(tmp) / "junit"),
            "JUNIT_TASK_CLASS": "yes",
        }
        command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(fleet.inventory)]
        command += ["-f", str(len(hosts)), "-l", ",".join(hosts), "-e", f"@{extravars}", str(PLAYBOOKS / "deploy.yml")]
        started = time.monotonic()
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            raise SystemExit(f"raw ansible-playbook failed:\n{result.stdout[-3000:]}")
        steps: StepTimes = defaultdict(lambda: defaultdict(float))
        for report in (Path(tmp) / "junit").glob("*.xml"):
            for case in ET.parse(report).iter("testcase"):  # noqa: S314 (our own run's file)
                name = case.get("name", "")
                if not name.startswith("[") or "]" not in name:
                    continue
                host, _, rest = name[1:].partition("]")
                task = rest.split(" : ", 1)[-1]
                step = task.split(":", 1)[0] if ":" in task else "ansible"
                steps[host][step] += float(case.get("time", "0"))
    return elapsed, steps


async def through_reactor(
    fleet: Fleet, hosts: list[str], driver: str, service: str, port: int, package: Package, state_dir: Path
) -> tuple[float, StepTimes]:
    """One ReleaseRequested for every host in one batch, through the embedded reactor."""
    executors: dict[str, Executor] = {}

    def capture(context: ExecutionContext) -> Executor:
        executor = physical_executor(context)
        executors[context.host] = executor
        return executor

    settings = Settings(
        state_dir=state_dir,
        physical_driver=driver,
        physical_inventory=fleet.inventory,
        physical_known_hosts=fleet.known_hosts,
        physical_private_key=fleet.private_key,
        resend_after_s=900.0,
    )
    plan = ReleasePlan(
        release_id=f"bench-{service}",
        service=service,
        version=VERSION,
        package=package,
        health=HealthCheck(timeout_s=30),
        nodes=[NodeTarget(node_key=f"physical/{host}/{service}", port=port) for host in hosts],
        strategy=Strategy(batches=["100%"], max_parallel=len(hosts)),
    )
    async with EmbeddedStore(":memory:") as store:
        bus = MemoryBus()
        started_roles = asyncio.Event()
        task = asyncio.create_task(
            run_roles(
                Backends(bus=bus, store=store, memory_bus=bus),
                settings,
                {Role.ALL},
                factories={"physical": capture},
                started=started_roles,
            )
        )
        await started_roles.wait()
        started = time.monotonic()
        await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
        await bus.idle(timeout_s=900)
        elapsed = time.monotonic() - started
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        record = await store.get_release(plan.release_id)
    if record is None or record.state != ReleaseState.COMPLETED:
        raise SystemExit(f"reactor+{driver}: release did not complete: {record}")
    steps: StepTimes = {host: dict(getattr(executor, "step_times", {})) for host, executor in executors.items()}
    return elapsed, steps


def step_table(results: dict[str, StepTimes]) -> list[str]:
    """Median / max per step over hosts, one column per way."""
    ways = list(results)
    steps = sorted({s for way in ways for host in results[way].values() for s in host}, key=_step_rank)
    lines = [f"{'step':10}" + "".join(f"{way:>26}" for way in ways), f"{'':10}" + "   median / max (s)" * len(ways)]
    for step in steps:
        row = f"{step:10}"
        for way in ways:
            values = [host.get(step, 0.0) for host in results[way].values()]
            row += f"{statistics.median(values):>17.2f} / {max(values):5.2f}" if values else f"{'-':>26}"
        lines.append(row)
    return lines


def _step_rank(step: str) -> int:
    return STEP_ORDER.index(step) if step in STEP_ORDER else len(STEP_ORDER)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="each way this often, interleaved; medians reported")
    args = parser.parse_args()
    logs.configure("console", os.environ.get("BENCH_LOG_LEVEL", "warning"))
    tune_gc()  # the garbage collector as the `reactor` command sets it
    with fleet_of(args.hosts) as fleet:
        hosts = [host.name for host in fleet.hosts[: args.hosts]]
        built = build_package(fleet.package_dir / "bench", VERSION)
        package = Package(url=fleet.package_url + "bench/" + built.path.name, sha256=built.sha256)
        times: dict[str, list[float]] = defaultdict(list)
        steps: dict[str, StepTimes] = {}
        loads: list[float] = []
        for round_number in range(args.rounds):
            ways = ["raw ansible-playbook", "reactor + ansible", "reactor + ssh"]
            ways = ways[round_number % 3 :] + ways[: round_number % 3]  # no way always runs first
            for way in ways:
                index = ("raw ansible-playbook", "reactor + ansible", "reactor + ssh").index(way)
                service, port = f"bench-{round_number}-{index}", PORT + 10 * round_number + index
                wipe(fleet, hosts, service)
                if way == "reactor + ansible":  # no master connections left from an earlier run
                    control = Path(ansible_driver._control_path_dir(_settings_of(fleet)))
                    shutil.rmtree(control, ignore_errors=True)
                if way == "raw ansible-playbook":
                    elapsed, per_host = await asyncio.to_thread(raw_ansible, fleet, hosts, service, port, package)
                else:
                    with tempfile.TemporaryDirectory(prefix="bench-state-") as state:
                        driver = way.rsplit(" ", 1)[-1]
                        elapsed, per_host = await through_reactor(
                            fleet, hosts, driver, service, port, package, Path(state)
                        )
                check_served(fleet, hosts, port, way)
                wipe(fleet, hosts, service)
                times[way].append(elapsed)
                steps[way] = per_host
                load = os.getloadavg()[0]
                loads.append(load)
                print(
                    f"round {round_number + 1}: {way:22} {elapsed:7.2f} s (load {load:.1f})",
                    file=sys.stderr,
                    flush=True,
                )

    raw = statistics.median(times["raw ansible-playbook"])
    print(f"\nOne release of {VERSION} to {len(hosts)} hosts in one batch, {args.rounds} round(s), medians")
    print(f"(machine: {os.cpu_count()} cores, 1-min load average during the runs {min(loads):.1f}..{max(loads):.1f})")
    print(f"{'way':24}{'seconds':>10}{'vs raw':>10}   all rounds")
    for way, values in times.items():
        median = statistics.median(values)
        print(f"{way:24}{median:10.2f}{median / raw:9.2f}x   {' '.join(f'{v:.2f}' for v in values)}")
    ssh_speedup = raw / statistics.median(times["reactor + ssh"])
    ansible_ratio = statistics.median(times["reactor + ansible"]) / raw
    print(
        f"\nssh driver vs raw ansible-playbook: {ssh_speedup:.1f}x faster (target >= 5x: {_verdict(ssh_speedup >= 5)})"
    )
    verdict = _verdict(ansible_ratio <= 1.1)
    print(f"reactor+ansible vs raw ansible-playbook: {ansible_ratio:.2f}x (target <= 1.1x: {verdict})")
    print(f"\nPer-host step times, last round, over {len(hosts)} hosts:")
    print("\n".join(step_table(steps)))


def _settings_of(fleet: Fleet) -> ExecutorSettings:
    return ExecutorSettings(
        physical_driver="ansible",
        physical_inventory=fleet.inventory,
        physical_known_hosts=fleet.known_hosts,
        physical_private_key=fleet.private_key,
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    asyncio.run(main())
