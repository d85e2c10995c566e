"""CDEvents to HTTP sinks: a real loopback HTTP server that fails the first attempts (503) then accepts; every
CDEvent of a release arrives, valid against the official schema, with one CloudEvent id across its retries."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from reactor.adapters.cdevent_sinks import HttpCDEventSink
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.cdevents import to_cdevent
from reactor.cli.exit_codes import ExitCode
from reactor.consumers.cdevents import CDEventsPublisher
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState, pending
from reactor.errors import BackendUnavailable, InvalidInput
from reactor.events import NodeDeployed, NodeTarget, Package, ReleasePlan, ReleaseRequested, Strategy, Topic
from reactor.runtime import Role, cdevent_sinks
from reactor.settings import Settings
from tests.cdevents_schemas import check
from tests.fakes import Script, scripted
from tests.support import equals, running, running_roles, until

pytestmark = pytest.mark.unit

PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="d" * 64)


@dataclass
class Sink:
    """What the loopback sink saw: every request, and how to answer the next ones."""

    url: str = ""
    failures_per_event: int = 0  # each CloudEvent id is answered 503 this many times, then accepted
    status_when_failing: int = 503
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], envelope: dict[str, Any]) -> int:
        with self.lock:
            self.requests.append((headers, envelope))
            self.attempts[envelope["id"]] += 1
            if self.attempts[envelope["id"]] <= self.failures_per_event:
                return self.status_when_failing
            self.accepted.append(envelope)
            return 202

    def accepted_types(self) -> list[str]:
        with self.lock:
            return [envelope["type"] for envelope in self.accepted]


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A CloudEvents HTTP sink on a free loopback port, served from a thread."""
    state = Sink()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = state.answer({k.lower(): v for k, v in self.headers.items()}, json.loads(body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/events"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def settings_for(sink: Sink, tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "cdevents_sinks": [sink.url],
        "cdevents_backoff_s": 0.01,
        "cdevents_max_backoff_s": 0.05,
        "cdevents_attempts": 5,
        **overrides,
    }
    return Settings(**options)


def structured(envelope: Mapping[str, Any], headers: Mapping[str, str]) -> None:
    """One request in CloudEvents structured mode carrying a valid CDEvent under the same id."""
    assert headers["content-type"].startswith("application/cloudevents+json")
    assert envelope["specversion"] == "1.0"
    assert envelope["datacontenttype"] == "application/json"
    cdevent = envelope["data"]
    check(cdevent)
    assert envelope["id"] == cdevent["context"]["id"]
    assert envelope["type"] == cdevent["context"]["type"]
    assert envelope["subject"] == cdevent["subject"]["id"]


async def test_a_release_reaches_a_sink_that_fails_twice_per_event_each_event_once_with_one_id(
    sink: Sink, tmp_path: Path
) -> None:
    """Upgrade, first install, a failed node rolled back: every CDEvent is retried to acceptance, same id."""
    sink.failures_per_event = 2
    script = Script(behaviour={"fake/host-02/app": "fail"})
    release = ReleasePlan(
        release_id="app-2",
        service="app",
        version="2.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"fake/host-{index:02d}/app") for index in range(3)],
        strategy=Strategy(batches=["100%"], max_parallel=3, failure_budget=1),
    )
    roles = {Role.EXECUTOR, Role.PACER, Role.ROLLBACK, Role.CDEVENTS}
    async with MemoryBus(retry_delay_s=0.01) as bus, EmbeddedStore(":memory:") as store:
        for key in ("fake/host-01/app", "fake/host-02/app"):  # running 1.0.0 already; host-00 is new
            running = pending(key, "app").model_copy(update={"state": NodeState.SUCCESS, "current_version": "1.0.0"})
            assert await store.put_node(running, expected_revision=0) is not None
        async with running_roles(bus, store, settings_for(sink, tmp_path), roles, {"fake": scripted(script)}):
            await bus.publish(ReleaseRequested(release_id=release.release_id, plan=release))
            await until(
                lambda: equals(_release_state(store, release.release_id), ReleaseState.COMPLETED),
                "the release completes",
            )
            await until(
                lambda: sorted(sink.accepted_types()) == EXPECTED_TYPES,
                "the sink has accepted every CDEvent of the release",
            )
            await bus.idle()
    for headers, envelope in sink.requests:
        structured(envelope, headers)
    ids = [envelope["id"] for envelope in sink.accepted]
    assert len(ids) == len(set(ids)) == len(EXPECTED_TYPES)
    assert set(sink.attempts.values()) == {3}  # two 503s then the accepted one, all under the same id
    by_type = {envelope["type"]: envelope["data"] for envelope in sink.accepted}
    upgraded = by_type["dev.cdevents.service.upgraded.0.3.0"]["subject"]
    assert upgraded["id"] == "fake/host-01/app"
    assert upgraded["content"]["artifactId"] == "pkg:generic/app@2.0.0"
    deployed = by_type["dev.cdevents.service.deployed.0.3.0"]["subject"]
    assert deployed["id"] == "fake/host-00/app"
    rolledback = by_type["dev.cdevents.service.rolledback.0.3.0"]["subject"]
    assert (rolledback["id"], rolledback["content"]["artifactId"]) == ("fake/host-02/app", "pkg:generic/app@1.0.0")
    finished = by_type["dev.cdevents.pipelinerun.finished.0.3.0"]["subject"]
    assert (finished["id"], finished["content"]["outcome"]) == ("app-2", "success")


EXPECTED_TYPES = sorted(
    f"dev.cdevents.{kind}.0.3.0"
    for kind in (
        "pipelinerun.queued",
        "pipelinerun.started",
        "service.upgraded",
        "service.deployed",
        "taskrun.finished",
        "service.rolledback",
        "pipelinerun.finished",
    )
)


async def _release_state(store: EmbeddedStore, release_id: str) -> ReleaseState | None:
    record = await store.get_release(release_id)
    return None if record is None else record.state


async def test_a_sink_down_longer_than_the_attempts_gets_the_event_again_from_the_bus_under_the_same_id(
    sink: Sink,
) -> None:
    """At-least-once: after `attempts` failures the handler raises (retriable), the bus redelivers, the id holds."""
    sink.failures_per_event = 7
    event = NodeDeployed(node_key="fake/host-00/app", service="app", version="2.0.0")
    async with (
        MemoryBus(retry_delay_s=0.01) as bus,
        HttpCDEventSink(sink.url, attempts=3, backoff_s=0.01, max_backoff_s=0.02) as http,
    ):
        publisher = CDEventsPublisher([http], source="/reactor")
        async with running_roles_of(bus, publisher):
            await bus.publish(event)
            await until(lambda: len(sink.accepted) == 1, "the sink accepts the event at last")
            await bus.idle()
    assert len(sink.requests) == 8  # 3 + 3 attempts (each time the bus gave it back), 2 + 1 in the third
    assert {envelope["id"] for _, envelope in sink.requests} == {
        to_cdevent(event, source="/reactor")["context"]["id"]  # type: ignore[index]
    }


async def test_a_refused_event_is_not_retried(sink: Sink) -> None:
    """A 400 says the sink will never take this event: one request, no retry, the handler goes on."""
    sink.failures_per_event, sink.status_when_failing = 1, 400
    async with HttpCDEventSink(sink.url, attempts=5, backoff_s=0.01) as http:
        await http.send(_deployed_cdevent())
    assert len(sink.requests) == 1
    assert sink.accepted == []


async def test_a_sink_that_does_not_answer_raises_a_retriable_error_after_its_attempts() -> None:
    """A closed port (connection refused) is retried like a 503, then reported as BackendUnavailable."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with HttpCDEventSink(f"http://127.0.0.1:{port}/", attempts=2, backoff_s=0.01) as http:
        with pytest.raises(BackendUnavailable, match="after 2 attempts"):
            await http.send(_deployed_cdevent())


def _deployed_cdevent() -> dict[str, object]:
    cdevent = to_cdevent(NodeDeployed(node_key="fake/host-00/app", service="app", version="2.0.0"), source="/r")
    assert cdevent is not None
    return cdevent


class _RecordingSink:
    def __init__(self, name: str, failures: int = 0) -> None:
        self.name = name
        self.failures = failures
        self.sent: list[str] = []

    async def __aenter__(self) -> _RecordingSink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, cdevent: Mapping[str, object]) -> None:
        if self.failures:
            self.failures -= 1
            raise BackendUnavailable(f"{self.name} is down")
        context = cdevent["context"]
        assert isinstance(context, dict)
        self.sent.append(context["id"])


async def test_a_retry_sends_only_to_the_sinks_that_did_not_take_the_event() -> None:
    kafka, http = _RecordingSink("kafka"), _RecordingSink("http", failures=2)
    publisher = CDEventsPublisher([kafka, http], source="/reactor")
    event = NodeDeployed(node_key="fake/host-00/app", service="app", version="2.0.0")
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            await publisher.handle(event)
    await publisher.handle(event)
    assert kafka.sent == http.sent == [to_cdevent(event, source="/reactor")["context"]["id"]]  # type: ignore[index]


def test_no_sink_at_all_or_a_source_that_is_no_uri_reference_is_refused_at_start() -> None:
    with pytest.raises(InvalidInput, match="cdevents sinks"):
        CDEventsPublisher([], source="/reactor")
    with pytest.raises(InvalidInput, match="cdevents source"):
        CDEventsPublisher([_RecordingSink("kafka")], source="/my reactor")


def test_sinks_setting_is_a_comma_separated_list_of_http_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REACTOR_CDEVENTS_SINKS", "http://127.0.0.1:9000/a, https://events.example.com/cd")
    urls = [str(url) for url in Settings().cdevents_sinks]
    assert urls == ["http://127.0.0.1:9000/a", "https://events.example.com/cd"]


@contextlib.asynccontextmanager
async def running_roles_of(bus: MemoryBus, publisher: CDEventsPublisher) -> AsyncIterator[None]:
    """The publisher alone consuming the bus, as the cdevents role does, while the block runs."""
    async with running(bus.consume([Topic.RELEASES, Topic.OUTCOMES], "cdevents", publisher.handle)):
        yield


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"mode": "distributed"}, ["kafka:reactor.cdevents"]),
        ({"mode": "distributed", "topic_prefix": "p.", "cdevents_topic": "cd"}, ["kafka:p.cd"]),
        (
            {"mode": "distributed", "cdevents_sinks": ["http://127.0.0.1:9000/a"]},
            ["kafka:reactor.cdevents", "http://127.0.0.1:9000/a"],
        ),
        (
            {"mode": "distributed", "cdevents_topic": "", "cdevents_sinks": ["https://x.example/e"]},
            ["https://x.example/e"],
        ),
        ({"mode": "distributed", "cdevents_topic": ""}, []),
        ({"mode": "embedded"}, []),  # no Kafka in embedded mode: HTTP sinks only
    ],
)
def test_the_role_publishes_to_the_topic_under_the_prefix_and_to_each_http_sink(
    options: dict[str, Any], expected: list[str], tmp_path: Path
) -> None:
    assert [sink.name for sink in cdevent_sinks(Settings(state_dir=tmp_path, **options))] == expected


def test_the_worker_refuses_to_start_the_role_with_nowhere_to_publish(tmp_path: Path) -> None:
    # A process of its own: the CLI configures logging for the process, which must not leak into other tests.
    environment = {**os.environ, "REACTOR_MODE": "distributed", "REACTOR_CDEVENTS_TOPIC": ""}
    environment["REACTOR_CONFIG"] = str(tmp_path / "reactor.toml")  # none: only the variables above
    environment.pop("REACTOR_CDEVENTS_SINKS", None)
    result = subprocess.run(
        [sys.executable, "-m", "reactor.cli.main", "worker", "--role", "cdevents"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == ExitCode.INVALID
    assert "REACTOR_CDEVENTS_SINKS" in result.stderr


def test_a_sink_url_with_credentials_is_named_without_them_in_logs_and_metrics() -> None:
    assert HttpCDEventSink("https://bot:s3cret@events.example.com:8443/cd").name == "https://events.example.com:8443/cd"
    assert HttpCDEventSink("http://127.0.0.1:9000/cd").name == "http://127.0.0.1:9000/cd"
