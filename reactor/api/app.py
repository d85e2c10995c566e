"""The Starlette application: routes over the store, the bus and the feed; bearer-token identities."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from reactor import logs
from reactor.api import console, openapi
from reactor.api.auth import LOCAL, Identity, Tokens
from reactor.api.binding import decode_request_record, problem_field
from reactor.api.feed import Feed, StreamEnded
from reactor.cli import documents
from reactor.codec import describe_validation_error, encode, matches, max_event_bytes
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.errors import DecodeError, ReactorError
from reactor.events import (
    RELEASE_ID,
    Event,
    ReleaseAborted,
    ReleaseApproved,
    ReleasePaused,
    ReleaseRequested,
    ReleaseResumed,
    ReleaseRollbackRequested,
    Topic,
)
from reactor.ports import EventBus, ReleaseNode, ReleaseRecord, Store
from reactor.trust.identities import TrustStore
from reactor.trust.signing import SignatureError, is_signed, sign_record, verify_record

log = logs.get_logger(__name__)

COMMANDS: dict[
    str, type[ReleaseApproved | ReleasePaused | ReleaseResumed | ReleaseAborted | ReleaseRollbackRequested]
] = {
    "approve": ReleaseApproved,
    "pause": ReleasePaused,
    "resume": ReleaseResumed,
    "abort": ReleaseAborted,
    "rollback": ReleaseRollbackRequested,
}
# A comment line on an idle stream, so proxies and clients see it is alive (and a gone client is noticed).
KEEPALIVE_S = 15.0
_MAX_COMMAND_BYTES = 16 * 1024


@dataclass
class Api:
    """What the routes work on. `tokens` None: no authentication (embedded mode's local use only). `trust`: the
    trusted keys a signed submission is verified with (None: no trust file, so one is passed on unverified, and the
    workers, which check nothing either, act on it)."""

    store: Store
    bus: EventBus
    feed: Feed
    tokens: Tokens | None
    trust: TrustStore | None = None
    keepalive_s: float = KEEPALIVE_S

    async def publish_as(self, identity: Identity, event: Event) -> None:
        """Publish a command for `identity`: signed with its key when its token has one, else as the bus signs."""
        if identity.key is None:
            await self.bus.publish(event)
        else:
            await self.bus.publish_raw(event.TOPIC, sign_record(encode(event, self.feed.source), identity.key))


class Refused(Exception):
    """A request answered with an error document: status, kind, the field at fault and why."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Bearer realm="reactor"'} if self.status == 401 else None
        body = {"error": self.error, "field": self.field, "detail": self.detail}
        return JSONResponse(body, status_code=self.status, headers=headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(api: Api) -> Starlette:
    """The ASGI application of the HTTP API."""

    def guarded(handler: Callable[[Api, Request, Identity], Awaitable[Response]], *, writes: bool) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            try:
                identity = authenticate(api.tokens, request.headers.get("authorization"), writes=writes)
                structlog.contextvars.bind_contextvars(identity=identity.name)
                try:
                    return await handler(api, request, identity)
                finally:
                    structlog.contextvars.unbind_contextvars("identity")
            except Refused as refused:
                return refused.response()
            except ReactorError as exc:
                # The store or the bus did not answer (503: try again), or failed otherwise (500); said as JSON.
                status, error = (503, "unavailable") if exc.retriable else (500, "error")
                log.warning("request failed", path=request.url.path, error=str(exc))
                return Refused(status, error, str(exc)).response()

        return endpoint

    async def openapi_document(request: Request) -> Response:
        return JSONResponse(openapi.document())

    routes = [
        Route("/openapi.json", openapi_document, methods=["GET"]),
        Route("/api/v1/releases", guarded(list_releases, writes=False), methods=["GET"]),
        Route("/api/v1/releases", guarded(submit_release, writes=True), methods=["POST"]),
        Route("/api/v1/releases/{release_id}", guarded(show_release, writes=False), methods=["GET"]),
        Route("/api/v1/releases/{release_id}/events", guarded(stream_events, writes=False), methods=["GET"]),
        Route("/api/v1/releases/{release_id}/{command}", guarded(release_command, writes=True), methods=["POST"]),
        Route("/api/v1/nodes", guarded(list_nodes, writes=False), methods=["GET"]),
        Route("/api/v1/whoami", guarded(console.whoami, writes=False), methods=["GET"]),
        *console.routes(),
    ]
    return Starlette(routes=routes)


def authenticate(tokens: Tokens | None, authorization: str | None, *, writes: bool) -> Identity:
    """The identity a request acts as; Refused 401 without a known token, 403 for a read-only one that writes."""
    if tokens is None:
        return LOCAL
    identity = tokens.identify(authorization)
    if identity is None:
        raise Refused(401, "unauthorized", "a known bearer token is required (Authorization: Bearer <token>)")
    if writes and identity.read_only:
        raise Refused(403, "forbidden", f"{identity.name} has read-only access")
    return identity


def _release_id(request: Request) -> str:
    release_id: str = request.path_params["release_id"]
    if not (len(release_id) < 64 and matches(RELEASE_ID, release_id)):
        raise Refused(404, "not_found", f"no release {release_id!r}", field="release_id")
    return release_id


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes before more of it is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, "too_large", f"the body is at most {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(413, "too_large", f"the body is at most {limit} bytes")
    return bytes(body)


async def _record(store: Store, release_id: str) -> ReleaseRecord:
    record = await store.get_release(release_id)
    if record is None:
        raise Refused(404, "not_found", f"no release {release_id!r}", field="release_id")
    return record


def summary(record: ReleaseRecord, counts: dict[ItemState, int]) -> dict[str, Any]:
    """A release in a list: what, where it is and its progress (the detail adds nodes, batches and events)."""
    times = record.model_dump(mode="json", include={"created_at", "updated_at"})
    return {
        "release_id": record.release_id,
        "service": record.plan.service,
        "version": record.plan.version,
        "state": record.state.value,
        "reason": record.reason,
        "batch": record.batch + 1,
        "batch_count": len(record.batch_sizes),
        "actor": record.actor,
        "created_at": times["created_at"],
        "updated_at": times["updated_at"],
        "progress": {state.value: counts.get(state, 0) for state in ItemState},
    }


def batches(record: ReleaseRecord, members: list[ReleaseNode]) -> list[dict[str, Any]]:
    """Each batch (1-based) with its size and how many of its nodes are in each state."""
    counts = [dict.fromkeys(ItemState, 0) for _ in record.batch_sizes]
    for member in members:
        if member.batch < len(counts):
            counts[member.batch][member.state] += 1
    return [
        {
            "batch": index + 1,
            "size": size,
            "progress": {state.value: count for state, count in counts[index].items()},
        }
        for index, size in enumerate(record.batch_sizes)
    ]


async def list_releases(api: Api, request: Request, identity: Identity) -> Response:
    wanted = request.query_params.get("state")
    service = request.query_params.get("service")
    if wanted is not None and wanted not in ReleaseState.__members__.values():
        states = ", ".join(state.value for state in ReleaseState)
        raise Refused(400, "invalid", f"{wanted!r} is not a release state ({states})", field="state")
    found = []
    for record in await api.store.list_releases():
        if (wanted is None or record.state.value == wanted) and (service is None or record.plan.service == service):
            found.append(summary(record, await api.store.count_release_nodes(record.release_id)))
    return JSONResponse({"releases": found})


async def show_release(api: Api, request: Request, identity: Identity) -> Response:
    release_id = _release_id(request)
    record = await _record(api.store, release_id)
    counts = await api.store.count_release_nodes(release_id)
    members = await api.store.list_release_nodes(release_id)
    statuses = await api.store.list_nodes(release_id=release_id)
    document = documents.release(record, counts, members, statuses)
    document["batches"] = batches(record, members)
    document["events"] = api.feed.timeline(release_id)
    return JSONResponse(document)


async def list_nodes(api: Api, request: Request, identity: Identity) -> Response:
    statuses = await api.store.list_nodes(
        release_id=request.query_params.get("release_id"), service=request.query_params.get("service")
    )
    return JSONResponse(documents.nodes(statuses))


async def submit_release(api: Api, request: Request, identity: Identity) -> Response:
    body = await _body(request, max_event_bytes(ReleaseRequested))
    try:
        event, record = decode_request_record(request.headers.items(), body, ReleaseRequested)
    except DecodeError as exc:
        reason = str(exc)
        raise Refused(400, "invalid", reason, field=problem_field(reason)) from exc
    assert isinstance(event, ReleaseRequested)  # noqa: S101 (decode_request checked the type; this tells mypy)
    # A submission signed by its sender (binary mode, ce-dssematerial) goes on as it came, its signature with it;
    # any other is signed here for the token's identity.
    signed = is_signed(record.headers)
    if signed and api.trust is not None:
        try:
            signer = verify_record(record, api.trust).identity.name
        except SignatureError as exc:
            raise Refused(403, "forbidden", str(exc), field="ce-dssematerial") from exc
        if api.tokens is not None and signer != identity.name:
            raise Refused(
                403,
                "forbidden",
                f"signed by {signer!r}, not by the authenticated identity {identity.name!r}",
                "ce-dssematerial",
            )
    if api.tokens is not None:
        if event.actor is None and not signed:
            event = event.model_copy(update={"actor": identity.name})
        elif event.actor is not None and event.actor != identity.name:
            raise Refused(
                403, "forbidden", f"actor {event.actor!r} is not the authenticated identity {identity.name!r}", "actor"
            )
    existing = await api.store.get_release(event.release_id)
    location = f"/api/v1/releases/{event.release_id}"
    if existing is not None and existing.request_id != event.event_id:
        raise Refused(409, "conflict", f"release {event.release_id!r} exists already", field="release_id")
    if existing is None:
        if signed:
            await api.bus.publish_raw(Topic.RELEASES, record)
        else:
            await api.publish_as(identity, event)
        api.feed.add(Topic.RELEASES, event)
        log.info("release submitted", release_id=event.release_id, event_id=event.event_id)
    accepted = {"release_id": event.release_id, "event_id": event.event_id, "location": location}
    return JSONResponse(accepted, status_code=202, headers={"Location": location})


async def release_command(api: Api, request: Request, identity: Identity) -> Response:
    name = request.path_params["command"]
    kind = COMMANDS.get(name)
    if kind is None:
        raise Refused(404, "not_found", f"no command {name!r} (one of {', '.join(COMMANDS)})", field="command")
    release_id = _release_id(request)
    options = await _command_options(request, allow_fast=kind is ReleaseRollbackRequested)
    await _record(api.store, release_id)
    try:
        event = kind(release_id=release_id, actor=identity.name, **options)
    except ValidationError as exc:
        reason = describe_validation_error(exc)
        raise Refused(400, "invalid", reason, field=problem_field(reason)) from exc
    await api.publish_as(identity, event)
    api.feed.add(Topic.RELEASES, event)
    log.info("release command", release_id=release_id, command=name, event_id=event.event_id)
    return JSONResponse(
        {"release_id": release_id, "event_id": event.event_id, "type": event.TYPE, "actor": identity.name},
        status_code=202,
    )


async def _command_options(request: Request, *, allow_fast: bool) -> dict[str, Any]:
    """The optional JSON body of a command: `reason`, and `fast` for a rollback."""
    body = await _body(request, _MAX_COMMAND_BYTES)
    if not body.strip():
        return {}
    try:
        options = json.loads(body)
    except ValueError as exc:
        raise Refused(400, "invalid", f"the body is not JSON: {exc}", field="(body)") from exc
    if not isinstance(options, dict):
        raise Refused(400, "invalid", "the body is a JSON object", field="(body)")
    allowed = {"reason", "fast"} if allow_fast else {"reason"}
    for key in options:
        if key not in allowed:
            raise Refused(400, "invalid", f"unknown field; allowed: {', '.join(sorted(allowed))}", field=key)
    return options


async def stream_events(api: Api, request: Request, identity: Identity) -> Response:
    release_id = _release_id(request)
    if not api.feed.timeline(release_id):
        await _record(api.store, release_id)
    after = request.headers.get("last-event-id")

    async def events() -> AsyncIterator[bytes]:
        async with api.feed.follow(release_id, after=after) as reader:
            yield b"retry: 2000\n\n"
            while True:
                try:
                    item = await reader.next_event(api.keepalive_s)
                except StreamEnded as ended:
                    yield f": {ended}\n\n".encode()
                    return
                if item is None:
                    yield b": keepalive\n\n"
                    continue
                data = json.dumps(item, separators=(",", ":"))
                yield f"id: {item['event_id']}\nevent: {item['event_type']}\ndata: {data}\n\n".encode()

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
