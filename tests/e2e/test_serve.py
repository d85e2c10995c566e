"""`reactor serve` as a real process: curl submits a release that runs to completion, and the live event stream
shows a release while it runs. No other process is needed: embedded mode runs every role inside `serve`."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from reactor.api.auth import digest
from reactor.demo import build_package
from reactor.demo.scenario import free_ports, release_plan, served_version
from reactor.executors.local import stop_all
from reactor.trust import generate_key

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "examples" / "ci" / "submit-release.sh"
TOKEN = "e2e-ci-token"  # noqa: S105 (a test token, in the tokens file only as its digest)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    state: Path
    stderr: Path

    def get(self, path: str) -> dict[str, Any]:
        response = httpx.get(self.url + path, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document


def _first_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line the process prints, waiting at most `timeout_s` for it."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return ""
    return process.stdout.readline()


@contextlib.contextmanager
def reactor_serve(tmp_path: Path, *, policy: dict[str, Any] | None = None) -> Iterator[Server]:
    """`reactor serve --port 0` with a tokens file, until the test ends; then SIGTERM, and it must exit 0.

    With `policy`: signatures required, the deploy policy enforced, and the token's commands signed with ci's key
    (the reactor's roles sign with a key of their own).
    """
    state = tmp_path / "state"
    tokens = tmp_path / "tokens.yaml"
    grant = "{identity: ci}" if policy is None else "{identity: ci, signing_key: keys/ci.key}"
    tokens.write_text(f"tokens:\n  {digest(TOKEN)}: {grant}\n")
    stderr = tmp_path / "serve.stderr"
    env = {
        **os.environ,
        "REACTOR_STATE_DIR": str(state),
        "REACTOR_LOG_FORMAT": "json",
        "REACTOR_API_TOKENS": str(tokens),
    }
    if policy is not None:
        keys = tmp_path / "keys"
        for name in ("reactor", "ci"):
            generate_key(name, keys)
        trust = [
            {"name": name, "public_key": f"{name}.pub", "reactor": name == "reactor"} for name in ("reactor", "ci")
        ]
        (keys / "trust.yaml").write_text(yaml.safe_dump(trust))
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
        env |= {
            "REACTOR_SIGNING_KEY": str(keys / "reactor.key"),
            "REACTOR_TRUST_FILE": str(keys / "trust.yaml"),
            "REACTOR_POLICY_FILE": str(tmp_path / "policy.yaml"),
            "REACTOR_REQUIRE_SIGNED": "true",
        }
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "reactor.cli.main", "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
            cwd=tmp_path,
        )
    try:
        line = _first_line(process, 60)
        assert line.startswith("serving http://127.0.0.1:"), f"{line!r}; stderr: {stderr.read_text()}"
        yield Server(url=line.split()[1], process=process, state=state, stderr=stderr)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            stop_all(state / "nodes")
            if process.stdout is not None:
                process.stdout.close()
    assert code == 0, stderr.read_text()
    assert TOKEN not in stderr.read_text()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60, check=False)


def test_curl_submits_a_release_of_local_nodes_that_completes(tmp_path: Path) -> None:
    """examples/ci/submit-release.sh posts a structured ReleaseRequested with curl and polls until it completes;
    the new version serves on every node; an invalid event is refused with 400 naming the field.

    Signatures are required and the policy lets only ci submit releases of hello: the release runs only because the
    server signs it with the key of the token's identity (signed with the server's own, the policy refuses it)."""
    package = build_package(tmp_path / "dist", "1.0.0")
    ports = dict(zip(("node-1", "node-2", "node-3"), free_ports(3), strict=True))
    plan = release_plan("hello-api-1", package, ports)
    plan_file = tmp_path / "release.json"
    plan_file.write_text(plan.model_dump_json(exclude_defaults=True))
    policy = {
        "services": {
            "hello": {
                "submit": ["ci"],
                "nodes": [{"key": "local/*/hello"}],
                "artifacts": {"packages": [package.url.rpartition("/")[0] + "/"]},
            }
        }
    }
    with reactor_serve(tmp_path, policy=policy) as server:
        env = {**os.environ, "REACTOR_URL": server.url, "REACTOR_TOKEN": TOKEN, "REACTOR_POLL_S": "0.2"}
        submitted = subprocess.run(
            ["bash", str(SUBMIT), str(plan_file)], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert submitted.returncode == 0, f"{submitted.stdout}\n{submitted.stderr}\n{server.stderr.read_text()}"
        assert "release hello-api-1: completed" in submitted.stdout

        release = server.get("/api/v1/releases/hello-api-1")
        assert release["state"] == "completed"
        assert release["actor"] == "ci"
        assert release["progress"]["succeeded"] == 3
        assert [event["event_type"] for event in release["events"]][-1] == "ReleaseCompleted"
        for port in ports.values():
            assert served_version(port) == "1.0.0"
        nodes = server.get("/api/v1/nodes")["nodes"]
        assert {node["node_key"]: node["current_version"] for node in nodes} == {
            f"local/{node}/hello": "1.0.0" for node in ports
        }

        bad = json.loads(plan_file.read_text())
        bad["release_id"] = "hello-api-2"
        bad["version"] = "1.0; rm -rf /"
        envelope = {
            "specversion": "1.0",
            "id": "ci-bad",
            "source": "/ci/e2e",
            "type": "dev.deployreactor.release.requested.v1",
            "subject": "hello-api-2",
            "correlationid": "hello-api-2",
            "time": "2026-12-01T10:00:00Z",
            "data": {"plan": bad},
        }
        refused = curl(
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "-H",
            "Content-Type: application/cloudevents+json",
            "--data-binary",
            json.dumps(envelope),
            server.url + "/api/v1/releases",
        )
        body, _, status = refused.stdout.rpartition("\n")
        assert status == "400", refused
        assert json.loads(body)["field"] == "plan.version"
        unauthenticated = curl("-o", "/dev/null", "-w", "%{http_code}", server.url + "/api/v1/releases")
        assert unauthenticated.stdout == "401"

        # Valid, accepted over HTTP, then refused by the policy (a package from elsewhere): never planned, so the
        # script gives up after its plan timeout rather than wait for ever.
        elsewhere = json.loads(plan_file.read_text())
        elsewhere["release_id"] = "hello-api-3"
        elsewhere["package"]["url"] = "https://elsewhere.example.test/hello-1.0.0.tar.gz"
        (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
        refused_run = subprocess.run(
            ["bash", str(SUBMIT), str(tmp_path / "elsewhere.json")],
            capture_output=True,
            text=True,
            env={**env, "REACTOR_PLAN_TIMEOUT_S": "3"},
            timeout=60,
            check=False,
        )
        assert refused_run.returncode == 1, refused_run
        assert "release hello-api-3 submitted" in refused_run.stdout
        assert "accepted but not planned within 3 s" in refused_run.stderr
        assert "policy: services.hello.artifacts.packages" in server.stderr.read_text()


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event type, document) of each Server-Sent Event; comments and the retry hint are skipped."""
    kind, data = "", ""
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and data:
            yield kind, json.loads(data)
            kind, data = "", ""


def _until(events: Iterator[tuple[str, dict[str, Any]]], last: str) -> list[str]:
    seen = []
    for kind, document in events:
        assert document["event_type"] == kind
        seen.append(kind)
        if kind == last:
            return seen
    pytest.fail(f"the stream ended before {last}; saw {seen}")


def test_the_event_stream_shows_a_release_live_through_its_approval_gate(tmp_path: Path) -> None:
    """A reader of a release held at its gate gets what happened so far, then live: the approval it gives over HTTP,
    the next batch's outcomes and the completion, in order and each once; it waits on the stream, never on a clock."""
    plan = {
        "release_id": "live-1",
        "service": "app",
        "version": "2.0.0",
        "image": "example/app:2.0.0",
        "nodes": [{"node_key": f"noop/h{number}/app"} for number in (1, 2, 3)],
        "strategy": {"batches": [1, "100%"], "approval_after_batches": [1]},
    }
    plan_file = tmp_path / "release.json"
    plan_file.write_text(json.dumps(plan))
    with reactor_serve(tmp_path) as server:
        headers = {"authorization": f"Bearer {TOKEN}"}
        env = {**os.environ, "REACTOR_URL": server.url, "REACTOR_TOKEN": TOKEN, "REACTOR_POLL_S": "0.2"}
        # The stream of a release no one submitted is 404. Submitted, the release stops at its gate: the stream
        # then replays what happened so far, and everything from the approval on arrives live.
        stream_url = server.url + "/api/v1/releases/live-1/events"
        assert httpx.get(stream_url, headers=headers, timeout=30).status_code == 404
        gated = subprocess.run(
            ["bash", str(SUBMIT), str(plan_file)], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert gated.returncode == 3, f"{gated.stdout}\n{gated.stderr}"  # waiting for a person

        with httpx.stream("GET", stream_url, headers=headers, timeout=httpx.Timeout(30)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = _events(response.iter_lines())
            before = _until(events, "ReleaseAwaitingApproval")
            assert before[0] == "ReleaseRequested"
            assert before.count("NodeDeployed") == 1

            approved = curl(
                "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}", server.url + "/api/v1/releases/live-1/approve"
            )
            assert json.loads(approved.stdout)["actor"] == "ci", approved
            after = _until(events, "ReleaseCompleted")
        assert after[0] == "ReleaseApproved"
        assert after.count("NodeDeployed") == 2
        assert server.get("/api/v1/releases/live-1")["state"] == "completed"


@pytest.mark.parametrize(
    ("settings", "args", "said"),
    [
        ({"REACTOR_MODE": "distributed"}, (), "api_tokens: required in distributed mode"),
        ({}, ("--host", "0.0.0.0"), "api_tokens: required on 0.0.0.0, beyond loopback"),  # noqa: S104 (refused)
        ({"REACTOR_API_TOKENS": "tokens.yaml"}, (), "keys are the hex SHA-256 of a token"),
        ({"REACTOR_API_TOKENS": "missing.yaml"}, (), "cannot read missing.yaml"),
    ],
)
def test_serve_refuses_to_start_without_usable_tokens_where_they_are_required(
    tmp_path: Path, settings: dict[str, str], args: tuple[str, ...], said: str
) -> None:
    """No tokens beyond embedded mode on loopback, or a tokens file that is not right: exit 2, the reason on
    stderr, nothing served, and a token written in the clear is never echoed."""
    (tmp_path / "tokens.yaml").write_text("tokens:\n  my-clear-token: {identity: ci}\n")
    env = {**os.environ, "REACTOR_STATE_DIR": str(tmp_path / "state"), **settings}
    result = subprocess.run(
        [sys.executable, "-m", "reactor.cli.main", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert said in result.stderr
    assert result.stdout == ""
    assert "my-clear-token" not in result.stderr
