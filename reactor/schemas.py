"""Generated contracts: a JSON Schema per event body, an AsyncAPI 3 document of the topics, the HTTP API's OpenAPI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reactor import __version__
from reactor.api import openapi
from reactor.codec import ATTRIBUTE_HEADER, CONTENT_TYPE, HEADER_RULES, RESERVED_HEADERS
from reactor.events import EVENT_TYPES, Event, ReleaseEvent, Topic

_ENVELOPE = ("event_id", "occurred_at", "release_id", "causation_id")
_JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"
_TOPIC_DOCS = {
    Topic.COMMANDS: "Node commands (DeployRequested, RollbackRequested); key = node key.",
    Topic.OUTCOMES: "Node outcomes (NodeDeployed, NodeFailed, NodeRolledBack, RollbackFailed); key = node key.",
    Topic.RELEASES: "Release requests, controls and progress; key = release id.",
    Topic.DLQ: "Messages that could not be decoded or handled, with the reason in header reactor_dlq_reason.",
}


_KEY_DOC = (
    "The node key (node messages) or the release id (release messages), equal to ce_subject. Choose the partition"
    " with Kafka's Java default partitioner (murmur2 of the key, positive, modulo the partition count), as the Java,"
    " aiokafka and kafka-python clients do; librdkafka clients (kcat, confluent-kafka) must set"
    " partitioner=murmur2_random. A message on another partition is not lost: workers serialise each node through"
    " the store, but its order against the node's other messages is then not guaranteed."
)


def file_name(event: type[Event]) -> str:
    """The schema file of an event type, named by its versioned CloudEvents type."""
    return f"{event.TYPE}.json"


def event_schema(event: type[Event]) -> dict[str, Any]:
    """JSON Schema of the event's JSON body (the CloudEvents `data`; envelope fields travel as attributes)."""
    schema = event.model_json_schema(mode="validation")
    for name in _ENVELOPE:
        schema["properties"].pop(name, None)
        if name in schema.get("required", []):
            schema["required"].remove(name)
    return {
        "$schema": _JSON_SCHEMA,
        "$id": f"https://deploy-reactor.dev/schemas/events/{file_name(event)}",
        "x-cloudevents-type": event.TYPE,
        "x-topic": event.TOPIC.value,
        **schema,
    }


def asyncapi_document() -> dict[str, Any]:
    """AsyncAPI 3.0 description of the topics, their messages and the CloudEvents headers."""
    headers = {
        "type": "object",
        "description": "Kafka headers of the binary content mode. Each header appears at most once; a header whose"
        " name starts with ce_ in any case is a CloudEvents attribute and must be ce_ and lower-case letters or"
        " digits; other headers (e.g. tracing) are ignored.",
        "required": [rule.name for rule in HEADER_RULES if rule.required],
        "properties": {rule.name: rule.json_schema() for rule in HEADER_RULES},
        "propertyNames": {
            "anyOf": [
                {"not": {"pattern": "^[Cc][Ee]_"}},
                {"pattern": ATTRIBUTE_HEADER, "not": {"enum": list(RESERVED_HEADERS)}},
            ]
        },
        "additionalProperties": {"type": "string"},
    }
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for topic in Topic:
        channel_messages = {}
        for event in EVENT_TYPES:
            if topic != event.TOPIC:
                continue
            name = event.__name__
            messages[name] = {
                "name": name,
                "title": name,
                "summary": (event.__doc__ or name).strip().splitlines()[0],
                "contentType": CONTENT_TYPE,
                "headers": {
                    "allOf": [
                        {"$ref": "#/components/schemas/CloudEventHeaders"},
                        {
                            "properties": {"ce_type": {"const": event.TYPE}},
                            "required": ["ce_correlationid"] if issubclass(event, ReleaseEvent) else [],
                        },
                    ]
                },
                "payload": {"$ref": f"events/{file_name(event)}"},
                "bindings": {
                    "kafka": {
                        "key": {"type": "string", "description": _KEY_DOC},
                        "bindingVersion": "0.5.0",
                    }
                },
            }
            channel_messages[name] = {"$ref": f"#/components/messages/{name}"}
        if topic == Topic.DLQ:
            messages["DeadLetter"] = {
                "name": "DeadLetter",
                "summary": "The original bytes and headers of a rejected message, plus the reason.",
                "payload": {},
            }
            channel_messages["DeadLetter"] = {"$ref": "#/components/messages/DeadLetter"}
        channels[topic.value] = {
            "address": "{prefix}" + topic.value,
            "description": _TOPIC_DOCS[topic],
            "parameters": {"prefix": {"description": "Topic prefix from REACTOR_TOPIC_PREFIX.", "default": "reactor."}},
            "messages": channel_messages,
        }
        operations[f"publish-{topic.value}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{topic.value}"},
        }
        operations[f"consume-{topic.value}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{topic.value}"},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Deploy Reactor events",
            "version": __version__,
            "description": "CloudEvents 1.0 over Kafka (binary content mode: ce_* headers, JSON body).",
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": {"CloudEventHeaders": headers}},
    }


def rendered() -> dict[str, str]:
    """Every generated file, by path relative to the schemas folder."""
    files = {f"events/{file_name(event)}": _dump(event_schema(event)) for event in EVENT_TYPES}
    files["asyncapi.json"] = _dump(asyncapi_document())
    files["openapi.json"] = _dump(openapi.document())
    return files


def export(directory: Path) -> list[Path]:
    """Write the generated files; removes stale event schemas. The paths written."""
    files = rendered()
    written = []
    for stale in (directory / "events").glob("*.json"):
        if f"events/{stale.name}" not in files:
            stale.unlink()
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def drift(directory: Path) -> list[str]:
    """What differs between the models and the files: missing, changed or stale paths."""
    files = rendered()
    problems = []
    for relative, text in files.items():
        path = directory / relative
        if not path.exists():
            problems.append(f"missing: {relative}")
        elif path.read_text() != text:
            problems.append(f"changed: {relative}")
    problems.extend(
        f"stale: events/{path.name}"
        for path in sorted((directory / "events").glob("*.json"))
        if f"events/{path.name}" not in files
    )
    return problems


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"
