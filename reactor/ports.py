"""The interfaces consumers depend on. Handlers import these, events and the domain; never an adapter."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Protocol, Self

from pydantic import Field

from reactor.codec import Record
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeStatus
from reactor.events import Event, HealthCheck, Model, NodeTarget, Package, ReleaseSpec, Topic

# --- executors ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """Platform settings an executor may need (root folder of the local platform, timeouts, kubeconfig)."""

    local_root: Path = Path("var/nodes")
    stop_timeout_s: float = 10.0
    noop_delay_s: float = 0.0
    # The `physical` platform (reactor/executors/hostcontract.py): which driver, how to reach and trust hosts.
    physical_driver: str = "ssh"  # "ssh" (asyncssh) or "ansible" (playbooks/ via ansible-runner)
    physical_inventory: Path | None = None  # Ansible INI inventory naming hosts; else node hosts are addresses
    physical_known_hosts: Path | None = None  # None: ~/.ssh/known_hosts; host keys are always verified
    physical_private_key: Path | None = None  # None: the ssh agent and the default keys
    physical_user: str = "root"
    physical_connect_timeout_s: float = 10.0
    physical_command_timeout_s: float = 120.0
    physical_concurrency: int = 32  # hosts worked on at once by one process
    kubeconfig: Path | None = None  # None: $KUBECONFIG, else ~/.kube/config (the `k8s` platform)


async def unfenced() -> None:
    """A run no one else can take over (an executor used on its own): every change may go ahead."""


@dataclass(frozen=True, slots=True)
class ExecutionContext:
    """Everything an executor needs for one request on one node."""

    node_key: str
    service: str
    host: str
    current: NodeStatus
    target_version: str | None = None
    package: Package | None = None
    image: str | None = None
    container: str | None = None
    port: int | None = None
    health: HealthCheck = field(default_factory=HealthCheck)
    request_id: str = ""
    settings: ExecutorSettings = field(default_factory=ExecutorSettings)
    # Raises Fenced unless the run still holds the node's claim. An executor awaits it right before each step that
    # changes the node: a run taken over while it waited (its worker froze past its lease) must not stop or start
    # what the new holder runs.
    fence: Callable[[], Awaitable[None]] = unfenced


class Executor(Protocol):
    """Runs deploys and rollbacks on one node of one platform (the seed's interface, async)."""

    platform: ClassVar[str]

    async def deploy(self) -> NodeStatus:
        """Put the target version on the node; on failure leave the previous one running."""
        ...

    async def rollback(self) -> NodeStatus:
        """Return the node to the target (previous) version."""
        ...

    async def status(self) -> NodeStatus:
        """Probe the real node, not only the record."""
        ...


# What the `reactor.executors` entry-point group registers: usually the Executor class itself.
ExecutorFactory = Callable[[ExecutionContext], Executor]


# --- bus ---------------------------------------------------------------------------------------

Handler = Callable[[Event], Awaitable[None]]
# Which events a handler acts on at all: the others are finished without a call (as if it had returned at once).
Interest = Callable[[Event], bool]


class EventBus(Protocol):
    """Publishes events and feeds them to handlers with at-least-once delivery and per-key order.

    A handler that returns has finished with the event (its offset may be committed); one that raises a
    retriable ReactorError gets it again later; invalid messages go to the dead-letter topic.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def ping(self) -> None:
        """Raise BackendUnavailable unless the bus can be reached."""
        ...

    async def publish(self, event: Event) -> None:
        """Send one event to its topic, keyed by its subject; returns once the bus has it."""
        ...

    async def publish_raw(self, topic: Topic, record: Record) -> None:
        """Send a message as it is, valid or not (CI/CD shims and tests send raw messages)."""
        ...

    async def consume(
        self, topics: Sequence[Topic], group: str, handler: Handler, *, wants: Interest | None = None
    ) -> None:
        """Feed events of `topics` to `handler` until cancelled; one consumer group per role. Events `wants`
        turns down are finished without reaching `handler`; a message is still checked and decoded first (an invalid
        one is dead-lettered as ever), except an event published in this process, which has nothing to check."""
        ...

    async def history(self, topic: Topic) -> list[Record]:
        """Every message of `topic` from its beginning up to now, in order per partition (for audit)."""
        ...


# --- store -------------------------------------------------------------------------------------


class ReleaseRecord(Model):
    """A release as the Pacer keeps it: its spec, batch sizes, where it is, and a revision for CAS.

    The node list lives in ReleaseNode rows, so this record stays small however many nodes a release has.
    """

    release_id: str
    plan: ReleaseSpec
    batch_sizes: list[int]
    batch: int = 0
    # Per state, the nodes of the batches before `batch`: those no longer change while the release rolls forward,
    # so the pacer counts only the current batch's rows (a FerretDB count decodes every row it counts). None in
    # a record stored without it: every batch is counted.
    settled: dict[ItemState, int] | None = None
    state: ReleaseState = ReleaseState.RUNNING
    budget: int = 0
    batch_budget: int | None = None
    approved_batch: int = -1
    resume_at: datetime | None = None
    reason: str = ""
    # Rolling back all at once (see `reactor.domain.pacer.rollback_window`), as asked or as the strategy says.
    fast_rollback: bool = False
    request_id: str
    actor: str | None = None
    # The verified signer of the ReleaseRequested (None when signatures were not checked): the deploy policy's
    # submitter, for four-eyes approval and the worker's check of each node command.
    submitter: str | None = None
    created_at: datetime
    updated_at: datetime
    revision: int = 0
    # Release events decided together with the last change and not yet known to be published (stored forms,
    # `reactor.events.event_document`): whoever reads the record next publishes them, so none is lost.
    outbox: list[str] = Field(default_factory=list)


class ReleaseNode(Model):
    """One node of a release: its batch, position and progress."""

    release_id: str
    node_key: str
    batch: int
    position: int
    state: ItemState = ItemState.QUEUED
    target: NodeTarget | None = None
    dispatched_at: datetime | None = None
    request_id: str | None = None
    outcome: str | None = None


class Slot(Model):
    """One unit of an in-flight limit, held by one dispatched node of a release."""

    scope: str
    index: int
    release_id: str
    node_key: str
    taken_at: datetime


class Store(Protocol):
    """Durable state: node statuses, processed event ids, releases. Writes are compare-and-set."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def ping(self) -> None:
        """Raise BackendUnavailable unless the store can be reached."""
        ...

    async def get_node(self, node_key: str) -> NodeStatus | None:
        """The node's status, or None if the reactor never touched it."""
        ...

    async def put_node(self, status: NodeStatus, *, expected_revision: int) -> NodeStatus | None:
        """Write `status` if the stored revision is `expected_revision` (0: absent); the new status or None."""
        ...

    async def list_nodes(self, *, release_id: str | None = None, service: str | None = None) -> list[NodeStatus]:
        """Node statuses, ordered by node key."""
        ...

    async def get_processed(self, event_id: str) -> str | None:
        """The recorded outcome (encoded event JSON) of a finished request, if any."""
        ...

    async def put_processed(self, event_id: str, outcome: str, *, at: datetime | None = None) -> bool:
        """Record the outcome of a finished request, finished `at` (None: now); a second write of the same id keeps
        the first. Whether this write is the one stored."""
        ...

    async def prune_processed(self, before: datetime) -> int:
        """Forget the outcomes of requests finished before `before`; how many were forgotten. A record from before
        records had a time is kept: how old it is cannot be told."""
        ...

    async def get_release(self, release_id: str) -> ReleaseRecord | None:
        """The release, if known."""
        ...

    async def put_release(self, record: ReleaseRecord, *, expected_revision: int) -> ReleaseRecord | None:
        """Write `record` if the stored revision is `expected_revision` (0: absent); the new record or None."""
        ...

    async def list_releases(self) -> list[ReleaseRecord]:
        """Every release, newest first."""
        ...

    async def add_release_nodes(self, nodes: Iterable[ReleaseNode]) -> None:
        """Insert the nodes of a new release; nodes already there are kept as they are. `nodes` is read once, in
        order, and a chunk of it at a time: a generator keeps a release of 100,000 nodes from being in memory as
        rows all at once."""
        ...

    async def move_release_node(
        self,
        release_id: str,
        node_key: str,
        *,
        from_states: Sequence[ItemState],
        to_state: ItemState,
        outcome: str | None = None,
        dispatched_at: datetime | None = None,
    ) -> bool:
        """Change one node's progress if it is in one of `from_states`; False if it was not."""
        ...

    async def move_release_nodes(
        self,
        release_id: str,
        node_keys: Sequence[str],
        *,
        from_states: Sequence[ItemState],
        to_state: ItemState,
        dispatched_at: datetime | None = None,
    ) -> set[str]:
        """Move each of `node_keys` that is in one of `from_states` to `to_state`, as `move_release_node` does one
        (a compare-and-set per node), in as few round trips as the store allows; the keys that moved. On an error
        some may have moved: moving them again from `to_state` too tells which are there now."""
        ...

    async def list_release_nodes(
        self,
        release_id: str,
        *,
        batch: int | None = None,
        state: ItemState | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[ReleaseNode]:
        """Nodes of a release in plan order (the last first with `newest_first`), optionally of one batch and one
        state, at most `limit` of them."""
        ...

    async def get_release_node(self, release_id: str, node_key: str) -> ReleaseNode | None:
        """One node of a release; None if the release has no such node."""
        ...

    async def list_release_node_keys(self, release_id: str, *, batch: int | None = None) -> list[str]:
        """The keys of a release's nodes (or of one batch's) in plan order: what `list_release_nodes` would give,
        without building a row for each."""
        ...

    async def count_release_nodes(self, release_id: str, *, batch: int | None = None) -> dict[ItemState, int]:
        """How many nodes of the release (or of one batch) are in each state."""
        ...

    async def count_release_batches(self, release_id: str) -> dict[int, dict[ItemState, int]]:
        """How many nodes of each batch of the release are in each state (a batch and state with no node may be
        absent), counted in one pass: the pacer needs its batch's counts and the release's on every pass."""
        ...

    async def take_slots(
        self, release_id: str, node_key: str, scopes: Sequence[tuple[str, int]], *, now: datetime
    ) -> bool:
        """Take one slot of every (scope, limit) for the node, or none of them: False if a scope is full.

        Each call takes slots of its own, even for a node that holds some already: counting those as taken
        would let a node go out with none if their taker gave them back meanwhile. `free_slots` gives back
        every slot of the node.
        """
        ...

    async def free_slots(self, release_id: str, node_key: str) -> None:
        """Give back every slot the node holds."""
        ...

    async def list_slots(self) -> list[Slot]:
        """Every slot held, by scope and index."""
        ...

    async def take_lease(self, name: str, holder: str, *, now: datetime, ttl_s: float) -> bool:
        """Take or renew the lease `name` for `holder` until `now + ttl_s`; False while another holder has it."""
        ...

    async def release_lease(self, name: str, holder: str) -> None:
        """Give up the lease `name` if `holder` has it, so another may take it at once."""
        ...


# --- CDEvents sinks ------------------------------------------------------------------------------


class CDEventSink(Protocol):
    """Somewhere CDEvents go for subscribers that speak CDEvents: a Kafka topic or an HTTP endpoint."""

    name: str  # shown in logs and metrics: the topic or the URL

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def send(self, cdevent: Mapping[str, object]) -> None:
        """Deliver one CDEvent (JSON form); returns once the sink has it, raises a retriable error if not yet."""
        ...
