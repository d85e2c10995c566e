"""Events to and from the CloudEvents Kafka protocol binding (binary mode; structured mode read too)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent
from pydantic import ValidationError

from reactor.errors import DecodeError, InvalidInput
from reactor.events import EVENT_ID, EVENTS_BY_TYPE, RELEASE_ID, Event, ReleaseEvent, ReleaseRequested, Topic

CONTENT_TYPE = "application/json"
# Commands and outcomes: well under Kafka's default 1 MiB message limit, so a rejected message still fits in the
# dead-letter topic with its reason.
MAX_EVENT_BYTES = 900 * 1024
# Events of the releases topic: a release's request carries its plan's nodes (about 100 bytes each without labels,
# and a plan has up to 100,000), and a batch's start names the batch's nodes. The releases topic is made to take them
# (`reactor topics create` sets its max.message.bytes), and producers and its readers fetch that much.
MAX_RELEASE_EVENT_BYTES = 32 * 1024 * 1024
# Envelope fields live in the CloudEvents attributes; the JSON body carries the rest of the event.
_ENVELOPE_FIELDS = {"event_id", "occurred_at", "release_id", "causation_id"}
SPECVERSION = "1.0"
# RFC 3339 date-time (seconds 00-59: a leap second cannot be represented, so it is refused).
RFC3339 = (
    r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
# A header whose name starts with ce_ (in any case) is a CloudEvents attribute: lower-case letters and digits.
ATTRIBUTE_HEADER = r"^ce_[a-z0-9]+$"
_ANY_CE = re.compile(r"^[Cc][Ee]_")
# Base64 in the standard or URL-safe alphabet, as DSSE allows.
DSSE_MATERIAL = r"^[A-Za-z0-9+/_-]+={0,2}$"
# Not attributes in binary mode: `data` is the message value and `datacontenttype` the content-type header.
RESERVED_HEADERS = ("ce_data", "ce_datacontenttype")


def matches(pattern: str, value: str) -> bool:
    """`value` matches an anchored pattern as JSON Schema reads it (ECMA-262: `$` is the very end, no newline)."""
    return re.search(pattern, value) is not None and not value.endswith("\n")


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """One Kafka header of the binary content mode, as published in asyncapi.json and enforced by `decode`."""

    name: str
    description: str
    required: bool = False
    pattern: str | None = None
    const: str | None = None
    date_time: bool = False

    def json_schema(self) -> dict[str, Any]:
        """This rule as JSON Schema (asyncapi.json's headers, openapi.json's CloudEvents attributes)."""
        schema: dict[str, Any] = {"type": "string", "description": self.description}
        if self.const is not None:
            schema["const"] = self.const
        else:
            schema["minLength"] = 1
        if self.pattern is not None:
            schema["pattern"] = self.pattern
        if self.date_time:
            schema["format"] = "date-time"
        return schema

    def check(self, value: str) -> str | None:
        """Why `value` breaks this rule, or None."""
        if self.const is not None and value != self.const:
            return f"must be {self.const!r}, not {value!r}"
        if self.pattern is not None and not matches(self.pattern, value):
            return f"{value!r} does not match {self.pattern}"
        if not value:
            return "must not be empty"
        if self.date_time:
            try:
                datetime.fromisoformat(value)
            except ValueError as exc:
                return f"{value!r} is not an RFC 3339 date-time: {exc}"
        return None


# One source of truth for the headers: `reactor.schemas` publishes these, `decode` enforces exactly these.
# ce_type is checked per message (its const is the message's type); release messages also need ce_correlationid.
HEADER_RULES: tuple[HeaderRule, ...] = (
    HeaderRule("ce_specversion", "CloudEvents version.", required=True, const=SPECVERSION),
    HeaderRule("ce_id", "Event id; consumers dedupe on it.", required=True, pattern=EVENT_ID),
    HeaderRule("ce_source", "The producer, e.g. /reactor or /ci/my-pipeline.", required=True),
    HeaderRule("ce_type", "Versioned event type; one per message, see each message.", required=True),
    HeaderRule("ce_time", "When it happened, RFC 3339.", required=True, pattern=RFC3339, date_time=True),
    HeaderRule(
        "ce_subject",
        "The node key (node messages) or the release id (release messages); equal to that body field or release id"
        " and to the message key.",
        required=True,
    ),
    HeaderRule("ce_correlationid", "The release id; required on release messages.", pattern=RELEASE_ID),
    HeaderRule("ce_causationid", "Id of the event that caused this one.", pattern=EVENT_ID),
    HeaderRule("ce_partitionkey", "The partition key (equal to the message key when given)."),
    HeaderRule(
        "ce_dssematerial",
        "The signature (CloudEvents extension Verifiable CloudEvents with DSSE,"
        " https://cloudevents.io/verifiability/dsse/v0.1): the Base64 of a DSSE v1.0.2 envelope, Ed25519, whose payload"
        " covers every other attribute, the body and, in its signedextattrs, every extension attribute. Required"
        " where REACTOR_REQUIRE_SIGNED is on (the default in distributed mode).",
        pattern=DSSE_MATERIAL,
    ),
    HeaderRule("content-type", "The body's media type.", const=CONTENT_TYPE),
)
_RULES = {rule.name: rule for rule in HEADER_RULES}


@dataclass(frozen=True, slots=True)
class Record:
    """One message as a bus carries it: key, JSON body and headers."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> bytes | None:
        """The first header called `name`, if any."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def encode(event: Event, source: str) -> Record:
    """The binary-mode Kafka message for `event`, keyed by its subject."""
    attributes: dict[str, Any] = {
        "id": event.event_id,
        "source": source,
        "type": event.TYPE,
        "subject": event.subject(),
        "time": event.occurred_at,
        "datacontenttype": CONTENT_TYPE,
        "partitionkey": event.subject(),
    }
    if event.release_id is not None:
        attributes["correlationid"] = event.release_id
    if event.causation_id is not None:
        attributes["causationid"] = event.causation_id
    data = event.model_dump(mode="json", exclude=_ENVELOPE_FIELDS)
    message = ce_kafka.to_binary_event(CloudEvent(attributes, data))
    key = message.key.encode() if isinstance(message.key, str) else message.key
    return Record(key=key, value=message.value, headers=tuple(message.headers.items()))


def max_event_bytes(event_type: type[Event]) -> int:
    """The largest message body `decode` takes for an event of `event_type`: more on the releases topic."""
    return MAX_RELEASE_EVENT_BYTES if event_type.TOPIC == Topic.RELEASES else MAX_EVENT_BYTES


def check_size(event: Event, record: Record) -> None:
    """Raise InvalidInput unless `record` (the encoding of `event`) is small enough for `decode` to take: sent, it
    would only be dead-lettered by every reader. For a ReleaseRequested it says how many of its nodes would fit."""
    size = len(record.value)
    limit = max_event_bytes(type(event))
    if size <= limit:
        return
    if isinstance(event, ReleaseRequested) and len(event.plan.nodes) > 1:
        nodes = len(event.plan.nodes)
        # The request's own size, then what its nodes take on average.
        alone = event.model_copy(update={"plan": event.plan.model_copy(update={"nodes": event.plan.nodes[:1]})})
        base = len(encode(alone, "/size").value)
        fit = 1 + (limit - base) * (nodes - 1) // (size - base)
        raise InvalidInput(
            "plan.nodes",
            f"the release request of {nodes:,} nodes is {size:,} bytes, more than the {limit:,} an event on"
            f" the bus may be: about {fit:,} of these nodes fit in one release; split it",
        )
    raise InvalidInput(event.TYPE, f"the event is {size:,} bytes, more than the {limit:,} an event may be")


def _oversized(size: int, limit: int) -> DecodeError:
    return DecodeError(f"oversized: {size} bytes, the limit is {limit}")


def decode(record: Record) -> tuple[Event, str]:
    """The event in `record` and its source; raises DecodeError with the reason if it is not valid.

    Binary mode (any ce_* header) is held to HEADER_RULES exactly; structured mode to the same rules on the
    attributes of its JSON envelope. Headers that are not ce_* attributes or content-type are ignored.
    """
    size = len(record.value)
    if size > MAX_RELEASE_EVENT_BYTES:
        raise _oversized(size, MAX_RELEASE_EVENT_BYTES)
    if any(_ANY_CE.match(name) for name, _ in record.headers):
        attributes = headers = _attribute_headers(record.headers)
        _check_attributes(headers, structured=False)
        message = ce_kafka.KafkaMessage(
            headers={name: value.encode() for name, value in headers.items()}, key=record.key, value=record.value
        )
    else:
        attributes = _check_structured(record.value)
        message = ce_kafka.KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)
    # The type's own limit (checked as known), before its data is validated.
    limit = max_event_bytes(EVENTS_BY_TYPE[attributes["ce_type"]])
    if size > limit:
        raise _oversized(size, limit)
    try:
        cloud_event = ce_kafka.from_kafka_event(message)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"not a CloudEvent: {exc}") from exc
    except Exception as exc:  # the SDK raises its own validation errors, not rooted in ValueError
        raise DecodeError(f"not a CloudEvent: {type(exc).__name__}: {exc}") from exc
    event = _event(cloud_event)
    _check_key(record, event)
    return event, cloud_event.get_source()


def _event(cloud_event: BaseCloudEvent) -> Event:
    model = EVENTS_BY_TYPE[cloud_event.get_type()]
    data = cloud_event.get_data()
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise DecodeError(f"data: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError("data: must be a JSON object")
    envelope = _ENVELOPE_FIELDS & data.keys()
    if envelope:
        raise DecodeError(f"data: {sorted(envelope)[0]} travels as a CloudEvents attribute, not in the body")
    fields = dict(data)
    fields["event_id"] = cloud_event.get_id()
    fields["occurred_at"] = cloud_event.get_time()
    for field, extension in (("release_id", "correlationid"), ("causation_id", "causationid")):
        value = cloud_event.get_extension(extension)
        if value is not None:
            fields[field] = value
    try:
        event = model.model_validate(fields)
    except ValidationError as exc:
        raise DecodeError(f"{model.TYPE}: {describe_validation_error(exc)}") from exc
    if cloud_event.get_subject() != event.subject():
        raise DecodeError(f"subject: {cloud_event.get_subject()!r} does not match {event.subject()!r}")
    return event


def _check_key(record: Record, event: Event) -> None:
    """The message key is the subject: it decides the partition, and with it the order of the node's messages."""
    if record.key is None or record.key != event.subject().encode():
        shown = None if record.key is None else record.key.decode(errors="replace")
        raise DecodeError(f"key: must be the subject {event.subject()!r}, not {shown!r}")


def _attribute_headers(headers: tuple[tuple[str, bytes], ...]) -> dict[str, str]:
    """The ce_* and content-type headers of a binary-mode message, decoded; refuses malformed or repeated ones."""
    found: dict[str, str] = {}
    for name, raw in headers:
        if _ANY_CE.match(name):
            if not matches(ATTRIBUTE_HEADER, name) or name in RESERVED_HEADERS:
                raise DecodeError(f"header {name!r}: a ce_* header is ce_ and a lower-case attribute name")
        elif name != "content-type":
            continue  # not part of the event (e.g. tracing headers)
        if name in found:
            raise DecodeError(f"{name}: the header appears twice")
        try:
            found[name] = raw.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{name}: not UTF-8: {exc}") from exc
    return found


def _check_structured(value: bytes) -> dict[str, str]:
    """Hold the JSON envelope of a structured-mode message to the header rules, by attribute name; its attributes
    as binary mode's headers name them."""
    try:
        envelope = json.loads(value)
    except ValueError as exc:
        raise DecodeError(f"not a CloudEvent: no ce_* headers and the body is not JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise DecodeError("not a CloudEvent: a structured CloudEvent is a JSON object")
    attributes: dict[str, str] = {}
    for name, item in envelope.items():
        if name in ("data", "data_base64"):
            continue
        if not isinstance(item, str):
            raise DecodeError(f"{name}: a CloudEvents attribute must be a string here")
        attributes["content-type" if name == "datacontenttype" else f"ce_{name}"] = item
    _check_attributes(attributes, structured=True)
    return attributes


def _check_attributes(attributes: dict[str, str], *, structured: bool) -> None:
    """Every rule of HEADER_RULES, the type's and the release messages' correlation id; named as the mode names them."""

    def named(header: str) -> str:
        if not structured:
            return header
        return "datacontenttype" if header == "content-type" else header.removeprefix("ce_")

    for rule in HEADER_RULES:
        value = attributes.get(rule.name)
        if value is None:
            if rule.required:
                raise DecodeError(f"{named(rule.name)}: required, missing")
            continue
        problem = rule.check(value)
        if problem is not None:
            raise DecodeError(f"{named(rule.name)}: {problem}")
    model = EVENTS_BY_TYPE.get(attributes["ce_type"])
    if model is None:
        raise DecodeError(f"{named('ce_type')}: unknown event type {attributes['ce_type']!r}")
    if issubclass(model, ReleaseEvent) and "ce_correlationid" not in attributes:
        raise DecodeError(f"{named('ce_correlationid')}: required on release messages (the release id)")


def describe_validation_error(exc: ValidationError) -> str:
    """One line per broken rule, each naming the field path and the rule."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)
