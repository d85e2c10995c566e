"""Audit of the topics as plain functions: a readable timeline, node status rebuilt from outcomes, and a diff.

No I/O here: `reactor.replay` reads the bus and writes the store around these functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from reactor.domain.status import NodeState, NodeStatus, pending
from reactor.events import (
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeEvent,
    NodeFailed,
    NodeRolledBack,
    ReleaseAborted,
    ReleaseApproved,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePaused,
    ReleaseRequested,
    ReleaseResumed,
    ReleaseRollbackRequested,
    ReleaseRolledBack,
    RollbackFailed,
    RollbackRequested,
    Topic,
)

UNDECODABLE = "Undecodable"
SUMMARY_LIMIT = 300
COMPARED_FIELDS = ("state", "current_version", "prev_version", "release_id")

_Requested = DeployRequested | RollbackRequested | ReleaseRequested
_Control = ReleaseApproved | ReleasePaused | ReleaseResumed | ReleaseAborted | ReleaseRollbackRequested
_Outcome = NodeDeployed | NodeFailed | NodeRolledBack | RollbackFailed


@dataclass(frozen=True)
class TimelineEntry:
    """One line of the audit timeline: when, where, what, about whom, asked by whom, and what it means."""

    time: datetime
    topic: Topic
    event_type: str
    subject: str
    release_id: str | None
    actor: str
    summary: str
    event_id: str | None = None
    # Who signed the record, verified against the trust file (None: not checked, or it did not verify).
    signer: str | None = None
    # Why the record's signature did not verify, when it was checked (None: it verified, or was not checked).
    unverified: str | None = None


@dataclass(frozen=True)
class Filter:
    """Which events an audit shows; every criterion given must hold."""

    since: datetime | None = None
    release_id: str | None = None
    node_key: str | None = None
    service: str | None = None

    def matches(self, event: Event) -> bool:
        """Whether `event` passes every criterion of this filter."""
        if self.since is not None and as_utc(event.occurred_at) < as_utc(self.since):
            return False
        if self.release_id is not None and event.release_id != self.release_id:
            return False
        if self.node_key is not None and not _names_node(event, self.node_key):
            return False
        return self.service is None or _names_service(event, self.service)

    def admits_unattributed(self, entry: TimelineEntry) -> bool:
        """Whether an entry with no event behind it (an undecodable record) passes: only time and key can tell."""
        if self.since is not None and entry.time < as_utc(self.since):
            return False
        if self.release_id is not None or self.service is not None:
            return False
        return self.node_key is None or entry.subject == self.node_key

    def concerns_node(self, *statuses: NodeStatus | None) -> bool:
        """Whether a node, given by its status on each side (live, rebuilt), is one the filter names.

        `since` is ignored: a node's status depends on its whole history.
        """
        known = [status for status in statuses if status is not None]
        if self.node_key is not None and all(status.node_key != self.node_key for status in known):
            return False
        if self.service is not None and all(status.service != self.service for status in known):
            return False
        return self.release_id is None or any(status.release_id == self.release_id for status in known)


def _names_node(event: Event, node_key: str) -> bool:
    if isinstance(event, NodeEvent):
        return event.node_key == node_key
    if isinstance(event, ReleaseRequested):
        return any(node.node_key == node_key for node in event.plan.nodes)
    if isinstance(event, BatchStarted):
        return node_key in event.node_keys
    return False


def _names_service(event: Event, service: str) -> bool:
    if isinstance(event, NodeEvent):
        return event.service == service
    if isinstance(event, ReleaseRequested):
        return event.plan.service == service
    return False


def as_utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC time; a naive time is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- timeline ----------------------------------------------------------------------------------------


def actor_of(event: Event, source: str) -> str:
    """Who asked: the request's `actor` when the event has one, else the CloudEvents source."""
    if isinstance(event, _Requested | _Control) and event.actor:
        return event.actor
    return source


def summarize(event: Event, source: str) -> str:
    """One human line saying who asked what, or what happened."""
    actor = actor_of(event, source)
    text = _node_summary(event, actor) if isinstance(event, NodeEvent) else _release_summary(event, actor)
    return one_line(text)


def _node_summary(event: NodeEvent, actor: str) -> str:
    match event:
        case DeployRequested():
            return f"deploy {event.version} requested by {actor}"
        case RollbackRequested():
            target = f" to {event.to_version}" if event.to_version else ""
            return f"rollback{target} requested by {actor}" + (f": {event.reason}" if event.reason else "")
        case NodeDeployed():
            return f"deployed {event.version} (was {event.prev_version or 'nothing'})"
        case NodeFailed():
            return (
                f"failed at {event.step}: {event.error}"
                f" (deploying {event.version}; runs {event.current_version or 'nothing'})"
            )
        case NodeRolledBack():
            return f"rolled back to {event.version}"
        case RollbackFailed():
            what = "rollback refused" if refused(event) else f"rollback failed at {event.step}"
            return f"{what}: {event.error} (runs {event.version or 'nothing'})"
        case _:
            return type(event).__name__


def _release_summary(event: Event, actor: str) -> str:
    match event:
        case ReleaseRequested():
            plan = event.plan
            return f"release of {plan.service} {plan.version} to {_count(len(plan.nodes), 'node')} requested by {actor}"
        case ReleaseApproved() | ReleasePaused() | ReleaseResumed() | ReleaseAborted():
            verb = type(event).__name__.removeprefix("Release").lower()
            return f"release {verb} by {actor}" + (f": {event.reason}" if event.reason else "")
        case BatchStarted():
            return f"batch {event.batch + 1} started: {_count(len(event.node_keys), 'node')}"
        case BatchCompleted():
            return f"batch {event.batch + 1} completed: {event.succeeded} succeeded, {event.failed} failed"
        case ReleaseCompleted():
            return f"release completed: {event.succeeded} succeeded, {event.failed} failed"
        case ReleaseHalted():
            return f"release halted: {event.reason}"
        case ReleaseRollbackRequested():
            fast = "fast " if event.fast else ""
            return f"{fast}rollback of the release requested by {actor}" + (f": {event.reason}" if event.reason else "")
        case ReleaseRolledBack():
            fast = " fast" if event.fast else ""
            return f"release rolled back{fast}: {event.rolled_back} rolled back, {event.failed} failed"
        case _:
            return type(event).__name__


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def one_line(text: str, limit: int = SUMMARY_LIMIT) -> str:
    """`text` on one line, cut to `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def entry_for(topic: Topic, event: Event, source: str, *, dead_letter_reason: str | None = None) -> TimelineEntry:
    """The timeline entry of one event; a dead-lettered one says why it was parked instead of what it asked."""
    if topic == Topic.DLQ:
        summary = one_line(f"dead-lettered: {dead_letter_reason or 'no reason recorded'}")
    else:
        summary = summarize(event, source)
    return TimelineEntry(
        time=as_utc(event.occurred_at),
        topic=topic,
        event_type=type(event).__name__,
        subject=event.subject(),
        release_id=event.release_id,
        actor=actor_of(event, source),
        summary=summary,
        event_id=event.event_id,
    )


def undecodable_entry(
    topic: Topic, reason: str, *, time: datetime, subject: str = "", actor: str = ""
) -> TimelineEntry:
    """The timeline entry of a record that is not a valid event (its time is a best guess)."""
    return TimelineEntry(
        time=as_utc(time),
        topic=topic,
        event_type=UNDECODABLE,
        subject=subject,
        release_id=None,
        actor=actor,
        summary=one_line(f"dead-lettered: {reason}" if topic == Topic.DLQ else f"undecodable: {reason}"),
    )


def causal_depths(events: Iterable[Event]) -> dict[str, int]:
    """How many known causes lead to each event (0: none known): orders events stamped with the same time."""
    causes = {event.event_id: event.causation_id for event in events}
    depths: dict[str, int] = {}
    for event_id in causes:
        chain: list[str] = []
        current: str | None = event_id
        while current is not None and current in causes and current not in depths and current not in chain:
            chain.append(current)
            current = causes[current]
        depth = depths[current] if current is not None and current in depths else -1
        for link in reversed(chain):
            depth += 1
            depths[link] = depth
    return depths


def timeline(
    items: Iterable[tuple[Topic, Event, str]],
    flt: Filter,
    *,
    dead_letter_reasons: Mapping[str, str] | None = None,
    undecodable: Iterable[TimelineEntry] = (),
) -> list[TimelineEntry]:
    """The filtered (topic, event, source) triples as entries, in time order, each event id once.

    Ties in time put causes before their effects, then keep the input order. A re-emitted event carries the id
    of the first emission, so only the earliest is kept; an event and its dead-lettered copy are different
    entries. Dead-lettered events take their reason from `dead_letter_reasons` (by event id); `undecodable`
    entries join when the filter admits them.
    """
    reasons = dead_letter_reasons or {}
    triples = list(items)
    depths = causal_depths(event for _, event, _ in triples)
    candidates: list[tuple[TimelineEntry, int]] = [
        (entry_for(topic, event, source, dead_letter_reason=reasons.get(event.event_id)), depths[event.event_id])
        for topic, event, source in triples
        if flt.matches(event)
    ]
    candidates.extend((entry, 0) for entry in undecodable if flt.admits_unattributed(entry))
    ordered = sorted(enumerate(candidates), key=lambda pair: (pair[1][0].time, pair[1][1], pair[0]))
    seen: set[tuple[bool, str]] = set()
    result: list[TimelineEntry] = []
    for _, (entry, _depth) in ordered:
        if entry.event_id is not None:
            key = (entry.topic == Topic.DLQ, entry.event_id)
            if key in seen:
                continue
            seen.add(key)
        result.append(entry)
    return result


# --- rebuild -----------------------------------------------------------------------------------------


def rebuild(events: Iterable[Event]) -> dict[str, NodeStatus]:
    """Node statuses recomputed from outcome events in time order (each event id once); commands are ignored.

    What an outcome does not carry stays as the node's previous outcome left it: the previous version after a
    failed deploy or rollback, and port and health check, which no outcome records. A refused rollback changes
    nothing, as it changed nothing live: a node known only from refusals is not rebuilt at all.
    """
    history = list(events)
    depths = causal_depths(history)
    outcomes = [event for event in history if isinstance(event, _Outcome)]
    ordered = sorted(
        enumerate(outcomes),
        key=lambda pair: (as_utc(pair[1].occurred_at), depths[pair[1].event_id], pair[0]),
    )
    seen: set[str] = set()
    nodes: dict[str, NodeStatus] = {}
    for _, outcome in ordered:
        if outcome.event_id in seen:
            continue
        seen.add(outcome.event_id)
        if refused(outcome):
            continue
        before = nodes.get(outcome.node_key) or pending(outcome.node_key, outcome.service)
        nodes[outcome.node_key] = apply(before, outcome)
    return nodes


def refused(outcome: NodeEvent) -> bool:
    """A rollback refused without running (nothing to roll back to): it names no target and changed no record."""
    return isinstance(outcome, RollbackFailed) and outcome.target_version is None


def apply(status: NodeStatus, outcome: NodeDeployed | NodeFailed | NodeRolledBack | RollbackFailed) -> NodeStatus:
    """The node status after one outcome, as the executor worker recorded it when it emitted that outcome."""
    if refused(outcome):
        return status
    common: dict[str, object] = {
        "service": outcome.service,
        "release_id": outcome.release_id,
        "request_id": outcome.causation_id,
        "updated_at": outcome.occurred_at,
    }
    match outcome:
        case NodeDeployed():
            update: dict[str, object] = {
                "state": NodeState.SUCCESS,
                "operation": "deploy",
                "current_version": outcome.version,
                "prev_version": outcome.prev_version,
                "deploying_version": None,
                "last_error": "",
            }
        case NodeFailed():
            update = {
                "state": NodeState.FAILED,
                "operation": "deploy",
                "current_version": outcome.current_version,
                "prev_version": outcome.prev_version,
                "deploying_version": outcome.version,
                "last_error": f"{outcome.step}: {outcome.error}",
            }
        case NodeRolledBack():
            update = {
                "state": NodeState.ROLLED_BACK,
                "operation": "rollback",
                "current_version": outcome.version,
                "prev_version": outcome.prev_version,
                "deploying_version": None,
                "last_error": "",
            }
        case RollbackFailed():
            update = {
                "state": NodeState.FAILED,
                "operation": "rollback",
                "current_version": outcome.version,
                "prev_version": outcome.prev_version,
                "deploying_version": outcome.target_version,
                "last_error": f"{outcome.step}: {outcome.error}",
            }
    return status.model_copy(update={**common, **update})


# --- compare -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One field of one node where the live store and the rebuilt status disagree (`presence`: one lacks it)."""

    node_key: str
    field: str
    live: str | None
    rebuilt: str | None


def compare(live: Iterable[NodeStatus], rebuilt: Mapping[str, NodeStatus]) -> list[Difference]:
    """Differences in state, current, previous version and release of every node on either side, by node key."""
    live_by_key = {status.node_key: status for status in live}
    differences: list[Difference] = []
    for node_key in sorted(live_by_key.keys() | rebuilt.keys()):
        left, right = live_by_key.get(node_key), rebuilt.get(node_key)
        if left is None or right is None:
            differences.append(
                Difference(
                    node_key=node_key,
                    field="presence",
                    live=None if left is None else "present",
                    rebuilt=None if right is None else "present",
                )
            )
            continue
        for name in COMPARED_FIELDS:
            live_value, rebuilt_value = _text(getattr(left, name)), _text(getattr(right, name))
            if live_value != rebuilt_value:
                differences.append(Difference(node_key=node_key, field=name, live=live_value, rebuilt=rebuilt_value))
    return differences


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, NodeState):
        return value.value
    return str(value)
