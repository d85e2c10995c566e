"""The host contract's pure parts: finding hosts, version history, drift, request checks, command quoting."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from reactor.domain.status import NodeState, pending
from reactor.errors import StepFailed
from reactor.events import HealthCheck, Package
from reactor.executors.ansible import PLAYBOOKS
from reactor.executors.hostcontract import (
    Probe,
    advanced,
    judge,
    parse_history,
    resolve_host,
    rewound,
    state_text,
    validate,
)
from reactor.executors.ssh import HELD_BY_UNIT, command
from reactor.ports import ExecutionContext

pytestmark = pytest.mark.unit

INVENTORY = """\
# comment
[web]
web1 ansible_host=10.1.0.1 ansible_port=2222
web2 ansible_host=10.1.0.2 ansible_user=deploy

[db]
db1

[web:vars]
ansible_port=2200
ansible_user=webops

[prod:children]
web

[prod:vars]
ansible_user=ops

[all:vars]
ansible_user=admin
"""


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.ini"
    path.write_text(INVENTORY)
    return path


def test_inventory_host_vars_win_over_group_vars_which_win_over_all(inventory: Path) -> None:
    """Host line > own group's vars > parent group's vars (via [parent:children]) > [all:vars] > defaults."""
    web1, web2, db1 = (resolve_host(name, inventory, "root") for name in ("web1", "web2", "db1"))
    assert (web1.address, web1.port, web1.user) == ("10.1.0.1", 2222, "webops")
    assert (web2.address, web2.port, web2.user) == ("10.1.0.2", 2200, "deploy")
    assert (db1.address, db1.port, db1.user) == ("db1", 22, "admin")


def test_host_missing_from_the_inventory_is_its_own_address(inventory: Path) -> None:
    """A node host that no inventory names is used as an IP address or DNS name, with the default user."""
    host = resolve_host("10.9.8.7", inventory, "root")
    assert (host.address, host.port, host.user) == ("10.9.8.7", 22, "root")
    assert resolve_host("db.example.com", None, "root").address == "db.example.com"


def test_inventory_address_outside_the_host_pattern_is_refused(tmp_path: Path) -> None:
    """An inventory entry cannot smuggle a shell word in as an address."""
    path = tmp_path / "inventory.ini"
    path.write_text("evil ansible_host='a;reboot'\n")
    with pytest.raises(StepFailed, match="prepare: host address 'a;reboot' is not allowed"):
        resolve_host("evil", path, "root")


def test_history_advances_once_per_version_and_rewinds_to_the_last_run_of_a_version() -> None:
    """Deploying the current version again keeps the history; a rollback drops what came after its target."""
    assert advanced([], "1") == ["1"]
    assert advanced(["1", "2"], "2") == ["1", "2"]
    assert advanced(["1", "2"], "3") == ["1", "2", "3"]
    assert advanced([str(v) for v in range(20)], "x")[-2:] == ["19", "x"]
    assert len(advanced([str(v) for v in range(20)], "x")) == 20
    assert rewound(["1", "2", "1", "3"], "1") == ["1", "2", "1"]
    assert rewound(["1", "2"], "0.9") == ["1", "2", "0.9"]


def test_state_file_round_trips_and_tolerates_garbage() -> None:
    """The state file names current and previous; an unreadable one means no history."""
    assert state_text(["1", "2"]) == '{"current": "2", "previous": "1", "history": ["1", "2"]}\n'
    assert parse_history(state_text(["1", "2"])) == ["1", "2"]
    assert parse_history("not json") == []
    assert parse_history('{"history": ["ok", "bad version; rm -rf /"]}') == ["ok"]


def _context(**changes: object) -> ExecutionContext:
    base = ExecutionContext(
        node_key="physical/h1/hello",
        service="hello",
        host="h1",
        current=pending("physical/h1/hello", "hello").model_copy(update={"current_version": "2"}),
        target_version="2",
        package=Package(url="http://10.0.0.1/hello-2.tar.gz", sha256="a" * 64),
        port=8080,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_judge_reports_success_when_the_host_matches_the_record() -> None:
    """The record, the state file, `current` and the one running instance agree, and it answers."""
    status = judge(_context(), Probe(["1", "2"], ["2"], "releases/2", True))
    assert (status.state, status.current_version, status.prev_version, status.last_error) == (
        NodeState.SUCCESS,
        "2",
        "1",
        "",
    )


@pytest.mark.parametrize(
    ("probe", "error"),
    [
        (Probe(["1"], ["1"], "releases/1", True), "drift: the record says 2 but the host's state file says 1"),
        (Probe(["1", "2"], [], "releases/2", None), "drift: 2 should run but nothing does"),
        (Probe(["1", "2"], ["1"], "releases/2", None), "drift: 2 should run but hello@1.service does"),
        (Probe(["1", "2"], ["2"], "releases/1", True), "drift: current points to releases/1"),
        (Probe(["1", "2"], ["2"], "releases/2", False), "drift: the health check fails"),
    ],
)
def test_judge_spells_out_each_kind_of_drift(probe: Probe, error: str) -> None:
    """Every difference between the record and the host is named in the status."""
    status = judge(_context(), probe)
    assert (status.state, status.last_error) == (NodeState.FAILED, error)


def test_judge_reports_what_actually_runs_as_the_current_version() -> None:
    """When another release runs than the host's record says, status names the running one."""
    assert judge(_context(), Probe(["1", "2"], ["1"], "releases/2", None)).current_version == "1"


def test_host_without_the_service_is_pending() -> None:
    """Nothing recorded and nothing running: the node was never deployed."""
    assert judge(_context(), Probe([], [], None, None)).state == NodeState.PENDING


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"service": "Hello"}, "prepare: service 'Hello' is not allowed"),
        ({"target_version": "1.0+build"}, "prepare: version '1.0+build' is not allowed"),
        ({"target_version": None}, "prepare: deploy needs a version and a package"),
        ({"package": None}, "prepare: deploy needs a version and a package"),
        ({"package": Package(url="file:///tmp/x.tgz", sha256="a" * 64)}, "prepare: package url 'file:///tmp/x.tgz'"),
        ({"port": 70000}, "prepare: port 70000 is not allowed"),
        (
            {"health": HealthCheck.model_construct(kind=cast(Any, "exec"), path="/", timeout_s=1.0)},
            "prepare: health kind",
        ),
    ],
)
def test_requests_outside_the_contract_fail_at_prepare(changes: dict[str, object], message: str) -> None:
    """What cannot become a systemd unit name, a path or a URL on a host is refused before connecting."""
    with pytest.raises(StepFailed) as failed:
        validate(_context(**changes), "deploy")
    assert str(failed.value).startswith(message)


def test_every_remote_argument_is_quoted_into_one_word() -> None:
    """Whatever a value holds, the remote shell sees it as one argument."""
    line = command("curl", "-o", "/opt/a b/x", "http://h/x?a=1&b=$(id)")
    assert shlex.split(line) == ["curl", "-o", "/opt/a b/x", "http://h/x?a=1&b=$(id)"]


def test_both_drivers_check_the_port_holder_with_the_same_script() -> None:
    """The playbooks' port-holder check is the ssh driver's, word for word."""
    playbook_vars = yaml.safe_load((PLAYBOOKS / "roles/release/vars/main.yml").read_text())
    assert playbook_vars["release_held_by_unit"] == HELD_BY_UNIT
