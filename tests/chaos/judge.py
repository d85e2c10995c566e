"""The chaos tier's invariants, as plain functions over what was seen from outside the reactor's state.

Evidence comes from three places only: the log the nodes' services write themselves (every start, with the other
processes of its node the kernel still showed alive), each node's port over HTTP, and the Kafka topics. The store
is never asked: a bug that corrupts it must not be able to hide itself. Each function returns the broken promises
it found, as sentences; an empty list means the invariant held.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from reactor.events import (
    DeployRequested,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePlan,
    ReleaseRolledBack,
    RollbackFailed,
    RollbackRequested,
)


@dataclass(frozen=True)
class Start:
    """One start of a node's service, as the service logged it (wall-clock seconds)."""

    node_key: str
    pid: int
    version: str
    wall: float
    others_alive: tuple[int, ...] = ()


@dataclass(frozen=True)
class Fault:
    """One fault the test caused, and when (wall-clock seconds)."""

    kind: str
    wall: float
    detail: str = ""


@dataclass
class Evidence:
    """Everything the invariants are judged from."""

    nodes: Sequence[str]
    starts: Sequence[Start]
    served: dict[str, str | None]  # node key -> the version its port answers, None if it does not answer
    running: dict[str, list[tuple[int, str]]]  # node key -> (pid, version) of its services alive at the end
    releases: Sequence[ReleasePlan]  # every release the test published, none with an injected failure
    commands: Sequence[Event]
    outcomes: Sequence[Event]
    release_events: Sequence[Event]
    dead_letters: int
    faults: Sequence[Fault] = ()
    injected_dead_letters: int = 0
    reach_s: float = 0.0  # how long after a fault it can still interrupt a run (see `starts_beyond_interruptions`)
    observed: list[str] = field(default_factory=list)  # what the test saw go wrong while it ran


def violations(evidence: Evidence) -> list[str]:
    """Every broken promise, grouped by invariant."""
    return [
        *evidence.observed,
        *overlapping_runs(evidence.starts),
        *not_serving_final_outcome(evidence),
        *starts_beyond_interruptions(evidence),
        *not_one_outcome_per_request(evidence.commands, evidence.outcomes),
        *releases_not_as_planned(evidence),
        *unexpected_dead_letters(evidence.dead_letters, evidence.injected_dead_letters),
    ]


def overlapping_runs(starts: Iterable[Start]) -> list[str]:
    """No service of a node starts while another of the same node still runs (the kernel's witness)."""
    return [
        f"overlap: {start.node_key}: {start.version} (pid {start.pid}) started while pids "
        f"{list(start.others_alive)} of the node still ran"
        for start in starts
        if start.others_alive
    ]


def final_outcomes(outcomes: Iterable[Event]) -> dict[str, Event]:
    """Each node's last outcome, by the time it happened."""
    final: dict[str, Event] = {}
    for event in sorted(outcomes, key=lambda event: event.occurred_at):
        node_key = getattr(event, "node_key", None)
        if node_key is not None:
            final[node_key] = event
    return final


def told_version(outcome: Event) -> str | None:
    """The version a node runs once `outcome` happened, by what the outcome says."""
    if isinstance(outcome, NodeDeployed | NodeRolledBack):
        return outcome.version
    if isinstance(outcome, NodeFailed):
        return outcome.current_version
    if isinstance(outcome, RollbackFailed):
        return outcome.version
    return None


def not_serving_final_outcome(evidence: Evidence) -> list[str]:
    """Every node ends serving, over HTTP and with exactly one live service of that version, what its final
    outcome says it runs."""
    problems = []
    final = final_outcomes(evidence.outcomes)
    for node_key in evidence.nodes:
        outcome = final.get(node_key)
        if outcome is None:
            problems.append(f"serving: {node_key} has no outcome at all")
            continue
        expected = told_version(outcome)
        running = evidence.running.get(node_key, [])
        if evidence.served.get(node_key) != expected:
            problems.append(
                f"serving: {node_key} answers {evidence.served.get(node_key)!r} over HTTP; its final outcome "
                f"{type(outcome).__name__} ({outcome.event_id}) says {expected!r}"
            )
        if [version for _, version in running] != ([expected] if expected is not None else []):
            problems.append(f"serving: {node_key} has services {running} alive (pid, version); expected {expected!r}")
    return problems


def starts_beyond_interruptions(evidence: Evidence) -> list[str]:
    """A version starts on a node at most once more than the faults that could have interrupted it (see
    `restarts`)."""
    return [
        f"starts: {node_key}: {version} started {1 + len(windows)} times; only {len(matched)} of those starts again "
        f"had a fault of their own in reach ({', '.join(fault.kind for fault in matched) or 'none'})"
        for node_key, version, windows, matched in restarts(evidence)
        if len(matched) < len(windows)
    ]


def restarts(evidence: Evidence) -> list[tuple[str, str, list[tuple[float, float]], list[Fault]]]:
    """Per node and version started more than once: the window in which a fault could have caused each start
    after the first, and the faults matched to them, one fault to one start at most.

    A start again follows an interrupted run of the node: the version's own run starting over, or the previous
    version put back after an interrupted switch (so one interruption may start two versions again, once each).
    What interrupted it happened after the node's start before it, or a little before that: a fault's rebalance
    reaches the group up to a session timeout plus a lease and the grace later (`reach_s`). Any fault in that
    window counts (whether or not it touched the node's worker), which keeps the bound loose but sound; a node
    that starts again with no fault near, or more often than faults came, is caught.
    """
    by_node: dict[str, list[Start]] = defaultdict(list)
    for start in evidence.starts:
        by_node[start.node_key].append(start)
    faults = sorted(evidence.faults, key=lambda fault: fault.wall)
    found = []
    for node_key, starts in sorted(by_node.items()):
        starts.sort(key=lambda start: start.wall)
        windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
        seen = {starts[0].version}
        for before, start in itertools.pairwise(starts):
            if start.version in seen:
                windows[start.version].append((before.wall - evidence.reach_s, start.wall))
            seen.add(start.version)
        for version, spans in sorted(windows.items()):
            # Earliest window end first, each taking the earliest free fault inside it: the largest matching.
            used: set[int] = set()
            matched: list[Fault] = []
            for begin, end in sorted(spans, key=lambda span: span[1]):
                for index, fault in enumerate(faults):
                    if index not in used and begin <= fault.wall <= end:
                        used.add(index)
                        matched.append(fault)
                        break
            found.append((node_key, version, spans, matched))
    return found


def not_one_outcome_per_request(commands: Iterable[Event], outcomes: Iterable[Event]) -> list[str]:
    """Each request has exactly one outcome: one event id, and every copy of it the same (a redelivered request
    re-emits its recorded outcome, byte for byte; a second run would tell its own)."""
    problems = []
    requests = {
        command.event_id: command for command in commands if isinstance(command, DeployRequested | RollbackRequested)
    }
    ids: dict[str, set[str]] = defaultdict(set)
    bodies: dict[str, set[str]] = defaultdict(set)
    for event in outcomes:
        if event.causation_id in requests:
            ids[event.causation_id].add(event.event_id)
            answer = {"kind": type(event).__name__, **event.model_dump(mode="json")}
            bodies[event.causation_id].add(json.dumps(answer, sort_keys=True))
    for request_id, request in requests.items():
        node_key = getattr(request, "node_key", "?")
        if not ids[request_id]:
            problems.append(f"outcomes: {node_key}: request {request_id} has no outcome")
        elif len(ids[request_id]) > 1 or len(bodies[request_id]) > 1:
            told = sorted(
                f"{answer['kind']} {answer.get('version')} at {answer['occurred_at']}"
                for answer in map(json.loads, bodies[request_id])
            )
            problems.append(
                f"outcomes: {node_key}: request {request_id} has {len(ids[request_id])} outcome ids and "
                f"{len(bodies[request_id])} different outcomes: {told[:3]}{' ...' if len(told) > 3 else ''}"
            )
    return problems


def releases_not_as_planned(evidence: Evidence) -> list[str]:
    """Every release, none with an injected failure, asks each of its nodes once to deploy its version, gets
    NodeDeployed of that version for each, asks for no rollback, and ends with one ReleaseCompleted."""
    problems = []
    for plan in evidence.releases:
        release = plan.release_id
        asked: dict[str, set[str]] = defaultdict(set)
        for command in evidence.commands:
            if command.release_id != release:
                continue
            if not isinstance(command, DeployRequested) or command.version != plan.version:
                problems.append(f"release {release}: unexpected command {type(command).__name__}")
                continue
            asked[command.node_key].add(command.event_id)
        wanted = {target.node_key for target in plan.nodes}
        if set(asked) != wanted or any(len(ids) != 1 for ids in asked.values()):
            problems.append(f"release {release}: deploy requests per node {dict(sorted(asked.items()))}")
        deployed = {
            event.node_key
            for event in evidence.outcomes
            if isinstance(event, NodeDeployed) and event.release_id == release and event.version == plan.version
        }
        others = sorted(
            f"{type(event).__name__} {getattr(event, 'node_key', '')}"
            for event in evidence.outcomes
            if event.release_id == release and not isinstance(event, NodeDeployed)
        )
        if deployed != wanted or others:
            problems.append(
                f"release {release}: not deployed: {sorted(wanted - deployed)}; other outcomes: {others or 'none'}"
            )
        ends = sorted(
            {
                (type(event).__name__, event.event_id)
                for event in evidence.release_events
                if isinstance(event, ReleaseCompleted | ReleaseHalted | ReleaseRolledBack)
                and event.release_id == release
            }
        )
        if [kind for kind, _ in ends] != [ReleaseCompleted.__name__]:
            problems.append(f"release {release}: ends with {ends or 'nothing'}, not one ReleaseCompleted")
    return problems


def unexpected_dead_letters(count: int, injected: int) -> list[str]:
    """The dead-letter topic holds exactly what was injected."""
    return [] if count == injected else [f"dlq: {count} dead letters, {injected} injected"]
