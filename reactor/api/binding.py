"""CloudEvents HTTP protocol binding: requests to events, held to exactly the rules of the Kafka codec.

A request becomes the Kafka record the same event would be (binary mode: each `ce-*` header as a `ce_*` header;
structured mode: the JSON envelope as the value, no headers), keyed by its subject, and `reactor.codec.decode`
judges it. What CI sends over HTTP is therefore valid exactly when it would be valid on the `releases` topic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from reactor.codec import CONTENT_TYPE, HEADER_RULES, MAX_RELEASE_EVENT_BYTES, Record, decode, encode
from reactor.errors import DecodeError
from reactor.events import EVENTS_BY_TYPE, Event

STRUCTURED = "application/cloudevents+json"
_FIELD = re.compile(r"^[A-Za-z0-9_.-]+$")
_ATTRIBUTES = frozenset({rule.name.removeprefix("ce_") for rule in HEADER_RULES if rule.name.startswith("ce_")})


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, without parameters, lower case."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def record_of(headers: Iterable[tuple[str, str]], body: bytes) -> Record:
    """The Kafka record an HTTP request carrying a CloudEvent stands for; DecodeError if it cannot be one (`decode`
    holds its body to its type's limit)."""
    if len(body) > MAX_RELEASE_EVENT_BYTES:
        raise DecodeError(f"oversized: {len(body)} bytes, the limit is {MAX_RELEASE_EVENT_BYTES}")
    pairs = [(name.lower(), value) for name, value in headers]
    content_type = next((value for name, value in pairs if name == "content-type"), None)
    if media_type(content_type) == STRUCTURED:
        try:
            envelope = json.loads(body)
        except ValueError as exc:
            raise DecodeError(f"not a CloudEvent: the body is not JSON: {exc}") from exc
        subject = envelope.get("subject") if isinstance(envelope, dict) else None
        key = subject.encode() if isinstance(subject, str) else None
        return Record(key=key, value=body, headers=())
    if not any(name.startswith("ce-") for name, _ in pairs):
        raise DecodeError(
            f"content-type: {STRUCTURED} (structured mode) or ce-* headers with a {CONTENT_TYPE} body (binary mode)"
        )
    kafka_headers: list[tuple[str, bytes]] = []
    for name, value in pairs:
        if name.startswith("ce-"):
            # The HTTP binding percent-encodes what a header cannot carry (space, '"', '%', beyond ASCII).
            try:
                text = unquote(value, errors="strict")
            except UnicodeDecodeError as exc:
                raise DecodeError(f"{name}: percent-encoded bytes that are not UTF-8: {exc}") from exc
            kafka_headers.append(("ce_" + name.removeprefix("ce-"), text.encode()))
        elif name == "content-type":
            # Parameters (e.g. charset=utf-8) say nothing the codec's rule does not: JSON is UTF-8.
            kafka_headers.append(("content-type", media_type(value).encode()))
    subject = next((value for name, value in kafka_headers if name == "ce_subject"), None)
    return Record(key=subject, value=body, headers=tuple(kafka_headers))


def decode_request(headers: Iterable[tuple[str, str]], body: bytes, expected: type[Event]) -> Event:
    """The event of type `expected` an HTTP request carries; DecodeError naming the attribute (as the request's mode
    names it: `time` in structured mode, `ce-time` in binary mode) or the field, and why, as `decode` does."""
    return decode_request_record(headers, body, expected)[0]


def decode_request_record(
    headers: Iterable[tuple[str, str]], body: bytes, expected: type[Event]
) -> tuple[Event, Record]:
    """`decode_request`, and the Kafka record the request stands for (what a signature over it covers)."""
    pairs = list(headers)
    binary = not is_structured(pairs)
    try:
        record = record_of(pairs, body)
        event, _source = decode(record)
    except DecodeError as exc:
        raise DecodeError(_as_named(str(exc), binary=binary)) from exc
    if not isinstance(event, expected):
        raise DecodeError(f"{'ce-type' if binary else 'type'}: this path takes {expected.TYPE}, not {event.TYPE}")
    return event, record


def _as_named(reason: str, *, binary: bool) -> str:
    """A codec reason with the attribute named as the request names it (binary mode: its `ce-` header)."""
    if not binary:
        return reason
    head, separator, rest = reason.partition(": ")
    name = head.removeprefix("ce_")
    if separator and (head.startswith("ce_") or name in _ATTRIBUTES):
        return f"ce-{name}: {rest}"
    return reason


def is_structured(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a request says it carries a structured-mode CloudEvent."""
    return any(name.lower() == "content-type" and media_type(value) == STRUCTURED for name, value in headers)


def structured(event: Event, source: str) -> dict[str, Any]:
    """The structured-mode CloudEvent (JSON envelope with `data`) of an event, as the bus would carry it."""
    record = encode(event, source)
    envelope: dict[str, Any] = {}
    for name, value in record.headers:
        if name.startswith("ce_"):
            envelope[name.removeprefix("ce_")] = value.decode()
        elif name == "content-type":
            envelope["datacontenttype"] = value.decode()
    envelope.pop("partitionkey", None)
    envelope["data"] = json.loads(record.value)
    return envelope


def problem_field(reason: str) -> str:
    """The attribute or field a DecodeError's reason names first ("field: why")."""
    head, separator, rest = reason.partition(": ")
    # "dev.deployreactor.release.requested.v1: plan.version: ..." names the field after the type.
    if head in EVENTS_BY_TYPE and ": " in rest:
        head = rest.partition(": ")[0]
    # "not a CloudEvent: ..." or "oversized: ..." name no field: the event as a whole is at fault.
    return head if separator and _FIELD.match(head) else "(event)"
