"""Outcome events derived from a finished NodeStatus, and their recorded form in the store."""

from __future__ import annotations

import json
import re

from reactor.domain.status import NodeState, NodeStatus
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

_STEP = re.compile(r"^([a-z][a-z0-9_-]{0,31}): ")


def split_error(last_error: str, default_step: str) -> tuple[str, str]:
    """The failed step and the message of an executor's `last_error` ("<step>: <message>")."""
    match = _STEP.match(last_error)
    if match is None:
        return default_step, last_error or "failed without a message"
    return match.group(1), last_error[match.end() :] or "failed without a message"


def outcome_for(
    request: DeployRequested | RollbackRequested,
    status: NodeStatus,
    duration_s: float,
    before: NodeStatus | None = None,
) -> NodeEvent:
    """The outcome event of `request`; its id derives from the request's, so a re-emission is a duplicate.

    `before` is the node as it was before the request, which names the version a rollback left.
    """
    common = {
        "event_id": derived_event_id(request.event_id, "outcome"),
        "node_key": request.node_key,
        "service": request.service,
        "release_id": request.release_id,
        "causation_id": request.event_id,
        "duration_s": round(duration_s, 6),
    }
    if isinstance(request, DeployRequested):
        if status.state == NodeState.SUCCESS:
            return NodeDeployed(version=request.version, prev_version=status.prev_version, **common)
        step, error = split_error(status.last_error, "deploy")
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
    step, error = split_error(status.last_error, "rollback")
    return RollbackFailed(
        version=status.current_version,
        prev_version=status.prev_version,
        target_version=status.deploying_version,
        step=step,
        error=error,
        **common,
    )


def record(outcome: Event) -> str:
    """The stored form of an outcome."""
    return json.dumps({"type": outcome.TYPE, "data": outcome.model_dump(mode="json")})


def restore(recorded: str) -> NodeEvent:
    """An outcome from its stored form."""
    document = json.loads(recorded)
    model = EVENTS_BY_TYPE[document["type"]]
    if model not in OUTCOME_TYPES:
        raise ValueError(f"not an outcome type: {document['type']}")
    event = model.model_validate(document["data"])
    assert isinstance(event, NodeEvent)  # noqa: S101 (narrowing for the type checker; checked just above)
    return event
