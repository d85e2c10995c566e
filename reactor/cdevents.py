"""Map reactor events onto CDEvents (spec v0.5.1, JSON format) for subscribers that speak CDEvents.

Pure functions, no I/O. The official JSON Schemas these events are checked against are vendored in
`reactor/cdevents_schemas/` (see its README for their origin).

Mapping:
- NodeDeployed → `service.deployed` (no `prev_version`: a first install) or `service.upgraded` (with one);
- NodeRolledBack → `service.rolledback`;
- NodeFailed / RollbackFailed → `taskrun.finished` with outcome `failure` and `errors` = "<step>: <error>";
- ReleaseRequested → `pipelinerun.queued`; BatchStarted of batch 0 → `pipelinerun.started`;
- ReleaseCompleted → `pipelinerun.finished` outcome `success`; ReleaseHalted → outcome `failure`, errors = reason;
- anything else (commands, control events, later batches) → None.

Choices the spec leaves open:
- `context.id` is a UUIDv5 of the reactor `event_id`, so a re-emitted event maps to the same CDEvent id and
  CDEvents consumers can dedupe exactly like reactor consumers do; the CloudEvent carrying it has the same id
  (the CDEvents CloudEvents binding asks for it);
- `context.chainId` (a UUID per the links spec) is a UUIDv5 of the release id, so every CDEvent of one release
  lands in one chain; events outside a release carry none. No embedded `links` are emitted: the causing
  event is usually a command, which has no CDEvent to point at;
- a service subject's `id` is the node key and its `environment.id` is the host/cluster part of it
  (`physical/<host>`, `k8s/<cluster>`; other platforms: every segment but the last);
- `artifactId` must be a purl, and outcome events carry no image or package URL, so it is
  `pkg:generic/<service>@<version>` with the version percent-encoded as the purl spec asks;
- a taskRun's `id` is `<node key>/<request id>` (the command that ran, i.e. `causation_id`, else the event id);
  its `pipelineRun.id` is the release id when there is one;
- a pipelineRun's `id` is the release id and its `pipelineName` is the same for every release
  (`PIPELINE_NAME`), since only ReleaseRequested knows the service; its `uri` (an absolute URI, required by
  `pipelinerun.started`) comes from an optional `release_url` template (`{release_id}` is replaced), else it is
  the URN `urn:deploy-reactor:release:<release id>`;
- `customData` (JSON) carries the reactor event id and type plus the fields CDEvents has no slot for.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from cloudevents.core.bindings import http as ce_http
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent

from reactor.codec import Record
from reactor.events import (
    NAMESPACE,
    BatchStarted,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    ReleaseCompleted,
    ReleaseHalted,
    ReleaseRequested,
    RollbackFailed,
)

SPEC_VERSION: Final = "0.5.1"
SCHEMA_DIR: Final = Path(__file__).parent / "cdevents_schemas"

SERVICE_DEPLOYED: Final = "dev.cdevents.service.deployed.0.3.0"
SERVICE_UPGRADED: Final = "dev.cdevents.service.upgraded.0.3.0"
SERVICE_ROLLEDBACK: Final = "dev.cdevents.service.rolledback.0.3.0"
TASKRUN_FINISHED: Final = "dev.cdevents.taskrun.finished.0.3.0"
PIPELINERUN_QUEUED: Final = "dev.cdevents.pipelinerun.queued.0.3.0"
PIPELINERUN_STARTED: Final = "dev.cdevents.pipelinerun.started.0.3.0"
PIPELINERUN_FINISHED: Final = "dev.cdevents.pipelinerun.finished.0.3.0"

# The vendored schema file of each CDEvent type this module emits.
SCHEMA_FILES: Final[dict[str, str]] = {
    SERVICE_DEPLOYED: "servicedeployed.json",
    SERVICE_UPGRADED: "serviceupgraded.json",
    SERVICE_ROLLEDBACK: "servicerolledback.json",
    TASKRUN_FINISHED: "taskrunfinished.json",
    PIPELINERUN_QUEUED: "pipelinerunqueued.json",
    PIPELINERUN_STARTED: "pipelinerunstarted.json",
    PIPELINERUN_FINISHED: "pipelinerunfinished.json",
}

PIPELINE_NAME: Final = "deploy-reactor release"
CONTENT_TYPE: Final = "application/json"
RELEASE_URN: Final = "urn:deploy-reactor:release:"
CDEVENTS_NAMESPACE: Final = uuid.uuid5(NAMESPACE, "cdevents")


def cdevent_id(event_id: str) -> str:
    """The CDEvent context id of the reactor event `event_id`: the same on every re-emission."""
    return str(uuid.uuid5(CDEVENTS_NAMESPACE, "event/" + event_id))


def chain_id(release_id: str) -> str:
    """The CDEvents chain id shared by every CDEvent of one release."""
    return str(uuid.uuid5(CDEVENTS_NAMESPACE, "release/" + release_id))


def environment_id(node_key: str) -> str:
    """The host or cluster part of a node key: `physical/<host>`, `k8s/<cluster>`, else all but the last part."""
    parts = node_key.split("/")
    if parts[0] == "k8s" and len(parts) > 2:
        return "/".join(parts[:2])
    return "/".join(parts[:-1]) if len(parts) > 1 else node_key


def artifact_id(service: str, version: str) -> str:
    """A purl naming `version` of `service`, which is all an outcome event knows about the artifact."""
    return f"pkg:generic/{quote(service, safe='')}@{quote(version, safe='')}"


def rfc3339(moment: datetime) -> str:
    """`moment` as an RFC 3339 UTC timestamp; a naive datetime is taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.astimezone(UTC).isoformat(timespec=spec).replace("+00:00", "Z")


def to_cdevent(
    event: Event,
    *,
    source: str,
    release_url: str | None = None,
    pipeline_name: str = PIPELINE_NAME,
) -> dict[str, object] | None:
    """The CDEvent (JSON form) an outcome or release event maps to, or None when it has no CDEvents meaning."""
    if not source or any(char.isspace() for char in source):
        raise ValueError("source must be a non-empty URI reference")
    match event:
        case NodeDeployed():
            cd_type = SERVICE_DEPLOYED if event.prev_version is None else SERVICE_UPGRADED
            extra = _drop_none({"previousVersion": event.prev_version, "durationSeconds": event.duration_s})
            return _service(event, cd_type, source, event.version, extra)
        case NodeRolledBack():
            extra = _drop_none({"fromVersion": event.from_version, "durationSeconds": event.duration_s})
            return _service(event, SERVICE_ROLLEDBACK, source, event.version, extra)
        case NodeFailed():
            extra = _drop_none({"version": event.version, "currentVersion": event.current_version, "step": event.step})
            return _taskrun(event, source, f"deploy {event.service}", event.step, event.error, extra)
        case RollbackFailed():
            extra = _drop_none({"version": event.version, "targetVersion": event.target_version, "step": event.step})
            return _taskrun(event, source, f"rollback {event.service}", event.step, event.error, extra)
        case ReleaseRequested():
            plan = event.plan
            content = _pipeline_content(event.release_id, pipeline_name, release_url)
            extra = _drop_none(
                {"service": plan.service, "version": plan.version, "nodes": len(plan.nodes), "actor": event.actor}
            )
            return _pipelinerun(event, PIPELINERUN_QUEUED, source, content, extra)
        case BatchStarted() if event.batch == 0:
            content = _pipeline_content(event.release_id, pipeline_name, release_url)
            return _pipelinerun(event, PIPELINERUN_STARTED, source, content, {"nodes": len(event.node_keys)})
        case ReleaseCompleted():
            content = _pipeline_content(event.release_id, pipeline_name, release_url)
            content["outcome"] = "success"
            counts: dict[str, object] = {"succeeded": event.succeeded, "failed": event.failed}
            return _pipelinerun(event, PIPELINERUN_FINISHED, source, content, counts)
        case ReleaseHalted():
            content = _pipeline_content(event.release_id, pipeline_name, release_url)
            content["outcome"] = "failure"
            content["errors"] = event.reason or "release halted"
            counts = {"succeeded": event.succeeded, "failed": event.failed}
            return _pipelinerun(event, PIPELINERUN_FINISHED, source, content, counts)
        case _:
            return None


def _drop_none(fields: dict[str, object]) -> dict[str, object]:
    """`fields` without the entries whose value is None."""
    return {key: value for key, value in fields.items() if value is not None}


def _context(event: Event, cd_type: str, source: str) -> dict[str, object]:
    """The CDEvents context of `event`: spec version, deterministic id, source, type, timestamp, chain."""
    context: dict[str, object] = {
        "specversion": SPEC_VERSION,
        "id": cdevent_id(event.event_id),
        "source": source,
        "type": cd_type,
        "timestamp": rfc3339(event.occurred_at),
    }
    if event.release_id is not None:
        context["chainId"] = chain_id(event.release_id)
    return context


def _envelope(
    event: Event, cd_type: str, source: str, subject: dict[str, object], extra: dict[str, object]
) -> dict[str, object]:
    """A whole CDEvent: context, subject, and customData naming the reactor event it came from."""
    custom: dict[str, object] = {"eventId": event.event_id, "eventType": event.TYPE}
    if event.release_id is not None:
        custom["releaseId"] = event.release_id
    custom.update(extra)
    return {
        "context": _context(event, cd_type, source),
        "subject": subject,
        "customData": custom,
        "customDataContentType": CONTENT_TYPE,
    }


def _service(
    event: NodeDeployed | NodeRolledBack, cd_type: str, source: str, version: str, extra: dict[str, object]
) -> dict[str, object]:
    """A service CDEvent about the node of `event`, which now runs `version`."""
    subject: dict[str, object] = {
        "id": event.node_key,
        "content": {
            "environment": {"id": environment_id(event.node_key)},
            "artifactId": artifact_id(event.service, version),
        },
    }
    return _envelope(event, cd_type, source, subject, {"service": event.service, "version": version, **extra})


def _taskrun(
    event: NodeFailed | RollbackFailed, source: str, task: str, step: str, error: str, extra: dict[str, object]
) -> dict[str, object]:
    """A failed `taskrun.finished` for one node's deploy or rollback."""
    content: dict[str, object] = {
        "taskName": task,
        "outcome": "failure",
        "errors": f"{step}: {error}" if error else step,
    }
    if event.release_id is not None:
        content["pipelineRun"] = {"id": event.release_id}
    subject: dict[str, object] = {
        "id": f"{event.node_key}/{event.causation_id or event.event_id}",
        "content": content,
    }
    return _envelope(event, TASKRUN_FINISHED, source, subject, {"nodeKey": event.node_key, **extra})


def _pipeline_content(release_id: str, pipeline_name: str, release_url: str | None) -> dict[str, object]:
    """The pipelineRun content shared by the release events: its name and URI."""
    uri = RELEASE_URN + release_id if release_url is None else release_url.replace("{release_id}", release_id)
    return {"pipelineName": pipeline_name, "uri": uri}


def _pipelinerun(
    event: Event, cd_type: str, source: str, content: dict[str, object], extra: dict[str, object]
) -> dict[str, object]:
    """A pipelineRun CDEvent about the release of `event`."""
    subject: dict[str, object] = {"id": event.subject(), "content": content}
    return _envelope(event, cd_type, source, subject, extra)


# --- the CloudEvents binding (cloudevents-binding.md of the spec) ------------------------------------------


def _part(document: Mapping[str, object], name: str) -> Mapping[str, Any]:
    part = document[name]
    if not isinstance(part, Mapping):
        raise TypeError(f"a CDEvent's {name} must be an object")
    return part


def cloud_event(cdevent: Mapping[str, object]) -> CloudEvent:
    """The CloudEvent carrying `cdevent`: its id, source, type and time, subject = the CDEvents subject id."""
    context, subject = _part(cdevent, "context"), _part(cdevent, "subject")
    attributes: dict[str, Any] = {
        "id": context["id"],
        "source": context["source"],
        "type": context["type"],
        "subject": subject["id"],
        "time": datetime.fromisoformat(context["timestamp"]),
        "datacontenttype": CONTENT_TYPE,
    }
    return CloudEvent(attributes, dict(cdevent))


def http_structured(cdevent: Mapping[str, object]) -> tuple[dict[str, str], bytes]:
    """Headers and body of `cdevent` in the CloudEvents HTTP binding, structured content mode."""
    message = ce_http.to_structured_event(cloud_event(cdevent))
    return dict(message.headers), message.body


def kafka_record(cdevent: Mapping[str, object]) -> Record:
    """`cdevent` as a CloudEvents Kafka binary-mode message (JSON body), keyed by its subject id."""
    event = cloud_event(cdevent)
    message = ce_kafka.to_binary_event(event, key_mapper=lambda _: str(_part(cdevent, "subject")["id"]))
    key = message.key.encode() if isinstance(message.key, str) else message.key
    return Record(key=key, value=message.value, headers=tuple(message.headers.items()))
