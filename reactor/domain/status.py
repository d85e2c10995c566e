"""NodeStatus and its legal transitions, as pure functions over plain data."""

from __future__ import annotations

import re
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

NO_ROLLBACK_TARGET = "no previous version to roll back to"
NO_MESSAGE = "failed without a message"
ERROR_LIMIT = 4000
"""The most characters an outcome event's `error` holds (its `Message` type)."""

_STEP = re.compile(r"^([a-z][a-z0-9_-]{0,31}): ")


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
    # Fencing: the worker process that holds (or last held) the claim, and a token raised by every claim.
    # A run writes only while the node's epoch is still the one its claim got; `updated_at` is its heartbeat.
    owner: str | None = None
    epoch: int = 0


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
    owner: str,
    operation: str,
    target_version: str | None,
    release_id: str | None,
    now: datetime,
    lease: timedelta,
    port: int | None = None,
    health: HealthCheck | None = None,
) -> NodeStatus:
    """Mark the node deploying for this request under `owner`, with the next epoch; the caller writes it with a
    compare-and-set. The request's `port` and `health` check are kept on the node (None: the node's own stay).

    A node deploying under another claim is busy until that claim's lease runs out (its holder stopped renewing
    it: it died or froze), even for the same request: a redelivery to another worker must not run beside the
    one still running it. Only the same owner may claim its own request again (its redelivery after an
    interruption), and anyone may claim a node whose interrupted run gave its claim up (owner none). Every claim
    raises the epoch, so whatever an earlier claim's run still writes is refused.
    """
    own_redelivery = current.owner == owner and current.request_id == request_id
    released = current.owner is None  # its run stopped and gave the claim up (or it predates owners)
    held = current.state == NodeState.DEPLOYING and not released
    if held and not own_redelivery and not lease_expired(current, now=now, lease=lease):
        raise NodeBusy(f"{current.node_key} is busy with request {current.request_id} of {current.owner}")
    return current.model_copy(
        update={
            "state": NodeState.DEPLOYING,
            "deploying_version": target_version,
            "request_id": request_id,
            "operation": operation,
            "release_id": release_id,
            "last_error": "",
            "updated_at": now,
            "owner": owner,
            "epoch": current.epoch + 1,
            "port": port or current.port,
            "health": health or current.health,
        }
    )


def lease_expired(current: NodeStatus, *, now: datetime, lease: timedelta) -> bool:
    """Whether the claim on a node was last renewed a whole lease ago (or never recorded when)."""
    return current.updated_at is None or now - current.updated_at >= lease


def holds(current: NodeStatus | None, claimed: NodeStatus) -> bool:
    """Whether the node as stored is still under the claim `claimed` (same owner and epoch)."""
    return current is not None and (current.owner, current.epoch) == (claimed.owner, claimed.epoch)


def renew(claimed: NodeStatus, *, now: datetime) -> NodeStatus:
    """The claim with its heartbeat moved to `now` (same owner and epoch); written with a compare-and-set."""
    if claimed.state != NodeState.DEPLOYING:
        raise IllegalTransition(f"{claimed.node_key}: renew a claim in {claimed.state}, expected deploying")
    return claimed.model_copy(update={"updated_at": now})


def rollback_target(current: NodeStatus, to_version: str | None) -> str | None:
    """The version a rollback returns to; None when there is none (the rollback is then refused).

    After a failed deploy the node was restored to `current_version`, so that is the target, unless it runs the
    failed version itself (it failed after the switch, e.g. during min_healthy); after a successful deploy it is
    `prev_version`. A rollback caught mid-way (redelivered, or taken over from a dead worker) keeps the target
    its claim recorded. An explicit `to_version` wins.
    """
    if to_version is not None:
        return to_version
    if current.state == NodeState.DEPLOYING and current.operation == "rollback":
        return current.deploying_version or current.current_version or current.prev_version
    failed_after_switch = current.state == NodeState.FAILED and current.current_version == current.deploying_version
    if failed_after_switch and current.current_version is not None:
        return current.prev_version
    if current.state == NodeState.FAILED:
        return current.current_version or current.prev_version
    return current.prev_version


def split_error(last_error: str, default_step: str) -> tuple[str, str]:
    """The failed step and the message of a `last_error` ("<step>: <message>"), the message never empty."""
    match = _STEP.match(last_error)
    if match is None:
        return default_step, last_error or NO_MESSAGE
    return match.group(1), last_error[match.end() :] or NO_MESSAGE


def error_text(last_error: str, default_step: str) -> str:
    """`last_error` as the outcome event will carry it: "<step>: <message>", the message cut to fit the event.

    Stored in this form, the record and its event say the same, and the event rebuilds the same record.
    """
    step, message = split_error(last_error, default_step)
    if len(message) > ERROR_LIMIT:
        message = message[: ERROR_LIMIT - 3] + "..."
    return f"{step}: {message}"


def finish(claimed: NodeStatus, result: NodeStatus, *, now: datetime) -> NodeStatus:
    """Fold an executor's result into the claimed status, in the form its outcome event carries.

    A result that contradicts the claim (not final, the wrong final state for the operation, or success
    running another version than the target) is recorded as a failure naming the contradiction: the record
    must map onto exactly one outcome event, and an executor's bug must not pass for success.
    """
    if claimed.state != NodeState.DEPLOYING:
        raise IllegalTransition(f"{claimed.node_key}: finish from {claimed.state}, expected deploying")
    operation = claimed.operation or "deploy"
    target = claimed.deploying_version
    done = NodeState.ROLLED_BACK if operation == "rollback" else NodeState.SUCCESS
    error = result.last_error
    state = result.state
    if state not in TERMINAL:
        state, error = NodeState.FAILED, f"{operation}: the executor ended in {result.state.value}, not a final state"
    elif state not in (done, NodeState.FAILED):
        state, error = NodeState.FAILED, f"{operation}: the executor reported {result.state.value}, not {done.value}"
    elif state == done and result.current_version != target:
        state = NodeState.FAILED
        error = f"{operation}: the executor reported {done.value} running {result.current_version or 'nothing'}"
        error += f", not {target or 'a version'}"
    failed = state == NodeState.FAILED
    return claimed.model_copy(
        update={
            "state": state,
            "current_version": result.current_version,
            "prev_version": result.prev_version,
            # The target comes from the claim: the event names the version this request was for.
            "deploying_version": target if failed else None,
            "last_error": error_text(error, operation) if failed else "",
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
            "last_error": error_text(f"min_healthy: {error}", "min_healthy"),
            "updated_at": now,
        }
    )
