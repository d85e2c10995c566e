"""Outcome events derived from a finished NodeStatus, and their recorded form in the store."""

from __future__ import annotations

import json

from reactor.domain.status import NodeState, NodeStatus, error_text, split_error
from reactor.events import (
    EVENTS_BY_TYPE,
    OUTCOME_TYPES,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeEvent,
    NodeFailed,
    NodeRolledBack,
    RollbackFailed,
    RollbackRequested,
    derived_event_id,
)


def _common(request: DeployRequested | RollbackRequested, duration_s: float) -> dict[str, object]:
    return {
        "event_id": derived_event_id(request.event_id, "outcome"),
        "node_key": request.node_key,
        "service": request.service,
        "release_id": request.release_id,
        "causation_id": request.event_id,
        "duration_s": round(duration_s, 6),
    }


def outcome_for(
    request: DeployRequested | RollbackRequested,
    status: NodeStatus,
    duration_s: float,
    before: NodeStatus | None = None,
) -> NodeEvent:
    """The outcome event of `request`; its id derives from the request's, so a re-emission is a duplicate.

    `before` is the node as it was before the request, which names the version a rollback left. `status` is the
    node as recorded when the request finished; the event says what the record says (`finish` stores the error
    in the form the event carries), so replaying the event rebuilds the record.
    """
    common = _common(request, duration_s)
    if isinstance(request, DeployRequested):
        if status.state == NodeState.SUCCESS:
            return NodeDeployed(version=request.version, prev_version=status.prev_version, **common)
        step, error = split_error(error_text(status.last_error, "deploy"), "deploy")
        return NodeFailed(
            version=request.version,
            current_version=status.current_version,
            prev_version=status.prev_version,
            step=step,
            error=error,
            auto_rollback=request.auto_rollback,
            **common,
        )
    if status.state == NodeState.ROLLED_BACK and status.current_version is not None:
        from_version = None
        if before is not None:
            failed = before.state == NodeState.FAILED
            from_version = before.deploying_version if failed else before.current_version
        return NodeRolledBack(
            version=status.current_version, from_version=from_version, prev_version=status.prev_version, **common
        )
    step, error = split_error(error_text(status.last_error, "rollback"), "rollback")
    return RollbackFailed(
        version=status.current_version,
        prev_version=status.prev_version,
        target_version=status.deploying_version,
        step=step,
        error=error,
        **common,
    )


def refused(request: RollbackRequested, current: NodeStatus, reason: str) -> RollbackFailed:
    """The outcome of a rollback refused without running anything: `current` stays the node's record.

    It names no `target_version`, which is how a replay tells a refusal (the node unchanged) from a rollback
    that ran and failed (the node recorded failed).
    """
    return RollbackFailed(
        version=current.current_version,
        prev_version=current.prev_version,
        target_version=None,
        step="rollback",
        error=reason,
        **_common(request, 0.0),
    )


def record(outcome: Event) -> str:
    """The stored form of an outcome: `{"type": ..., "data": ...}`, its data as the model writes its JSON (in one
    pass, rather than a dict of it written again by `json`)."""
    return f'{{"type":{json.dumps(outcome.TYPE)},"data":{outcome.model_dump_json()}}}'


def restore(recorded: str) -> NodeEvent:
    """An outcome from its stored form."""
    document = json.loads(recorded)
    model = EVENTS_BY_TYPE[document["type"]]
    if model not in OUTCOME_TYPES:
        raise ValueError(f"not an outcome type: {document['type']}")
    event = model.model_validate(document["data"])
    assert isinstance(event, NodeEvent)  # noqa: S101 (narrowing for the type checker; checked just above)
    return event
