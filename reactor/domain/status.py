"""NodeStatus and its legal transitions, as pure functions over plain data."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import Field

from reactor.errors import IllegalTransition, NodeBusy
from reactor.events import HealthCheck, Model, NodeKey, ReleaseId, Service, Version


class NodeState(StrEnum):
    """The seed's node states."""

    PENDING = "pending"
    DEPLOYING = "deploying"
    SUCCESS = "success"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


TERMINAL = frozenset({NodeState.SUCCESS, NodeState.FAILED, NodeState.ROLLED_BACK})


class NodeStatus(Model):
    """What one node runs and what is happening to it (the seed's fields plus bookkeeping)."""

    node_key: NodeKey
    host: str
    service: Service
    platform: str
    current_version: Version | None = None
    deploying_version: Version | None = None
    prev_version: Version | None = None
    state: NodeState = NodeState.PENDING
    last_error: str = ""
    release_id: ReleaseId | None = None
    request_id: str | None = None
    operation: str | None = Field(default=None, pattern=r"^(deploy|rollback)$")
    port: int | None = None
    health: HealthCheck | None = None
    updated_at: datetime | None = None
    revision: int = 0


def parse_node_key(node_key: str) -> tuple[str, str]:
    """The platform and the host (or workload name) of a node key."""
    parts = node_key.split("/")
    if parts[0] == "k8s":
        return "k8s", parts[-1]
    return parts[0], parts[1] if len(parts) > 2 else parts[-1]


def pending(node_key: str, service: str) -> NodeStatus:
    """A node the reactor has never touched."""
    platform, host = parse_node_key(node_key)
    return NodeStatus(node_key=node_key, host=host, service=service, platform=platform)


def claim(
    current: NodeStatus,
    *,
    request_id: str,
    operation: str,
    target_version: str | None,
    release_id: str | None,
    now: datetime,
    lease: timedelta,
) -> NodeStatus:
    """Mark the node deploying for this request; the caller writes it with a compare-and-set.

    A node deploying for another request is busy unless that request's lease ran out (its worker died).
    The same request may claim again: that is a redelivery of an interrupted request.
    """
    held_by_other = current.state == NodeState.DEPLOYING and current.request_id != request_id
    if held_by_other and current.updated_at is not None and now - current.updated_at < lease:
        raise NodeBusy(f"{current.node_key} is busy with request {current.request_id}")
    return current.model_copy(
        update={
            "state": NodeState.DEPLOYING,
            "deploying_version": target_version,
            "request_id": request_id,
            "operation": operation,
            "release_id": release_id,
            "last_error": "",
            "updated_at": now,
        }
    )


def rollback_target(current: NodeStatus, to_version: str | None) -> str | None:
    """The version a rollback returns to.

    After a failed deploy the node was restored to `current_version`, so that is the target, unless it runs the
    failed version itself (it failed after the switch, e.g. during min_healthy); after a successful deploy it is
    `prev_version`. An explicit `to_version` wins.
    """
    if to_version is not None:
        return to_version
    failed_after_switch = current.state == NodeState.FAILED and current.current_version == current.deploying_version
    if failed_after_switch and current.current_version is not None:
        return current.prev_version
    if current.state == NodeState.FAILED or (current.state == NodeState.DEPLOYING and current.operation == "rollback"):
        return current.current_version or current.prev_version
    return current.prev_version


def finish(claimed: NodeStatus, result: NodeStatus, *, now: datetime) -> NodeStatus:
    """Fold an executor's result into the claimed status; only a terminal result may finish a claim."""
    if claimed.state != NodeState.DEPLOYING:
        raise IllegalTransition(f"{claimed.node_key}: finish from {claimed.state}, expected deploying")
    if result.state not in TERMINAL:
        raise IllegalTransition(f"{claimed.node_key}: executor returned non-terminal state {result.state}")
    if claimed.operation == "rollback" and result.state == NodeState.SUCCESS:
        raise IllegalTransition(f"{claimed.node_key}: a rollback ends rolled_back or failed")
    if claimed.operation == "deploy" and result.state == NodeState.ROLLED_BACK:
        raise IllegalTransition(f"{claimed.node_key}: a deploy ends success or failed")
    return claimed.model_copy(
        update={
            "state": result.state,
            "current_version": result.current_version,
            "prev_version": result.prev_version,
            "deploying_version": result.deploying_version if result.state == NodeState.FAILED else None,
            "last_error": result.last_error,
            "updated_at": now,
        }
    )


def fail_min_healthy(deployed: NodeStatus, *, running: str | None, error: str, now: datetime) -> NodeStatus:
    """A deployed node that did not stay healthy for min_healthy: failed, running what the probe saw."""
    if deployed.state != NodeState.SUCCESS or deployed.operation != "deploy":
        raise IllegalTransition(f"{deployed.node_key}: min_healthy fails a deployed node, not {deployed.state}")
    return deployed.model_copy(
        update={
            "state": NodeState.FAILED,
            "current_version": running,
            "deploying_version": deployed.current_version,
            "last_error": f"min_healthy: {error}",
            "updated_at": now,
        }
    )
