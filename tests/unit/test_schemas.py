"""The generated contracts in schemas/: valid JSON Schemas, a valid AsyncAPI 3.0.0 document, in step with the models.

The AsyncAPI document is checked against the official AsyncAPI 3.0.0 JSON Schema from the npm package
``@asyncapi/specs`` (fetched once by ``tests/infra/testenv.py`` into the cache; a failed fetch fails the test).

jsonschema ships no type hints; its imports ignore `import-untyped` until types-jsonschema is a dev dependency
(`unused-ignore` keeps mypy quiet either way).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from jsonschema import Draft7Validator, Draft202012Validator, ValidationError  # type: ignore[import-untyped,unused-ignore]
from jsonschema.validators import validator_for  # type: ignore[import-untyped,unused-ignore]
from pydantic import ValidationError as ModelValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT7

from reactor.codec import encode
from reactor.events import EVENT_TYPES, Event, Topic
from reactor.schemas import asyncapi_document, drift, file_name
from tests.infra import testenv
from tests.unit.test_codec import SAMPLES

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
ASYNCAPI = SCHEMAS / "asyncapi.json"
EVENT_FILES = sorted((SCHEMAS / "events").glob("*.json"))
ENVELOPE = {"event_id", "occurred_at", "release_id", "causation_id"}
HOSTILE = "1; rm -rf /"


def load(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    assert isinstance(document, dict), f"{path}: not a JSON object"
    return document


def event_schema(event: type[Event]) -> dict[str, Any]:
    return load(SCHEMAS / "events" / file_name(event))


def event_validator(event: type[Event]) -> Draft202012Validator:
    return Draft202012Validator(event_schema(event), format_checker=Draft202012Validator.FORMAT_CHECKER)


def wire_body(event: Event) -> dict[str, Any]:
    body = json.loads(encode(event, "/test").value)
    assert isinstance(body, dict)
    return body


def rebuilt(event: Event, body: dict[str, Any]) -> Event:
    """`body` read back by the event's model, with the envelope fields of `event` added."""
    envelope = event.model_dump(mode="json", include=ENVELOPE)
    return type(event).model_validate({**envelope, **body})


def refs(node: object, where: str = "#") -> Iterator[tuple[str, str]]:
    """Every `$ref` in a JSON document, with the JSON pointer of the object holding it."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield where, ref
        for key, value in node.items():
            yield from refs(value, f"{where}/{str(key).replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from refs(value, f"{where}/{index}")


def pointer(document: object, fragment: str) -> object:
    """The value at JSON pointer `fragment` (`/a/b`, URI-escaped as in a `$ref`); KeyError if there is none."""
    node = document
    for raw in fragment.split("/")[1:] if fragment else []:
        token = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise KeyError(f"{fragment}: no {token!r}")
    return node


@pytest.fixture(scope="module")
def asyncapi_validator() -> Draft7Validator:
    """A validator for the official AsyncAPI 3.0.0 schema; its `$ref`s resolve within the file, never online."""
    spec = load(testenv.ensure_asyncapi_schema())
    Draft7Validator.check_schema(spec)
    assert validator_for(spec) is Draft7Validator
    registry: Registry[Any] = Registry().with_resource(spec["$id"], DRAFT7.create_resource(spec))
    return Draft7Validator(spec, registry=registry.crawl())


# --- every file -------------------------------------------------------------------------------


def test_schemas_folder_holds_only_checked_files() -> None:
    files = {path.relative_to(SCHEMAS).as_posix() for path in SCHEMAS.rglob("*") if path.is_file()}
    assert files == {"asyncapi.json", "openapi.json"} | {f"events/{file_name(event)}" for event in EVENT_TYPES}


def test_checked_in_files_match_the_models() -> None:
    assert drift(SCHEMAS) == []


@pytest.mark.parametrize("path", EVENT_FILES, ids=lambda path: path.name)
def test_event_schema_is_a_valid_2020_12_schema(path: Path) -> None:
    schema = load(path)
    assert validator_for(schema) is Draft202012Validator
    Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert not ENVELOPE & set(schema["properties"]), "envelope fields travel as CloudEvents attributes"


# --- event bodies against their schema files ----------------------------------------------------


def test_samples_cover_every_event_type() -> None:
    assert sorted(type(event).__name__ for event in SAMPLES) == sorted(event.__name__ for event in EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: type(event).__name__)
def test_wire_body_validates_against_its_schema(event: Event) -> None:
    body = wire_body(event)
    event_validator(type(event)).validate(body)
    assert rebuilt(event, body) == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: type(event).__name__)
def test_unknown_field_fails_schema_and_model(event: Event) -> None:
    body = {**wire_body(event), "unexpected": "x"}
    with pytest.raises(ValidationError):
        event_validator(type(event)).validate(body)
    with pytest.raises(ModelValidationError):
        rebuilt(event, body)


def _patterned(schema: dict[str, Any]) -> bool:
    """A string schema (or a nullable one) that is constrained by a pattern."""
    branches = schema.get("anyOf", [schema])
    return any(branch.get("type") == "string" and "pattern" in branch for branch in branches)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda event: type(event).__name__)
def test_hostile_strings_fail_schema_and_model(event: Event) -> None:
    properties: dict[str, Any] = event_schema(type(event))["properties"]
    validator = event_validator(type(event))
    fields = sorted(name for name, prop in properties.items() if _patterned(prop))
    if "version" in type(event).model_fields:
        assert "version" in fields
    mutations: list[tuple[list[str | int], object]] = [([name], HOSTILE) for name in fields]
    for name, prop in properties.items():
        if prop.get("type") == "integer":
            mutations += [([name], HOSTILE), ([name], -1)]
    if "plan" in properties:
        mutations += [(["plan", "version"], HOSTILE), (["plan", "nodes", 0, "node_key"], HOSTILE)]
    if "node_keys" in properties:
        mutations.append((["node_keys", 0], HOSTILE))
    assert mutations
    for path, value in mutations:
        body = copy.deepcopy(wire_body(event))
        node: Any = body
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
        assert not validator.is_valid(body), f"{path}={value!r} passed the schema"
        with pytest.raises(ModelValidationError):
            rebuilt(event, body)


# --- the AsyncAPI document ----------------------------------------------------------------------


def test_asyncapi_document_is_valid_asyncapi_3(asyncapi_validator: Draft7Validator) -> None:
    document = load(ASYNCAPI)
    assert document["asyncapi"] == "3.0.0"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in asyncapi_validator.iter_errors(document)]
    assert errors == []


def test_official_schema_rejects_an_invalid_document(asyncapi_validator: Draft7Validator) -> None:
    """The check has teeth: AsyncAPI 2 style operations and unknown Kafka binding fields are errors."""
    document = asyncapi_document()
    document["operations"]["publish-commands"]["action"] = "publish"
    assert not asyncapi_validator.is_valid(document)
    document = asyncapi_document()
    document["components"]["messages"]["NodeDeployed"]["bindings"]["kafka"]["partitions"] = 3
    assert not asyncapi_validator.is_valid(document)


@pytest.mark.parametrize("path", [ASYNCAPI, *EVENT_FILES], ids=lambda path: path.name)
def test_every_ref_resolves(path: Path) -> None:
    document = load(path)
    unresolved = []
    for where, ref in refs(document):
        target, _, fragment = ref.partition("#")
        if target:
            if target.startswith(("/", "\\")) or ":" in target or ".." in Path(target).parts:
                unresolved.append(f"{where}: {ref} is not a relative file path inside schemas/")
                continue
            file = path.parent / target
            if not file.is_file():
                unresolved.append(f"{where}: {ref} names no file")
                continue
            resolved: object = load(file)
        else:
            resolved = document
        try:
            pointer(resolved, fragment)
        except KeyError as exc:
            unresolved.append(f"{where}: {ref}: {exc}")
    assert unresolved == []


def test_message_payloads_are_the_event_schema_files() -> None:
    document = load(ASYNCAPI)
    payloads = {
        name: message["payload"].get("$ref")
        for name, message in document["components"]["messages"].items()
        if name != "DeadLetter"
    }
    assert payloads == {event.__name__: f"events/{file_name(event)}" for event in EVENT_TYPES}


@pytest.mark.parametrize("event", EVENT_TYPES, ids=lambda event: event.__name__)
def test_event_is_a_message_of_its_topic_channel(event: type[Event]) -> None:
    document = load(ASYNCAPI)
    holders = []
    for channel_name, channel in document["channels"].items():
        for ref in channel["messages"].values():
            message = pointer(document, ref["$ref"].removeprefix("#"))
            assert isinstance(message, dict)
            if message["payload"].get("$ref") == f"events/{file_name(event)}":
                holders.append(channel_name)
    assert holders == [event.TOPIC.value]
    assert document["channels"][event.TOPIC.value]["address"] == "{prefix}" + event.TOPIC.value


def test_every_topic_has_a_channel_and_operations() -> None:
    document = load(ASYNCAPI)
    assert set(document["channels"]) == {topic.value for topic in Topic}
    used = {operation["channel"]["$ref"] for operation in document["operations"].values()}
    assert used == {f"#/channels/{topic.value}" for topic in Topic}
