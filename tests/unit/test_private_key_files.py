"""Private key files (SSH and signing) are refused when group or others can access them, naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.domain.status import NodeState, pending
from reactor.errors import InvalidInput
from reactor.events import Package
from reactor.executors.ssh import SshExecutor
from reactor.ports import ExecutionContext, ExecutorSettings
from reactor.runtime import Backends, Role, run_roles
from reactor.settings import Settings
from reactor.trust import generate_key, load_signing_key
from reactor.trust.keys import check_private_file, private_file_problem

pytestmark = pytest.mark.unit

NODE = "physical/127.0.0.1/app"


def _key_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "id_ed25519"
    path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n(not a real key)\n-----END OPENSSH PRIVATE KEY-----\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610], ids=lambda mode: f"{mode:04o}")
def test_a_key_file_group_or_others_can_access_is_refused_with_its_name_and_the_fix(tmp_path: Path, mode: int) -> None:
    key = _key_file(tmp_path, mode)
    with pytest.raises(InvalidInput) as refused:
        check_private_file(key, "SSH private key")
    assert refused.value.field == str(key)
    assert f"mode {mode:04o}" in refused.value.rule
    assert f"chmod 600 {key}" in refused.value.rule


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=lambda mode: f"{mode:04o}")
def test_a_key_file_only_its_owner_can_access_is_accepted(tmp_path: Path, mode: int) -> None:
    assert private_file_problem(_key_file(tmp_path, mode), "SSH private key") is None


def test_a_symlink_is_judged_by_the_file_it_leads_to(tmp_path: Path) -> None:
    """A Kubernetes secret mount is a chain of symlinks: the key file behind them decides."""
    key = _key_file(tmp_path, 0o600)
    link = tmp_path / "mounted"
    link.symlink_to(key)
    assert private_file_problem(link, "SSH private key") is None
    key.chmod(0o644)
    assert "group or others" in str(private_file_problem(link, "SSH private key"))


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    assert "cannot read the SSH private key" in str(private_file_problem(tmp_path / "absent", "SSH private key"))


def test_a_signing_key_group_can_read_is_refused(tmp_path: Path) -> None:
    """The signing key's own loader applies the same rule."""
    generate_key("reactor", tmp_path)
    key = tmp_path / "reactor.key"
    key.chmod(0o640)
    with pytest.raises(InvalidInput, match="accessible by group or others") as refused:
        load_signing_key(key)
    assert refused.value.field == str(key)


async def test_an_executor_worker_with_a_readable_ssh_key_does_not_start(tmp_path: Path) -> None:
    """Checked before any command is taken, for both drivers, with the setting's name."""
    key = _key_file(tmp_path, 0o644)
    settings = Settings(state_dir=tmp_path, physical_private_key=key)
    async with MemoryBus() as bus, EmbeddedStore(tmp_path / "db") as store:
        with pytest.raises(InvalidInput, match="REACTOR_PHYSICAL_PRIVATE_KEY") as refused:
            await run_roles(Backends(bus=bus, store=store, memory_bus=bus), settings, {Role.EXECUTOR})
    assert refused.value.field == str(key)


async def test_the_ssh_driver_refuses_a_readable_key_before_connecting(tmp_path: Path) -> None:
    """A key whose mode changed after the worker started fails the deploy at `connect`, naming the file; no host
    is contacted."""
    key = _key_file(tmp_path, 0o644)
    context = ExecutionContext(
        node_key=NODE,
        service="app",
        host="127.0.0.1",
        current=pending(NODE, "app"),
        target_version="2.0.0",
        package=Package(url="https://packages.example.com/app-2.0.0.tar.gz", sha256="a" * 64),
        port=8080,
        request_id="r-1",
        settings=ExecutorSettings(physical_private_key=key, physical_known_hosts=tmp_path / "known_hosts"),
    )
    status = await SshExecutor(context).deploy()
    assert status.state == NodeState.FAILED
    assert status.last_error is not None
    assert str(key) in status.last_error
    assert "group or others" in status.last_error
    assert os.stat(key).st_mode & 0o777 == 0o644  # the file itself is left as it was
