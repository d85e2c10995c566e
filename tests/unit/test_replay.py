"""Audit replay over histories made by the real consumers: timeline, filters, dedupe, rebuild and diff."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reactor.adapters.dispatch import dead_letter_record
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import Record, encode
from reactor.domain.replay import Difference, Filter, TimelineEntry, compare, rebuild, summarize, timeline
from reactor.domain.status import NodeState, pending
from reactor.errors import InvalidInput
from reactor.events import (
    AutoRollback,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    NodeTarget,
    Package,
    ReleaseAborted,
    ReleaseApproved,
    ReleasePaused,
    ReleasePlan,
    ReleaseRequested,
    ReleaseResumed,
    ReleaseRollbackRequested,
    ReleaseRolledBack,
    RollbackFailed,
    RollbackRequested,
    Strategy,
    Topic,
)
from reactor.replay import AUDIT_TOPICS, audit, read_events, rebuild_into
from reactor.runtime import Backends, Role, run_roles
from reactor.settings import Settings
from reactor.trust import generate_key, load_signing_key, load_trust_file, sign_record
from tests.fakes import Script, scripted

pytestmark = pytest.mark.unit

NODES = ["fake/host-00/app", "fake/host-01/app", "fake/host-02/app"]
FAILING = NODES[1]
WEB = "fake/host-05/web"
RELEASE = "app-110"
PACKAGE = Package(url="https://packages.example.test/app.tar.gz", sha256="c" * 64)


def deploy(node_key: str, version: str, actor: str, service: str = "app") -> DeployRequested:
    return DeployRequested(node_key=node_key, service=service, version=version, package=PACKAGE, actor=actor)


@dataclass
class Fleet:
    """A reactor still running on the history below, with its bus and live store."""

    bus: MemoryBus
    store: EmbeddedStore


async def play_history(bus: MemoryBus, script: Script) -> None:
    """ci installs 1.0.0 on three nodes; ci releases 1.1.0, host-01 fails and is rolled back, the release halts;
    alice then deploys web 3.0.0 and a 1.1.1 hotfix on host-00 by hand, outside any release."""
    for node_key in NODES:
        await bus.publish(deploy(node_key, "1.0.0", "ci"))
    await bus.idle()
    script.behaviour[FAILING] = "fail"
    plan = ReleasePlan(
        release_id=RELEASE,
        service="app",
        version="1.1.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=node_key) for node_key in NODES],
        strategy=Strategy(batches=[1, "100%"], max_parallel=2, failure_budget=0),
    )
    await bus.publish(ReleaseRequested(release_id=RELEASE, plan=plan, actor="ci"))
    await bus.idle()
    del script.behaviour[FAILING]
    await bus.publish(deploy(WEB, "3.0.0", "alice", service="web"))
    await bus.publish(deploy(NODES[0], "1.1.1", "alice"))
    await bus.idle()


@contextlib.asynccontextmanager
async def reactor(tmp_path: Path, script: Script) -> AsyncIterator[Fleet]:
    """The real executor worker, pacer and rollback consumer on an in-memory bus and store, while the block runs."""
    async with EmbeddedStore(":memory:") as store:
        bus = MemoryBus(retry_delay_s=0.01)
        started = asyncio.Event()
        task = asyncio.create_task(
            run_roles(
                Backends(bus=bus, store=store, memory_bus=bus),
                Settings(state_dir=tmp_path),
                {Role.ALL},
                factories={"fake": scripted(script)},
                started=started,
            )
        )
        await started.wait()
        try:
            yield Fleet(bus=bus, store=store)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """The history played by the real executor worker, pacer and rollback consumer; they keep running."""
    script = Script()
    async with reactor(tmp_path, script) as running:
        await play_history(running.bus, script)
        yield running


async def entries(bus: MemoryBus, flt: Filter) -> list[TimelineEntry]:
    decoded, _ = await read_events(bus, AUDIT_TOPICS)
    return timeline(decoded, flt)


async def history_events(bus: MemoryBus) -> list[Event]:
    decoded, _ = await read_events(bus, AUDIT_TOPICS)
    return [event for topic, event, _ in decoded if topic != Topic.DLQ]


async def fresh_audit(fleet: Fleet, flt: Filter) -> tuple[list[Difference], int]:
    async with EmbeddedStore(":memory:") as fresh:
        report = await audit(fleet.bus, fleet.store, fresh, flt)
        return report.differences, len(await fresh.list_nodes())


# --- timeline ----------------------------------------------------------------------------------------


async def test_timeline_tells_who_asked_what_and_what_happened_in_order(fleet: Fleet) -> None:
    """The failed node's story reads in order: install, release, its batch, failure, automatic rollback."""
    story = await entries(fleet.bus, Filter(node_key=FAILING))
    assert [(entry.summary, entry.actor) for entry in story] == [
        ("deploy 1.0.0 requested by ci", "ci"),
        ("deployed 1.0.0 (was nothing)", "/reactor"),
        ("release of app 1.1.0 to 3 nodes requested by ci", "ci"),
        ("batch 2 started: 2 nodes", "/reactor"),
        ("deploy 1.1.0 requested by ci", "ci"),
        ("failed at health: did not answer (deploying 1.1.0; runs 1.0.0)", "/reactor"),
        ("rollback requested by reactor/rollback: automatic: health failed: did not answer", "reactor/rollback"),
        ("rolled back to 1.0.0", "/reactor"),
    ]
    assert [entry.event_type for entry in story][-2:] == ["RollbackRequested", "NodeRolledBack"]
    assert {entry.subject for entry in story} == {FAILING, RELEASE}


async def test_timeline_is_in_time_order_and_ends_with_the_hand_deploys(fleet: Fleet) -> None:
    """The whole timeline never goes back in time; the release halts before alice's deploys outside it."""
    story = await entries(fleet.bus, Filter())
    assert [entry.time for entry in story] == sorted(entry.time for entry in story)
    summaries = [entry.summary for entry in story]
    halted = summaries.index("release halted: failure budget spent: 1 failed, budget 0")
    assert summaries.index("deploy 3.0.0 requested by alice") > halted
    assert summaries.index("deployed 1.1.1 (was 1.1.0)") > halted
    assert "batch 1 completed: 1 succeeded, 0 failed" in summaries


async def test_release_filter_keeps_only_events_correlated_with_the_release(fleet: Fleet) -> None:
    """Filtering by release drops the 1.0.0 installs and alice's deploys, and keeps the whole release."""
    story = await entries(fleet.bus, Filter(release_id=RELEASE))
    assert {entry.release_id for entry in story} == {RELEASE}
    assert story[0].event_type == "ReleaseRequested"
    assert story[-1].event_type in {"NodeDeployed", "NodeRolledBack", "ReleaseHalted", "RollbackRequested"}
    assert not [entry for entry in story if "1.0.0 requested" in entry.summary or entry.actor == "alice"]
    kinds = [entry.event_type for entry in story]
    assert kinds.count("DeployRequested") == 3
    assert kinds.count("ReleaseHalted") == 1


async def test_node_filter_keeps_release_request_and_batch_naming_the_node(fleet: Fleet) -> None:
    """A node filter keeps the release request whose plan holds it and its own batch, not other release events."""
    story = await entries(fleet.bus, Filter(release_id=RELEASE, node_key=NODES[2]))
    assert [entry.summary for entry in story] == [
        "release of app 1.1.0 to 3 nodes requested by ci",
        "batch 2 started: 2 nodes",
        "deploy 1.1.0 requested by ci",
        "deployed 1.1.0 (was 1.0.0)",
    ]


async def test_service_filter_keeps_node_events_of_the_service_and_its_release_requests(fleet: Fleet) -> None:
    """`web` shows only alice's deploy; `app` shows the release request but no batch or web events."""
    web = await entries(fleet.bus, Filter(service="web"))
    assert [(entry.event_type, entry.subject, entry.actor) for entry in web] == [
        ("DeployRequested", WEB, "alice"),
        ("NodeDeployed", WEB, "/reactor"),
    ]
    app = await entries(fleet.bus, Filter(service="app"))
    kinds = {entry.event_type for entry in app}
    assert "ReleaseRequested" in kinds
    assert not kinds & {"BatchStarted", "BatchCompleted", "ReleaseHalted"}
    assert WEB not in {entry.subject for entry in app}


async def test_since_filter_drops_everything_before_the_given_time(fleet: Fleet) -> None:
    """Since the release was requested: the release request comes first and no 1.0.0 install is left."""
    everything = await entries(fleet.bus, Filter())
    requested = next(entry for entry in everything if entry.event_type == "ReleaseRequested")
    story = await entries(fleet.bus, Filter(since=requested.time))
    assert story[0] == requested
    assert all(entry.time >= requested.time for entry in story)
    assert len(story) == len([entry for entry in everything if entry.time >= requested.time])
    naive = await entries(fleet.bus, Filter(since=requested.time.replace(tzinfo=None)))
    assert naive == story  # a naive time is read as UTC


async def test_re_emitted_outcomes_appear_once(fleet: Fleet) -> None:
    """Publishing every outcome a second time (the worker re-emits, rollbacks are re-asked) changes no line."""
    before = await entries(fleet.bus, Filter())
    outcomes = fleet.bus.events(Topic.OUTCOMES)
    for outcome in outcomes:
        await fleet.bus.publish(outcome)
    await fleet.bus.idle()
    assert len(fleet.bus.records(Topic.OUTCOMES)) > len(outcomes)
    assert await entries(fleet.bus, Filter()) == before
    assert compare(await fleet.store.list_nodes(), rebuild(await history_events(fleet.bus))) == []


# --- rebuild and compare -------------------------------------------------------------------------------


async def test_rebuild_reproduces_the_live_status_of_every_node(fleet: Fleet) -> None:
    """State, versions, release, request and error rebuilt from outcomes equal what the worker stored."""
    live = await fleet.store.list_nodes()
    rebuilt = rebuild(await history_events(fleet.bus))
    assert compare(live, rebuilt) == []
    assert sorted(rebuilt) == sorted([*NODES, WEB])
    for status in live:
        again = rebuilt[status.node_key]
        fields = ("host", "platform", "service", "request_id", "operation", "deploying_version", "last_error")
        assert {name: getattr(again, name) for name in fields} == {name: getattr(status, name) for name in fields}
    summary = {key: (s.state, s.current_version, s.prev_version, s.release_id) for key, s in rebuilt.items()}
    assert summary == {
        NODES[0]: (NodeState.SUCCESS, "1.1.1", "1.1.0", None),
        FAILING: (NodeState.ROLLED_BACK, "1.0.0", None, RELEASE),
        NODES[2]: (NodeState.SUCCESS, "1.1.0", "1.0.0", RELEASE),
        WEB: (NodeState.SUCCESS, "3.0.0", None, None),
    }


async def test_audit_rebuilds_into_the_fresh_store_and_finds_no_difference(fleet: Fleet) -> None:
    """An untouched live store matches the rebuild; every node lands in the fresh store."""
    differences, rebuilt = await fresh_audit(fleet, Filter())
    assert differences == []
    assert rebuilt == 4


async def test_audit_reports_exactly_the_field_changed_by_hand_in_the_live_store(fleet: Fleet) -> None:
    """A current_version edited in the live store is the only difference, and only for that node."""
    live = await fleet.store.get_node(NODES[2])
    assert live is not None
    tampered = live.model_copy(update={"current_version": "9.9.9"})
    assert await fleet.store.put_node(tampered, expected_revision=live.revision) is not None

    differences, _ = await fresh_audit(fleet, Filter())
    assert differences == [Difference(node_key=NODES[2], field="current_version", live="9.9.9", rebuilt="1.1.0")]
    assert (await fresh_audit(fleet, Filter(node_key=NODES[0])))[0] == []
    assert (await fresh_audit(fleet, Filter(service="web")))[0] == []
    assert (await fresh_audit(fleet, Filter(release_id=RELEASE)))[0] == differences


def node(index: int, platform: str = "fake") -> str:
    return f"{platform}/host-{index:02d}/app"


async def play_every_outcome(bus: MemoryBus, script: Script) -> None:
    """Every kind of outcome, each on its own node: deployed, failed (at a step, crashed, at min_healthy), rolled
    back (asked and automatic), rollback failed (ran: a version not on the node) and refused (nothing to go to)."""

    async def send(*requests: DeployRequested | RollbackRequested) -> None:
        for request in requests:
            await bus.publish(request)
            await bus.idle()

    def kept(node_key: str, version: str, **extra: object) -> DeployRequested:
        return deploy(node_key, version, "ci").model_copy(update={"auto_rollback": AutoRollback.NONE, **extra})

    def rollback(node_key: str, **extra: object) -> RollbackRequested:
        return RollbackRequested(node_key=node_key, service="app", actor="alice", **extra)

    await send(*(deploy(node(index), "1.0.0", "ci") for index in (0, 1, 2, 4)))
    await send(deploy(node(0), "1.1.0", "ci"), rollback(node(0)))  # deployed, then rolled back by hand
    script.behaviour[node(1)] = "fail"
    await send(deploy(node(1), "1.1.0", "ci"))  # failed, rolled back automatically
    script.probes[node(2)] = ["unhealthy"]
    await send(kept(node(2), "1.1.0", min_healthy_s=0.2))  # failed at min_healthy, kept
    await send(rollback(node(3)))  # refused: never deployed
    await send(rollback(node(4), release_id="app-9"))  # refused: nothing before 1.0.0
    script.behaviour[node(5)] = "fail"
    await send(deploy(node(5), "1.0.0", "ci"), rollback(node(5)))  # first deploy failed; rollback refused
    script.behaviour[node(6)] = "crash"
    await send(kept(node(6), "1.0.0"))  # the executor crashed
    await send(rollback(node(7, "local"), to_version="0.9.0"))  # ran and failed: 0.9.0 is not on the node


async def test_rebuild_after_every_kind_of_outcome_finds_no_difference(tmp_path: Path) -> None:
    """`reactor replay --rebuild` after deploys, failures, rollbacks, failed and refused rollbacks: the live store
    and the rebuild agree on every node, and a refused rollback rebuilds no node that was never deployed."""
    script = Script()
    async with reactor(tmp_path, script) as running:
        await play_every_outcome(running.bus, script)
        differences, rebuilt = await fresh_audit(running, Filter())
        live = {status.node_key: status for status in await running.store.list_nodes()}
        told = running.bus.events(Topic.OUTCOMES)

    assert differences == []
    assert {type(outcome) for outcome in told} == {NodeDeployed, NodeFailed, NodeRolledBack, RollbackFailed}
    failed_rollbacks = [outcome for outcome in told if isinstance(outcome, RollbackFailed)]
    assert sorted((outcome.node_key, outcome.target_version, outcome.error) for outcome in failed_rollbacks) == [
        (node(3), None, "no previous version to roll back to"),
        (node(4), None, "no previous version to roll back to"),
        (node(5), None, "no previous version to roll back to"),
        (node(7, "local"), "0.9.0", "release 0.9.0 is not on the node"),
    ]
    summary = {key: (s.state.value, s.current_version, s.prev_version, s.last_error) for key, s in live.items()}
    assert summary == {
        node(0): ("rolled_back", "1.0.0", "1.0.0", ""),
        node(1): ("rolled_back", "1.0.0", None, ""),
        node(2): ("failed", "1.1.0", "1.0.0", summary[node(2)][3]),
        node(4): ("success", "1.0.0", None, ""),
        node(5): ("failed", None, None, "health: did not answer"),
        node(6): ("failed", None, None, "deploy: executor crashed: RuntimeError: boom"),
        node(7, "local"): ("failed", None, None, "rollback: release 0.9.0 is not on the node"),
    }
    assert summary[node(2)][3].startswith("min_healthy: ")
    assert rebuilt == len(live)


def test_refused_rollback_rebuilds_nothing_and_leaves_a_known_node_as_it_was() -> None:
    """A RollbackFailed without a target (refused, nothing ran) creates no node and changes none."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    deployed = NodeDeployed(node_key=NODES[0], service="app", version="1.0.0", occurred_at=start, causation_id="a")
    refusals = [
        RollbackFailed(
            node_key=key,
            service="app",
            version=version,
            step="rollback",
            error="no previous version to roll back to",
            occurred_at=start + timedelta(seconds=1),
            causation_id=f"rollback-{index}",
        )
        for index, (key, version) in enumerate(((NODES[0], "1.0.0"), (NODES[1], None)))
    ]
    rebuilt = rebuild([deployed, *refusals])
    assert rebuilt == rebuild([deployed])
    summaries = [entry.summary for entry in timeline([(Topic.OUTCOMES, refusals[1], "/reactor")], Filter())]
    assert summaries == ["rollback refused: no previous version to roll back to (runs nothing)"]


def test_compare_reports_a_node_known_to_one_side_only_as_presence() -> None:
    """A node only live and a node only rebuilt each give one `presence` difference, in node key order."""
    only_live = pending(NODES[0], "app")
    only_rebuilt = pending(NODES[1], "app")
    assert compare([only_live], {NODES[1]: only_rebuilt}) == [
        Difference(node_key=NODES[0], field="presence", live="present", rebuilt=None),
        Difference(node_key=NODES[1], field="presence", live=None, rebuilt="present"),
    ]


def test_rebuild_applies_outcomes_in_time_order_once_each() -> None:
    """Outcomes given out of order and twice: the later deploy wins and the duplicate changes nothing."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    first = NodeDeployed(node_key=NODES[0], service="app", version="1.0.0", occurred_at=start, causation_id="a")
    second = NodeDeployed(
        node_key=NODES[0],
        service="app",
        version="1.1.0",
        prev_version="1.0.0",
        occurred_at=start + timedelta(seconds=5),
        causation_id="b",
    )
    rebuilt = rebuild([second, first, second, deploy(NODES[1], "2.0.0", "ci")])
    assert list(rebuilt) == [NODES[0]]  # a command alone rebuilds nothing
    status = rebuilt[NODES[0]]
    assert (status.current_version, status.prev_version, status.request_id) == ("1.1.0", "1.0.0", "b")
    assert (status.host, status.platform) == ("host-00", "fake")


def test_events_stamped_with_the_same_time_list_causes_before_effects() -> None:
    """Same timestamp, effect given first: the request still comes before its outcome, in timeline and rebuild."""
    moment = datetime(2025, 1, 1, tzinfo=UTC)
    request = deploy(NODES[0], "2.0.0", "ci").model_copy(update={"occurred_at": moment})
    failed = NodeFailed(
        node_key=NODES[0],
        service="app",
        version="2.0.0",
        current_version="1.0.0",
        step="health",
        error="did not answer",
        occurred_at=moment,
        causation_id=request.event_id,
    )
    rolled_back = NodeRolledBack(
        node_key=NODES[0], service="app", version="1.0.0", occurred_at=moment, causation_id=failed.event_id
    )
    items = [(Topic.OUTCOMES, rolled_back, "/reactor"), (Topic.OUTCOMES, failed, "/reactor")]
    story = timeline([*items, (Topic.COMMANDS, request, "/ci")], Filter())
    assert [entry.event_type for entry in story] == ["DeployRequested", "NodeFailed", "NodeRolledBack"]
    assert rebuild([rolled_back, failed])[NODES[0]].state == NodeState.ROLLED_BACK


async def test_rebuild_into_refuses_a_store_that_already_holds_the_node(fleet: Fleet) -> None:
    """Writing a rebuild over the live store fails instead of overwriting it."""
    with pytest.raises(InvalidInput, match="empty store"):
        await rebuild_into(fleet.store, await history_events(fleet.bus))


# --- bad records ----------------------------------------------------------------------------------------


async def test_garbage_command_is_listed_undecodable_and_the_report_still_builds(fleet: Fleet) -> None:
    """A non-event on the commands topic is listed from both commands and the DLQ; the rest of the report holds."""
    garbage = Record(key=NODES[2].encode(), value=b"{not json", headers=())
    await fleet.bus.publish_raw(Topic.COMMANDS, garbage)
    await fleet.bus.idle()

    async with EmbeddedStore(":memory:") as fresh:
        report = await audit(fleet.bus, fleet.store, fresh, Filter())
    assert [topic for topic, _ in report.undecodable] == [Topic.COMMANDS, Topic.DLQ]
    assert all(reason.startswith("not a CloudEvent") for _, reason in report.undecodable)
    assert report.differences == []
    [parked] = [entry for entry in report.timeline if entry.event_type == "Undecodable"]
    assert (parked.topic, parked.subject) == (Topic.DLQ, NODES[2])
    assert parked.summary.startswith("dead-lettered: not a CloudEvent")
    assert parked.time >= report.timeline[0].time
    assert len(report.timeline) == len(await entries(fleet.bus, Filter())) + 1
    assert (await read_events(fleet.bus, [Topic.COMMANDS]))[1] == report.undecodable[:1]


async def test_dead_lettered_event_shows_its_reason_and_is_not_rebuilt(fleet: Fleet) -> None:
    """A valid outcome parked in the DLQ is a timeline line with the parking reason, never a rebuilt node."""
    stray = NodeDeployed(node_key="fake/host-07/app", service="app", version="5.0.0")
    parked = dead_letter_record(Topic.OUTCOMES, encode(stray, "/elsewhere"), "handler: boom")
    await fleet.bus.publish_raw(Topic.DLQ, parked)

    async with EmbeddedStore(":memory:") as fresh:
        report = await audit(fleet.bus, fleet.store, fresh, Filter(node_key=stray.node_key))
        assert await fresh.get_node(stray.node_key) is None
    assert [(entry.topic, entry.event_type, entry.summary, entry.actor) for entry in report.timeline] == [
        (Topic.DLQ, "NodeDeployed", "dead-lettered: handler: boom", "/elsewhere")
    ]
    assert report.differences == []
    assert report.undecodable == []


@pytest.mark.parametrize(
    ("fast", "asked", "ended"),
    [
        (
            True,
            "fast rollback of the release requested by carol: errors",
            "release rolled back fast: 4 rolled back, 1 failed",
        ),
        (False, "rollback of the release requested by carol: errors", "release rolled back: 4 rolled back, 1 failed"),
    ],
)
def test_timeline_says_who_asked_for_a_release_rollback_and_whether_it_was_fast(
    fast: bool, asked: str, ended: str
) -> None:
    request = ReleaseRollbackRequested(release_id="app-2", actor="carol", reason="errors", fast=fast)
    assert summarize(request, "/reactor") == asked
    assert summarize(ReleaseRolledBack(release_id="app-2", rolled_back=4, failed=1, fast=fast), "/reactor") == ended


async def test_audit_with_a_trust_file_names_who_signed_each_entry_and_why_others_do_not_verify(
    tmp_path: Path,
) -> None:
    """Signed by the reactor, signed by alice under another actor's name, unsigned, tampered after signing, signed by
    a key the trust file does not hold: each entry says who verifiably signed it, or why it does not verify; without
    a trust file nothing is claimed."""
    keys = tmp_path / "keys"
    for name in ("reactor", "alice", "stranger"):
        generate_key(name, keys)
    (keys / "trust.yaml").write_text(
        "- {name: reactor, public_key: reactor.pub, reactor: true}\n- {name: alice, public_key: alice.pub}\n"
    )
    trust = load_trust_file(keys / "trust.yaml")
    reactor_key, alice, stranger = (load_signing_key(keys / f"{name}.key") for name in ("reactor", "alice", "stranger"))
    by_reactor = deploy(NODES[0], "1.0.0", "ci")
    approved = ReleaseApproved(release_id=RELEASE, actor="bob")
    unsigned = ReleasePaused(release_id=RELEASE, actor="alice")
    tampered = ReleaseResumed(release_id=RELEASE, actor="alice")
    foreign = ReleaseAborted(release_id=RELEASE, actor="alice")
    bus = MemoryBus()
    await bus.publish_raw(Topic.COMMANDS, sign_record(encode(by_reactor, "/reactor"), reactor_key))
    await bus.publish_raw(Topic.RELEASES, sign_record(encode(approved, "/cli"), alice))
    await bus.publish_raw(Topic.RELEASES, encode(unsigned, "/cli"))
    signed = sign_record(encode(tampered, "/cli"), alice)
    await bus.publish_raw(Topic.RELEASES, Record(signed.key, signed.value.replace(b"alice", b"mallo"), signed.headers))
    await bus.publish_raw(Topic.RELEASES, sign_record(encode(foreign, "/cli"), stranger))

    async with EmbeddedStore(":memory:") as live, EmbeddedStore(":memory:") as fresh:
        report = await audit(bus, live, fresh, Filter(), trust=trust)
    found = {entry.event_id: (entry.signer, entry.unverified) for entry in report.timeline}
    assert found[by_reactor.event_id] == ("reactor", None)
    assert found[approved.event_id] == ("alice", None)
    assert [entry.actor for entry in report.timeline if entry.event_id == approved.event_id] == ["bob"]
    assert found[unsigned.event_id][0] is None
    assert (found[unsigned.event_id][1] or "").startswith("signature: unsigned")
    assert (found[tampered.event_id][1] or "").startswith("signature: tampered")
    assert (found[foreign.event_id][1] or "").startswith("signature: unknown key")

    async with EmbeddedStore(":memory:") as live, EmbeddedStore(":memory:") as fresh:
        unchecked = await audit(bus, live, fresh, Filter())
    assert {(entry.signer, entry.unverified) for entry in unchecked.timeline} == {(None, None)}
