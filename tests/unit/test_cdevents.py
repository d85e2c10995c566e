"""CDEvents mapping: every mapped event validates against the official v0.5.1 JSON Schemas, ids are stable."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

# jsonschema ships no type hints (see tests/unit/test_schemas.py): ignore `import-untyped` until types-jsonschema is in.
from jsonschema import Draft202012Validator, ValidationError  # type: ignore[import-untyped,unused-ignore]
from jsonschema.validators import validator_for  # type: ignore[import-untyped,unused-ignore]

from reactor import cdevents
from reactor.cdevents import SCHEMA_DIR, SCHEMA_FILES, to_cdevent
from reactor.events import (
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    NodeTarget,
    ReleaseAborted,
    ReleaseApproved,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePaused,
    ReleasePlan,
    ReleaseRequested,
    ReleaseResumed,
    RollbackFailed,
    RollbackRequested,
)
from tests.cdevents_schemas import Json, check, validator

pytestmark = pytest.mark.unit

SOURCE = "/deploy-reactor/test"
T0 = datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)
HOST_NODE = "physical/web-1.example.com/shop"
K8S_NODE = "k8s/prod-eu/shop/deployment/shop"
IMAGE = "registry.example.com/shop:1.2.3"


def mapped(event: Event, **kwargs: Any) -> Json:
    """`event` mapped to a CDEvent and validated against the official schema."""
    result = to_cdevent(event, source=SOURCE, **kwargs)
    assert result is not None
    check(result)
    return result


def plan(release_id: str = "r-1") -> ReleasePlan:
    """A small valid release plan of two hosts."""
    nodes = [NodeTarget(node_key=HOST_NODE), NodeTarget(node_key="physical/web-2.example.com/shop")]
    return ReleasePlan(release_id=release_id, service="shop", version="1.2.3", image=IMAGE, nodes=nodes)


# --- the vendored schemas ---------------------------------------------------------------------------


def test_vendored_schemas_are_the_v0_5_1_ones_for_the_types_we_emit() -> None:
    for cd_type, filename in SCHEMA_FILES.items():
        schema = json.loads((SCHEMA_DIR / filename).read_text(encoding="utf-8"))
        assert schema["$id"].startswith("https://cdevents.dev/0.5.1/schema/")
        assert validator_for(schema) is Draft202012Validator
        assert schema["properties"]["context"]["properties"]["type"]["enum"] == [cd_type]
        assert schema["properties"]["context"]["required"] == ["specversion", "id", "source", "type", "timestamp"]
    assert cdevents.SPEC_VERSION == "0.5.1"


def test_link_refs_resolve_through_the_registry() -> None:
    event = mapped(NodeDeployed(node_key=HOST_NODE, service="shop", version="1.2.3", occurred_at=T0))
    linked = copy.deepcopy(event)
    linked["context"]["links"] = [{"linkType": "PATH", "from": {"contextId": str(uuid.uuid4())}}]
    check(linked)
    linked["context"]["links"] = [{"linkType": "PATH"}]  # a PATH link needs `from`: only the ref'd schema knows
    with pytest.raises(ValidationError):
        check(linked)


# --- services ---------------------------------------------------------------------------------------


def test_first_deploy_is_service_deployed() -> None:
    event = NodeDeployed(node_key=HOST_NODE, service="shop", version="1.2.3", occurred_at=T0, release_id="r-1")
    result = mapped(event)
    context, subject = result["context"], result["subject"]
    assert context["type"] == "dev.cdevents.service.deployed.0.3.0"
    assert context["specversion"] == "0.5.1"
    assert context["source"] == SOURCE
    assert context["timestamp"] == "2024-05-01T12:30:15.250000Z"
    assert context["chainId"] == cdevents.chain_id("r-1")
    assert subject["id"] == HOST_NODE
    assert subject["content"] == {
        "environment": {"id": "physical/web-1.example.com"},
        "artifactId": "pkg:generic/shop@1.2.3",
    }
    assert result["customData"]["eventId"] == event.event_id
    assert result["customDataContentType"] == "application/json"


def test_deploy_over_a_previous_version_is_service_upgraded() -> None:
    event = NodeDeployed(node_key=K8S_NODE, service="shop", version="1.3.0+build.7", prev_version="1.2.3")
    result = mapped(event)
    assert result["context"]["type"] == "dev.cdevents.service.upgraded.0.3.0"
    assert "chainId" not in result["context"]  # not part of a release
    assert result["subject"]["id"] == K8S_NODE
    assert result["subject"]["content"]["environment"] == {"id": "k8s/prod-eu"}
    assert result["subject"]["content"]["artifactId"] == "pkg:generic/shop@1.3.0%2Bbuild.7"
    assert result["customData"]["previousVersion"] == "1.2.3"


def test_rolled_back_is_service_rolledback_with_the_version_now_running() -> None:
    event = NodeRolledBack(node_key=HOST_NODE, service="shop", version="1.2.3", from_version="1.3.0")
    result = mapped(event)
    assert result["context"]["type"] == "dev.cdevents.service.rolledback.0.3.0"
    assert result["subject"]["content"]["artifactId"] == "pkg:generic/shop@1.2.3"
    assert result["subject"]["content"]["environment"]["id"] == "physical/web-1.example.com"
    assert result["customData"]["fromVersion"] == "1.3.0"


@pytest.mark.parametrize(
    ("node_key", "environment"),
    [
        ("physical/web-1/shop", "physical/web-1"),
        ("k8s/prod/shop/statefulset/db", "k8s/prod"),
        ("local/shop", "local"),
        ("nomad/dc1/eu/shop", "nomad/dc1/eu"),
    ],
)
def test_environment_is_the_host_or_cluster_part_of_the_node_key(node_key: str, environment: str) -> None:
    assert cdevents.environment_id(node_key) == environment


# --- failures -> taskrun.finished -------------------------------------------------------------------


def test_failed_deploy_is_a_failed_taskrun_of_the_release() -> None:
    event = NodeFailed(
        node_key=HOST_NODE,
        service="shop",
        version="1.3.0",
        current_version="1.2.3",
        step="health",
        error="GET /healthz answered 503",
        release_id="r-1",
        causation_id="req-42",
    )
    result = mapped(event)
    subject = result["subject"]
    assert result["context"]["type"] == "dev.cdevents.taskrun.finished.0.3.0"
    assert subject["id"] == f"{HOST_NODE}/req-42"
    assert subject["content"] == {
        "taskName": "deploy shop",
        "outcome": "failure",
        "errors": "health: GET /healthz answered 503",
        "pipelineRun": {"id": "r-1"},
    }
    assert result["customData"]["nodeKey"] == HOST_NODE
    assert result["customData"]["currentVersion"] == "1.2.3"


def test_failed_rollback_outside_a_release_is_a_failed_taskrun_without_pipelinerun() -> None:
    event = RollbackFailed(node_key=K8S_NODE, service="shop", step="rollout", error="ProgressDeadlineExceeded")
    result = mapped(event)
    content = result["subject"]["content"]
    assert result["context"]["type"] == "dev.cdevents.taskrun.finished.0.3.0"
    assert result["subject"]["id"] == f"{K8S_NODE}/{event.event_id}"
    assert content["taskName"] == "rollback shop"
    assert content["outcome"] == "failure"
    assert content["errors"] == "rollout: ProgressDeadlineExceeded"
    assert "pipelineRun" not in content


# --- releases -> pipelinerun.* ----------------------------------------------------------------------


def test_release_requested_is_pipelinerun_queued() -> None:
    event = ReleaseRequested(release_id="r-1", plan=plan(), actor="ci@example.com")
    result = mapped(event, release_url="https://reactor.example.com/releases/{release_id}")
    assert result["context"]["type"] == "dev.cdevents.pipelinerun.queued.0.3.0"
    assert result["context"]["chainId"] == cdevents.chain_id("r-1")
    assert result["subject"]["id"] == "r-1"
    assert result["subject"]["content"] == {
        "pipelineName": cdevents.PIPELINE_NAME,
        "uri": "https://reactor.example.com/releases/r-1",
    }
    assert result["customData"]["nodes"] == 2
    assert result["customData"]["service"] == "shop"


@pytest.mark.parametrize("release_url", [None, "https://reactor.example.com/releases/{release_id}"])
def test_first_batch_started_is_pipelinerun_started(release_url: str | None) -> None:
    event = BatchStarted(release_id="r-1", batch=0, node_keys=[HOST_NODE])
    result = mapped(event, release_url=release_url)
    content = result["subject"]["content"]
    assert result["context"]["type"] == "dev.cdevents.pipelinerun.started.0.3.0"
    assert result["subject"]["id"] == "r-1"
    assert content["pipelineName"] == cdevents.PIPELINE_NAME
    assert content["uri"] == (
        "urn:deploy-reactor:release:r-1" if release_url is None else "https://reactor.example.com/releases/r-1"
    )


def test_release_completed_is_a_successful_pipelinerun_finished() -> None:
    result = mapped(ReleaseCompleted(release_id="r-1", succeeded=2, failed=0), pipeline_name="shop release")
    content = result["subject"]["content"]
    assert result["context"]["type"] == "dev.cdevents.pipelinerun.finished.0.3.0"
    assert result["subject"]["id"] == "r-1"
    assert content == {"pipelineName": "shop release", "uri": "urn:deploy-reactor:release:r-1", "outcome": "success"}
    assert result["customData"]["succeeded"] == 2


def test_release_halted_is_a_failed_pipelinerun_finished_with_the_reason() -> None:
    event = ReleaseHalted(release_id="r-1", reason="failure budget spent in batch 1", succeeded=1, failed=2)
    content = mapped(event)["subject"]["content"]
    assert content["outcome"] == "failure"
    assert content["errors"] == "failure budget spent in batch 1"


# --- schema checks catch wrong mappings ---------------------------------------------------------------

MAPPED: list[tuple[str, Callable[[], Event]]] = [
    ("deployed", lambda: NodeDeployed(node_key=HOST_NODE, service="shop", version="1.2.3")),
    ("upgraded", lambda: NodeDeployed(node_key=HOST_NODE, service="shop", version="1.3.0", prev_version="1.2.3")),
    ("rolledback", lambda: NodeRolledBack(node_key=HOST_NODE, service="shop", version="1.2.3")),
    ("failed", lambda: NodeFailed(node_key=HOST_NODE, service="shop", version="1.3.0", step="unpack", error="x")),
    ("rollback_failed", lambda: RollbackFailed(node_key=HOST_NODE, service="shop", step="start", error="x")),
    ("queued", lambda: ReleaseRequested(release_id="r-1", plan=plan())),
    ("started", lambda: BatchStarted(release_id="r-1", batch=0, node_keys=[HOST_NODE])),
    ("completed", lambda: ReleaseCompleted(release_id="r-1", succeeded=2, failed=0)),
    ("halted", lambda: ReleaseHalted(release_id="r-1", reason="aborted", succeeded=0, failed=0)),
]


@pytest.mark.parametrize("make", [make for _, make in MAPPED], ids=[name for name, _ in MAPPED])
@pytest.mark.parametrize(
    "breakage",
    [
        ("context", "timestamp"),
        ("context", "id"),
        ("context", "specversion"),
        ("subject", "id"),
        ("subject", "content"),
    ],
    ids=".".join,
)
def test_the_schema_rejects_a_missing_required_field(make: Callable[[], Event], breakage: tuple[str, str]) -> None:
    broken = copy.deepcopy(mapped(make()))
    section, field = breakage
    del broken[section][field]
    with pytest.raises(ValidationError):
        check(broken)


@pytest.mark.parametrize("make", [make for _, make in MAPPED], ids=[name for name, _ in MAPPED])
def test_the_schema_rejects_a_wrong_type_or_an_unknown_field(make: Callable[[], Event]) -> None:
    good = mapped(make())
    wrong_type = copy.deepcopy(good)
    wrong_type["context"]["type"] = good["context"]["type"].replace(".0.3.0", ".0.2.0")  # the spec 0.4 type
    with pytest.raises(ValidationError):
        validator(good["context"]["type"]).validate(wrong_type)
    unknown = copy.deepcopy(good)
    unknown["subject"]["content"]["nodeKey"] = HOST_NODE
    with pytest.raises(ValidationError):
        check(unknown)


def test_the_schema_rejects_a_service_event_without_artifact_or_environment() -> None:
    good = mapped(NodeDeployed(node_key=HOST_NODE, service="shop", version="1.2.3"))
    for field in ("artifactId", "environment"):
        broken = copy.deepcopy(good)
        del broken["subject"]["content"][field]
        with pytest.raises(ValidationError):
            check(broken)


def test_the_schema_rejects_pipelinerun_started_without_an_absolute_uri() -> None:
    good = mapped(BatchStarted(release_id="r-1", batch=0, node_keys=[HOST_NODE]))
    for uri in (None, "", "/releases/r-1"):  # missing, empty (what 0.4 allowed as `url`), relative
        broken = copy.deepcopy(good)
        if uri is None:
            del broken["subject"]["content"]["uri"]
        else:
            broken["subject"]["content"]["uri"] = uri
        with pytest.raises(ValidationError):
            check(broken)


def test_the_schema_rejects_the_spec_0_4_context_and_subject_shape() -> None:
    """0.5 renamed `context.version` to `specversion` and dropped `subject.type`: an old-shaped event fails."""
    good = mapped(NodeDeployed(node_key=HOST_NODE, service="shop", version="1.2.3"))
    old_context = copy.deepcopy(good)
    old_context["context"]["version"] = old_context["context"].pop("specversion")
    typed_subject = copy.deepcopy(good)
    typed_subject["subject"]["type"] = "service"
    for broken in (old_context, typed_subject):
        with pytest.raises(ValidationError):
            check(broken)


# --- ids, timestamps, source ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make for _, make in MAPPED], ids=[name for name, _ in MAPPED])
def test_context_id_is_a_uuid5_of_the_event_id_so_re_emission_maps_to_the_same_id(make: Callable[[], Event]) -> None:
    event = make()
    first = mapped(event)
    again = mapped(event.model_copy(update={"occurred_at": T0}))  # a re-emission: same event_id, later time
    other = mapped(make())  # a new event: new event_id
    context_id = first["context"]["id"]
    assert uuid.UUID(context_id).version == 5
    assert context_id == cdevents.cdevent_id(event.event_id)
    assert again["context"]["id"] == context_id
    assert other["context"]["id"] != context_id
    assert mapped(event) == first  # pure: the same event always maps to the same CDEvent


def test_naive_and_whole_second_timestamps_are_rfc3339_utc() -> None:
    naive = NodeDeployed(node_key=HOST_NODE, service="shop", version="1.2.3", occurred_at=datetime(2024, 5, 1, 12))
    assert mapped(naive)["context"]["timestamp"] == "2024-05-01T12:00:00Z"


@pytest.mark.parametrize("source", ["", "has space"])
def test_an_invalid_source_is_refused(source: str) -> None:
    with pytest.raises(ValueError, match="source"):
        to_cdevent(NodeDeployed(node_key=HOST_NODE, service="shop", version="1.2.3"), source=source)


# --- events with no CDEvents meaning ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        DeployRequested(node_key=HOST_NODE, service="shop", version="1.2.3", image=IMAGE),
        RollbackRequested(node_key=HOST_NODE, service="shop"),
        ReleaseApproved(release_id="r-1"),
        ReleasePaused(release_id="r-1"),
        ReleaseResumed(release_id="r-1"),
        ReleaseAborted(release_id="r-1"),
        BatchStarted(release_id="r-1", batch=1, node_keys=[HOST_NODE]),
        BatchCompleted(release_id="r-1", batch=0, succeeded=1, failed=0),
    ],
    ids=lambda event: f"{type(event).__name__}",
)
def test_unmapped_events_return_none(event: Event) -> None:
    assert to_cdevent(event, source=SOURCE) is None


def test_vendored_files_are_byte_for_byte_the_ones_the_readme_names() -> None:
    """Each vendored file has the Git blob id its README row records (the id `git ls-tree v0.5.1` shows)."""
    rows = re.findall(r"^\| `([^`]+)` \| `[^`]+` \| `([0-9a-f]{40})` \|", (SCHEMA_DIR / "README.md").read_text(), re.M)
    listed = dict(rows)
    vendored = {path.relative_to(SCHEMA_DIR).as_posix() for path in SCHEMA_DIR.rglob("*") if path.suffix == ".json"}
    assert vendored | {"LICENSE"} == set(listed)
    for name, blob in listed.items():
        content = (SCHEMA_DIR / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(content) + content, usedforsecurity=False).hexdigest() == blob, name


# --- the CloudEvents binding ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make for _, make in MAPPED], ids=[name for name, _ in MAPPED])
def test_http_structured_mode_carries_the_cdevent_with_its_id_source_type_subject_and_time(
    make: Callable[[], Event],
) -> None:
    cdevent = mapped(make())
    headers, body = cdevents.http_structured(cdevent)
    assert headers["content-type"].startswith("application/cloudevents+json")
    envelope = json.loads(body)
    context = cdevent["context"]
    assert envelope["specversion"] == "1.0"
    assert envelope["id"] == context["id"]
    assert envelope["source"] == context["source"]
    assert envelope["type"] == context["type"]
    assert envelope["subject"] == cdevent["subject"]["id"]
    assert datetime.fromisoformat(envelope["time"]) == datetime.fromisoformat(context["timestamp"])
    assert envelope["datacontenttype"] == "application/json"
    assert envelope["data"] == cdevent
    check(envelope["data"])


def test_kafka_binary_mode_keys_by_subject_and_carries_the_cdevent_as_the_body() -> None:
    cdevent = mapped(NodeDeployed(node_key=HOST_NODE, service="shop", version="1.2.3", release_id="r-1"))
    record = cdevents.kafka_record(cdevent)
    headers = {name: value.decode() for name, value in record.headers}
    assert record.key == HOST_NODE.encode()
    assert headers["ce_id"] == cdevent["context"]["id"]
    assert headers["ce_type"] == "dev.cdevents.service.deployed.0.3.0"
    assert headers["ce_subject"] == HOST_NODE
    assert headers["ce_specversion"] == "1.0"
    assert headers["content-type"] == "application/json"
    assert json.loads(record.value) == cdevent
