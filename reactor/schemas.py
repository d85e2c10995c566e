"""Generated contracts: a JSON Schema per event body and an AsyncAPI 3 document of the topics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reactor import __version__
from reactor.codec import CONTENT_TYPE
from reactor.events import EVENT_TYPES, Event, Topic

_ENVELOPE = ("event_id", "occurred_at", "release_id", "causation_id")
_JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"
_TOPIC_DOCS = {
    Topic.COMMANDS: "Node commands (DeployRequested, RollbackRequested); key = node key.",
    Topic.OUTCOMES: "Node outcomes (NodeDeployed, NodeFailed, NodeRolledBack, RollbackFailed); key = node key.",
    Topic.RELEASES: "Release requests, controls and progress; key = release id.",
    Topic.DLQ: "Messages that could not be decoded or handled, with the reason in header reactor_dlq_reason.",
}


def file_name(event: type[Event]) -> str:
    """The schema file of an event type, named by its versioned CloudEvents type."""
    return f"{event.TYPE}.json"


def event_schema(event: type[Event]) -> dict[str, Any]:
    """JSON Schema of the event's JSON body (the CloudEvents `data`; envelope fields travel as attributes)."""
    schema = event.model_json_schema(mode="serialization")
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
        "required": ["ce_id", "ce_source", "ce_type", "ce_specversion", "ce_time", "ce_subject"],
        "properties": {
            "ce_id": {"type": "string", "description": "Event id; consumers dedupe on it."},
            "ce_source": {"type": "string", "description": "The producing role, e.g. /reactor."},
            "ce_type": {"type": "string", "description": "Versioned event type."},
            "ce_specversion": {"type": "string", "const": "1.0"},
            "ce_time": {"type": "string", "format": "date-time"},
            "ce_subject": {"type": "string", "description": "Node key or release id; also the message key."},
            "ce_correlationid": {"type": "string", "description": "Release id."},
            "ce_causationid": {"type": "string", "description": "Id of the event that caused this one."},
            "content-type": {"type": "string", "const": CONTENT_TYPE},
        },
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
                "headers": {"$ref": "#/components/schemas/CloudEventHeaders"},
                "payload": {"$ref": f"events/{file_name(event)}"},
                "bindings": {"kafka": {"key": {"type": "string"}, "bindingVersion": "0.5.0"}},
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
