"""The `reactor` command line as a user runs it: exit codes, messages, and nothing changed on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.demo import build_package
from reactor.demo.scenario import free_ports, release_plan, served_version, write_plan
from reactor.domain.status import NodeState, pending
from reactor.events import RELEASE_ID, SERVICE, VERSION, ReleasePlan
from reactor.executors.local import stop_all

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def reactor(
    *args: str, state: Path, cwd: Path | None = None, log_level: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REACTOR_STATE_DIR": str(state), "REACTOR_LOG_FORMAT": "json"}
    if log_level is not None:
        env["REACTOR_LOG_LEVEL"] = log_level
    return subprocess.run(
        [sys.executable, "-m", "reactor.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=120,
        check=False,
    )


def test_schemas_check_passes_on_the_checked_in_files(tmp_path: Path) -> None:
    """`reactor schemas check` exits 0 on the repository's schemas/."""
    result = reactor("schemas", "check", state=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "schemas up to date" in result.stdout


def test_schemas_check_fails_on_drift(tmp_path: Path) -> None:
    """An edited schema file makes `reactor schemas check` exit non-zero and name the file."""
    copy = tmp_path / "schemas"
    assert reactor("schemas", "export", "--dir", str(copy), state=tmp_path).returncode == 0
    target = copy / "events" / "dev.deployreactor.node.deployed.v1.json"
    target.write_text(target.read_text().replace('"version"', '"versio"'))
    (copy / "events" / "dev.deployreactor.node.removed.v1.json").write_text("{}")
    result = reactor("schemas", "check", "--dir", str(copy), state=tmp_path)
    assert result.returncode == 1
    assert "changed: events/dev.deployreactor.node.deployed.v1.json" in result.stderr
    assert "stale: events/dev.deployreactor.node.removed.v1.json" in result.stderr


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda plan: plan.update(version="1.0; rm -rf /"), "version"),
        (lambda plan: plan["nodes"][0].update(node_key="local/../etc/hello"), "nodes.0.node_key"),
        (lambda plan: plan["package"].update(sha256="XYZ"), "package.sha256"),
        (lambda plan: plan["strategy"].update(max_parallel=0), "strategy.max_parallel"),
        (lambda plan: plan.update(surprise=True), "surprise"),
    ],
)
def test_invalid_release_file_exits_2_naming_the_field_and_changes_nothing(
    tmp_path: Path, mutate: object, field: str
) -> None:
    """A bad release file is refused with exit code 2, the field and the rule named, and no state written."""
    package = build_package(tmp_path / "dist", "1.0.0")
    document = release_plan("bad-1", package, {"node-1": 1}).model_dump(mode="json")
    assert callable(mutate)
    mutate(document)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    state = tmp_path / "state"
    result = reactor("release", "submit", str(path), state=state)
    assert result.returncode == 2, result.stdout + result.stderr
    assert field in result.stderr
    assert not (state / "reactor.db").exists()


@pytest.mark.parametrize("command", ["plan", "submit"])
def test_refused_release_file_shows_the_rule_and_the_file_name_literally(tmp_path: Path, command: str) -> None:
    """The pattern a field must match is printed whole, brackets included, and so is a file name with brackets."""
    package = build_package(tmp_path / "dist", "1.0.0")
    document = release_plan("bad-1", package, {"node-1": 1}).model_dump(mode="json")
    document["release_id"] = "Bad Release!"
    path = tmp_path / "[bold]bad :x:.yaml"
    path.write_text(yaml.safe_dump(document))
    result = reactor("release", command, str(path), state=tmp_path / "state")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"String should match pattern '{RELEASE_ID}'" in result.stderr, result.stderr
    assert str(path) in result.stderr


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (("release", "approve", "Bad[x]"), f"release_id: String should match pattern '{RELEASE_ID}'"),
        (
            (
                "deploy",
                "local/n/hello",
                "--service",
                "Hello World",
                "--version",
                "1.0.0",
                "--package-url",
                "p.tgz",
                "--sha256",
                "e" * 64,
            ),
            f"service: String should match pattern '{SERVICE}'",
        ),
        (
            ("rollback", "local/n/hello", "--to-version", "[bold]2[/]"),
            f"to_version: String should match pattern '{VERSION}'",
        ),
    ],
    ids=["release-approve", "deploy", "rollback"],
)
def test_refused_command_line_shows_the_rule_literally(tmp_path: Path, args: tuple[str, ...], rule: str) -> None:
    """A command line value that breaks a pattern: exit 2 and the whole pattern, not a traceback or half a rule."""
    result = reactor(*args, state=tmp_path / "state")
    assert result.returncode == 2, result.stdout + result.stderr
    assert rule in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def test_status_shows_errors_and_unknown_release_ids_literally(tmp_path: Path) -> None:
    """A node's last_error with markup-like text and an emoji code is shown as stored, and so is a release id."""
    state = tmp_path / "state"
    state.mkdir()
    error = "health: [bold]x[/] answered :x: [/]"
    node = pending("local/node-1/hello", "hello").model_copy(
        update={"state": NodeState.FAILED, "current_version": "1.0.0", "last_error": error}
    )
    async with EmbeddedStore(state / "reactor.db") as store:
        assert await store.put_node(node, expected_revision=0) is not None

    shown = reactor("status", state=state)
    assert shown.returncode == 0, shown.stderr
    assert error in shown.stdout, shown.stdout
    missing = reactor("release", "status", "[bold]nope[/]", state=state)
    assert missing.returncode == 1
    assert "no release [bold]nope[/]" in missing.stderr


def test_release_submit_status_and_node_commands_work_on_the_embedded_store(tmp_path: Path) -> None:
    """submit runs a release to the end; status shows it; deploy and rollback work on one node."""
    dist = tmp_path / "dist"
    old, new = build_package(dist, "1.0.0"), build_package(dist, "1.1.0")
    port = free_ports(1)[0]
    state = tmp_path / "state"
    try:
        plan_file = write_plan(tmp_path / "release.yaml", release_plan("hello-1.0.0", old, {"node-1": port}))
        submitted = reactor("release", "submit", str(plan_file), state=state)
        assert submitted.returncode == 0, submitted.stderr
        assert "release hello-1.0.0: completed" in submitted.stdout
        assert served_version(port) == "1.0.0"

        shown = reactor("release", "status", "hello-1.0.0", state=state)
        assert shown.returncode == 0, shown.stderr
        assert "completed" in shown.stdout
        assert "local/node-1/hello" in shown.stdout
        assert reactor("release", "status", "nope", state=state).returncode == 1

        deployed = reactor(
            "deploy", "local/node-1/hello", "--version", "1.1.0", "--package-url", str(new.path),
            "--sha256", new.sha256, "--port", str(port), state=state,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr
        assert served_version(port) == "1.1.0"

        rolled = reactor("rollback", "local/node-1/hello", state=state)
        assert rolled.returncode == 0, rolled.stderr
        assert "rolled back to 1.0.0" in rolled.stdout
        assert served_version(port) == "1.0.0"

        table = reactor("status", state=state)
        assert table.returncode == 0
        assert "rolled_back" in table.stdout
    finally:
        stop_all(state / "nodes")


def test_deploy_with_wrong_sha256_exits_1_and_keeps_the_old_version(tmp_path: Path) -> None:
    """A single-node deploy with a bad checksum reports the failure and the old version keeps serving."""
    dist = tmp_path / "dist"
    old, new = build_package(dist, "1.0.0"), build_package(dist, "1.1.0")
    port = free_ports(1)[0]
    state = tmp_path / "state"
    try:
        args = ("--port", str(port))
        ok = reactor("deploy", "local/n/hello", "--version", "1.0.0", "--package-url", str(old.path),
                     "--sha256", old.sha256, *args, state=state)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        bad = reactor("deploy", "local/n/hello", "--version", "1.1.0", "--package-url", str(new.path),
                      "--sha256", "e" * 64, *args, state=state)  # fmt: skip
        assert bad.returncode == 1
        assert "sha256 mismatch" in bad.stdout
        assert served_version(port) == "1.0.0"
    finally:
        stop_all(state / "nodes")


def test_standalone_worker_refuses_embedded_mode(tmp_path: Path) -> None:
    """`reactor worker` in embedded mode explains that it needs a shared bus, exit code 2."""
    result = reactor("worker", "--role", "executor", state=tmp_path)
    assert result.returncode == 2
    assert "shared bus" in result.stderr


def test_release_waits_for_approval_across_processes_then_approve_finishes_it(tmp_path: Path) -> None:
    """`plan` shows the gate; `submit` stops at it (exit 3); `status` says so; `approve` in a new process finishes."""
    dist = tmp_path / "dist"
    package = build_package(dist, "1.0.0")
    ports = dict(zip(("node-1", "node-2"), free_ports(2), strict=True))
    plan = release_plan("gated-1", package, ports)
    gated = plan.model_copy(
        update={"strategy": plan.strategy.model_copy(update={"batches": [1], "approval_after_batches": [1]})}
    )
    state = tmp_path / "state"
    try:
        plan_file = write_plan(tmp_path / "gated.yaml", gated)
        shown = reactor("release", "plan", str(plan_file), state=state)
        assert shown.returncode == 0, shown.stderr
        assert "approval" in shown.stdout
        assert not (state / "reactor.db").exists()

        submitted = reactor("release", "submit", str(plan_file), state=state)
        assert submitted.returncode == 3, submitted.stderr
        assert "release gated-1: awaiting_approval" in submitted.stdout
        assert (served_version(ports["node-1"]), served_version(ports["node-2"])) == ("1.0.0", None)

        approved = reactor("release", "approve", "gated-1", "--actor", "alice", state=state)
        assert approved.returncode == 0, approved.stderr
        assert "release gated-1: completed" in approved.stdout
        assert served_version(ports["node-2"]) == "1.0.0"
    finally:
        stop_all(state / "nodes")


def test_release_plan_shows_min_healthy_only_when_set(tmp_path: Path) -> None:
    """`plan` prints a min_healthy line for a plan that sets it, and none for one that does not."""
    package = build_package(tmp_path / "dist", "1.0.0")
    plain = release_plan("hello-1.0.0", package, {"node-1": 1})
    observed = plain.model_copy(update={"strategy": plain.strategy.model_copy(update={"min_healthy_s": 2.5})})
    shown = reactor("release", "plan", str(write_plan(tmp_path / "observed.yaml", observed)), state=tmp_path / "s")
    assert shown.returncode == 0, shown.stderr
    assert "min_healthy 2.5s: a deployed node counts as done only after staying healthy that long" in shown.stdout
    shown = reactor("release", "plan", str(write_plan(tmp_path / "plain.yaml", plain)), state=tmp_path / "s")
    assert shown.returncode == 0, shown.stderr
    assert "min_healthy" not in shown.stdout


def test_readme_release_file_example_is_a_valid_plan(tmp_path: Path) -> None:
    """The release file shown in the README validates and plans as its comments say."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A release file") :]
    example = section[section.index("```yaml") + len("```yaml") : section.index("```", section.index("```yaml") + 7)]
    path = tmp_path / "readme.yaml"
    path.write_text(example.replace("5f0c…", "5f0c" + "0" * 60))
    result = reactor("release", "plan", str(path), state=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "local/node-" in line]
    assert [row.split("│")[2].split() for row in rows] == [
        ["local/node-1/hello"],
        ["local/node-2/hello", "local/node-3/hello"],
    ]


def test_release_rollback_fast_returns_every_node_and_says_it_was_fast(tmp_path: Path) -> None:
    """`release rollback ID --fast` on a completed release (noop nodes): exit 0, every node back on its previous
    version, and the output and `release status` say the rollback was fast."""
    state = tmp_path / "state"
    nodes = [{"node_key": f"noop/node-{index}/hello"} for index in range(1, 5)]
    for version in ("1.0.0", "2.0.0"):
        release = {
            "release_id": f"hello-{version}",
            "service": "hello",
            "version": version,
            "package": {"url": f"https://packages.example.test/hello-{version}.tar.gz", "sha256": "e" * 64},
            "nodes": nodes,
            "strategy": {"batches": [1, "100%"], "max_parallel": 1},
        }
        path = tmp_path / f"hello-{version}.yaml"
        path.write_text(yaml.safe_dump(release))
        submitted = reactor("release", "submit", str(path), state=state)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert f"release hello-{version}: completed" in submitted.stdout

    rolled = reactor(
        "release", "rollback", "hello-2.0.0", "--fast", "--actor", "carol", "--reason", "errors", state=state
    )
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "hello-2.0.0: fast rollback of the release requested" in rolled.stdout
    assert sorted(line for line in rolled.stdout.splitlines() if "rolled back to" in line) == [
        f"noop/node-{index}/hello: rolled back to 1.0.0" for index in range(1, 5)
    ]
    assert "hello-2.0.0: release rolled back fast (4 rolled back, 0 failed)" in rolled.stdout
    assert "release hello-2.0.0: rolled_back" in rolled.stdout

    shown = reactor("release", "status", "hello-2.0.0", state=state)
    assert shown.returncode == 1, shown.stderr  # rolled back: the release did not do what it was asked
    assert "rolled_back (rollback requested by carol: errors) (fast rollback)" in shown.stdout
    table = reactor("status", state=state)
    rows = [line for line in table.stdout.splitlines() if "noop/node-" in line]
    assert len(rows) == 4, table.stdout
    assert all("rolled_back" in row and "1.0.0" in row for row in rows), table.stdout

    fast = yaml.safe_load((tmp_path / "hello-2.0.0.yaml").read_text())
    fast["strategy"].update(fast_rollback=True, rollback_parallel=3)
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(fast))
    planned = reactor("release", "plan", str(tmp_path / "fast.yaml"), state=state)
    assert planned.returncode == 0, planned.stderr
    assert "; fast rollback, 3 at once" in planned.stdout


# --- output for scripts: `--output json` and exit codes ------------------------------------------------------

NODE_FIELDS = {
    "node_key", "host", "service", "platform", "state", "current_version", "prev_version", "deploying_version",
    "release_id", "request_id", "operation", "last_error", "updated_at",
}  # fmt: skip
RELEASE_FIELDS = {
    "release_id", "service", "version", "state", "reason", "fast_rollback", "batch", "batch_count", "batch_sizes",
    "failure_budget", "batch_failure_budget", "resume_at", "actor", "created_at", "updated_at", "progress", "nodes",
    "plan",
}  # fmt: skip
PROGRESS = {"queued", "dispatched", "succeeded", "failed", "rollback_dispatched", "rolled_back", "rollback_failed"}


def document(result: subprocess.CompletedProcess[str]) -> Any:
    """The one JSON document on stdout: the whole of stdout must parse, so no log line or markup is mixed in."""
    return json.loads(result.stdout)


def noop_release(release_id: str, *, service: str = "web", count: int = 3, **strategy: object) -> dict[str, Any]:
    """A release file of noop nodes (they deploy at once and change nothing), zones a, b, a, ..."""
    return {
        "release_id": release_id,
        "service": service,
        "version": "2.0.0",
        "package": {"url": f"https://packages.example.test/{service}-2.0.0.tar.gz", "sha256": "e" * 64},
        "nodes": [
            {"node_key": f"noop/node-{index}/{service}", "labels": {"zone": "ab"[(index - 1) % 2]}}
            for index in range(1, count + 1)
        ],
        "strategy": {"canary": 1, "batches": ["100%"], **strategy},
    }


def write_release(path: Path, release: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(release))
    return path


def test_release_plan_json_lists_batches_gates_and_the_plan(tmp_path: Path) -> None:
    """`release plan -o json`: one document with the batches, their spread and gates, the failure budget in nodes
    and the plan itself; an invalid file exits 2 with the reason on stderr and nothing on stdout."""
    release = noop_release("web-2.0.0", count=4, spread_by="zone", failure_budget="50%", approval_after_batches=[1])
    path = write_release(tmp_path / "web.yaml", release)
    planned = reactor("release", "plan", str(path), "--output", "json", state=tmp_path / "state", log_level="debug")
    assert planned.returncode == 0, planned.stderr
    shown = document(planned)
    assert set(shown) == {"release_id", "service", "version", "node_count", "failure_budget", "batches", "plan"}
    assert (shown["release_id"], shown["service"], shown["version"]) == ("web-2.0.0", "web", "2.0.0")
    assert (shown["node_count"], shown["failure_budget"]) == (4, 2)
    assert shown["batches"] == [
        {"batch": 1, "nodes": ["noop/node-1/web"], "spread": ["a"], "gate_after": "approval", "pause_after_s": None},
        {
            "batch": 2,
            "nodes": ["noop/node-2/web", "noop/node-3/web", "noop/node-4/web"],
            "spread": ["a", "b"],
            "gate_after": None,
            "pause_after_s": None,
        },
    ]
    assert ReleasePlan.model_validate(shown["plan"]).strategy.approval_after_batches == [1]
    assert not (tmp_path / "state" / "reactor.db").exists()

    paused = write_release(tmp_path / "paused.yaml", noop_release("web-2.0.0", pause_between_batches_s=30))
    gates = document(reactor("release", "plan", str(paused), "-o", "json", state=tmp_path / "state"))["batches"]
    assert [(batch["gate_after"], batch["pause_after_s"]) for batch in gates] == [("pause", 30.0), (None, None)]

    bad = write_release(tmp_path / "bad.yaml", {**release, "version": "2.0 beta"})
    refused = reactor("release", "plan", str(bad), "-o", "json", state=tmp_path / "state")
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "version: String should match pattern" in refused.stderr


def test_release_status_json_and_exit_code_follow_the_release_state(tmp_path: Path) -> None:
    """Scripts can poll: `release submit` and `release status` exit 3 awaiting approval, 4 queued, 0 completed,
    1 halted; `release status -o json` and `status -o json` describe the release and its nodes as documented."""
    state = tmp_path / "state"
    gated = write_release(tmp_path / "gated.yaml", noop_release("web-2.0.0", approval_after_batches=[1]))
    submitted = reactor("release", "submit", str(gated), state=state)
    assert submitted.returncode == 3, submitted.stdout + submitted.stderr
    assert "release web-2.0.0: awaiting_approval" in submitted.stdout

    waiting = reactor("release", "status", "web-2.0.0", "-o", "json", state=state, log_level="debug")
    assert waiting.returncode == 3, waiting.stderr
    shown = document(waiting)
    assert set(shown) == RELEASE_FIELDS
    assert (shown["state"], shown["batch"], shown["batch_count"], shown["batch_sizes"]) == (
        "awaiting_approval", 1, 2, [1, 2],
    )  # fmt: skip
    assert (shown["failure_budget"], shown["actor"], shown["reason"], shown["fast_rollback"]) == (0, "cli", "", False)
    assert set(shown["progress"]) == PROGRESS
    assert (shown["progress"]["succeeded"], shown["progress"]["queued"]) == (1, 2)
    assert [(node["node_key"], node["batch"], node["progress"]) for node in shown["nodes"]] == [
        ("noop/node-1/web", 1, "succeeded"),
        ("noop/node-2/web", 2, "queued"),
        ("noop/node-3/web", 2, "queued"),
    ]
    first = shown["nodes"][0]["status"]
    assert set(first) == NODE_FIELDS
    assert (first["state"], first["current_version"], first["release_id"]) == ("success", "2.0.0", "web-2.0.0")
    assert [node["status"] for node in shown["nodes"][1:]] == [None, None]
    assert shown["created_at"].endswith("Z")
    assert first["updated_at"].endswith("Z")
    assert shown["plan"]["strategy"]["approval_after_batches"] == [1]
    assert reactor("release", "status", "web-2.0.0", state=state).returncode == 3  # the text form says the same

    behind = write_release(tmp_path / "behind.yaml", noop_release("web-2.1.0"))
    queued = reactor("release", "submit", str(behind), state=state)
    assert queued.returncode == 4, queued.stdout + queued.stderr
    polled = reactor("release", "status", "web-2.1.0", "-o", "json", state=state)
    assert (polled.returncode, document(polled)["state"]) == (4, "queued")

    nodes = reactor("status", "-o", "json", state=state, log_level="debug")
    assert nodes.returncode == 0, nodes.stderr
    listed = document(nodes)
    assert set(listed) == {"nodes"}
    assert [node["node_key"] for node in listed["nodes"]] == ["noop/node-1/web"]
    assert all(set(node) == NODE_FIELDS for node in listed["nodes"])

    assert reactor("release", "approve", "web-2.0.0", state=state).returncode == 0
    done = reactor("release", "status", "web-2.0.0", "-o", "json", state=state)
    assert (done.returncode, document(done)["state"]) == (0, "completed")
    assert reactor("release", "status", "web-2.0.0", state=state).returncode == 0

    missing = reactor("release", "status", "nope", "-o", "json", state=state)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no release nope" in missing.stderr

    package = build_package(tmp_path / "dist", "1.0.0")
    try:
        bad = write_plan(tmp_path / "bad.yaml", release_plan("bad-1", package, {"node-1": 1}, bad_node="node-1"))
        failed = reactor("release", "submit", str(bad), state=state)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "release bad-1: halted" in failed.stdout
        halted = reactor("release", "status", "bad-1", "-o", "json", state=state)
        assert halted.returncode == 1, halted.stderr
        shown = document(halted)
        assert (shown["state"], shown["progress"]["failed"]) == ("halted", 1)
        assert "failure budget spent" in shown["reason"]
        assert shown["nodes"][0]["status"]["state"] == "failed"
    finally:
        stop_all(state / "nodes")
