"""Messages made from the published contract alone (schemas/), and what the contract says of each.

Bodies come from the JSON Schema files and header sets from asyncapi.json through hypothesis-jsonschema; nothing
here reads the models. `verdict` is the contract's own answer (JSON Schema validation plus the rules the files
list in `x-reactor-rules` and the header descriptions), which the workers must match exactly.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator  # type: ignore[import-untyped,unused-ignore]

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
NODE_KEYS = r"^(?:local|physical|noop)/h[0-9]{1,2}/app$"
LIVE_NODE_KEYS = r"^fake/h[0-9]/app$"


# Values of every JSON kind, most of them wrong for most fields: the schema decides which are.
WRONG_VALUES: list[Any] = ["8080", "5", "0", "true", True, False, None, 0, -1, 1.5, 8080.0, 70000, [], {}, "", "x y"]
BAD_HEADERS: list[tuple[str, str]] = [
    ("ce_id", "order#1"),
    ("ce_id", ""),
    ("ce_specversion", "0.3"),
    ("ce_time", "yesterday"),
    ("ce_time", "2026-02-30T10:00:00Z"),
    ("ce_time", "2026-12-01T10:00:00"),
    ("ce_time", "2026-12-01T23:59:60Z"),
    ("ce_correlationid", "Rel 1"),
    ("ce_causationid", "a b"),
    ("ce_source", ""),
    ("ce_type", "dev.deployreactor.node.unknown.v1"),
    ("content-type", "text/plain"),
    ("CE_ID", "dup"),
    ("ce_Foo", "x"),
    ("ce_data", "x"),
    ("ce_datacontenttype", "application/json"),
    ("ce_traceparent", "00-abc"),
    ("traceparent", "00-abc"),
]


@dataclass(frozen=True)
class Message:
    """One Kafka message: key, JSON body (as a value) and headers (name -> text)."""

    type: str
    key: str | None
    body: Any
    headers: dict[str, str]

    def value(self) -> bytes:
        """The body as the bytes on the wire."""
        return json.dumps(self.body).encode()

    def header_items(self) -> tuple[tuple[str, bytes], ...]:
        """The headers as Kafka carries them."""
        return tuple((name, text.encode()) for name, text in self.headers.items())


@functools.cache
def asyncapi() -> dict[str, Any]:
    """The published AsyncAPI document."""
    document: dict[str, Any] = json.loads((SCHEMAS / "asyncapi.json").read_text())
    return document


@functools.cache
def messages() -> dict[str, dict[str, Any]]:
    """Each published message by its CloudEvents type: its body schema, headers schema and topic."""
    document = asyncapi()
    found: dict[str, dict[str, Any]] = {}
    for topic, channel in document["channels"].items():
        for ref in channel["messages"].values():
            message = document["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
            if "headers" not in message:
                continue  # the dead-letter message carries whatever was refused
            headers = _resolved(message["headers"], document)
            event_type = _header_const(headers, "ce_type")
            body = json.loads((SCHEMAS / message["payload"]["$ref"]).read_text())
            found[event_type] = {"body": body, "headers": headers, "topic": topic, "name": message["name"]}
    return found


def is_release_message(event_type: str) -> bool:
    """Release messages (subject = release id) are those on the releases topic."""
    return str(messages()[event_type]["topic"]) == "releases"


def _resolved(schema: Any, document: dict[str, Any]) -> Any:
    """`schema` with its local `#/components/...` references replaced by what they point at."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = document
            for part in ref[2:].split("/"):
                target = target[part]
            return _resolved(target, document)
        return {key: _resolved(value, document) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_resolved(item, document) for item in schema]
    return schema


def _header_const(headers: dict[str, Any], name: str) -> str:
    for part in headers["allOf"]:
        value = part.get("properties", {}).get(name, {}).get("const")
        if isinstance(value, str):
            return value
    raise AssertionError(f"no const {name} in {headers}")


def _narrowed_body(event_type: str, live: bool) -> dict[str, Any]:
    """The body schema, narrowed (never widened) so a release plan has a real chance to keep the listed rules.

    `live`: node commands for a running worker: nodes of the test platform `fake`, no min_healthy window.
    """
    schema: dict[str, Any] = copy.deepcopy(messages()[event_type]["body"])
    properties = schema.get("properties", {})
    if live and "node_key" in properties:
        properties["node_key"] = {"type": "string", "pattern": LIVE_NODE_KEYS}
        if "min_healthy_s" in properties:
            properties["min_healthy_s"] = {"const": 0}
    if "plan" not in properties:
        return schema
    definitions = schema["$defs"]
    definitions["ReleasePlan"]["properties"]["service"] = {"const": "app"}
    definitions["ReleasePlan"]["properties"]["nodes"]["maxItems"] = 4
    definitions["NodeTarget"]["properties"]["node_key"]["pattern"] = NODE_KEYS
    definitions["Strategy"]["properties"]["batches"]["maxItems"] = 3
    return schema


def _strategy_headers(event_type: str) -> dict[str, Any]:
    """The headers schema, narrowed: at most 12 headers, no name empty or holding "=" (kcat cannot send those)."""
    headers = copy.deepcopy(messages()[event_type]["headers"])
    return {"allOf": headers["allOf"], "maxProperties": 12, "propertyNames": {"pattern": "^[^=]+$"}}


@functools.cache
def _strategies(event_type: str, live: bool) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    """Strategies for the body and the headers of a type, built once."""
    return _bodies(_narrowed_body(event_type, live)), _header_sets(_strategy_headers(event_type))


@functools.cache
def _strategy_of(schema_text: str) -> st.SearchStrategy[Any]:
    """hypothesis-jsonschema's strategy for one schema, built once. No NUL characters: a header value on a command
    line (kcat) cannot hold one."""
    return from_schema(json.loads(schema_text), allow_x00=False)


def _drawn(draw: st.DrawFn, schema: dict[str, Any], definitions: dict[str, Any]) -> Any:
    return draw(_strategy_of(json.dumps({"$defs": definitions, **schema} if definitions else schema)))


def _drawn_object(
    draw: st.DrawFn, object_schema: dict[str, Any], definitions: dict[str, Any], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """An object drawn property by property: every required property, each other one half the time.

    hypothesis-jsonschema resolves an object's properties again on every draw of it (and merges a release plan's
    anyOf with its properties), which took most of each example's time; drawing each property from its own schema,
    with the strategy built once, and checking the whole against the file is as faithful.
    """
    found: dict[str, Any] = {}
    for name, property_schema in object_schema["properties"].items():
        if name in skip or (name not in object_schema.get("required", []) and draw(st.booleans())):
            continue
        found[name] = _drawn(draw, property_schema, definitions)
    return found


@st.composite
def _bodies(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, Any]:
    """A body drawn from its schema file, property by property, and checked against the whole file."""
    definitions = schema.get("$defs", {})
    if "plan" in schema["properties"]:
        body = _drawn_object(draw, schema, definitions, skip=("plan",))
        body["plan"] = _plan(draw, definitions)
    else:
        body = _drawn_object(draw, schema, definitions)
    alternatives: list[dict[str, Any]] = schema.get("anyOf", [])
    if alternatives and not any(_valid(alternative, body) for alternative in alternatives):
        # One alternative's required properties (a deploy's package or image), drawn as it asks.
        alternative = draw(st.sampled_from(alternatives))
        for name in alternative["required"]:
            both = {"allOf": [schema["properties"][name], alternative["properties"][name]]}
            body[name] = _drawn(draw, both, definitions)
    problems = [error.message for error in _validator(json.dumps(schema)).iter_errors(body)]
    assert not problems, f"drawn body is not valid against its own schema: {problems}"
    return body


def _valid(schema: dict[str, Any], instance: Any) -> bool:
    return not any(_validator(json.dumps(schema)).iter_errors(instance))


def _plan(draw: st.DrawFn, definitions: dict[str, Any]) -> dict[str, Any]:
    """A release plan: its properties, one to four nodes, and a package where neither it nor a node names one."""
    plan = _drawn_object(draw, definitions["ReleasePlan"], definitions, skip=("nodes",))
    node_schema = json.dumps({"$defs": definitions, **definitions["NodeTarget"]})
    plan["nodes"] = draw(st.lists(_strategy_of(node_schema), min_size=1, max_size=4))
    if not any(plan.get(name) is not None for name in ("package", "image")) and any(
        node.get("package") is None and node.get("image") is None for node in plan["nodes"]
    ):
        plan["package"] = _drawn(draw, definitions["Package"], definitions)
    return plan


@st.composite
def _header_sets(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, str]:
    """A header set drawn header by header: each listed one from its schemas (every part of the allOf), then a few
    others named as the rule for names allows; checked against the whole schema."""
    parts: list[dict[str, Any]] = schema["allOf"]
    required = {name for part in parts for name in part.get("required", [])}
    listed: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for name, header_schema in part.get("properties", {}).items():
            listed.setdefault(name, []).append(header_schema)
    headers: dict[str, str] = {}
    for name, schemas in listed.items():
        if name in required or draw(st.booleans()):
            headers[name] = _drawn(draw, {"allOf": schemas}, {})
    names = {"allOf": [part["propertyNames"] for part in parts if "propertyNames" in part] + [schema["propertyNames"]]}
    room = schema["maxProperties"] - len(headers)
    for _ in range(min(room, draw(st.sampled_from((1, 0, 2))))):
        name = _drawn(draw, {"type": "string", **names}, {})
        if name not in listed:
            headers[name] = _drawn(draw, {"type": "string"}, {})
    problems = [error.message for error in _validator(json.dumps(schema)).iter_errors(headers)]
    assert not problems, f"drawn headers are not valid against their own schema: {problems}"
    return headers


@st.composite
def valid_messages(draw: st.DrawFn, event_type: str, live: bool = False) -> Message:
    """A message the contract accepts: body and headers drawn from the files, tied together as they require.

    `live`: for a running worker, which refuses a command older than its freshness window
    (REACTOR_COMMAND_MAX_AGE_S): the time is the time of drawing, not a drawn one, which would almost always be stale.
    """
    bodies, header_sets = _strategies(event_type, live)
    body = copy.deepcopy(draw(bodies))
    headers = dict(draw(header_sets))
    if is_release_message(event_type):
        release_id = body["plan"]["release_id"] if "plan" in body else headers["ce_correlationid"]
        headers["ce_correlationid"] = release_id
        subject = release_id
        if "plan" in body:
            _keep_plan_rules(body["plan"])
    else:
        subject = body["node_key"]
    headers["ce_subject"] = subject
    headers.pop("ce_partitionkey", None)
    if live:
        headers["ce_time"] = datetime.now(UTC).isoformat()
    return Message(event_type, subject, body, headers)


def _keep_plan_rules(plan: dict[str, Any]) -> None:
    """Make a drawn plan keep the rules JSON Schema cannot state: unique keys, explicit batches naming each once."""
    unique: dict[str, Any] = {}
    for node in plan["nodes"]:
        unique.setdefault(node["node_key"], node)
    plan["nodes"] = list(unique.values())
    strategy = plan.get("strategy") or {}
    batches = strategy.get("batches")
    if batches and isinstance(batches[0], list):
        keys = list(unique)
        strategy["batches"] = [keys[: max(1, len(keys) // 2)], keys[max(1, len(keys) // 2) :]]
        strategy["batches"] = [batch for batch in strategy["batches"] if batch]


@st.composite
def mutated(draw: st.DrawFn, event_type: str, live: bool = False) -> Message:
    """A valid message with one thing changed: a body value anywhere, a field dropped or added, or a header."""
    base = draw(valid_messages(event_type, live))
    body, headers = json.loads(json.dumps(base.body)), dict(base.headers)
    kind = draw(st.sampled_from(["value", "drop", "add", "header", "drop-header", "key"]))
    if kind in ("value", "drop"):
        paths = list(_paths(body))
        path = draw(st.sampled_from(paths)) if paths else ()
        if path:
            parent = body
            for part in path[:-1]:
                parent = parent[part]
            if kind == "drop" and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(st.sampled_from(WRONG_VALUES))
    elif kind == "add":
        body[draw(st.sampled_from(["unexpected", "event_id", "release_id", "occurred_at"]))] = "x"
    elif kind == "header":
        name, value = draw(st.sampled_from(BAD_HEADERS))
        headers[name] = value
    elif kind == "drop-header":
        headers.pop(draw(st.sampled_from(sorted(headers))))
    else:
        return Message(event_type, draw(st.sampled_from([None, "local/h9/other"])), body, headers)
    return Message(event_type, base.key, body, headers)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Any:
    if isinstance(node, dict):
        for name, value in node.items():
            yield (*prefix, name)
            yield from _paths(value, (*prefix, name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


@dataclass(frozen=True)
class Verdict:
    """The contract's answer for a message: accepted, or refused with the names a reason may give."""

    accepted: bool
    names: frozenset[str] = frozenset()


def verdict(message: Message) -> Verdict:
    """What the published files say of `message`."""
    spec = messages().get(message.headers.get("ce_type", ""))
    names: set[str] = set()
    header_schema = spec["headers"] if spec else messages()[message.type]["headers"]
    for error in _validator(json.dumps(header_schema)).iter_errors(message.headers):
        names.update(_error_names(error, message.headers))
    if spec is None:
        return Verdict(False, frozenset(names | {"ce_type", "type"}))
    for error in _validator(json.dumps(spec["body"])).iter_errors(message.body):
        names.update(_error_names(error, message.body))
    if names:
        return Verdict(False, frozenset(names))
    names.update(_rule_breaks(message, spec))
    return Verdict(not names, frozenset(names))


@functools.cache
def _validator(schema_text: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_text), format_checker=Draft202012Validator.FORMAT_CHECKER)


def _error_names(error: Any, instance: Any) -> set[str]:
    """Field or header names an error is about: its path, the properties it names, and its context's."""
    names = {part for part in error.absolute_path if isinstance(part, str)}
    if error.validator in {"required", "additionalProperties"}:
        names.update(re.findall(r"'([^']+)'", error.message))
    if "propertyNames" in error.schema_path and isinstance(error.instance, str):
        names.add(error.instance)  # the header name itself broke the rule
    if error.validator == "anyOf" and not names:
        names.update({"package", "image", "(root)"})
    for sub in error.context or ():
        names.update(part for part in sub.absolute_path if isinstance(part, str))
    if not names:
        names.add("(root)")
    return names


def _rule_breaks(message: Message, spec: dict[str, Any]) -> set[str]:
    """The names of the listed rules `message` breaks (x-reactor-rules and the header descriptions)."""
    broken: set[str] = set()
    headers, body = message.headers, message.body
    release = spec["topic"] == "releases"
    subject = headers.get("ce_correlationid") if release else body.get("node_key")
    if headers.get("ce_subject") != subject:
        broken.add("subject")
    if message.key != headers.get("ce_subject"):
        broken.add("key")
    plan = body.get("plan")
    if isinstance(plan, dict):
        if plan.get("release_id") != headers.get("ce_correlationid"):
            broken.add("release_id")
        keys = [node["node_key"] for node in plan["nodes"]]
        if len(set(keys)) != len(keys):
            broken.add("nodes")
        if any(not key.endswith("/" + plan["service"]) and not key.startswith("k8s/") for key in keys):
            broken.add("nodes")
        batches = (plan.get("strategy") or {}).get("batches") or []
        explicit = [key for batch in batches if isinstance(batch, list) for key in batch]
        if explicit and sorted(explicit) != sorted(keys):
            broken.add("batches")
    return broken
