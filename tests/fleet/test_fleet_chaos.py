"""Chaos on fleet hosts (the chaos tier's fleet half; in tests/fleet so that it runs after the harness's own fleet
test, which needs the machine's one fleet free): one powered off during its deploy, another's cable pulled while it
switches versions.

Real Kafka, FerretDB and `reactor worker --role all` processes drive the ssh driver against three nspawn hosts
booting systemd. Release 1 puts 1.0.0 on all three; release 2 (2.0.0, two failures tolerated) starts on all
three at once, and each 2.0.0 holds at its start until the test opens its gate. Once every host has stopped 1.0.0
and started 2.0.0 (the switch is under way): host A is powered off, host B's cable is pulled (its gate opened, so
2.0.0 comes up there with nobody watching), host C's gate opens. The reactor fails A and B, tries to roll them back
while they are still gone, and completes the release within its budget. Then A is booted, B's cable plugged back.

Judged from the hosts' journals (tests/chaos/journal.py), their ports and the topics, never from the store:
- right after power-on / heal, each host runs exactly one `<service>@<version>` (A the 1.0.0 it was running when
  it lost power, B the 2.0.0 it started) and the driver's `status` reports exactly what answers on the port;
- no two versions of the service ever ran at once on a host, across boots;
- a version started on a host at most once more than the faults that hit it;
- every request has one outcome; the release completes as its plan says;
- after the operator rolls B back (`reactor rollback`), every host serves what its final outcome says.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import decode
from reactor.demo import build_package
from reactor.domain.status import NodeState, NodeStatus
from reactor.events import (
    AutoRollback,
    Event,
    HealthCheck,
    NodeFailed,
    NodeTarget,
    Package,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePlan,
    ReleaseRequested,
    RollbackFailed,
    Strategy,
    Topic,
)
from reactor.executors.hostcontract import physical_executor
from reactor.ports import ExecutionContext
from tests.chaos import journal, judge
from tests.fleet.conftest import settings_for, wipe
from tests.infra.fleet import Fleet
from tests.workers import worker_group

pytestmark = [pytest.mark.chaos, pytest.mark.fleet, pytest.mark.kafka, pytest.mark.mongo]

SERVICE = "chaosfleet"
PORT = 21900
VERSIONS = ("1.0.0", "2.0.0")
HEALTH_TIMEOUT_S = 240.0  # 2.0.0 waits at its gate through the faults
WAIT_S = 240.0


def gate(version: str) -> str:
    return f"/var/tmp/{SERVICE}-gate-{version}"  # noqa: S108 (a path on the test host, which the test owns)


def started(version: str) -> str:
    return f"/var/tmp/{SERVICE}-started-{version}"  # noqa: S108 (as above)


RUN = (
    "#!/bin/sh\n"
    'v=$(cat "$(dirname "$0")/VERSION")\n'
    f'touch "/var/tmp/{SERVICE}-started-$v"\n'
    f'while [ ! -e "/var/tmp/{SERVICE}-gate-$v" ]; do sleep 0.2; done\n'
    'exec python3 "$(dirname "$0")/app.py"\n'
).encode()


class Hosts:
    """The three hosts of the scenario, looked at through their disks (mounted here) and ssh."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.names = [host.name for host in fleet.hosts[:3]]
        self.off, self.cut, self.calm = self.names
        self.since = int(time.time()) - 1  # the journal is read from here on: earlier runs left theirs

    def key(self, host: str) -> str:
        return f"physical/{host}/{SERVICE}"

    def file(self, host: str, remote: str) -> Path:
        return self.fleet.host(host).root / remote.lstrip("/")

    def open_gate(self, host: str, version: str) -> None:
        self.file(host, gate(version)).touch()

    def has_started(self, host: str, version: str) -> bool:
        return self.file(host, started(version)).exists()

    def active(self, host: str) -> list[str]:
        listed = self.fleet.ssh(host, f"systemctl list-units --plain --no-legend --state=active '{SERVICE}@*'")
        return sorted(line.split()[0] for line in listed.splitlines() if line.strip())

    def served(self, host: str) -> str | None:
        for _ in range(3):
            answer = self.fleet.ssh(host, f"curl -fsS --max-time 3 http://127.0.0.1:{PORT}/version", check=False)
            if answer.strip():
                return answer.strip()
            time.sleep(0.5)
        return None

    def journal(self, host: str) -> list[journal.Span]:
        text = self.fleet.ssh(host, f"journalctl -o json --no-pager --since @{self.since} -u '{SERVICE}@*'", timeout=60)
        return journal.spans(journal.entries(text), SERVICE)


@pytest.fixture
def hosts(fleet: Fleet) -> Iterator[Hosts]:
    """The hosts, the service wiped before and after; whatever happened, they end booted and connected."""
    found = Hosts(fleet)
    wipe(fleet, SERVICE, found.names)
    clean = f"rm -f /var/tmp/{SERVICE}-*"
    for host in found.names:
        fleet.ssh(host, clean)
    try:
        yield found
    finally:
        with contextlib.suppress(Exception):
            fleet.boot(found.off)
        with contextlib.suppress(Exception):
            fleet.heal(found.cut)
        wipe(fleet, SERVICE, found.names)
        for host in found.names:
            fleet.ssh(host, clean, check=False)


async def waiting(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting until {what}")
        await asyncio.sleep(0.2)


def known(status: NodeStatus | None) -> NodeStatus:
    assert status is not None, "the store has no record of a node the releases touched"
    return status


def decoded(records: list[Any]) -> list[Event]:
    return [decode(record)[0] for record in records]


@pytest.mark.timeout(900)
async def test_a_host_powered_off_and_one_cut_off_while_switching_end_with_one_release_running_and_the_truth_told(
    fleet: Fleet, hosts: Hosts, kafka_bootstrap: str, mongo_url: str, tmp_path: Path
) -> None:
    """See the module's docstring: power-off during the deploy, cable pulled during the switch, judged from the
    journals, the ports and the topics."""
    dist = fleet.package_dir / f"chaos-{uuid4().hex[:8]}"
    packages = {version: build_package(dist, version, run=RUN) for version in VERSIONS}

    def plan(version: str, budget: int) -> ReleasePlan:
        package = packages[version]
        url = fleet.package_url + package.path.relative_to(fleet.package_dir).as_posix()
        return ReleasePlan(
            release_id=f"{SERVICE}-{version}-{uuid4().hex[:6]}",
            service=SERVICE,
            version=version,
            package=Package(url=url, sha256=package.sha256),
            health=HealthCheck(timeout_s=HEALTH_TIMEOUT_S),
            nodes=[NodeTarget(node_key=hosts.key(host), port=PORT) for host in hosts.names],
            strategy=Strategy(max_parallel=3, failure_budget=budget, auto_rollback=AutoRollback.NODE),
        )

    first, second = plan("1.0.0", 0), plan("2.0.0", 2)
    for host in hosts.names:
        hosts.open_gate(host, "1.0.0")
    database = f"chaosfleet_{uuid4().hex[:12]}"
    settings = settings_for(fleet, "ssh")
    with worker_group(kafka_bootstrap, mongo_url, database, tmp_path) as workers:
        workers.env.update(
            {
                "REACTOR_PHYSICAL_DRIVER": "ssh",
                "REACTOR_PHYSICAL_INVENTORY": str(fleet.inventory),
                "REACTOR_PHYSICAL_KNOWN_HOSTS": str(fleet.known_hosts),
                "REACTOR_PHYSICAL_PRIVATE_KEY": str(fleet.private_key),
                "REACTOR_PHYSICAL_CONNECT_TIMEOUT_S": "5",
                "REACTOR_PHYSICAL_COMMAND_TIMEOUT_S": "60",
                "REACTOR_LEASE_S": "10",
            }
        )
        async with (
            KafkaBus(kafka_bootstrap, prefix=workers.env["REACTOR_TOPIC_PREFIX"]) as bus,
            MongoStore(mongo_url, database=database) as store,
        ):
            await bus.create_topics(partitions=4)
            workers.start()
            workers.start()

            async def outcomes() -> list[Event]:
                return decoded(await bus.history(Topic.OUTCOMES))

            async def ended(release_id: str) -> list[ReleaseCompleted | ReleaseHalted]:
                """Wait until the release's end is on the releases topic; its end events."""
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline:
                    found = [
                        event
                        for event in decoded(await bus.history(Topic.RELEASES))
                        if isinstance(event, ReleaseCompleted | ReleaseHalted) and event.release_id == release_id
                    ]
                    if found:
                        return found
                    await asyncio.sleep(0.5)
                pytest.fail(f"release {release_id} did not end within {WAIT_S:g}s")

            await bus.publish(ReleaseRequested(release_id=first.release_id, plan=first, actor="chaos"))
            assert [type(event) for event in await ended(first.release_id)] == [ReleaseCompleted]
            assert [hosts.served(host) for host in hosts.names] == ["1.0.0"] * 3

            await bus.publish(ReleaseRequested(release_id=second.release_id, plan=second, actor="chaos"))
            await waiting(
                lambda: all(hosts.has_started(host, "2.0.0") for host in hosts.names),
                "2.0.0 started on every host (1.0.0 stopped: the switch is under way)",
            )
            await asyncio.to_thread(fleet.power_off, hosts.off)
            fleet.cut(hosts.cut)
            hosts.open_gate(hosts.cut, "2.0.0")  # on its disk: 2.0.0 comes up there while nobody can see it
            hosts.open_gate(hosts.calm, "2.0.0")

            gone = {hosts.key(hosts.off), hosts.key(hosts.cut)}
            deadline = time.monotonic() + WAIT_S
            while {e.node_key for e in await outcomes() if isinstance(e, RollbackFailed)} != gone:
                assert time.monotonic() < deadline, f"no failed rollback of both {gone}: {await outcomes()}"
                await asyncio.sleep(0.5)
            ends = await ended(second.release_id)

            await asyncio.to_thread(fleet.boot, hosts.off)
            fleet.heal(hosts.cut)
            await waiting(lambda: hosts.served(hosts.cut) is not None, "the cut host answers again", 60)

            # Right after power-on and heal, before anyone repairs anything.
            after = {host: hosts.active(host) for host in hosts.names}
            served = {host: hosts.served(host) for host in hosts.names}
            records = {host: await store.get_node(hosts.key(host)) for host in hosts.names}
            probed = {}
            for host in hosts.names:
                context = ExecutionContext(
                    node_key=hosts.key(host),
                    service=SERVICE,
                    host=host,
                    current=known(records[host]),
                    target_version=None,
                    port=PORT,
                    health=HealthCheck(timeout_s=30),
                    settings=settings,
                )
                probed[host] = await physical_executor(context).status()

            # The operator puts B back on the release its record names.
            repair = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "reactor.cli.main", "rollback", hosts.key(hosts.cut), "--to-version", "1.0.0"],
                env=workers.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert repair.returncode == 0, repair.stderr
            await waiting(lambda: hosts.served(hosts.cut) == "1.0.0", "the operator's rollback of B is done", 120)
            told = await outcomes()
            deadline = time.monotonic() + 60
            while judge.not_one_outcome_per_request(decoded(await bus.history(Topic.COMMANDS)), told):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.5)
                told = await outcomes()
            commands = decoded(await bus.history(Topic.COMMANDS))
            dead_letters = len(await bus.history(Topic.DLQ))

    problems = judged(hosts, after, served, probed)
    problems += judge.not_one_outcome_per_request(commands, told)
    final = judge.final_outcomes(told)
    for host in hosts.names:
        outcome = final.get(hosts.key(host))
        said = judge.told_version(outcome) if outcome is not None else None
        if hosts.served(host) != said:
            problems.append(f"{host} serves {hosts.served(host)!r}; its final outcome {outcome!r} says {said!r}")
    failed = {e.node_key for e in told if isinstance(e, NodeFailed) and e.release_id == second.release_id}
    if failed != gone:
        problems.append(f"release 2 failed {sorted(failed)}, expected {sorted(gone)}")
    if [type(event) for event in ends] != [ReleaseCompleted]:
        problems.append(f"release 2 ended with {ends}, expected one ReleaseCompleted (2 failures are within budget)")
    if dead_letters:
        problems.append(f"dlq: {dead_letters} dead letters, none injected")
    assert not problems, "\n".join(problems)


def judged(
    hosts: Hosts, after: dict[str, list[str]], served: dict[str, str | None], probed: dict[str, NodeStatus]
) -> list[str]:
    """What the hosts show: one release running after power-on/heal, a truthful status, the journal's runs."""
    problems: list[str] = []
    unit = {version: f"{SERVICE}@{version}.service" for version in VERSIONS}
    expected_after = {hosts.off: [unit["1.0.0"]], hosts.cut: [unit["2.0.0"]], hosts.calm: [unit["2.0.0"]]}
    for host in hosts.names:
        if after[host] != expected_after[host]:
            problems.append(f"after power-on/heal {host} runs {after[host]}, expected {expected_after[host]}")
        probe = probed[host]
        if served[host] is None and "nothing does" not in probe.last_error:
            problems.append(f"status of {host} does not say nothing runs: {probe.state} {probe.last_error!r}")
        elif served[host] is not None and probe.current_version != served[host]:
            problems.append(f"status of {host} says {probe.current_version!r}; its port answers {served[host]!r}")
        # B runs 2.0.0 while its record and state file say 1.0.0: the truth is drift.
        truthful = NodeState.FAILED if host == hosts.cut else NodeState.SUCCESS
        if probe.state != truthful:
            problems.append(f"status of {host} is {probe.state} ({probe.last_error!r}), expected {truthful}")

    interruptions = {hosts.off: 1, hosts.cut: 1, hosts.calm: 0}
    for host in hosts.names:
        spans = hosts.journal(host)
        if not spans:
            problems.append(f"journal of {host}: no run of {SERVICE} at all")
        for first_span, second_span in journal.overlaps(spans):
            problems.append(f"journal of {host}: {first_span} and {second_span} ran at once")
        for version, count in journal.starts(spans).items():
            allowed = 1 + interruptions[host]
            if count > allowed:
                problems.append(f"journal of {host}: {version} started {count} times, at most {allowed} allowed")
    return problems
