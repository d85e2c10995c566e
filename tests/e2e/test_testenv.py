"""The READMEs' `scripts/testenv` lines, run as written: what `up` starts outlives it and runs until `down`.

Each test runs a README line (with its `eval`) in a shell of its own, which then exits; a second, separate process
uses the service through the exported variables; `scripts/testenv down ...` must then stop it, and its port must
refuse connections. Each test has a state dir of its own ($REACTOR_TESTENV_DIR), so it neither sees nor stops a
developer's own `up` or the services of the test session, and brings everything down in a `finally`.

These services are started by `up`, so unlike the session's fixtures they do not die with the test run: a run
killed mid-test leaves them running (`REACTOR_TESTENV_DIR=<the test's dir> scripts/testenv down` stops them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.infra import k8s, testenv
from tests.infra.fleet import BRIDGE, OWNER_PATH, Fleet, _our_nspawn_pids

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PLAYBOOKS_README = ROOT / "playbooks" / "README.md"
# Variables that choose what gets built or where the cache is; every other REACTOR_* one is left out, so what a
# test sees comes from the line it runs and not from the session that runs it.
PASSED_THROUGH = {"REACTOR_CACHE_DIR", "REACTOR_KAFKA_VERSION", "REACTOR_FLEET_MIRROR", "REACTOR_FLEET_SUITE"}


def readme_line(readme: Path, command: str) -> str:
    """The line of `readme` whose command (before any `# comment`) is `command`, as written there."""
    for raw in readme.read_text().splitlines():
        line = raw.strip()
        if line.split(" #", 1)[0].strip() == command:
            return line
    pytest.fail(f"{readme.relative_to(ROOT)} has no line `{command}`")


def shell(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`script` in a bash of its own, from the repository root, as a user would type it."""
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def up_in_shell(line: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    """Run `line` in a shell that exits right after; the REACTOR_* variables the line set in that shell."""
    result = shell(f"{line}\nstatus=$?\n[ $status = 0 ] || exit $status\nenv -0", env, timeout)
    assert result.returncode == 0, f"`{line}` failed (exit {result.returncode}):\n{result.stderr}"
    after = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    exported = {k: v for k, v in after.items() if k.startswith("REACTOR_") and env.get(k) != v}
    assert exported, f"`{line}` exported nothing:\n{result.stderr}"
    return exported


@contextlib.contextmanager
def brought_up(line: str, names: list[str], env: dict[str, str], timeout: float) -> Iterator[dict[str, str]]:
    """`up_in_shell`, and `scripts/testenv down <names>` afterwards whatever happens (a no-op if the test did)."""
    try:
        yield up_in_shell(line, env, timeout)
    finally:
        shell(f"scripts/testenv down {shlex.join(names)}", env, timeout=300)


def down(command: str, env: dict[str, str], *names: str) -> None:
    """Run a `scripts/testenv down` line; it must stop each of `names` (not find them already dead)."""
    result = shell(command, env, timeout=300)
    assert result.returncode == 0, f"`{command}` failed (exit {result.returncode}):\n{result.stderr}"
    for name in names:
        assert f"stopping {name} (pid" in result.stderr, f"`{command}` did not stop {name}:\n{result.stderr}"
    assert "was not running" not in result.stderr, result.stderr


def address(url: str) -> tuple[str, int]:
    """(host, port) of `url` (`scheme://host:port/...`, or `host:port`)."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    assert parts.hostname, url
    assert parts.port, url
    return parts.hostname, parts.port


def refused(where: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(where, timeout=3):
            return False
    except OSError:
        return True


def recorded(env: dict[str, str], name: str) -> testenv.Service:
    """The service `name` as the state file of this test's `up` records it."""
    services = json.loads((Path(env["REACTOR_TESTENV_DIR"]) / "state.json").read_text())["services"]
    return testenv.Service.from_json(services[name])


def second_process(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{shlex.join(args)} failed (exit {result.returncode}):\n{result.stderr}"
    return result.stdout


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user's shell, with a state dir of this test's own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REACTOR_") or k in PASSED_THROUGH}
    return {**clean, "REACTOR_TESTENV_DIR": str(tmp_path / "run")}


MONGO_PING = """
import os
from pymongo import MongoClient
with MongoClient(os.environ["REACTOR_MONGO_URL"], serverSelectionTimeoutMS=10000) as client:
    print(client.admin.command("ping")["ok"])
"""


@pytest.mark.kafka
@pytest.mark.mongo
@pytest.mark.timeout(600)
def test_kafka_and_mongo_from_the_readme_run_until_down(env: dict[str, str]) -> None:
    """`out=$(scripts/testenv up kafka mongo) && eval "$out"`; `down kafka`, then the README's `down` (all)."""
    line = readme_line(README, 'out=$(scripts/testenv up kafka mongo) && eval "$out"')
    down_all = readme_line(README, "scripts/testenv down")
    with brought_up(line, ["kafka", "mongo"], env, timeout=400) as exported:
        assert set(exported) == {"REACTOR_KAFKA_BOOTSTRAP", "REACTOR_MONGO_URL", "REACTOR_FERRETDB_SQLITE_DIR"}
        # The README's line says what it exports: stores started from that shell make their indexes in FerretDB's files.
        assert "REACTOR_FERRETDB_SQLITE_DIR" in line
        user = {**env, **exported}
        listed = shell("scripts/testenv env", user)
        assert listed.returncode == 0, listed.stderr
        assert sorted(listed.stdout.splitlines()) == sorted(f"export {k}={shlex.quote(v)}" for k, v in exported.items())
        status = shell("scripts/testenv status", user)
        assert status.returncode == 0, status.stderr
        assert {row.split("\t")[0] for row in status.stderr.splitlines()} == {"kafka", "mongo"}

        topics = [sys.executable, "-m", "reactor.cli.main", "topics", "create"]
        created = second_process(topics, {**user, "REACTOR_TOPIC_PREFIX": "readme."})
        assert "created readme.commands" in created, created
        assert second_process([sys.executable, "-c", MONGO_PING], user).strip() == "1.0"

        kafka, mongo = address(exported["REACTOR_KAFKA_BOOTSTRAP"]), address(exported["REACTOR_MONGO_URL"])
        down("scripts/testenv down kafka", env, "kafka")
        assert refused(kafka)
        assert second_process([sys.executable, "-c", MONGO_PING], user).strip() == "1.0"  # only kafka went
        down(down_all, env, "mongo")
        assert refused(mongo)
        assert shell("scripts/testenv status", user).stderr == ""


@pytest.mark.mongo
@pytest.mark.timeout(300)
def test_mongo_on_postgresql_from_the_readme_runs_until_down_with_its_cluster(env: dict[str, str]) -> None:
    """`up mongo --backend postgresql`: FerretDB on a PostgreSQL cluster run by a non-root user, listed as
    `mongo/postgres`; `up mongo` on SQLite is refused while it runs; `down` stops both and leaves no cluster."""
    line = readme_line(README, 'out=$(scripts/testenv up mongo --backend postgresql) && eval "$out"')
    down_all = readme_line(README, "scripts/testenv down")
    with brought_up(line, ["mongo"], env, timeout=200) as exported:
        # The README's line says it exports both: stores started from that shell make their indexes in PostgreSQL.
        assert set(exported) == {"REACTOR_MONGO_URL", "REACTOR_FERRETDB_POSTGRESQL_URL"}
        assert "REACTOR_FERRETDB_POSTGRESQL_URL" in line
        user = {**env, **exported}
        assert second_process([sys.executable, "-c", MONGO_PING], user).strip() == "1.0"
        ferretdb = recorded(env, "mongo")
        assert testenv.ferretdb_backend(ferretdb) == "postgresql"
        [postgres] = ferretdb.parts
        assert postgres.alive(), "PostgreSQL died with `up`"
        assert exported["REACTOR_FERRETDB_POSTGRESQL_URL"] == postgres.env["REACTOR_POSTGRESQL_URL"]
        assert Path(f"/proc/{postgres.pid}").stat().st_uid != 0 or os.geteuid() != 0, "PostgreSQL runs as root"
        cluster = Path(postgres.workdir, "cluster").resolve()
        assert (cluster / "data" / "PG_VERSION").exists()
        status = shell("scripts/testenv status", user)
        assert {row.split("\t")[0] for row in status.stderr.splitlines()} == {"mongo", "mongo/postgres"}

        other = shell("scripts/testenv up mongo", env)
        assert other.returncode == 1, other.stderr
        assert "runs on postgresql, not sqlite" in other.stderr

        mongo, sql = address(exported["REACTOR_MONGO_URL"]), address(postgres.env["REACTOR_POSTGRESQL_URL"])
        down(down_all, env, "mongo")
        assert refused(mongo)
        assert refused(sql)
        assert not postgres.alive()
        assert not cluster.exists() or cluster.is_relative_to(postgres.workdir), "its private directory was left"


@pytest.mark.k8s
@pytest.mark.timeout(900)
def test_k8s_from_the_readme_runs_until_down(env: dict[str, str]) -> None:
    """`eval "$(scripts/testenv up k8s)"`, then `kubectl get nodes` from another process, then `down k8s`."""
    command = "scripts/testenv up k8s"
    assert f"`{command}`" in README.read_text()
    with brought_up(f'eval "$({command})"', ["k8s"], env, timeout=600) as exported:
        assert set(exported) == {"REACTOR_KUBECONFIG"}
        supervisor = recorded(env, "k8s")
        assert supervisor.alive(), "the cluster's supervisor died with `up`"
        members = testenv._group_members(supervisor.pid)
        assert len(members) >= 6, f"the supervisor and its etcd, apiserver, ... : only {members}"

        kubectl = shutil.which("kubectl") or str(testenv.CACHE / f"k8s-{k8s.K8S_VERSION}" / "bin" / "kubectl")
        kubeconfig = exported["REACTOR_KUBECONFIG"]
        nodes = second_process([kubectl, "--kubeconfig", kubeconfig, "get", "nodes", "-o", "name"], env)
        assert nodes.split() == ["node/kwok-node-0", "node/kwok-node-1"]

        server = address(json.loads(Path(kubeconfig).read_text())["clusters"][0]["cluster"]["server"])
        down("scripts/testenv down k8s", env, "k8s")
        assert refused(server)
        assert testenv._group_members(supervisor.pid) == [], "processes of the cluster outlived `down`"


@pytest.mark.fleet
@pytest.mark.timeout(1200)
def test_fleet_from_the_playbooks_readme_runs_until_down(env: dict[str, str]) -> None:
    """`eval "$(scripts/testenv up fleet --hosts 3)"`, ssh to every host from another process, `down fleet`."""
    line = readme_line(PLAYBOOKS_README, 'eval "$(scripts/testenv up fleet --hosts 3)"')
    down_fleet = readme_line(PLAYBOOKS_README, "scripts/testenv down fleet")
    with contextlib.suppress(OSError, ValueError, KeyError):
        holder = json.loads(OWNER_PATH.read_text())
        if testenv._proc_starttime(int(holder["pid"])) is not None:  # e.g. a developer's own `up fleet`
            pytest.skip(f"a machine has one test fleet, and the one in {holder.get('dir')} is in use")
    with brought_up(line, ["fleet"], env, timeout=900) as exported:
        assert {"REACTOR_FLEET_DIR", "REACTOR_PHYSICAL_INVENTORY"} <= set(exported)
        supervisor = recorded(env, "fleet")
        assert supervisor.alive(), "the fleet's supervisor died with `up`"
        fleet = Fleet.load(Path(exported["REACTOR_FLEET_DIR"]))
        assert [host.name for host in fleet.hosts] == ["h1", "h2", "h3"]
        for host in fleet.hosts:
            ssh = [
                "ssh",
                "-i",
                exported["REACTOR_PHYSICAL_PRIVATE_KEY"],
                "-o",
                f"UserKnownHostsFile={exported['REACTOR_PHYSICAL_KNOWN_HOSTS']}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                f"{exported['REACTOR_PHYSICAL_USER']}@{host.address}",
                "hostname",
            ]
            assert second_process(ssh, env, timeout=60).strip() == host.name
        down(down_fleet, env, "fleet")
        # Not a port check: with the bridge gone, a connection to a host's address takes the default route, and
        # what answers there is not ours to predict.
        assert not (Path("/sys/class/net") / BRIDGE).exists(), "the fleet's bridge outlived `down`"
        assert _our_nspawn_pids() == [], "hosts of the fleet outlived `down`"
        assert testenv._group_members(supervisor.pid) == [], "processes of the fleet outlived `down`"
