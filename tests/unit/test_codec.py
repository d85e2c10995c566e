"""The CloudEvents Kafka binding: binary-mode encode/decode of every event, structured mode read, rejections."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent

from reactor.codec import MAX_EVENT_BYTES, MAX_RELEASE_EVENT_BYTES, Record, check_size, decode, encode
from reactor.errors import DecodeError
from reactor.events import (
    EVENT_TYPES,
    AutoRollback,
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    HealthCheck,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    NodeTarget,
    Package,
    ReleaseAborted,
    ReleaseApproved,
    ReleaseAwaitingApproval,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePaused,
    ReleasePlan,
    ReleaseRequested,
    ReleaseResumed,
    ReleaseRollbackRequested,
    ReleaseRolledBack,
    RollbackFailed,
    RollbackRequested,
    Strategy,
)

pytestmark = pytest.mark.unit

SOURCE = "/tests/codec"
SHA = "0123456789abcdef" * 4
IMAGE = "registry.example.com/shop/api:1.2.3"
AT = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
NODE = "local/h1/api"
STRUCTURED_CONTENT_TYPE = ("content-type", b"application/cloudevents+json")
REL = "rel-7"

PLAN = ReleasePlan(
    release_id=REL,
    service="api",
    version="1.2.3",
    package=Package(url="https://artifacts.example.com/api-1.2.3.tgz", sha256=SHA),
    health=HealthCheck(kind="tcp", timeout_s=3.5),
    nodes=[NodeTarget(node_key=NODE, port=8080), NodeTarget(node_key="k8s/prod/api", image=IMAGE)],
    strategy=Strategy(batches=[1, "50%"], max_parallel=2, failure_budget="10%", auto_rollback=AutoRollback.RELEASE),
)

SAMPLES: list[Event] = [
    DeployRequested(
        event_id="req-1",
        occurred_at=AT,
        release_id=REL,
        causation_id="cause-1",
        node_key=NODE,
        service="api",
        version="1.2.3",
        package=Package(url="https://artifacts.example.com/api-1.2.3.tgz", sha256=SHA),
        port=8080,
        health=HealthCheck(path="/ready", timeout_s=2.0),
        auto_rollback=AutoRollback.NONE,
        actor="alice@example.com",
    ),
    RollbackRequested(node_key=NODE, service="api", to_version="1.2.2", reason="bad build", actor="bob"),
    NodeDeployed(release_id=REL, node_key=NODE, service="api", version="1.2.3", prev_version="1.2.2", duration_s=1.5),
    NodeFailed(
        release_id=REL,
        node_key=NODE,
        service="api",
        version="1.2.3",
        current_version="1.2.2",
        step="health",
        error="GET /healthz: 503",
        auto_rollback=AutoRollback.RELEASE,
    ),
    NodeRolledBack(node_key=NODE, service="api", version="1.2.2", from_version="1.2.3", causation_id="req-1"),
    RollbackFailed(node_key=NODE, service="api", version="1.2.2", step="start", error="exit 1"),
    ReleaseRequested(release_id=REL, plan=PLAN, actor="alice"),
    ReleaseApproved(release_id=REL, actor="alice", reason="looks good"),
    ReleasePaused(release_id=REL, reason="lunch"),
    ReleaseResumed(release_id=REL),
    ReleaseAborted(release_id=REL, actor="carol", reason="rollback everything"),
    ReleaseRollbackRequested(release_id=REL, actor="dave", reason="bad metrics"),
    ReleaseAwaitingApproval(release_id=REL, batch=0),
    BatchStarted(release_id=REL, batch=0, node_keys=[NODE]),
    BatchCompleted(release_id=REL, batch=0, succeeded=1, failed=0),
    ReleaseCompleted(release_id=REL, succeeded=2, failed=0),
    ReleaseHalted(release_id=REL, reason="failure budget spent", succeeded=1, failed=1),
    ReleaseRolledBack(release_id=REL, rolled_back=2, failed=0),
]


def sample_id(event: Event) -> str:
    return type(event).__name__


def with_header(record: Record, name: str, value: bytes) -> Record:
    """`record` with header `name` set to `value` (replaced if present, added if not)."""
    headers = [(key, old) for key, old in record.headers if key != name]
    return Record(key=record.key, value=record.value, headers=(*headers, (name, value)))


def with_body(record: Record, change: dict[str, Any]) -> Record:
    """`record` with its JSON body updated by `change`."""
    body = json.loads(record.value)
    body.update(change)
    return Record(key=record.key, value=json.dumps(body).encode(), headers=record.headers)


def structured(event: Event, source: str) -> Record:
    """`event` as a structured-mode Kafka message: the whole CloudEvents JSON envelope in the value."""
    attributes: dict[str, Any] = {
        "id": event.event_id,
        "source": source,
        "type": event.TYPE,
        "subject": event.subject(),
        "time": event.occurred_at,
        "datacontenttype": "application/json",
        "partitionkey": event.subject(),
    }
    if event.release_id is not None:
        attributes["correlationid"] = event.release_id
    if event.causation_id is not None:
        attributes["causationid"] = event.causation_id
    data = event.model_dump(mode="json", exclude={"event_id", "occurred_at", "release_id", "causation_id"})
    message = ce_kafka.to_structured_event(CloudEvent(attributes, data))
    key = message.key.encode() if isinstance(message.key, str) else message.key
    return Record(key=key, value=message.value, headers=tuple(message.headers.items()))


def test_samples_cover_every_event_type() -> None:
    assert [type(event) for event in SAMPLES] == list(EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=sample_id)
def test_encode_then_decode_gives_back_the_event_and_its_source(event: Event) -> None:
    decoded, source = decode(encode(event, SOURCE))
    assert type(decoded) is type(event)
    assert decoded == event
    assert decoded.occurred_at == event.occurred_at
    assert source == SOURCE


@pytest.mark.parametrize("event", SAMPLES, ids=sample_id)
def test_record_carries_the_cloudevents_headers_and_is_keyed_by_subject(event: Event) -> None:
    record = encode(event, SOURCE)
    assert record.header("ce_id") == event.event_id.encode()
    assert record.header("ce_type") == event.TYPE.encode()
    assert record.header("ce_source") == SOURCE.encode()
    assert record.header("ce_specversion") == b"1.0"
    assert record.header("ce_subject") == event.subject().encode()
    assert record.header("content-type") == b"application/json"
    assert record.key == event.subject().encode()


@pytest.mark.parametrize("event", SAMPLES, ids=sample_id)
def test_record_carries_correlation_and_causation_headers_only_when_set(event: Event) -> None:
    record = encode(event, SOURCE)
    expected_correlation = None if event.release_id is None else event.release_id.encode()
    expected_causation = None if event.causation_id is None else event.causation_id.encode()
    assert record.header("ce_correlationid") == expected_correlation
    assert record.header("ce_causationid") == expected_causation


def test_samples_include_events_with_and_without_correlation_and_causation() -> None:
    """Guards the header test above: both branches of each header are exercised."""
    assert {event.release_id is None for event in SAMPLES} == {True, False}
    assert {event.causation_id is None for event in SAMPLES} == {True, False}


def test_node_event_subject_is_the_node_key_and_release_event_subject_the_release_id() -> None:
    assert encode(SAMPLES[0], SOURCE).key == NODE.encode()
    assert encode(ReleasePaused(release_id=REL), SOURCE).key == REL.encode()


@pytest.mark.parametrize("event", SAMPLES, ids=sample_id)
def test_body_is_a_json_object_without_the_envelope_fields(event: Event) -> None:
    body = json.loads(encode(event, SOURCE).value)
    assert isinstance(body, dict)
    assert body.keys().isdisjoint({"event_id", "occurred_at", "release_id", "causation_id"})


def test_time_header_is_the_occurrence_time_in_utc() -> None:
    record = encode(SAMPLES[0], SOURCE)
    assert record.header("ce_time") == b"2025-03-04T05:06:07.890123Z"


# --- rejections ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"\x00\x01garbage", b"not json at all", b"", b"\xff\xfe", b'{"id": "x"}'], ids=repr)
def test_garbage_without_headers_is_rejected(value: bytes) -> None:
    with pytest.raises(DecodeError, match=r"not a CloudEvent|specversion: required"):
        decode(Record(key=b"k", value=value, headers=()))


def test_unknown_event_type_is_rejected() -> None:
    record = with_header(encode(SAMPLES[0], SOURCE), "ce_type", b"dev.deployreactor.node.deploy.requested.v2")
    with pytest.raises(DecodeError, match=r"unknown event type 'dev\.deployreactor\.node\.deploy\.requested\.v2'"):
        decode(record)


def without_header(record: Record, name: str) -> Record:
    """`record` without header `name`."""
    return Record(key=record.key, value=record.value, headers=tuple(item for item in record.headers if item[0] != name))


@pytest.mark.parametrize("header", ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject"])
def test_record_missing_a_required_attribute_is_rejected(header: str) -> None:
    """Every header asyncapi.json marks required is required by the codec, and the reason names it."""
    with pytest.raises(DecodeError, match=f"^{header}: required, missing$"):
        decode(without_header(encode(SAMPLES[0], SOURCE), header))


def test_binary_record_without_an_id_is_rejected() -> None:
    """The SDK would invent a fresh id per decode, so redeliveries could not be recognised: refuse instead."""
    record = without_header(encode(SAMPLES[0], SOURCE), "ce_id")
    with pytest.raises(DecodeError, match="id"):
        decode(record)


def test_structured_record_without_an_id_is_rejected() -> None:
    """The SDK would invent a fresh id per decode, so redeliveries could not be recognised: refuse instead."""
    envelope = json.loads(structured(SAMPLES[0], SOURCE).value)
    del envelope["id"]
    record = Record(key=None, value=json.dumps(envelope).encode(), headers=(STRUCTURED_CONTENT_TYPE,))
    with pytest.raises(DecodeError, match="id"):
        decode(record)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": "1.0; rm -rf /"}, "version"),
        ({"node_key": "local/../api"}, "node_key"),
        ({"shell": "id"}, "shell"),
        ({"port": 0}, "port"),
        ({"package": {"url": "ftp://example.com/x", "sha256": SHA}}, "package.url"),
    ],
)
def test_body_failing_validation_is_rejected_naming_the_field(change: dict[str, Any], field: str) -> None:
    record = with_body(encode(SAMPLES[0], SOURCE), change)
    with pytest.raises(DecodeError) as info:
        decode(record)
    assert f"{DeployRequested.TYPE}: {field}:" in str(info.value)


def test_invalid_correlation_id_is_rejected_naming_the_header() -> None:
    record = with_header(encode(SAMPLES[0], SOURCE), "ce_correlationid", b"Rel 1; id")
    with pytest.raises(DecodeError, match=r"^ce_correlationid: 'Rel 1; id' does not match"):
        decode(record)


def test_release_event_without_correlation_id_is_rejected() -> None:
    """A release event's release id travels in the correlationid extension; without it the event is incomplete."""
    record = encode(ReleasePaused(release_id=REL), SOURCE)
    with pytest.raises(DecodeError, match=r"^ce_correlationid: required on release messages"):
        decode(without_header(record, "ce_correlationid"))


def test_subject_that_does_not_match_the_event_is_rejected() -> None:
    record = with_header(encode(SAMPLES[0], SOURCE), "ce_subject", b"local/h2/api")
    with pytest.raises(DecodeError, match="subject: 'local/h2/api' does not match 'local/h1/api'"):
        decode(record)


@pytest.mark.parametrize("value", [b"[1, 2, 3]", b"42", b"null", b"true"], ids=repr)
def test_body_that_is_not_a_json_object_is_rejected(value: bytes) -> None:
    record = encode(SAMPLES[0], SOURCE)
    with pytest.raises(DecodeError, match="data: must be a JSON object"):
        decode(Record(key=record.key, value=value, headers=record.headers))


def test_body_that_is_not_json_is_rejected() -> None:
    record = encode(SAMPLES[0], SOURCE)
    with pytest.raises(DecodeError):
        decode(Record(key=record.key, value=b"{not json", headers=record.headers))


# --- structured mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("event", SAMPLES, ids=sample_id)
def test_structured_mode_message_decodes_to_the_same_event(event: Event) -> None:
    record = structured(event, "/elsewhere")
    assert record.header("content-type") == b"application/cloudevents+json"
    assert record.header("ce_type") is None
    decoded, source = decode(record)
    assert decoded == event
    assert source == "/elsewhere"


def test_structured_mode_message_failing_validation_is_rejected() -> None:
    event = SAMPLES[0]
    envelope = json.loads(structured(event, SOURCE).value)
    envelope["data"]["version"] = "$(id)"
    record = Record(key=None, value=json.dumps(envelope).encode(), headers=(STRUCTURED_CONTENT_TYPE,))
    with pytest.raises(DecodeError, match="version"):
        decode(record)


def test_structured_mode_subject_mismatch_is_rejected() -> None:
    envelope = json.loads(structured(SAMPLES[0], SOURCE).value)
    envelope["subject"] = "local/h9/api"
    record = Record(key=None, value=json.dumps(envelope).encode(), headers=(STRUCTURED_CONTENT_TYPE,))
    with pytest.raises(DecodeError, match="subject"):
        decode(record)


# --- size limits --------------------------------------------------------------------------------


def _release_of(nodes: int) -> ReleaseRequested:
    plan = PLAN.model_copy(
        update={"nodes": [NodeTarget(node_key=f"local/host-{index:06d}/api") for index in range(nodes)]}
    )
    return ReleaseRequested(release_id=REL, plan=plan)


def test_a_release_request_past_the_commands_limit_decodes_and_a_command_as_large_is_refused() -> None:
    """The releases topic's events may be up to MAX_RELEASE_EVENT_BYTES (a request carries its nodes); any other
    event is held to MAX_EVENT_BYTES, in binary mode before its body is parsed and in structured mode too."""
    request = _release_of(20_000)
    record = encode(request, SOURCE)
    assert MAX_EVENT_BYTES < len(record.value) < MAX_RELEASE_EVENT_BYTES
    check_size(request, record)
    assert decode(record)[0] == request
    assert decode(structured(request, SOURCE))[0] == request

    # Pydantic caps an error at 4,000 characters: the padding goes into an unchecked place, the value.
    failure = NodeFailed(node_key=NODE, service="api", version="1.2.3", step="health", error="e")
    big = encode(failure, SOURCE)
    body = json.loads(big.value)
    body["error"] = "e" * len(record.value)
    oversized = Record(key=big.key, value=json.dumps(body).encode(), headers=big.headers)
    with pytest.raises(DecodeError, match=f"oversized: {len(oversized.value)} bytes, the limit is {MAX_EVENT_BYTES}$"):
        decode(oversized)
    envelope = json.loads(structured(failure, SOURCE).value)
    envelope["data"]["error"] = "e" * len(record.value)
    as_structured = Record(key=None, value=json.dumps(envelope).encode(), headers=(STRUCTURED_CONTENT_TYPE,))
    with pytest.raises(DecodeError, match=f"the limit is {MAX_EVENT_BYTES}$"):
        decode(as_structured)


def test_a_release_request_of_the_largest_plan_of_plain_nodes_fits() -> None:
    request = _release_of(100_000)
    record = encode(request, SOURCE)
    check_size(request, record)
    assert len(record.value) < MAX_RELEASE_EVENT_BYTES / 2


def test_a_message_past_the_release_limit_is_refused_before_anything_is_read() -> None:
    record = encode(SAMPLES[0], SOURCE)
    value = b" " * (MAX_RELEASE_EVENT_BYTES + 1)
    with pytest.raises(DecodeError, match=f"the limit is {MAX_RELEASE_EVENT_BYTES}$"):
        decode(Record(key=record.key, value=value, headers=record.headers))
    with pytest.raises(DecodeError, match=f"the limit is {MAX_RELEASE_EVENT_BYTES}$"):
        decode(Record(key=None, value=value, headers=()))
