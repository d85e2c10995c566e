"""Events to and from the CloudEvents Kafka protocol binding (binary mode; structured mode read too)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent
from pydantic import ValidationError

from reactor.errors import DecodeError
from reactor.events import EVENTS_BY_TYPE, Event

CONTENT_TYPE = "application/json"
# Well under Kafka's default 1 MiB message limit, so a rejected message still fits in the dead-letter topic
# with its reason; a 10,000-node release plan is about 700 KiB.
MAX_EVENT_BYTES = 900 * 1024
# Envelope fields live in the CloudEvents attributes; the JSON body carries the rest of the event.
_ENVELOPE_FIELDS = {"event_id", "occurred_at", "release_id", "causation_id"}


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


def decode(record: Record) -> tuple[Event, str]:
    """The event in `record` and its source; raises DecodeError with the reason if it is not valid."""
    if len(record.value) > MAX_EVENT_BYTES:
        raise DecodeError(f"oversized: {len(record.value)} bytes, the limit is {MAX_EVENT_BYTES}")
    headers = dict(record.headers)
    _require_id(headers, record.value)
    try:
        cloud_event = ce_kafka.from_kafka_event(
            ce_kafka.KafkaMessage(headers=headers, key=record.key, value=record.value)
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"not a CloudEvent: {exc}") from exc
    except Exception as exc:  # the SDK raises its own validation errors, not rooted in ValueError
        raise DecodeError(f"not a CloudEvent: {type(exc).__name__}: {exc}") from exc
    event_type = cloud_event.get_type()
    model = EVENTS_BY_TYPE.get(event_type)
    if model is None:
        raise DecodeError(f"type: unknown event type {event_type!r}")
    data = cloud_event.get_data()
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise DecodeError(f"data: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError("data: must be a JSON object")
    fields = dict(data)
    fields["event_id"] = cloud_event.get_id()
    time = cloud_event.get_time()
    if time is not None:
        fields["occurred_at"] = time
    for field, extension in (("release_id", "correlationid"), ("causation_id", "causationid")):
        value = cloud_event.get_extension(extension)
        if value is not None:
            fields[field] = value
    try:
        event = model.model_validate(fields)
    except ValidationError as exc:
        raise DecodeError(f"{event_type}: {describe_validation_error(exc)}") from exc
    if cloud_event.get_subject() not in (None, event.subject()):
        raise DecodeError(f"subject: {cloud_event.get_subject()!r} does not match {event.subject()!r}")
    return event, cloud_event.get_source()


def _require_id(headers: dict[str, bytes], value: bytes) -> None:
    """The SDK invents a fresh id when none is given, which would defeat dedupe: refuse such messages."""
    if any(name.lower().startswith("ce_") for name in headers):
        if not headers.get("ce_id"):
            raise DecodeError("id: the ce_id header is missing")
        return
    try:
        envelope = json.loads(value)
    except ValueError as exc:
        raise DecodeError(f"not a CloudEvent: no ce_* headers and the body is not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or not envelope.get("id"):
        raise DecodeError("id: a structured CloudEvent needs an id")


def describe_validation_error(exc: ValidationError) -> str:
    """One line per broken rule, each naming the field path and the rule."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)
