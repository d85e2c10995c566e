"""The JSON documents of `--output json`: one per command, built from the data its tables show.

Field names are snake_case and stable; times are ISO 8601 in UTC (`...Z`); enums are their string values; batch
numbers are 1-based, as people read them. Scripts depend on these shapes: add fields, never rename or drop one.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import TypeAdapter

from reactor.cli.report import PlannedBatch
from reactor.domain.pacer import ItemState
from reactor.domain.replay import Difference, TimelineEntry
from reactor.domain.status import NodeStatus
from reactor.events import ReleasePlan
from reactor.ports import ReleaseNode, ReleaseRecord
from reactor.replay import AuditReport
from reactor.trust.audit import RecordCheck

Document = dict[str, Any]

# What a node's record says to its users; the claim bookkeeping (owner, epoch, revision) stays internal.
NODE_FIELDS = frozenset(
    {
        "node_key",
        "host",
        "service",
        "platform",
        "state",
        "current_version",
        "prev_version",
        "deploying_version",
        "release_id",
        "request_id",
        "operation",
        "last_error",
        "updated_at",
    }
)

_TIMELINE = TypeAdapter(list[TimelineEntry])
_DIFFERENCES = TypeAdapter(list[Difference])
_PLANNED = TypeAdapter(list[PlannedBatch])


def emit(document: Document) -> None:
    """Write `document` to stdout as one JSON document (stdout carries nothing else in JSON mode)."""
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


def node(status: NodeStatus) -> Document:
    """One node's status."""
    return status.model_dump(mode="json", include=set(NODE_FIELDS))


def nodes(statuses: list[NodeStatus]) -> Document:
    """`reactor status`: every node shown."""
    return {"nodes": [node(status) for status in statuses]}


def release(
    record: ReleaseRecord, counts: dict[ItemState, int], members: list[ReleaseNode], statuses: list[NodeStatus]
) -> Document:
    """`reactor release status`: where the release is, its progress, and each node with its status.

    A node's `status` is its record if this release touched it last, else null (another release has it since,
    or this one has not reached it).
    """
    by_key = {status.node_key: status for status in statuses}
    times = record.model_dump(mode="json", include={"resume_at", "created_at", "updated_at"})
    return {
        "release_id": record.release_id,
        "service": record.plan.service,
        "version": record.plan.version,
        "state": record.state.value,
        "reason": record.reason,
        "fast_rollback": record.fast_rollback,
        "batch": record.batch + 1,
        "batch_count": len(record.batch_sizes),
        "batch_sizes": record.batch_sizes,
        "failure_budget": record.budget,
        "batch_failure_budget": record.batch_budget,
        "resume_at": times["resume_at"],
        "actor": record.actor,
        "created_at": times["created_at"],
        "updated_at": times["updated_at"],
        "progress": {state.value: counts.get(state, 0) for state in ItemState},
        "nodes": [
            {
                "node_key": member.node_key,
                "batch": member.batch + 1,
                "progress": member.state.value,
                "status": node(by_key[member.node_key]) if member.node_key in by_key else None,
            }
            for member in members
        ],
        "plan": record.plan.model_dump(mode="json"),
    }


def plan(release_plan: ReleasePlan, batches: list[PlannedBatch], budget: int) -> Document:
    """`reactor release plan`: the batches and gates it would run, the failure budget in nodes, the plan itself."""
    return {
        "release_id": release_plan.release_id,
        "service": release_plan.service,
        "version": release_plan.version,
        "node_count": len(release_plan.nodes),
        "failure_budget": budget,
        "batches": [
            {
                "batch": batch["number"],
                "nodes": batch["node_keys"],
                "spread": batch["spread"],
                "gate_after": batch["gate_after"],
                "pause_after_s": batch["pause_after_s"],
            }
            for batch in _PLANNED.dump_python(batches, mode="json")
        ],
        "plan": release_plan.model_dump(mode="json"),
    }


def audit(report: AuditReport, rebuilt_into: str | None) -> Document:
    """`reactor replay`: the timeline, unreadable records, and with `--rebuild` the database and the differences."""
    return {
        "timeline": _TIMELINE.dump_python(report.timeline, mode="json"),
        "undecodable": [{"topic": topic.value, "problem": problem} for topic, problem in report.undecodable],
        "rebuild": None
        if rebuilt_into is None
        else {"database": rebuilt_into, "differences": _DIFFERENCES.dump_python(report.differences, mode="json")},
    }


def verification(topic: str, checks: list[RecordCheck]) -> Document:
    """`reactor verify`: each message of the topic, verified or not, with its signer or the reason."""
    return {
        "topic": topic,
        "total": len(checks),
        "verified": sum(1 for check in checks if check.verified),
        "records": [
            {
                "position": check.position,
                "type": check.event_type,
                "id": check.event_id,
                "subject": check.subject,
                "verified": check.verified,
                "signer": check.signer,
                "key_id": check.key_id,
                "reactor": check.reactor,
                "problem": check.problem,
            }
            for check in checks
        ],
    }
