"""Event contracts: versioned, frozen pydantic models with strict patterns on every string.

Each event maps onto a CloudEvents 1.0 envelope (see `reactor.codec`): `id` = event_id,
`time` = occurred_at, `subject` = node key (node events) or release id (release events),
extension `correlationid` = release id and `causationid` = the event that caused this one.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, StrictBool, model_validator
from pydantic.config import JsonDict
from pydantic_core import PydanticUndefined

# Patterns for every string that may reach a shell, a host or an API. Nothing outside them passes.
EVENT_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
RELEASE_ID = r"^[a-z0-9][a-z0-9._-]{0,62}$"
SERVICE = r"^[a-z][a-z0-9-]{0,62}$"
VERSION = r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$"
HOST = r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$"
DNS_LABEL = r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$"
NODE_KEY = r"^[a-z][a-z0-9-]{0,30}(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?){1,5}$"
SHA256 = r"^[0-9a-f]{64}$"
URL = r"^(?:https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?|file://)/[A-Za-z0-9._~/%+=-]*(?:\?[A-Za-z0-9._~%=&+-]*)?$"
IMAGE = r"^[a-z0-9][a-z0-9._/-]{0,200}(?::[A-Za-z0-9._-]{1,128})?(?:@sha256:[0-9a-f]{64})?$"
ACTOR = r"^[A-Za-z0-9][A-Za-z0-9._@:/-]{0,127}$"
HTTP_PATH = r"^/[A-Za-z0-9._~/%-]{0,200}$"
STEP = r"^[a-z][a-z0-9_-]{0,31}$"


def _json_number(value: object) -> object:
    """Let only JSON numbers through to number fields: no strings, no booleans (the schema says number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a JSON number, not {type(value).__name__}")  # noqa: TRY004 - pydantic reports only ValueError
    return value


# Number fields take what JSON Schema calls a number (integer: a number with no fraction, 8080.0 included) and
# nothing else: pydantic's lax mode would turn "8080" into 8080 and true into 1, which the schema refuses.
# The check goes after the constraints in each Annotated, or the JSON Schema loses them (pydantic then emits
# non-standard "ge"/"le" keys instead of minimum/maximum).
JSON_NUMBER = BeforeValidator(_json_number)
Port = Annotated[int, Field(ge=1, le=65535), JSON_NUMBER]
Count = Annotated[int, Field(ge=0), JSON_NUMBER]
Seconds = Annotated[float, Field(ge=0), JSON_NUMBER]

EventId = Annotated[str, Field(pattern=EVENT_ID)]
ReleaseId = Annotated[str, Field(pattern=RELEASE_ID)]
Service = Annotated[str, Field(pattern=SERVICE)]
Version = Annotated[str, Field(pattern=VERSION)]
NodeKey = Annotated[str, Field(pattern=NODE_KEY, max_length=512)]
Actor = Annotated[str, Field(pattern=ACTOR)]
Message = Annotated[str, Field(max_length=4000)]
MinHealthy = Annotated[float, Field(ge=0, le=86400), JSON_NUMBER]

NAMESPACE = uuid.UUID("6f1c8f1e-5d1b-4a7e-9c61-2b7b0d3e9a10")
_NAMESPACE_BYTES = NAMESPACE.bytes


def new_event_id() -> str:
    """A fresh random event id."""
    return str(uuid.uuid4())


def derived_event_id(*parts: str) -> str:
    """A deterministic event id, so a re-emitted event carries the id of the first emission.

    The name-based UUID (version 5) of `parts` joined by "/" in NAMESPACE, as `uuid.uuid5` makes it, made straight
    from its SHA-1 digest: a release derives a few per node, and `uuid.UUID` took three quarters of each.
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + "/".join(parts).encode(), usedforsecurity=False).digest()[:16])
    digest[6] = digest[6] & 0x0F | 0x50  # version 5
    digest[8] = digest[8] & 0x3F | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Topic(StrEnum):
    """Logical topics; the bus adds the configured prefix."""

    COMMANDS = "commands"
    OUTCOMES = "outcomes"
    RELEASES = "releases"
    DLQ = "dlq"


class AutoRollback(StrEnum):
    """What happens when a node fails: roll back that node, the whole release, or nothing."""

    NODE = "node"
    RELEASE = "release"
    NONE = "none"


_new = object.__new__
_set = object.__setattr__


class Model(BaseModel):
    """Base of every contract: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __copy__(self) -> Self:
        """A shallow copy, as BaseModel's (see `model_copy`)."""
        if self.__pydantic_extra__ is not None:
            return super().__copy__()
        return self.model_copy()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """BaseModel's `model_copy`, made without `copy.copy`'s generic dispatch for each part and with `update` made
        in the copying itself: the hot path copies a model a few times a node (a state's next step), and this takes
        0.45 of BaseModel's time for one. Like BaseModel's, it does not validate what `update` gives."""
        extra = self.__pydantic_extra__
        if deep or extra is not None:  # extra fields (no contract allows them) or a deep copy: BaseModel's way
            return super().model_copy(update=update, deep=deep)
        copied = _new(type(self))
        values = self.__dict__.copy()
        fields_set = set(self.__pydantic_fields_set__)
        if update:
            values.update(update)
            fields_set.update(update)
        _set(copied, "__dict__", values)
        _set(copied, "__pydantic_extra__", None)
        _set(copied, "__pydantic_fields_set__", fields_set)
        private = getattr(self, "__pydantic_private__", None)
        if private is not None:  # as BaseModel's: unset private attributes are left out
            private = {key: value for key, value in private.items() if value is not PydanticUndefined}
        _set(copied, "__pydantic_private__", private)
        return copied


def _present(field: str, kind: str) -> JsonDict:
    """JSON Schema: `field` is given and not null."""
    return {"required": [field], "properties": {field: {"type": kind}}}


# The artifact rule as JSON Schema: a package or an image (either may be null, not both).
ARTIFACT_CHOICES: list[JsonValue] = [_present("package", "object"), _present("image", "string")]
ARTIFACT_RULE: JsonDict = {"anyOf": ARTIFACT_CHOICES}


class Package(Model):
    """A release artifact for hosts: where to fetch it and its SHA256, checked before anything changes."""

    url: Annotated[str, Field(pattern=URL, max_length=2048)]
    sha256: Annotated[str, Field(pattern=SHA256)]


class HealthCheck(Model):
    """How to tell the new version is serving: an HTTP GET answering 2xx, or a TCP connect."""

    kind: Literal["http", "tcp"] = "http"
    path: Annotated[str, Field(pattern=HTTP_PATH)] = "/healthz"
    timeout_s: Annotated[float, Field(gt=0, le=3600), JSON_NUMBER] = 15.0


class Event(Model):
    """Fields every event has; `TYPE` is the versioned CloudEvents type."""

    TYPE: ClassVar[str]
    TOPIC: ClassVar[Topic]

    event_id: EventId = Field(default_factory=new_event_id)
    occurred_at: datetime = Field(default_factory=utc_now)
    release_id: ReleaseId | None = None
    causation_id: EventId | None = None

    def subject(self) -> str:
        """The CloudEvents subject, which is also the partition key."""
        raise NotImplementedError


class NodeEvent(Event):
    """An event about one node; keyed by its node key."""

    node_key: NodeKey
    service: Service

    def subject(self) -> str:
        return self.node_key


class ReleaseEvent(Event):
    """An event about a release; keyed by its release id."""

    release_id: ReleaseId

    def subject(self) -> str:
        return self.release_id


# --- commands ---------------------------------------------------------------------------------


class DeployRequested(NodeEvent):
    """Put `version` of `service` on one node; with `min_healthy_s`, it must then stay healthy that long."""

    TYPE: ClassVar[str] = "dev.deployreactor.node.deploy.requested.v1"
    TOPIC: ClassVar[Topic] = Topic.COMMANDS
    model_config = ConfigDict(json_schema_extra=ARTIFACT_RULE)

    version: Version
    package: Package | None = None
    image: Annotated[str, Field(pattern=IMAGE)] | None = None
    container: Annotated[str, Field(pattern=DNS_LABEL)] | None = None
    port: Port | None = None
    health: HealthCheck = HealthCheck()
    auto_rollback: AutoRollback = AutoRollback.NODE
    min_healthy_s: MinHealthy = 0.0
    actor: Actor | None = None

    @model_validator(mode="after")
    def _artifact(self) -> DeployRequested:
        if self.package is None and self.image is None:
            raise ValueError("one of package or image is required")
        return self


class RollbackRequested(NodeEvent):
    """Return one node to the version it ran before (or to `to_version`)."""

    TYPE: ClassVar[str] = "dev.deployreactor.node.rollback.requested.v1"
    TOPIC: ClassVar[Topic] = Topic.COMMANDS

    to_version: Version | None = None
    port: Port | None = None
    health: HealthCheck | None = None
    reason: Message = ""
    actor: Actor | None = None


# --- outcomes ---------------------------------------------------------------------------------


class NodeDeployed(NodeEvent):
    """The node runs `version` and passed its health check."""

    TYPE: ClassVar[str] = "dev.deployreactor.node.deployed.v1"
    TOPIC: ClassVar[Topic] = Topic.OUTCOMES

    version: Version
    prev_version: Version | None = None
    duration_s: Seconds = 0.0


class NodeFailed(NodeEvent):
    """A deploy failed at `step`; `current_version` is what the node runs now."""

    TYPE: ClassVar[str] = "dev.deployreactor.node.failed.v1"
    TOPIC: ClassVar[Topic] = Topic.OUTCOMES

    version: Version
    current_version: Version | None = None
    prev_version: Version | None = None
    step: Annotated[str, Field(pattern=STEP)]
    error: Message
    auto_rollback: AutoRollback = AutoRollback.NODE
    duration_s: Seconds = 0.0


class NodeRolledBack(NodeEvent):
    """The node runs `version` again, after a rollback from `from_version`; `prev_version` is the next target."""

    TYPE: ClassVar[str] = "dev.deployreactor.node.rolled_back.v1"
    TOPIC: ClassVar[Topic] = Topic.OUTCOMES

    version: Version
    from_version: Version | None = None
    prev_version: Version | None = None
    duration_s: Seconds = 0.0


class RollbackFailed(NodeEvent):
    """A rollback failed at `step`; the node needs a human."""

    TYPE: ClassVar[str] = "dev.deployreactor.node.rollback.failed.v1"
    TOPIC: ClassVar[Topic] = Topic.OUTCOMES

    version: Version | None = None
    prev_version: Version | None = None
    target_version: Version | None = None
    step: Annotated[str, Field(pattern=STEP)]
    error: Message
    duration_s: Seconds = 0.0


# --- releases ---------------------------------------------------------------------------------

Percent = Annotated[str, Field(pattern=r"^(?:100|[1-9][0-9]?)%$")]
BatchSize = Annotated[int, Field(ge=1), JSON_NUMBER] | Percent
Budget = Count | Percent
ExplicitBatch = Annotated[list[NodeKey], Field(min_length=1)]


LABEL_KEY = r"^[a-z][a-z0-9_.-]{0,62}$"
LABEL_VALUE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
LabelKey = Annotated[str, Field(pattern=LABEL_KEY)]


class Strategy(Model):
    """How a release moves through its nodes.

    `batches`: sizes (count or "N%"; the last size repeats) or explicit lists of node keys; `canary`: a
    first batch of that size before them. `spread_by`: a node label (e.g. zone) whose values are interleaved
    so each batch spans them. `failure_budget` (release) and `batch_failure_budget`: failed nodes tolerated,
    count or percent; one more halts the release (and with `auto_rollback: release`, rolls back every node it
    deployed). Gates between batches: `pause_between_batches_s`, `approval_every_batch`,
    `approval_after_batches` (1-based batch numbers). `node_deadline_s`: a node with no outcome by then fails.
    `min_healthy_s`: a deployed node counts as done only after staying healthy that long (its deadline grows
    by as much); a node that turns unhealthy or drifts meanwhile fails at step `min_healthy`.
    A release rollback (automatic or requested) takes every deployed node back `max_parallel` at a time, newest
    batch first; with `fast_rollback` (or a request with `fast`) every deployed node goes back at once, or at most
    `rollback_parallel` at a time, within the limits across releases.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "description": "batches: either every entry a size or every entry an explicit node list",
                    "properties": {
                        "batches": {"anyOf": [{"items": {"not": {"type": "array"}}}, {"items": {"type": "array"}}]}
                    },
                },
                {
                    "description": "canary and spread_by apply to sized batches only",
                    "anyOf": [
                        {"properties": {"batches": {"items": {"not": {"type": "array"}}}}},
                        {"properties": {"canary": {"type": "null"}, "spread_by": {"type": "null"}}},
                    ],
                },
            ]
        }
    )

    batches: Annotated[list[BatchSize | ExplicitBatch], Field(min_length=1, max_length=1000)] = ["100%"]
    canary: BatchSize | None = None
    spread_by: LabelKey | None = None
    max_parallel: Annotated[int, Field(ge=1, le=10_000), JSON_NUMBER] = 1
    failure_budget: Budget = 0
    batch_failure_budget: Budget | None = None
    auto_rollback: AutoRollback = AutoRollback.NODE
    pause_between_batches_s: Annotated[float, Field(ge=0, le=7 * 86400), JSON_NUMBER] = 0.0
    approval_every_batch: StrictBool = False
    approval_after_batches: list[Annotated[int, Field(ge=1), JSON_NUMBER]] = []
    node_deadline_s: Annotated[float, Field(gt=0, le=7 * 86400), JSON_NUMBER] | None = None
    min_healthy_s: MinHealthy = 0.0
    fast_rollback: StrictBool = False
    rollback_parallel: Annotated[int, Field(ge=1, le=100_000), JSON_NUMBER] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Strategy:
        explicit = [batch for batch in self.batches if isinstance(batch, list)]
        if explicit and len(explicit) != len(self.batches):
            raise ValueError("batches: use either sizes or explicit node lists, not both")
        if explicit and (self.canary is not None or self.spread_by is not None):
            raise ValueError("canary and spread_by apply to sized batches; explicit batches are used as given")
        return self


class NodeTarget(Model):
    """One node of a release, with optional per-node overrides."""

    node_key: NodeKey
    port: Port | None = None
    package: Package | None = None
    image: Annotated[str, Field(pattern=IMAGE)] | None = None
    container: Annotated[str, Field(pattern=DNS_LABEL)] | None = None
    # Pydantic states the key rule as patternProperties alone, which lets any other key through in JSON Schema.
    labels: Annotated[
        dict[LabelKey, Annotated[str, Field(pattern=LABEL_VALUE)]],
        Field(json_schema_extra={"additionalProperties": False}),
    ] = {}


class ReleaseSpec(Model):
    """What every node of a release gets: one service, one version, its artifact, health check and strategy."""

    release_id: ReleaseId
    service: Service
    version: Version
    package: Package | None = None
    image: Annotated[str, Field(pattern=IMAGE)] | None = None
    container: Annotated[str, Field(pattern=DNS_LABEL)] | None = None
    health: HealthCheck = HealthCheck()
    strategy: Strategy = Strategy()


class ReleasePlan(ReleaseSpec):
    """What a release file says: the release spec and its nodes."""

    model_config = ConfigDict(
        json_schema_extra={
            # Every node has a package or an image, its own or the release's.
            "anyOf": [*ARTIFACT_CHOICES, {"properties": {"nodes": {"items": ARTIFACT_RULE}}}],
            # What JSON Schema cannot say (it relates values to each other); workers enforce exactly these.
            "x-reactor-rules": [
                "nodes: no node key appears twice",
                "nodes: every node key ends with '/' + service, except keys of platform k8s ('k8s/...')",
                "strategy.batches: explicit batches name every node of `nodes` exactly once",
            ],
        }
    )

    nodes: Annotated[list[NodeTarget], Field(min_length=1, max_length=100_000)]

    def spec(self) -> ReleaseSpec:
        """The plan without its node list."""
        return ReleaseSpec.model_validate(self.model_dump(exclude={"nodes"}))

    @model_validator(mode="after")
    def _consistent(self) -> ReleasePlan:
        keys = [node.node_key for node in self.nodes]
        if len(set(keys)) != len(keys):
            raise ValueError("nodes: a node key appears twice")
        explicit = [key for batch in self.strategy.batches if isinstance(batch, list) for key in batch]
        if explicit and sorted(explicit) != sorted(keys):
            missing = sorted(set(keys) - set(explicit))[:3]
            unknown = sorted(set(explicit) - set(keys))[:3]
            raise ValueError(
                f"strategy.batches: explicit batches must name every node exactly once"
                f" (not in any batch: {missing}; not a node: {unknown})"
            )
        for node in self.nodes:
            if node.package is None and node.image is None and self.package is None and self.image is None:
                raise ValueError(f"nodes: {node.node_key} has no package or image")
            if not node.node_key.endswith("/" + self.service) and not node.node_key.startswith("k8s/"):
                raise ValueError(f"nodes: {node.node_key} does not end with the service name {self.service}")
        return self


class ReleaseRequested(ReleaseEvent):
    """Start a release of the plan."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.requested.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES
    model_config = ConfigDict(
        json_schema_extra={"x-reactor-rules": ["plan.release_id equals the release id (header ce_correlationid)"]}
    )

    plan: ReleasePlan
    actor: Actor | None = None

    @model_validator(mode="after")
    def _same_id(self) -> ReleaseRequested:
        if self.plan.release_id != self.release_id:
            raise ValueError("release_id differs from plan.release_id")
        return self


class _ReleaseControl(ReleaseEvent):
    actor: Actor | None = None
    reason: Message = ""


class ReleaseApproved(_ReleaseControl):
    """A human approved the next batch."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.approved.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES


class ReleasePaused(_ReleaseControl):
    """Stop dispatching new nodes until resumed."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.paused.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES


class ReleaseResumed(_ReleaseControl):
    """Dispatch again after a pause."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.resumed.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES


class ReleaseAborted(_ReleaseControl):
    """Dispatch nothing more for this release."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.aborted.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES


class ReleaseRollbackRequested(_ReleaseControl):
    """Roll back every node the release deployed, `max_parallel` at a time or, with `fast`, all at once.

    Newest batch first. A fast rollback sends every deployed node at once, at most the strategy's
    `rollback_parallel`, within the limits across releases; a fast request also speeds up a rollback under way.
    Pauses and approval gates never hold a release rollback back.
    """

    TYPE: ClassVar[str] = "dev.deployreactor.release.rollback.requested.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES

    fast: StrictBool = False


class ReleaseAwaitingApproval(ReleaseEvent):
    """Batch `batch` is done and the next one starts only after a ReleaseApproved."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.awaiting_approval.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES

    batch: Count


class BatchStarted(ReleaseEvent):
    """A batch of the release began."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.batch.started.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES

    batch: Count
    node_keys: list[NodeKey]


class BatchCompleted(ReleaseEvent):
    """Every node of a batch has an outcome."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.batch.completed.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES

    batch: Count
    succeeded: Count
    failed: Count


class ReleaseCompleted(ReleaseEvent):
    """Every batch ran and the failure budget held."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.completed.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES

    succeeded: Count
    failed: Count


class ReleaseHalted(ReleaseEvent):
    """The release stopped before its end (failure budget spent, or aborted)."""

    TYPE: ClassVar[str] = "dev.deployreactor.release.halted.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES

    reason: Message
    succeeded: Count
    failed: Count


class ReleaseRolledBack(ReleaseEvent):
    """Every node the release had deployed was rolled back (or failed to, counted in `failed`).

    `fast`: the rollback sent them all at once (a fast rollback), not `max_parallel` at a time.
    """

    TYPE: ClassVar[str] = "dev.deployreactor.release.rolled_back.v1"
    TOPIC: ClassVar[Topic] = Topic.RELEASES

    rolled_back: Count
    failed: Count
    fast: StrictBool = False


EVENT_TYPES: tuple[type[Event], ...] = (
    DeployRequested,
    RollbackRequested,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    RollbackFailed,
    ReleaseRequested,
    ReleaseApproved,
    ReleasePaused,
    ReleaseResumed,
    ReleaseAborted,
    ReleaseRollbackRequested,
    ReleaseAwaitingApproval,
    BatchStarted,
    BatchCompleted,
    ReleaseCompleted,
    ReleaseHalted,
    ReleaseRolledBack,
)
EVENTS_BY_TYPE: dict[str, type[Event]] = {cls.TYPE: cls for cls in EVENT_TYPES}
OUTCOME_TYPES: tuple[type[NodeEvent], ...] = (NodeDeployed, NodeFailed, NodeRolledBack, RollbackFailed)


def event_document(event: Event) -> str:
    """An event in a stored form that keeps its type (for outboxes and recorded outcomes)."""
    return json.dumps({"type": event.TYPE, "data": event.model_dump(mode="json")})


def event_from_document(document: str) -> Event:
    """The event of a stored form made by `event_document`."""
    parsed = json.loads(document)
    return EVENTS_BY_TYPE[parsed["type"]].model_validate(parsed["data"])
