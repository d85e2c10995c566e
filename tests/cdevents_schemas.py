"""The official CDEvents JSON Schemas vendored in `reactor/cdevents_schemas/`, as validators for tests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from functools import cache
from typing import Any

# jsonschema ships no type hints (see tests/unit/test_schemas.py): ignore `import-untyped` until types-jsonschema is in.
from jsonschema.validators import validator_for  # type: ignore[import-untyped,unused-ignore]
from referencing import Registry, Resource

from reactor.cdevents import SCHEMA_DIR, SCHEMA_FILES

# RFC 3339 `date-time` (section 5.6); checked explicitly because jsonschema only enforces the `date-time` format
# when the optional rfc3339-validator package is installed.
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})$")

Json = dict[str, Any]


def _schema_files() -> Iterator[Json]:
    """Every vendored schema document."""
    for path in sorted(SCHEMA_DIR.rglob("*.json")):
        yield json.loads(path.read_text(encoding="utf-8"))


@cache
def registry() -> Registry[Any]:
    """All vendored schemas under their `$id`, so relative `$ref`s (links/embeddedlinksarray …) resolve offline."""
    resources = [(doc["$id"], Resource.from_contents(doc)) for doc in _schema_files()]
    return Registry().with_resources(resources)


def validator(cd_type: str) -> Any:
    """A validator for the official schema of `cd_type`, of the draft its `$schema` names, checking formats."""
    schema = json.loads((SCHEMA_DIR / SCHEMA_FILES[cd_type]).read_text(encoding="utf-8"))
    cls = validator_for(schema)
    cls.check_schema(schema)
    # Without rfc3986-validator jsonschema skips formats uri / uri-reference silently; the dev extra brings it.
    assert {"uri", "uri-reference", "date-time"} <= set(cls.FORMAT_CHECKER.checkers)
    return cls(schema, registry=registry(), format_checker=cls.FORMAT_CHECKER)


def check(cdevent: Json) -> None:
    """Validate `cdevent` against the schema of its own type, plus the RFC 3339 timestamp."""
    context = cdevent["context"]
    validator(context["type"]).validate(cdevent)
    assert RFC3339.match(context["timestamp"]), context["timestamp"]
    assert datetime.fromisoformat(context["timestamp"]).tzinfo is not None
