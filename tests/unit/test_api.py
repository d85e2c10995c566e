"""The HTTP API through an ASGI client over the in-memory bus and the embedded store, every role running."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx

# jsonschema ships no type hints (see tests/unit/test_schemas.py).
import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from reactor import schemas
from reactor.adapters.memory_bus import MemoryBus
from reactor.api import feed as feed_module
from reactor.api import openapi
from reactor.api.app import Api, create_app
from reactor.api.auth import Tokens, digest, load_tokens
from reactor.api.binding import decode_request
from reactor.api.feed import Feed, StreamEnded
from reactor.codec import MAX_RELEASE_EVENT_BYTES
from reactor.domain.pacer import ReleaseState
from reactor.errors import BackendUnavailable, InvalidInput, ReactorError
from reactor.events import ReleaseApproved, ReleasePaused, ReleasePlan, ReleaseRequested, Topic
from reactor.ports import Store
from reactor.session import Session, embedded
from reactor.settings import Settings

pytestmark = pytest.mark.unit

WRITER, READER = "writer-token-1", "reader-token-1"
ATTRIBUTES = ("id", "time", "type", "subject", "correlationid")
THREE = [{"node_key": f"noop/h{number}/app"} for number in (1, 2, 3)]
CHECKED_IN = Path(__file__).resolve().parents[2] / "schemas" / "openapi.json"


def envelope(release_id: str, *, event_id: str | None = None, **plan: Any) -> dict[str, Any]:
    """A structured-mode ReleaseRequested of two noop nodes."""
    body = {
        "release_id": release_id,
        "service": "app",
        "version": "1.0.0",
        "image": "example/app:1.0.0",
        "nodes": [{"node_key": "noop/h1/app"}, {"node_key": "noop/h2/app"}],
        **plan,
    }
    return {
        "specversion": "1.0",
        "id": event_id or f"ci-{release_id}",
        "source": "/ci/test",
        "type": ReleaseRequested.TYPE,
        "subject": release_id,
        "time": "2026-12-01T10:00:00Z",
        "correlationid": release_id,
        "datacontenttype": "application/json",
        "data": {"plan": body},
    }


def binary(document: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """The same event in binary mode: attributes as ce-* headers, data as the body."""
    headers = {f"ce-{name}": value for name, value in document.items() if name not in ("data", "datacontenttype")}
    headers["content-type"] = "application/json; charset=utf-8"
    return headers, json.dumps(document["data"]).encode()


def structured(document: dict[str, Any]) -> dict[str, Any]:
    return {"content": json.dumps(document), "headers": {"content-type": "application/cloudevents+json"}}


@dataclass
class Served:
    client: httpx.AsyncClient
    session: Session
    feed: Feed


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, tokens: Tokens | None = None) -> AsyncIterator[Served]:
    async with embedded(Settings(state_dir=tmp_path)) as session:
        feed = Feed("/reactor")
        reading = asyncio.create_task(feed.run(session.bus))
        app = create_app(Api(store=session.backends.store, bus=session.bus, feed=feed, tokens=tokens))
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
                yield Served(client, session, feed)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(tmp_path) as opened:
        yield opened


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Served]:
    """Tokens configured: a writer `ci` and a read-only `viewer`."""
    path = tmp_path / "tokens.yaml"
    path.write_text(
        f"tokens:\n  {digest(WRITER)}: {{identity: ci}}\n  {digest(READER)}: {{identity: viewer, read_only: true}}\n"
    )
    async with serving(tmp_path, load_tokens(path)) as opened:
        yield opened


def component(name: str) -> dict[str, Any]:
    """A schema of the OpenAPI document's components, resolvable on its own."""
    return {**openapi.document(), "$ref": f"#/components/schemas/{name}"}


def check_release(document: dict[str, Any]) -> None:
    """Validate a release document against the OpenAPI `Release` schema, its $refs into events/ resolved."""
    base = "https://deploy-reactor.dev/schemas/"
    event_schema = json.loads((CHECKED_IN.parent / "events" / f"{ReleaseRequested.TYPE}.json").read_text())
    registry = Registry().with_resource(
        f"{base}events/{ReleaseRequested.TYPE}.json", Resource.from_contents(event_schema, DRAFT202012)
    )
    schema = {**component("Release"), "$id": f"{base}openapi.json"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(document)


async def test_a_structured_release_runs_to_completion_and_reads_back_with_batches_nodes_and_events(
    served: Served,
) -> None:
    """POST a structured ReleaseRequested: 202 with its location; the release completes; GET shows it all."""
    response = await served.client.post("/api/v1/releases", **structured(envelope("r1")))
    assert response.status_code == 202, response.text
    assert response.headers["location"] == "/api/v1/releases/r1"
    assert response.json()["event_id"] == "ci-r1"
    await served.session.settle_release("r1", timeout_s=30)

    release = (await served.client.get("/api/v1/releases/r1")).json()
    assert release["state"] == "completed"
    assert release["batches"] == [
        {"batch": 1, "size": 2, "progress": {**dict.fromkeys(release["progress"], 0), "succeeded": 2}}
    ]
    assert [node["status"]["current_version"] for node in release["nodes"]] == ["1.0.0", "1.0.0"]
    types = [event["event_type"] for event in release["events"]]
    assert types[0] == "ReleaseRequested"
    assert types[-1] == "ReleaseCompleted"
    assert types.count("NodeDeployed") == 2
    assert release["events"][0]["cloudevent"]["id"] == "ci-r1"
    check_release(release)

    listed = (await served.client.get("/api/v1/releases", params={"state": "completed"})).json()["releases"]
    assert [item["release_id"] for item in listed] == ["r1"]
    jsonschema.validate(listed[0], component("ReleaseSummary"))
    assert (await served.client.get("/api/v1/releases", params={"state": "running"})).json() == {"releases": []}
    nodes = (await served.client.get("/api/v1/nodes", params={"service": "app"})).json()["nodes"]
    assert [node["node_key"] for node in nodes] == ["noop/h1/app", "noop/h2/app"]
    for node in nodes:
        jsonschema.validate(node, component("Node"))


async def test_a_binary_mode_release_is_accepted_and_runs(served: Served) -> None:
    """The same event in binary mode (ce-* headers, percent-encoded as the binding says; a JSON body with a charset)
    is taken as well."""
    headers, body = binary(envelope("r2"))
    headers["ce-source"] = "/ci/my%20pipeline%C3%A9"
    response = await served.client.post("/api/v1/releases", content=body, headers=headers)
    assert response.status_code == 202, response.text
    await served.session.settle_release("r2", timeout_s=30)
    assert await served.session.release_state("r2") == ReleaseState.COMPLETED
    headers["ce-source"] = "/ci/%C3"
    refused = await served.client.post("/api/v1/releases", content=body, headers=headers)
    assert (refused.status_code, refused.json()["field"]) == (400, "ce-source")


def _without(document: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != name}


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (envelope("bad", version="1.0; rm -rf /"), "plan.version"),
        (envelope("bad", nodes=[{"node_key": "noop/../etc/app"}]), "plan.nodes.0.node_key"),
        (_without(envelope("bad"), "id"), "id"),
        ({**envelope("bad"), "time": "yesterday"}, "time"),
        ({**envelope("bad"), "type": "dev.deployreactor.release.exploded.v1"}, "type"),
        ({**envelope("bad"), "type": ReleaseApproved.TYPE, "data": {}}, "type"),
        ({**envelope("bad"), "subject": "other"}, "subject"),
        (_without(envelope("bad"), "correlationid"), "correlationid"),
        ({**envelope("bad"), "data": {"plan": {}, "surprise": 1}}, "plan.release_id"),
    ],
)
async def test_invalid_release_events_are_refused_with_400_naming_the_field_and_nothing_is_published(
    served: Served, document: dict[str, Any], field: str
) -> None:
    """A ReleaseRequested the Kafka codec would dead-letter is refused with the field and why; none reaches the bus."""
    for request in (structured(document), None):
        if request is None:
            if "id" not in document or "correlationid" not in document:
                continue  # binary mode without the header names the same field; one mode is enough here
            headers, body = binary(document)
            response = await served.client.post("/api/v1/releases", content=body, headers=headers)
            named = f"ce-{field}" if field in ATTRIBUTES else field
        else:
            response = await served.client.post("/api/v1/releases", **request)
            named = field
        assert response.status_code == 400, response.text
        problem = response.json()
        assert problem["error"] == "invalid"
        assert problem["field"] == named, problem
        assert problem["detail"]
    assert served.session.bus.events(Topic.RELEASES) == []


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"not json", "application/cloudevents+json"), (b"[1]", "application/cloudevents+json"), (b"{}", "text/plain")],
)
async def test_bodies_that_are_no_cloudevent_are_refused_with_400(
    served: Served, content: bytes, content_type: str
) -> None:
    """A body that is not a CloudEvent in either mode gets 400 with a reason, not a server error."""
    response = await served.client.post("/api/v1/releases", content=content, headers={"content-type": content_type})
    assert response.status_code == 400
    problem = response.json()
    assert problem["detail"]
    assert problem["field"] == ("content-type" if content_type == "text/plain" else "(event)")


async def test_submitting_the_same_event_again_is_accepted_and_another_for_the_same_release_conflicts(
    served: Served,
) -> None:
    """A CI retry of the same event id gets 202 again; a different event for an existing release gets 409."""
    assert (await served.client.post("/api/v1/releases", **structured(envelope("r3")))).status_code == 202
    await served.session.settle_release("r3", timeout_s=30)
    again = await served.client.post("/api/v1/releases", **structured(envelope("r3")))
    assert again.status_code == 202
    other = await served.client.post("/api/v1/releases", **structured(envelope("r3", event_id="ci-other")))
    assert other.status_code == 409
    assert other.json()["field"] == "release_id"
    requests = [event for event in served.session.bus.events(Topic.RELEASES) if isinstance(event, ReleaseRequested)]
    assert len(requests) == 1


async def test_commands_publish_as_the_identity_and_move_the_release(served: Served) -> None:
    """approve lets a gated release go on; pause/resume/abort/rollback publish their events; unknown ones 404."""
    document = envelope("r4", nodes=THREE, strategy={"batches": [1], "approval_every_batch": True})
    assert (await served.client.post("/api/v1/releases", **structured(document))).status_code == 202
    await served.session.settle_release("r4", timeout_s=30)
    assert await served.session.release_state("r4") == ReleaseState.AWAITING_APPROVAL

    approved = await served.client.post("/api/v1/releases/r4/approve", json={"reason": "looks good"})
    assert approved.status_code == 202, approved.text
    assert approved.json()["actor"] == "local"
    await served.session.settle_release("r4", timeout_s=30)
    assert await served.session.release_state("r4") == ReleaseState.AWAITING_APPROVAL  # the gate after batch 2

    paused = await served.client.post("/api/v1/releases/r4/pause")
    assert paused.status_code == 202
    await served.session.settle_release("r4", timeout_s=30)
    events = served.session.bus.events(Topic.RELEASES)
    approval = next(event for event in events if isinstance(event, ReleaseApproved))
    assert (approval.actor, approval.reason) == ("local", "looks good")
    assert any(isinstance(event, ReleasePaused) for event in events)

    rollback = await served.client.post("/api/v1/releases/r4/rollback", json={"fast": True})
    assert rollback.status_code == 202
    await served.session.settle_release("r4", timeout_s=30)
    assert await served.session.release_state("r4") == ReleaseState.ROLLED_BACK

    assert (await served.client.post("/api/v1/releases/nope/abort")).status_code == 404
    assert (await served.client.post("/api/v1/releases/r4/explode")).status_code == 404
    refused = await served.client.post("/api/v1/releases/r4/abort", json={"fast": True})
    assert (refused.status_code, refused.json()["field"]) == (400, "fast")
    refused = await served.client.post("/api/v1/releases/r4/pause", json={"reason": "x" * 5000})
    assert (refused.status_code, refused.json()["field"]) == (400, "reason")


async def test_unknown_releases_are_404(served: Served) -> None:
    """A release no one submitted is not found, nor is a malformed id."""
    assert (await served.client.get("/api/v1/releases/nope")).status_code == 404
    assert (await served.client.get("/api/v1/releases/NOT..valid")).status_code == 404
    assert (await served.client.get("/api/v1/releases/nope/events")).status_code == 404


async def test_tokens_authenticate_identities_and_read_only_ones_cannot_write(guarded: Served) -> None:
    """No token or an unknown one: 401; read-only: GET yes, POST 403; a writer's release is recorded as its own."""
    client = guarded.client
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {WRITER}"}):
        response = await client.get("/api/v1/releases", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
    reader = {"authorization": f"Bearer {READER}"}
    assert (await client.get("/api/v1/releases", headers=reader)).status_code == 200
    refused = await client.post("/api/v1/releases", headers=reader, content=structured(envelope("r5"))["content"])
    assert refused.status_code == 403
    assert (await client.post("/api/v1/releases/r5/abort", headers=reader)).status_code == 403
    assert guarded.session.bus.events(Topic.RELEASES) == []
    assert (await client.get("/openapi.json")).status_code == 200  # the contract is public

    writer = {"authorization": f"Bearer {WRITER}", "content-type": "application/cloudevents+json"}
    document = envelope("r5")
    response = await client.post("/api/v1/releases", headers=writer, content=json.dumps(document))
    assert response.status_code == 202, response.text
    await guarded.session.settle_release("r5", timeout_s=30)
    release = (await client.get("/api/v1/releases/r5", headers=reader)).json()
    assert release["actor"] == "ci"

    document = envelope("r6")
    document["data"]["actor"] = "someone-else"
    response = await client.post("/api/v1/releases", headers=writer, content=json.dumps(document))
    assert (response.status_code, response.json()["field"]) == (403, "actor")


def test_the_tokens_file_holds_digests_and_refuses_anything_else(tmp_path: Path) -> None:
    """A token in the clear, a bad flag or a missing identity is refused naming the rule; digests identify."""
    path = tmp_path / "tokens.yaml"
    for text in (
        "tokens:\n  my-secret-token: {identity: ci}\n",
        "tokens:\n  my-secret-token: {read_only: maybe}\n",
        f"tokens:\n  {digest('t')}: {{identity: ci, read_only: 'no'}}\n",
        f"tokens:\n  {digest('t')}: {{read_only: true}}\n",
        "tokens: [",
    ):
        path.write_text(text)
        with pytest.raises(InvalidInput) as raised:
            load_tokens(path)
        assert raised.value.field == "api_tokens"
        assert "my-secret-token" not in str(raised.value)
    path.write_text(f"tokens:\n  {digest('t')}: {{identity: ci}}\n")
    tokens = load_tokens(path)
    identity = tokens.identify("Bearer t")
    assert identity is not None
    assert (identity.name, identity.read_only) == ("ci", False)
    assert tokens.identify("Bearer u") is None
    assert tokens.identify(None) is None


async def test_openapi_json_is_the_checked_in_document(served: Served) -> None:
    """GET /openapi.json serves the document `reactor schemas export` writes."""
    response = await served.client.get("/openapi.json")
    assert response.json() == json.loads(CHECKED_IN.read_text())
    paths = response.json()["paths"]
    for command in ("approve", "pause", "resume", "abort", "rollback"):
        assert f"/api/v1/releases/{{release_id}}/{command}" in paths
    assert {"/api/v1/releases", "/api/v1/releases/{release_id}/events", "/api/v1/nodes"} <= paths.keys()


async def test_the_feed_gives_past_events_then_live_ones_resuming_after_last_event_id(served: Served) -> None:
    """A reader gets what happened before it came, then new events as they happen, each once, in order."""
    document = envelope("r7", nodes=THREE, strategy={"batches": [1], "approval_every_batch": True})
    assert (await served.client.post("/api/v1/releases", **structured(document))).status_code == 202
    await served.session.settle_release("r7", timeout_s=30)
    past = served.feed.timeline("r7")
    assert past[-1]["event_type"] == "ReleaseAwaitingApproval"

    async with served.feed.follow("r7") as everything, served.feed.follow("r7", after=past[1]["event_id"]) as later:
        seen = [await everything.next_event(5) for _ in past]
        assert [item["event_id"] for item in seen if item] == [item["event_id"] for item in past]
        first = await later.next_event(5)
        assert first is not None
        assert first["event_id"] == past[2]["event_id"]
        assert await everything.next_event(0.01) is None  # nothing new yet

        assert (await served.client.post("/api/v1/releases/r7/approve")).status_code == 202
        live: list[dict[str, Any]] = []
        while not live or live[-1]["event_type"] != "ReleaseAwaitingApproval":
            item = await everything.next_event(10)
            assert item is not None, "no live event within 10 s"
            live.append(item)
        assert live[0]["event_type"] == "ReleaseApproved"
        assert "NodeDeployed" in [item["event_type"] for item in live]


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ci"


def test_the_ci_examples_are_valid_releases() -> None:
    """The README's example event decodes as the API judges it; the example plan is a valid release plan."""
    event = decode_request(
        [("content-type", "application/cloudevents+json")],
        (EXAMPLES / "release-requested.json").read_bytes(),
        ReleaseRequested,
    )
    assert isinstance(event, ReleaseRequested)
    assert event.release_id == "noop-http-1"
    plan = ReleasePlan.model_validate_json((EXAMPLES / "release-noop.json").read_text())
    assert plan.release_id == "noop-ci-1"


def test_schemas_check_reports_a_changed_or_missing_openapi_document(tmp_path: Path) -> None:
    """`reactor schemas check` covers the OpenAPI document: an edit or a deletion is drift."""
    schemas.export(tmp_path)
    assert schemas.drift(tmp_path) == []
    document = tmp_path / "openapi.json"
    document.write_text(document.read_text().replace('"/api/v1/nodes"', '"/api/v1/hosts"'))
    assert schemas.drift(tmp_path) == ["changed: openapi.json"]
    document.unlink()
    assert schemas.drift(tmp_path) == ["missing: openapi.json"]


async def test_closing_the_feed_ends_every_stream_after_what_it_had(served: Served) -> None:
    """When the server stops, readers get what was queued for them, then the end (not a hang until cut off)."""
    assert (await served.client.post("/api/v1/releases", **structured(envelope("r8")))).status_code == 202
    await served.session.settle_release("r8", timeout_s=30)
    count = len(served.feed.timeline("r8"))
    async with served.feed.follow("r8") as reader:
        served.feed.close()
        for _ in range(count):
            assert await reader.next_event(5) is not None
        with pytest.raises(StreamEnded, match="stopping"):
            await reader.next_event(5)
    async with served.feed.follow("r8") as late:
        for _ in range(count):
            assert await late.next_event(5) is not None
        with pytest.raises(StreamEnded):
            await late.next_event(5)


def test_the_feed_keeps_bounded_timelines_and_adds_each_event_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PER_RELEASE events a release's oldest go; past RELEASES_KEPT releases the least recently active goes;
    an event seen twice (published by the API, then read from the bus) is kept once."""
    monkeypatch.setattr(feed_module, "PER_RELEASE", 3)
    monkeypatch.setattr(feed_module, "RELEASES_KEPT", 2)
    feed = Feed("/reactor")
    paused = [ReleasePaused(release_id="a", reason=str(number)) for number in range(5)]
    for event in paused:
        feed.add(Topic.RELEASES, event)
        feed.add(Topic.RELEASES, event)
    assert [item["event_id"] for item in feed.timeline("a")] == [event.event_id for event in paused[2:]]
    feed.add(Topic.RELEASES, ReleasePaused(release_id="b"))
    feed.add(Topic.RELEASES, ReleasePaused(release_id="a", reason="again"))  # "a" is now the most recently active
    feed.add(Topic.RELEASES, ReleasePaused(release_id="c"))
    assert feed.timeline("b") == []
    assert len(feed.timeline("a")) == 3
    assert len(feed.timeline("c")) == 1


async def test_oversized_bodies_are_413_before_they_are_read_whole(served: Served) -> None:
    """An event past the codec's size limit, or a command body past 16 KiB, is refused with 413."""
    big = json.dumps({**envelope("big"), "padding": "x" * MAX_RELEASE_EVENT_BYTES})
    response = await served.client.post(
        "/api/v1/releases", content=big, headers={"content-type": "application/cloudevents+json"}
    )
    assert (response.status_code, response.json()["error"]) == (413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b" " * 1024

    response = await served.client.post("/api/v1/releases/big/pause", content=chunks())
    assert response.status_code == 413
    assert served.session.bus.events(Topic.RELEASES) == []


class _SilentStore:
    """A store whose server does not answer."""

    async def list_releases(self) -> list[object]:
        raise BackendUnavailable("mongodb://db: no answer")

    async def list_nodes(self, **_: object) -> list[object]:
        raise ReactorError("the store broke")


async def test_a_store_that_does_not_answer_is_503_and_other_failures_500_as_json() -> None:
    """Backend failures come back in the same JSON error shape: 503 (try again) when retriable, else 500."""
    store = cast(Store, _SilentStore())
    app = create_app(Api(store=store, bus=MemoryBus(), feed=Feed("/reactor"), tokens=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        unavailable = await client.get("/api/v1/releases")
        assert (unavailable.status_code, unavailable.json()["error"]) == (503, "unavailable")
        broken = await client.get("/api/v1/nodes")
        assert (broken.status_code, broken.json()["error"]) == (500, "error")
