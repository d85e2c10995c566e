"""`reactor recover`: rebuild a lost store from the topics, so the workers carry on where the log says they were.

What the log gives back:
- node status (`reactor.domain.replay.rebuild` over the workers' outcomes);
- the record of every finished request, so a redelivered command re-emits its outcome instead of running again;
- every release with its batches, node progress, gates, pauses and budgets: the release topic and the outcomes
  are fed, in time order, to a Pacer writing into the new store, with its clock set to each event's time and its
  timers fired before each event (pauses that ended, deadlines that expired, queued releases whose turn came).
  What it decides is what the Pacer decided live, so the commands it would send are already in the log: it
  publishes nothing. In-flight limits are taken again for the nodes still in flight.

What it reads is what the workers accepted: with signatures required, a record that does not pass this process's
check (unsigned, forged, tampered, a node command not signed by a reactor identity) is left out, as every consumer
dead-lettered it live, and each release and release command is replayed as its verified signer's (the release
keeps its verified submitter); with a deploy policy, the replayed Pacer checks it as the live one did, so what the
policy refused (a release, an approval by its own submitter) stays refused.

What it cannot give back: a claim in flight when the store was lost (its owner and epoch; stop the workers before
recovering, a run still going finds its claim gone and is fenced), a node's port and health check until its next
command, processed records of requests whose outcome was never published, and anything a Pacer decided but had
not published yet (it decides it again once the workers run). A release whose progress the replay cannot place
(an outcome for a node it did not dispatch, say after a live dispatch order the replay did not reproduce) is
reported, not guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from reactor import outcomes
from reactor.adapters.memory_bus import MemoryBus
from reactor.consumers.pacer import Pacer
from reactor.domain.limits import InFlightLimits
from reactor.domain.pacer import ItemState
from reactor.domain.replay import as_utc, rebuild
from reactor.errors import InvalidInput, PolicyRefused
from reactor.events import (
    DeployRequested,
    Event,
    NodeDeployed,
    NodeEvent,
    NodeFailed,
    NodeRolledBack,
    RollbackFailed,
    RollbackRequested,
    Topic,
    derived_event_id,
    utc_now,
)
from reactor.ports import EventBus, Store
from reactor.replay import read_accepted
from reactor.trust.enforcement import NO_SIGNATURES, SIGNER, Signatures
from reactor.trust.identities import Identity
from reactor.trust.policy import Policy

RECOVERY_TOPICS = (Topic.RELEASES, Topic.COMMANDS, Topic.OUTCOMES)

_PACER_INPUTS = (Topic.RELEASES, Topic.OUTCOMES)
_SETTLED = {
    ItemState.SUCCEEDED,
    ItemState.FAILED,
    ItemState.ROLLED_BACK,
    ItemState.ROLLBACK_FAILED,
    ItemState.ROLLBACK_DISPATCHED,
}


@dataclass
class RecoveryReport:
    """What a recovery wrote, and what it could not place."""

    nodes: int = 0
    processed: int = 0
    releases: int = 0
    events: int = 0
    unplaced: list[str] = field(default_factory=list)
    # Records left out: they do not decode, or their signature does not pass (the live consumers dead-lettered them).
    refused: int = 0
    # Releases and release commands the deploy policy refused again.
    policy_refused: int = 0


class _ReplayClock:
    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self) -> datetime:
        return self.now


def worker_outcome(event: Event) -> bool:
    """An outcome a worker emitted for a command it ran (not a Pacer's deadline report)."""
    return (
        isinstance(event, NodeDeployed | NodeFailed | NodeRolledBack | RollbackFailed)
        and event.causation_id is not None
        and event.event_id == derived_event_id(event.causation_id, "outcome")
    )


async def recover(
    bus: EventBus,
    store: Store,
    *,
    concurrent_releases: str = "queue",
    limits: InFlightLimits | None = None,
    signatures: Signatures = NO_SIGNATURES,
    policy: Policy | None = None,
) -> RecoveryReport:
    """Rebuild node status, processed records and releases from the topics into `store`, which must be empty.

    `signatures` and `policy`: the workers' own, so that what they refused stays out (see the module's text)."""
    if await store.list_releases() or await store.list_nodes():
        raise InvalidInput("store", "is not empty: recovery rebuilds a lost store and never writes over one")
    read, refused = await read_accepted(bus, RECOVERY_TOPICS, signatures.check)
    report = await recover_from(
        [(topic, event) for topic, event, _ in read],
        store,
        concurrent_releases=concurrent_releases,
        limits=limits,
        signers=[signer for _, _, signer in read],
        policy=policy,
    )
    report.refused = len(refused)
    return report


async def recover_from(
    read: Sequence[tuple[Topic, Event]],
    store: Store,
    *,
    concurrent_releases: str = "queue",
    limits: InFlightLimits | None = None,
    signers: Sequence[Identity | None] | None = None,
    policy: Policy | None = None,
) -> RecoveryReport:
    """`recover` over events already read: (topic, event) in each topic's order, and who verifiably signed each
    (`signers`, in the same order; None: unchecked)."""
    report = RecoveryReport()
    events = [event for _, event in read]
    signed_by = [None] * len(read) if signers is None else list(signers)
    if len(signed_by) != len(read):
        raise ValueError("signers: one per event read")
    worker_outcomes = [event for event in events if worker_outcome(event)]
    for status in rebuild(worker_outcomes).values():
        if await store.put_node(status, expected_revision=0) is None:
            raise InvalidInput("store", f"already holds {status.node_key}: recovery needs an empty store")
        report.nodes += 1
    commands = {event.event_id for event in events if isinstance(event, DeployRequested | RollbackRequested)}
    for outcome in worker_outcomes:
        if outcome.causation_id in commands:
            await store.put_processed(outcome.causation_id, outcomes.record(outcome))
            report.processed += 1

    clock = _ReplayClock()
    # Whatever the replayed Pacer decides to send is already in the log: it goes to a bus nobody reads.
    pacer = Pacer(
        store,
        MemoryBus(history_limit=0),
        clock=clock,
        concurrent_releases=concurrent_releases,
        limits=limits,
        policy=policy,
    )
    fed = sorted(
        (
            (as_utc(event.occurred_at), position, event)
            for position, (topic, event) in enumerate(read)
            if topic in _PACER_INPUTS
        ),
        key=lambda item: (item[0], item[1]),
    )
    seen: set[str] = set()
    for moment, position, event in fed:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        clock.now = moment
        await pacer.tick()
        token = SIGNER.set(signed_by[position])  # who signed it, as the live bus told the Pacer
        try:
            await pacer.handle(event)
        except PolicyRefused:
            report.policy_refused += 1  # dead-lettered live too: it changed nothing then, it changes nothing now
        finally:
            SIGNER.reset(token)
        report.events += 1
    report.releases = len(await store.list_releases())
    report.unplaced = await _unplaced(store, [event for event in events if isinstance(event, NodeEvent)])
    return report


async def _unplaced(store: Store, node_events: list[NodeEvent]) -> list[str]:
    """Nodes of a release whose outcome is in the log but whose rebuilt progress does not show it."""
    problems = []
    for record in await store.list_releases():
        rows = {row.node_key: row for row in await store.list_release_nodes(record.release_id)}
        for event in node_events:
            if event.release_id != record.release_id or not isinstance(event, NodeDeployed | NodeFailed):
                continue
            row = rows.get(event.node_key)
            if row is not None and row.state not in _SETTLED:
                problems.append(
                    f"{record.release_id} {event.node_key}: the log has its {type(event).__name__}, "
                    f"the replay left it {row.state.value}"
                )
    return sorted(set(problems))
