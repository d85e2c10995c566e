"""The OpenAPI 3.1 document of the HTTP API, generated from the same models and rules the API enforces.

Exported into `schemas/openapi.json` by `reactor schemas export` and drift-checked by `reactor schemas check`.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from reactor import __version__
from reactor.api import console
from reactor.cli.documents import NODE_FIELDS as _NODE_FIELDS
from reactor.codec import CONTENT_TYPE, HEADER_RULES
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.replay import TimelineEntry
from reactor.domain.status import NodeStatus
from reactor.events import RELEASE_ID, ReleaseRequested, ReleaseSpec

Schema = dict[str, Any]
_REF = "#/components/schemas/{model}"
STRUCTURED = "application/cloudevents+json"
# The node fields the API shows, in the model's order.
NODE_FIELDS = tuple(name for name in NodeStatus.model_fields if name in _NODE_FIELDS)
# Where the event body's JSON Schema sits, relative to this document in schemas/.
_RELEASE_REQUESTED = f"events/{ReleaseRequested.TYPE}.json"


def _ref(name: str) -> Schema:
    return {"$ref": _REF.format(model=name)}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _progress() -> Schema:
    return {
        "type": "object",
        "description": "How many nodes are in each progress state.",
        "properties": {state.value: {"type": "integer", "minimum": 0} for state in ItemState},
        "required": [state.value for state in ItemState],
    }


def _structured_release_requested() -> Schema:
    """The structured-mode envelope of a ReleaseRequested: the codec's attribute rules by attribute name."""
    properties: Schema = {}
    required = []
    for rule in HEADER_RULES:
        name = "datacontenttype" if rule.name == "content-type" else rule.name.removeprefix("ce_")
        properties[name] = rule.json_schema()
        if rule.required:
            required.append(name)
    properties["type"] = {**properties["type"], "const": ReleaseRequested.TYPE}
    properties["subject"] = {**properties["subject"], "description": "The release id."}
    properties["data"] = {"$ref": _RELEASE_REQUESTED}
    return {
        "type": "object",
        "description": "A ReleaseRequested CloudEvent in structured mode. Attributes follow the same rules as the"
        " Kafka binding's ce_* headers (schemas/asyncapi.json); data is the event body.",
        "properties": properties,
        "required": [*required, "correlationid", "data"],
    }


def _binary_headers() -> list[Schema]:
    """Binary mode: each attribute as a `ce-` header, the body as `data`."""
    parameters = []
    for rule in HEADER_RULES:
        if rule.name == "content-type":
            continue
        schema = rule.json_schema()
        if rule.name == "ce_type":
            schema = {**schema, "const": ReleaseRequested.TYPE}
        parameters.append(
            {
                "name": "ce-" + rule.name.removeprefix("ce_"),
                "in": "header",
                "required": False,
                "description": f"Binary mode only ({'required' if rule.required else 'optional'} there): "
                + rule.description,
                "schema": schema,
            }
        )
    return parameters


def _components() -> Schema:
    schemas: Schema = {}
    node = NodeStatus.model_json_schema(ref_template=_REF, mode="serialization")
    schemas.update(node.pop("$defs", {}))
    schemas["Node"] = {
        "type": "object",
        "title": "Node",
        "description": "One node's status.",
        "properties": {name: node["properties"][name] for name in NODE_FIELDS},
        "required": list(NODE_FIELDS),
    }
    spec = ReleaseSpec.model_json_schema(ref_template=_REF, mode="validation")
    schemas.update(spec.pop("$defs", {}))
    schemas["ReleaseSpec"] = spec
    entry = TypeAdapter(TimelineEntry).json_schema(ref_template=_REF, mode="serialization")
    schemas.update(entry.pop("$defs", {}))
    entry["properties"]["cloudevent"] = {
        "type": "object",
        "description": "The event as a structured-mode CloudEvent (attributes and data).",
    }
    entry["required"] = [*entry.get("required", []), "cloudevent"]
    schemas["Event"] = entry
    schemas["Progress"] = _progress()
    release_state = {"type": "string", "enum": [state.value for state in ReleaseState]}
    summary_properties: Schema = {
        "release_id": {"type": "string", "pattern": RELEASE_ID},
        "service": {"type": "string"},
        "version": {"type": "string"},
        "state": release_state,
        "reason": {"type": "string"},
        "batch": {"type": "integer", "minimum": 1, "description": "The current batch, 1-based."},
        "batch_count": {"type": "integer", "minimum": 0},
        "actor": {"type": ["string", "null"]},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "progress": _ref("Progress"),
    }
    schemas["ReleaseSummary"] = {
        "type": "object",
        "properties": summary_properties,
        "required": list(summary_properties),
    }
    detail: Schema = {
        **summary_properties,
        "fast_rollback": {"type": "boolean"},
        "batch_sizes": {"type": "array", "items": {"type": "integer"}},
        "failure_budget": {"type": "integer"},
        "batch_failure_budget": {"type": ["integer", "null"]},
        "resume_at": {"type": ["string", "null"], "format": "date-time"},
        "batches": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "batch": {"type": "integer", "minimum": 1},
                    "size": {"type": "integer", "minimum": 0},
                    "progress": _ref("Progress"),
                },
                "required": ["batch", "size", "progress"],
            },
        },
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "node_key": {"type": "string"},
                    "batch": {"type": "integer", "minimum": 1},
                    "progress": {"type": "string", "enum": [state.value for state in ItemState]},
                    "status": {"anyOf": [_ref("Node"), {"type": "null"}]},
                },
                "required": ["node_key", "batch", "progress", "status"],
            },
        },
        "events": {
            "type": "array",
            "items": _ref("Event"),
            "description": "The release's events seen by this server since it started, in arrival order.",
        },
        "plan": _ref("ReleaseSpec"),
    }
    schemas["Release"] = {"type": "object", "properties": detail, "required": list(detail)}
    schemas["ReleaseRequestedCloudEvent"] = _structured_release_requested()
    schemas["Accepted"] = {
        "type": "object",
        "properties": {
            "release_id": {"type": "string"},
            "event_id": {"type": "string"},
            "location": {"type": "string"},
            "type": {"type": "string"},
            "actor": {"type": "string"},
        },
        "required": ["release_id", "event_id"],
    }
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "unauthorized, forbidden, invalid, not_found, conflict, ..."},
            "field": {"type": ["string", "null"], "description": "The attribute, field or parameter at fault."},
            "detail": {"type": "string", "description": "Why."},
        },
        "required": ["error", "field", "detail"],
    }
    schemas["Command"] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "reason": {"type": "string", "maxLength": 4000, "description": "Why, for the audit trail."},
            "fast": {"type": "boolean", "description": "rollback only: every deployed node at once."},
        },
    }
    return schemas


def _errors(*statuses: int) -> Schema:
    words = {
        400: "Invalid input: the field at fault and why.",
        401: "No known bearer token.",
        403: "The token's identity may not do this (read-only).",
        404: "No such release.",
        409: "A release with this id exists already.",
        413: "The body is too large (an event: the Kafka codec's limit; a command: 16 KiB).",
        503: "The store or the bus does not answer; try again.",
    }
    return {str(status): _json(_ref("Error"), words[status]) for status in statuses}


def document() -> Schema:
    """The OpenAPI 3.1 document of the HTTP API."""
    release_id = {
        "name": "release_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": RELEASE_ID},
    }
    command_paths: Schema = {}
    for command, summary in (
        ("approve", "Let a release waiting for approval start its next batch."),
        ("pause", "Stop dispatching new nodes (in-flight ones finish) until resumed."),
        ("resume", "Dispatch again after a pause."),
        ("abort", "Dispatch nothing more for this release (in-flight nodes finish)."),
        ("rollback", "Roll back every node the release deployed (fast: all at once)."),
    ):
        command_paths[f"/api/v1/releases/{{release_id}}/{command}"] = {
            "post": {
                "operationId": f"{command}Release",
                "summary": summary,
                "parameters": [release_id],
                "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("Command")}}},
                "responses": {
                    "202": _json(_ref("Accepted"), "Published as the authenticated identity."),
                    **_errors(400, 401, 403, 404, 413, 503),
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Deploy Reactor HTTP API",
            "version": __version__,
            "description": "Releases, nodes and live release events over the reactor's store and bus. Every path"
            " under /api/v1 takes `Authorization: Bearer <token>` when tokens are configured (REACTOR_API_TOKENS);"
            " read-only tokens may only GET.",
        },
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
                }
            },
            "/api/v1/releases": {
                "get": {
                    "operationId": "listReleases",
                    "summary": "Every release, newest first, optionally of one state or service.",
                    "parameters": [
                        {"name": "state", "in": "query", "required": False, "schema": _ref_state()},
                        {"name": "service", "in": "query", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {"releases": {"type": "array", "items": _ref("ReleaseSummary")}},
                                "required": ["releases"],
                            },
                            "The releases.",
                        ),
                        **_errors(400, 401, 503),
                    },
                },
                "post": {
                    "operationId": "submitRelease",
                    "summary": "Submit a ReleaseRequested CloudEvent (HTTP binding, structured or binary mode).",
                    "description": "Validated exactly as a message on the releases topic is. Without an actor the"
                    " authenticated identity is recorded; an actor other than that identity is refused. Submitting"
                    " the same event again is accepted again; another event for an existing release id is a"
                    " conflict.",
                    "parameters": _binary_headers(),
                    "requestBody": {
                        "required": True,
                        "content": {
                            STRUCTURED: {"schema": _ref("ReleaseRequestedCloudEvent")},
                            CONTENT_TYPE: {
                                "schema": {"$ref": _RELEASE_REQUESTED},
                                "description": "Binary mode: the event body, with the attributes as ce-* headers.",
                            },
                        },
                    },
                    "responses": {
                        "202": {
                            **_json(_ref("Accepted"), "Published; the release runs."),
                            "headers": {"Location": {"schema": {"type": "string"}}},
                        },
                        **_errors(400, 401, 403, 409, 413, 503),
                    },
                },
            },
            "/api/v1/releases/{release_id}": {
                "get": {
                    "operationId": "getRelease",
                    "summary": "A release with its batches, progress counters, nodes and event timeline.",
                    "parameters": [release_id],
                    "responses": {"200": _json(_ref("Release"), "The release."), **_errors(401, 404, 503)},
                }
            },
            **command_paths,
            "/api/v1/releases/{release_id}/events": {
                "get": {
                    "operationId": "streamReleaseEvents",
                    "summary": "Server-Sent Events: the release's events so far, then live ones as they happen.",
                    "description": "Each message has `id` (the event id), `event` (the event type, e.g."
                    " NodeDeployed) and `data` (an Event document, one line of JSON). Reconnecting with"
                    " Last-Event-ID resumes after that event. Comment lines keep an idle stream alive.",
                    "parameters": [
                        release_id,
                        {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "An endless event stream.",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(401, 404, 503),
                    },
                }
            },
            "/api/v1/whoami": console.WHOAMI_PATH,
            "/api/v1/nodes": {
                "get": {
                    "operationId": "listNodes",
                    "summary": "Every node the reactor knows, by node key, optionally of one service or release.",
                    "parameters": [
                        {"name": "service", "in": "query", "required": False, "schema": {"type": "string"}},
                        {"name": "release_id", "in": "query", "required": False, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {"nodes": {"type": "array", "items": _ref("Node")}},
                                "required": ["nodes"],
                            },
                            "The nodes.",
                        ),
                        **_errors(401, 503),
                    },
                }
            },
        },
    }


def _ref_state() -> Schema:
    return {"type": "string", "enum": [state.value for state in ReleaseState]}
