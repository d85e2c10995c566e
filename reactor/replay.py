"""`reactor replay`'s audit: read every topic from its beginning, show the timeline, rebuild and diff node status.

A thin shell of I/O around `reactor.domain.replay`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from reactor.adapters.dispatch import DLQ_REASON
from reactor.codec import Record, decode
from reactor.domain.replay import Difference, Filter, TimelineEntry, compare, rebuild, timeline, undecodable_entry
from reactor.errors import DecodeError, InvalidInput
from reactor.events import Event, Topic
from reactor.ports import EventBus, Store
from reactor.trust.identities import Identity, TrustStore
from reactor.trust.signing import SignatureError, Verified, verify_record

Check = Callable[[Record], Verified | None]

AUDIT_TOPICS = (Topic.RELEASES, Topic.COMMANDS, Topic.OUTCOMES, Topic.DLQ)
"""Read in this order: the last tiebreak (after causation) for events stamped with the same time."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class _Read:
    """One record as read back: its event and source when it decodes, else why not; for the DLQ, why parked."""

    topic: Topic
    event: Event | None
    source: str
    problem: str
    dead_letter_reason: str | None
    time: datetime
    key: str
    signer: Identity | None = None
    unverified: str | None = None


@dataclass(frozen=True)
class AuditReport:
    """What an audit found: the timeline, where the live store differs from the rebuild, unreadable records."""

    timeline: list[TimelineEntry]
    differences: list[Difference]
    undecodable: list[tuple[Topic, str]]


async def read_events(
    bus: EventBus, topics: Sequence[Topic]
) -> tuple[list[tuple[Topic, Event, str]], list[tuple[Topic, str]]]:
    """Every record of `topics`: the (topic, event, source) that decode, and (topic, reason) for those that do not."""
    reads = await _read(bus, topics)
    decoded = [(read.topic, read.event, read.source) for read in reads if read.event is not None]
    undecodable = [(read.topic, read.problem) for read in reads if read.event is None]
    return decoded, undecodable


async def read_accepted(
    bus: EventBus, topics: Sequence[Topic], check: Check
) -> tuple[list[tuple[Topic, Event, Identity | None]], list[tuple[Topic, str]]]:
    """The records of `topics` a consumer checking with `check` would have acted on, each with its verified signer
    (None: not checked), and (topic, reason) for every other one: undecodable, or refused by `check`."""
    reads = await _read(bus, topics, check=check)
    accepted = [
        (read.topic, read.event, read.signer) for read in reads if read.event is not None and not read.unverified
    ]
    refused = [
        (read.topic, read.problem or read.unverified or "") for read in reads if read.event is None or read.unverified
    ]
    return accepted, refused


def trust_check(trust: TrustStore) -> Check:
    """A check that verifies a record's signature with `trust` (what `reactor replay` shows), and nothing more."""
    return lambda record: verify_record(record, trust)


async def _read(bus: EventBus, topics: Sequence[Topic], *, check: Check | None = None) -> list[_Read]:
    """Every record of `topics`, decoded where it can be; with `check`, each decodable one's signature checked."""
    reads: list[_Read] = []
    for topic in topics:
        last_time: datetime | None = None
        pending_times: list[int] = []  # undecodable records before the first decodable one: no time known yet
        for record in await bus.history(topic):
            reason = _header(record, DLQ_REASON) if topic == Topic.DLQ else None
            key = (record.key or b"").decode(errors="replace")
            try:
                event, source = decode(record)
            except DecodeError as exc:
                header_time = _header_time(record)
                if header_time is None and last_time is None:
                    pending_times.append(len(reads))
                source = _header(record, "ce_source") or ""
                reads.append(_Read(topic, None, source, str(exc), reason, header_time or last_time or _EPOCH, key))
                continue
            last_time = event.occurred_at
            for index in pending_times:
                reads[index] = _with_time(reads[index], last_time)
            pending_times.clear()
            signer, unverified = _signature(record, check)
            reads.append(_Read(topic, event, source, "", reason, event.occurred_at, key, signer, unverified))
    return reads


def _signature(record: Record, check: Check | None) -> tuple[Identity | None, str | None]:
    """(signer, None) when the record passes `check`, (None, why) when it does not, (None, None) unchecked."""
    if check is None:
        return None, None
    try:
        verified = check(record)
    except SignatureError as exc:
        return None, str(exc)
    return (None if verified is None else verified.identity), None


def _with_time(read: _Read, time: datetime) -> _Read:
    return replace(read, time=time)


def _header(record: Record, name: str) -> str | None:
    value = record.header(name)
    return None if value is None else value.decode(errors="replace")


def _header_time(record: Record) -> datetime | None:
    """The `ce_time` header of a record that did not decode, if it still reads as a time."""
    text = _header(record, "ce_time")
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


async def rebuild_into(store: Store, events: Iterable[Event]) -> int:
    """Write the statuses rebuilt from `events` into an empty store; the number of nodes written."""
    count = 0
    for node_key, status in sorted(rebuild(events).items()):
        if await store.put_node(status, expected_revision=0) is None:
            raise InvalidInput("store", f"already holds {node_key}: a rebuild needs an empty store")
        count += 1
    return count


async def audit(
    bus: EventBus, live_store: Store, fresh_store: Store, flt: Filter, *, trust: TrustStore | None = None
) -> AuditReport:
    """Read every topic, build the filtered timeline, rebuild node status into `fresh_store` and diff it with live.

    The rebuild always uses the whole history (a node's status depends on all of it) and skips the dead-letter
    topic; differences are narrowed to the nodes the filter names by node key, service or release. With `trust`,
    each entry says who signed it (verified) or why its signature does not verify.
    """
    reads = await _read(bus, AUDIT_TOPICS, check=None if trust is None else trust_check(trust))
    items = [(read.topic, read.event, read.source) for read in reads if read.event is not None]
    reasons: dict[str, str] = {}
    for read in reads:
        if read.topic == Topic.DLQ and read.event is not None:
            reasons.setdefault(read.event.event_id, read.dead_letter_reason or "no reason recorded")
    unreadable = [
        undecodable_entry(
            Topic.DLQ, read.dead_letter_reason or read.problem, time=read.time, subject=read.key, actor=read.source
        )
        for read in reads
        if read.topic == Topic.DLQ and read.event is None
    ]
    entries = timeline(items, flt, dead_letter_reasons=reasons, undecodable=unreadable)
    if trust is not None:
        # A re-emitted event keeps its first emission's id: the timeline shows the first, so its signature counts.
        signatures: dict[tuple[Topic, str], tuple[str | None, str | None]] = {}
        for read in reads:
            if read.event is not None:
                signer = None if read.signer is None else read.signer.name
                signatures.setdefault((read.topic, read.event.event_id), (signer, read.unverified))
        entries = [
            entry
            if entry.event_id is None
            else replace(
                entry,
                signer=signatures[(entry.topic, entry.event_id)][0],
                unverified=signatures[(entry.topic, entry.event_id)][1],
            )
            for entry in entries
        ]
    await rebuild_into(fresh_store, (event for topic, event, _ in items if topic != Topic.DLQ))
    rebuilt = {status.node_key: status for status in await fresh_store.list_nodes()}
    live = {status.node_key: status for status in await live_store.list_nodes()}
    differences = [
        difference
        for difference in compare(live.values(), rebuilt)
        if flt.concerns_node(live.get(difference.node_key), rebuilt.get(difference.node_key))
    ]
    return AuditReport(
        timeline=entries,
        differences=differences,
        undecodable=[(read.topic, read.problem) for read in reads if read.event is None],
    )
