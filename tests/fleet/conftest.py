"""Packages on the session fleet's package server (the `fleet` fixture is in tests/conftest.py, shared with the
chaos tier), and helpers to look at a host."""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from reactor.demo import build_package
from reactor.domain.status import NodeStatus, pending
from reactor.events import HealthCheck, Package
from reactor.executors.hostcontract import Layout, physical_executor
from reactor.ports import ExecutionContext, ExecutorSettings
from tests.infra.fleet import Fleet

DRIVERS = ["ssh", "ansible"]


@dataclass(frozen=True)
class Artifact:
    """A package on the fleet's package server."""

    version: str
    url: str
    sha256: str

    def package(self, sha256: str | None = None) -> Package:
        return Package(url=self.url, sha256=sha256 or self.sha256)


@pytest.fixture(scope="session")
def artifacts(fleet: Fleet) -> dict[str, Artifact]:
    """1.0.0, 1.1.0, 2.0.0 of the example service; `broken` 2.0.0 exits at once; `slow` 1.5.0 serves after 60 s."""

    def served(path: Path, version: str) -> Artifact:
        relative = path.relative_to(fleet.package_dir).as_posix()
        return Artifact(version, fleet.package_url + relative, hashlib.sha256(path.read_bytes()).hexdigest())

    built = {v: served(build_package(fleet.package_dir / "good", v).path, v) for v in ("1.0.0", "1.1.0", "2.0.0")}
    built["broken"] = served(build_package(fleet.package_dir / "broken", "2.0.0", broken=True).path, "2.0.0")
    slow = b'#!/bin/sh\nsleep 60\nexec python3 "$(dirname "$0")/app.py"\n'
    built["slow"] = served(build_package(fleet.package_dir / "slow", "1.5.0", run=slow).path, "1.5.0")
    return built


def settings_for(fleet: Fleet, driver: str, **overrides: object) -> ExecutorSettings:
    """Executor settings that reach the fleet's hosts with `driver`."""
    values: dict[str, object] = {
        "physical_driver": driver,
        "physical_inventory": fleet.inventory,
        "physical_known_hosts": fleet.known_hosts,
        "physical_private_key": fleet.private_key,
        "physical_connect_timeout_s": 5.0,
        "physical_command_timeout_s": 60.0,
    }
    values.update(overrides)
    return ExecutorSettings(**values)  # type: ignore[arg-type]


class Node:
    """One `physical/<host>/<service>` node, driven the way the executor worker drives it."""

    def __init__(self, fleet: Fleet, host: str, service: str, port: int, driver: str) -> None:
        self.fleet = fleet
        self.host = host
        self.service = service
        self.port = port
        self.driver = driver
        self.status: NodeStatus = pending(f"physical/{host}/{service}", service)
        self.health = HealthCheck(timeout_s=10)

    def context(
        self, version: str | None, package: Package | None = None, *, driver: str | None = None, **settings: object
    ) -> ExecutionContext:
        return ExecutionContext(
            node_key=self.status.node_key,
            service=self.service,
            host=self.host,
            current=self.status,
            target_version=version,
            package=package,
            port=self.port,
            health=self.health,
            settings=settings_for(self.fleet, driver or self.driver, **settings),
        )

    async def deploy(self, artifact: Artifact, *, sha256: str | None = None, driver: str | None = None) -> NodeStatus:
        self.status = await physical_executor(
            self.context(artifact.version, artifact.package(sha256), driver=driver)
        ).deploy()
        return self.status

    async def rollback(self, version: str) -> NodeStatus:
        self.status = await physical_executor(self.context(version)).rollback()
        return self.status

    async def probe(self) -> NodeStatus:
        return await physical_executor(self.context(None)).status()

    async def arrange(self, *artifacts: Artifact) -> None:
        """Put releases on the host with the ssh driver, whatever driver is under test (and check it worked)."""
        for artifact in artifacts:
            status = await self.deploy(artifact, driver="ssh")
            assert status.current_version == artifact.version, status.last_error

    # --- looking at the host ---

    @property
    def layout(self) -> Layout:
        return Layout(self.service)

    def path(self, remote: str | os.PathLike[str]) -> Path:
        """A host file as seen from here (the host's disk is an overlay mounted on this machine)."""
        return self.fleet.host(self.host).root / str(remote).lstrip("/")

    def sh(self, command: str, *, check: bool = True) -> str:
        return self.fleet.ssh(self.host, command, check=check)

    def served(self) -> str | None:
        """The version answering on the node's port, or None (asked up to 3 times: the hosts share 2 cores)."""
        for _ in range(3):
            answer = self.sh(f"curl -fsS --max-time 3 http://127.0.0.1:{self.port}/version", check=False).strip()
            if answer:
                return answer
            time.sleep(0.5)
        return None

    def unit_property(self, version: str, name: str) -> str:
        return self.sh(f"systemctl show --property={name} --value {self.layout.unit(version)}").strip()

    def enabled(self, version: str) -> bool:
        return self.path(f"/etc/systemd/system/multi-user.target.wants/{self.layout.unit(version)}").is_symlink()

    def current_link(self) -> str | None:
        link = self.path(self.layout.current)
        return os.readlink(link) if link.is_symlink() else None

    def snapshot(self) -> dict[str, object]:
        """What a failed request must leave as it was: files, links, enabled units, the running process."""
        base = self.path(self.layout.base)
        files = {
            str(p.relative_to(base)): (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p))
            for p in sorted(base.rglob("*"))
            if (p.is_file() or p.is_symlink()) and "downloads" not in p.parts
        }
        unit_file = self.path(self.layout.unit_file)
        wants = self.path("/etc/systemd/system/multi-user.target.wants")
        return {
            "files": files,
            "unit": unit_file.read_bytes() if unit_file.exists() else None,
            "enabled": sorted(p.name for p in wants.glob(f"{self.service}@*")),
            "running": self.sh(f"systemctl list-units --plain --no-legend --state=active '{self.service}@*'"),
            "pids": self.sh(f"systemctl show --property=MainPID --value '{self.service}@*'"),
        }


_numbers = itertools.count(1)


def wipe(fleet: Fleet, service: str, hosts: list[str]) -> None:
    """Remove every trace of `service` from `hosts` (a reused fleet may have it from an earlier run)."""
    command = (
        f"systemctl disable --now '{service}@*' >/dev/null 2>&1; rm -rf /opt/{service} "
        f"/etc/systemd/system/{service}@.service /etc/systemd/system/multi-user.target.wants/{service}@*; "
        "systemctl daemon-reload; systemctl reset-failed"
    )
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        list(pool.map(lambda host: fleet.ssh(host, command, check=False), hosts))


@pytest.fixture
def service(fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A service name and port no other test uses, absent from every host before and after the test."""
    number = next(_numbers)
    name = f"t{number:02d}-{request.node.name.split('[')[-1].rstrip(']')[:10].replace('_', '-')}".lower()
    name = "".join(c for c in name if c.isalnum() or c == "-")
    hosts = [host.name for host in fleet.hosts]
    wipe(fleet, name, hosts)
    yield name, 20000 + number
    wipe(fleet, name, hosts)
