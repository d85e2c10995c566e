"""Pure domain rules: node status transitions, batch planning and pacing decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reactor.domain.pacer import (
    AwaitApproval,
    BatchCounts,
    Complete,
    Decision,
    Dispatch,
    DispatchRollbacks,
    Gates,
    Halt,
    PauseUntil,
    ReleaseState,
    RollBackRelease,
    RolledBack,
    StartNextBatch,
    View,
    Wait,
    decide,
    rollback_window,
)
from reactor.domain.planner import failure_budget, plan_batches, resolve_size
from reactor.domain.status import (
    NodeState,
    NodeStatus,
    claim,
    fail_min_healthy,
    finish,
    holds,
    lease_expired,
    parse_node_key,
    pending,
    renew,
    rollback_target,
)
from reactor.errors import IllegalTransition, InvalidInput, NodeBusy
from reactor.events import BatchSize, HealthCheck, Strategy

pytestmark = pytest.mark.unit

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
KEY = "local/h1/api"


def node(state: NodeState = NodeState.PENDING, **changes: object) -> NodeStatus:
    """A node of `api` on h1 in `state`, with `changes` applied."""
    return pending(KEY, "api").model_copy(update={"state": state, **changes})


def claimed(
    operation: str = "deploy",
    request_id: str = "req-1",
    *,
    request_port: int | None = None,
    request_health: HealthCheck | None = None,
    **changes: object,
) -> NodeStatus:
    """A node claimed by `request_id` for `operation` (with the request's port and health check, if any)."""
    base = node(NodeState.SUCCESS, current_version="1.0.0", prev_version="0.9.0", **changes)
    return claim(
        base,
        request_id=request_id,
        owner="worker-a",
        operation=operation,
        target_version="2.0.0" if operation == "deploy" else "0.9.0",
        release_id="rel-1",
        now=NOW,
        lease=LEASE,
        port=request_port,
        health=request_health,
    )


# --- node keys and fresh nodes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_key", "platform", "host"),
    [
        ("local/h1/api", "local", "h1"),
        ("ssh/web-01.example.com/api", "ssh", "web-01.example.com"),
        ("local/api", "local", "api"),
        ("k8s/prod/api-deployment", "k8s", "api-deployment"),
    ],
)
def test_parse_node_key_gives_platform_and_host(node_key: str, platform: str, host: str) -> None:
    assert parse_node_key(node_key) == (platform, host)


def test_pending_node_has_no_versions_and_revision_zero() -> None:
    status = pending("ssh/web-01/api", "api")
    assert (status.platform, status.host, status.service) == ("ssh", "web-01", "api")
    assert status.state == NodeState.PENDING
    assert (status.current_version, status.prev_version, status.deploying_version) == (None, None, None)
    assert status.revision == 0


# --- claim --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state", [NodeState.PENDING, NodeState.SUCCESS, NodeState.FAILED, NodeState.ROLLED_BACK], ids=str
)
def test_claim_marks_an_idle_node_deploying_for_the_request(state: NodeState) -> None:
    current = node(state, current_version="1.0.0", prev_version="0.9.0", last_error="old error", revision=4)
    result = claim(
        current,
        request_id="req-9",
        owner="worker-b",
        operation="deploy",
        target_version="2.0.0",
        release_id="rel-1",
        now=NOW,
        lease=LEASE,
    )
    assert result.state == NodeState.DEPLOYING
    assert result.deploying_version == "2.0.0"
    assert result.request_id == "req-9"
    assert result.operation == "deploy"
    assert result.release_id == "rel-1"
    assert result.updated_at == NOW
    assert result.last_error == ""
    # What the node runs does not change until the executor reports.
    assert (result.current_version, result.prev_version) == ("1.0.0", "0.9.0")
    # The caller writes the claim with a compare-and-set against the revision it read.
    assert result.revision == 4
    assert current.state == state


@pytest.mark.parametrize(
    ("port", "health", "kept"),
    [
        (None, None, (8080, HealthCheck(path="/ready"))),
        (9090, HealthCheck(path="/live"), (9090, HealthCheck(path="/live"))),
    ],
    ids=["node's own", "request's"],
)
def test_claim_keeps_the_requests_port_and_health_check_else_the_nodes(
    port: int | None, health: HealthCheck | None, kept: tuple[int, HealthCheck]
) -> None:
    result = claimed(
        request_id="req-9", request_port=port, request_health=health, port=8080, health=HealthCheck(path="/ready")
    )
    assert (result.port, result.health) == kept
    assert (result.state, result.request_id) == (NodeState.DEPLOYING, "req-9")


@pytest.mark.parametrize("held_for", [timedelta(0), timedelta(minutes=1), LEASE - timedelta(microseconds=1)])
def test_claim_of_a_node_deploying_for_another_request_within_the_lease_raises_node_busy(held_for: timedelta) -> None:
    held = claimed(request_id="req-1")
    with pytest.raises(NodeBusy, match="req-1") as info:
        claim(
            held,
            request_id="req-2",
            owner="worker-b",
            operation="deploy",
            target_version="3.0.0",
            release_id=None,
            now=NOW + held_for,
            lease=LEASE,
        )
    assert info.value.retriable


@pytest.mark.parametrize("held_for", [LEASE, LEASE + timedelta(seconds=1), timedelta(days=1)])
def test_claim_of_a_node_whose_lease_ran_out_succeeds(held_for: timedelta) -> None:
    held = claimed(request_id="req-1")
    result = claim(
        held,
        request_id="req-2",
        owner="worker-b",
        operation="rollback",
        target_version="0.9.0",
        release_id=None,
        now=NOW + held_for,
        lease=LEASE,
    )
    assert (result.state, result.request_id, result.operation) == (NodeState.DEPLOYING, "req-2", "rollback")
    assert result.deploying_version == "0.9.0"
    assert result.updated_at == NOW + held_for


def test_same_request_may_claim_again_within_the_lease() -> None:
    held = claimed(request_id="req-1")
    later = NOW + timedelta(seconds=30)
    result = claim(
        held,
        request_id="req-1",
        owner="worker-a",
        operation="deploy",
        target_version="2.0.0",
        release_id="rel-1",
        now=later,
        lease=LEASE,
    )
    assert (result.state, result.request_id) == (NodeState.DEPLOYING, "req-1")
    assert result.updated_at == later


def test_same_request_under_another_owner_within_the_lease_raises_node_busy() -> None:
    """A redelivery to another worker while the first still holds the claim must not run beside it."""
    held = claimed(request_id="req-1")
    with pytest.raises(NodeBusy, match="req-1") as info:
        claim(
            held,
            request_id="req-1",
            owner="worker-b",
            operation="deploy",
            target_version="2.0.0",
            release_id="rel-1",
            now=NOW + LEASE - timedelta(microseconds=1),
            lease=LEASE,
        )
    assert info.value.retriable


def test_every_claim_records_its_owner_and_raises_the_epoch() -> None:
    first = claimed(request_id="req-1", epoch=4)
    assert (first.owner, first.epoch) == ("worker-a", 5)
    again = claim(
        first,
        request_id="req-1",
        owner="worker-a",
        operation="deploy",
        target_version="2.0.0",
        release_id="rel-1",
        now=NOW,
        lease=LEASE,
    )
    assert (again.owner, again.epoch) == ("worker-a", 6), "the owner's own redelivery fences its earlier run"
    taken = claim(
        again,
        request_id="req-1",
        owner="worker-b",
        operation="deploy",
        target_version="2.0.0",
        release_id="rel-1",
        now=NOW + LEASE,
        lease=LEASE,
    )
    assert (taken.owner, taken.epoch) == ("worker-b", 7)
    assert holds(taken, taken)
    assert not holds(taken, again), "the claim taken over no longer holds the node"
    assert not holds(None, again)


def test_renewing_a_claim_moves_its_heartbeat_and_keeps_it_alive() -> None:
    held = claimed(request_id="req-1")
    renewed = renew(held, now=NOW + LEASE / 3)
    assert (renewed.owner, renewed.epoch, renewed.updated_at) == (held.owner, held.epoch, NOW + LEASE / 3)
    assert lease_expired(held, now=NOW + LEASE, lease=LEASE)
    assert not lease_expired(renewed, now=NOW + LEASE, lease=LEASE)
    with pytest.raises(NodeBusy):
        claim(
            renewed,
            request_id="req-2",
            owner="worker-b",
            operation="deploy",
            target_version="3.0.0",
            release_id=None,
            now=NOW + LEASE,
            lease=LEASE,
        )


@pytest.mark.parametrize("state", [NodeState.SUCCESS, NodeState.FAILED, NodeState.PENDING], ids=str)
def test_only_a_running_claim_is_renewed(state: NodeState) -> None:
    with pytest.raises(IllegalTransition):
        renew(node(state), now=NOW)


# --- finish -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state", [NodeState.PENDING, NodeState.SUCCESS, NodeState.FAILED, NodeState.ROLLED_BACK], ids=str
)
def test_finish_rejects_a_claim_that_is_not_deploying(state: NodeState) -> None:
    not_claimed = node(state, operation="deploy")
    with pytest.raises(IllegalTransition, match="expected deploying"):
        finish(not_claimed, node(NodeState.SUCCESS, current_version="2.0.0"), now=NOW)


@pytest.mark.parametrize(
    ("operation", "result", "error"),
    [
        ("deploy", node(NodeState.PENDING), "deploy: the executor ended in pending, not a final state"),
        ("rollback", node(NodeState.DEPLOYING), "rollback: the executor ended in deploying, not a final state"),
        (
            "rollback",
            node(NodeState.SUCCESS, current_version="0.9.0"),
            "rollback: the executor reported success, not rolled_back",
        ),
        (
            "deploy",
            node(NodeState.ROLLED_BACK, current_version="1.0.0"),
            "deploy: the executor reported rolled_back, not success",
        ),
        (
            "deploy",
            node(NodeState.SUCCESS, current_version="1.0.0"),
            "deploy: the executor reported success running 1.0.0, not 2.0.0",
        ),
        (
            "rollback",
            node(NodeState.ROLLED_BACK, current_version=None),
            "rollback: the executor reported rolled_back running nothing, not 0.9.0",
        ),
    ],
    ids=["deploy-pending", "rollback-deploying", "rollback-success", "deploy-rolled-back", "other", "nothing"],
)
def test_finish_records_a_result_that_contradicts_the_claim_as_failed(
    operation: str, result: NodeStatus, error: str
) -> None:
    """An executor result that is not final, not the operation's end, or not the target is a failure naming it."""
    final = finish(claimed(operation), result, now=NOW)
    assert (final.state, final.last_error) == (NodeState.FAILED, error)
    assert final.deploying_version == ("2.0.0" if operation == "deploy" else "0.9.0")
    assert final.current_version == result.current_version


def test_finish_of_a_successful_deploy_records_the_new_versions() -> None:
    later = NOW + timedelta(seconds=40)
    result = node(NodeState.SUCCESS, current_version="2.0.0", prev_version="1.0.0", deploying_version="2.0.0")
    final = finish(claimed("deploy"), result, now=later)
    assert final.state == NodeState.SUCCESS
    assert (final.current_version, final.prev_version, final.deploying_version) == ("2.0.0", "1.0.0", None)
    assert final.updated_at == later
    # Bookkeeping of the claim stays: which request and release did this.
    assert (final.request_id, final.release_id, final.operation) == ("req-1", "rel-1", "deploy")


def test_finish_of_a_failed_deploy_keeps_the_attempted_version_and_the_error() -> None:
    result = node(
        NodeState.FAILED,
        current_version="1.0.0",
        prev_version="0.9.0",
        deploying_version="2.0.0",
        last_error="health: 503",
    )
    final = finish(claimed("deploy"), result, now=NOW)
    assert final.state == NodeState.FAILED
    assert (final.current_version, final.deploying_version) == ("1.0.0", "2.0.0")
    assert final.last_error == "health: 503"


@pytest.mark.parametrize(
    ("last_error", "stored"),
    [
        ("health: 503", "health: 503"),
        ("", "deploy: failed without a message"),
        ("health: ", "health: failed without a message"),
        ("Connection refused: port 80", "deploy: Connection refused: port 80"),
        ("unpack: bad: archive", "unpack: bad: archive"),
        ("x" * 5000, "deploy: " + "x" * 3997 + "..."),
    ],
    ids=["step", "empty", "empty-message", "no-step", "colon-in-message", "too-long"],
)
def test_finish_stores_the_error_as_its_outcome_event_carries_it(last_error: str, stored: str) -> None:
    """`<step>: <message>`: the executor's step, else the operation; never empty; cut to fit the event's error."""
    result = node(NodeState.FAILED, current_version="1.0.0", last_error=last_error)
    assert finish(claimed("deploy"), result, now=NOW).last_error == stored


def test_finish_takes_the_failed_target_from_the_claim_and_clears_the_error_on_success() -> None:
    """A failed result that forgot the version it tried still names it; a success keeps no error."""
    failed = finish(claimed("rollback"), node(NodeState.FAILED, current_version="1.0.0"), now=NOW)
    assert failed.deploying_version == "0.9.0"
    done = node(NodeState.SUCCESS, current_version="2.0.0", last_error="warning: slow start")
    assert finish(claimed("deploy"), done, now=NOW).last_error == ""


@pytest.mark.parametrize("state", [NodeState.ROLLED_BACK, NodeState.FAILED], ids=str)
def test_finish_of_a_rollback_accepts_rolled_back_or_failed(state: NodeState) -> None:
    final = finish(claimed("rollback"), node(state, current_version="0.9.0"), now=NOW)
    assert final.state == state
    assert final.current_version == "0.9.0"


@pytest.mark.parametrize("state", [NodeState.SUCCESS, NodeState.FAILED], ids=str)
def test_finish_of_a_deploy_accepts_success_or_failed(state: NodeState) -> None:
    assert finish(claimed("deploy"), node(state, current_version="2.0.0"), now=NOW).state == state


# --- rollback target ----------------------------------------------------------------------------


def test_rollback_after_a_failed_deploy_returns_to_the_current_version() -> None:
    failed = node(NodeState.FAILED, current_version="1.0.0", prev_version="0.9.0", deploying_version="2.0.0")
    assert rollback_target(failed, None) == "1.0.0"


def test_rollback_after_a_failed_deploy_without_current_version_falls_back_to_prev_version() -> None:
    failed = node(NodeState.FAILED, current_version=None, prev_version="0.9.0")
    assert rollback_target(failed, None) == "0.9.0"


def test_rollback_after_a_deploy_that_failed_after_the_switch_returns_to_the_previous_version() -> None:
    """The node runs the version that failed (e.g. at min_healthy): going back means prev_version."""
    failed = node(NodeState.FAILED, current_version="2.0.0", prev_version="1.0.0", deploying_version="2.0.0")
    assert rollback_target(failed, None) == "1.0.0"


def test_min_healthy_failure_keeps_what_the_probe_saw_and_the_previous_version() -> None:
    result = node(NodeState.SUCCESS, current_version="2.0.0", prev_version="1.0.0")
    deployed = finish(claimed("deploy"), result, now=NOW)
    failed = fail_min_healthy(deployed, running="2.0.0", error="the probe saw failed", now=NOW + timedelta(seconds=5))
    assert (failed.state, failed.current_version, failed.prev_version) == (NodeState.FAILED, "2.0.0", "1.0.0")
    assert (failed.deploying_version, failed.last_error) == ("2.0.0", "min_healthy: the probe saw failed")
    assert (failed.request_id, failed.updated_at) == ("req-1", NOW + timedelta(seconds=5))
    assert rollback_target(failed, None) == "1.0.0"


@pytest.mark.parametrize("state", [NodeState.DEPLOYING, NodeState.FAILED, NodeState.ROLLED_BACK], ids=str)
def test_min_healthy_fails_only_a_deployed_node(state: NodeState) -> None:
    with pytest.raises(IllegalTransition):
        fail_min_healthy(node(state, operation="deploy"), running="2.0.0", error="x", now=NOW)


def test_rollback_after_a_successful_deploy_returns_to_the_previous_version() -> None:
    success = node(NodeState.SUCCESS, current_version="2.0.0", prev_version="1.0.0")
    assert rollback_target(success, None) == "1.0.0"


def test_redelivered_rollback_keeps_the_current_version_as_target() -> None:
    in_rollback = node(NodeState.DEPLOYING, operation="rollback", current_version="1.0.0", prev_version="0.9.0")
    assert rollback_target(in_rollback, None) == "1.0.0"


def test_redelivered_rollback_after_a_successful_deploy_keeps_the_target_of_its_claim() -> None:
    """Interrupted while leaving 2.0.0 for 1.0.0: the claim still runs 2.0.0 but the target stays 1.0.0."""
    success = node(NodeState.SUCCESS, current_version="2.0.0", prev_version="1.0.0")
    target = rollback_target(success, None)
    in_rollback = claim(
        success,
        request_id="rb-1",
        owner="worker-a",
        operation="rollback",
        target_version=target,
        release_id=None,
        now=NOW,
        lease=LEASE,
    )
    assert rollback_target(in_rollback, None) == "1.0.0"


@pytest.mark.parametrize(
    "state", [NodeState.FAILED, NodeState.SUCCESS, NodeState.ROLLED_BACK, NodeState.PENDING], ids=str
)
def test_explicit_rollback_version_wins(state: NodeState) -> None:
    current = node(state, current_version="2.0.0", prev_version="1.0.0")
    assert rollback_target(current, "0.5.0") == "0.5.0"


@pytest.mark.parametrize(
    "current",
    [
        node(NodeState.PENDING),
        node(NodeState.SUCCESS, current_version="1.0.0"),
        node(NodeState.FAILED, deploying_version="1.0.0", last_error="health: 503"),
    ],
    ids=["never-deployed", "first-version", "first-deploy-failed"],
)
def test_rollback_of_a_node_without_a_version_to_return_to_has_no_target(current: NodeStatus) -> None:
    assert rollback_target(current, None) is None


# --- planner ------------------------------------------------------------------------------------


def keys(count: int) -> list[str]:
    return [f"local/h{index:02d}/api" for index in range(count)]


@pytest.mark.parametrize(
    ("count", "batches", "sizes"),
    [
        (3, [1, "100%"], [1, 2]),
        (10, ["10%", "50%"], [1, 5, 4]),
        (5, [2], [2, 2, 1]),
        (4, ["100%"], [4]),
        (2, [5], [2]),
        (7, [1, 2, 3, 4], [1, 2, 3, 1]),
        (10, ["1%"], [1] * 10),
        (3, ["34%"], [2, 1]),
        (200, ["1%", "10%", "100%"], [2, 20, 178]),
        (1, ["1%"], [1]),
    ],
)
def test_plan_batches_sizes(count: int, batches: list[BatchSize], sizes: list[int]) -> None:
    planned = plan_batches(keys(count), Strategy(batches=batches))
    assert [len(batch) for batch in planned] == sizes
    assert [key for batch in planned for key in batch] == keys(count)


def test_plan_batches_keeps_plan_order_and_repeats_the_last_size() -> None:
    planned = plan_batches(["a", "b", "c"], Strategy(batches=[1, "100%"]))
    assert planned == [["a"], ["b", "c"]]


@pytest.mark.parametrize("count", [1, 3, 7, 99, 101])
@pytest.mark.parametrize("percent", ["1%", "33%", "99%"])
def test_plan_batches_never_makes_an_empty_batch(count: int, percent: str) -> None:
    planned = plan_batches(keys(count), Strategy(batches=[percent]))
    assert all(planned)
    assert sum(len(batch) for batch in planned) == count


def test_plan_batches_rejects_a_release_without_nodes() -> None:
    with pytest.raises(InvalidInput) as info:
        plan_batches([], Strategy())
    assert info.value.field == "nodes"


@pytest.mark.parametrize(("size", "total", "count"), [(3, 10, 3), ("10%", 10, 1), ("34%", 3, 2), ("1%", 1, 1)])
def test_resolve_size_rounds_percentages_up(size: BatchSize, total: int, count: int) -> None:
    assert resolve_size(size, total) == count


@pytest.mark.parametrize(
    ("budget", "total", "tolerated"),
    [(0, 10, 0), (3, 10, 3), ("10%", 10, 1), ("15%", 10, 1), ("10%", 5, 0), ("50%", 3, 1), ("100%", 7, 7)],
)
def test_failure_budget_counts_and_percentages_rounded_down(budget: BatchSize, total: int, tolerated: int) -> None:
    assert failure_budget(Strategy(failure_budget=budget).failure_budget, total) == tolerated


# --- pacing decisions ---------------------------------------------------------------------------


NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def decision(
    *,
    state: ReleaseState = ReleaseState.RUNNING,
    batch: int = 0,
    batch_count: int = 3,
    counts: BatchCounts,
    totals: BatchCounts | None = None,
    total_failed: int = 0,
    budget: int = 0,
    batch_budget: int | None = None,
    max_parallel: int = 2,
    gates: Gates | None = None,
    approved_batch: int = -1,
    resume_at: datetime | None = None,
    rollback_on_budget: bool = False,
    fast_rollback: bool = False,
    rollback_parallel: int | None = None,
) -> Decision:
    return decide(
        View(
            state=state,
            batch=batch,
            batch_count=batch_count,
            batch_counts=counts,
            totals=totals or BatchCounts(failed=total_failed),
            budget=budget,
            batch_budget=batch_budget,
            max_parallel=max_parallel,
            gates=gates or Gates(),
            approved_batch=approved_batch,
            resume_at=resume_at,
            now=NOW,
            rollback_on_budget=rollback_on_budget,
            fast_rollback=fast_rollback,
            rollback_parallel=rollback_parallel,
        )
    )


@pytest.mark.parametrize(
    "state",
    [
        ReleaseState.COMPLETED,
        ReleaseState.HALTED,
        ReleaseState.PAUSED,
        ReleaseState.AWAITING_APPROVAL,
        ReleaseState.ABORTED,
        ReleaseState.ROLLED_BACK,
    ],
    ids=str,
)
def test_release_that_is_not_running_waits(state: ReleaseState) -> None:
    assert decision(state=state, counts=BatchCounts(queued=5)) == Wait()
    assert decision(state=state, counts=BatchCounts(succeeded=2), total_failed=9) == Wait()


def test_failures_beyond_the_budget_halt_the_release() -> None:
    result = decision(counts=BatchCounts(queued=3, failed=2), total_failed=2, budget=1)
    assert isinstance(result, Halt)
    assert "2 failed, budget 1" in result.reason


def test_failures_within_the_budget_do_not_halt() -> None:
    assert decision(counts=BatchCounts(queued=3, failed=1), total_failed=1, budget=1) == Dispatch(2)


def test_spent_budget_halts_even_when_the_last_batch_is_done() -> None:
    counts = BatchCounts(succeeded=1, failed=1)
    assert isinstance(decision(batch=2, batch_count=3, counts=counts, total_failed=1, budget=0), Halt)


@pytest.mark.parametrize(
    ("queued", "dispatched", "max_parallel", "count"),
    [(5, 0, 2, 2), (5, 1, 3, 2), (1, 0, 10, 1), (4, 2, 10, 4)],
)
def test_dispatch_is_limited_by_the_free_window_and_the_queued_nodes(
    queued: int, dispatched: int, max_parallel: int, count: int
) -> None:
    counts = BatchCounts(queued=queued, dispatched=dispatched)
    assert decision(counts=counts, max_parallel=max_parallel) == Dispatch(count)


@pytest.mark.parametrize(("queued", "dispatched", "max_parallel"), [(3, 2, 2), (1, 5, 3)])
def test_full_window_waits(queued: int, dispatched: int, max_parallel: int) -> None:
    counts = BatchCounts(queued=queued, dispatched=dispatched)
    assert decision(counts=counts, max_parallel=max_parallel) == Wait()


def test_nodes_in_flight_with_nothing_queued_waits() -> None:
    assert decision(counts=BatchCounts(dispatched=1, succeeded=3)) == Wait()


@pytest.mark.parametrize("batch", [0, 1])
def test_done_batch_that_is_not_the_last_starts_the_next(batch: int) -> None:
    counts = BatchCounts(succeeded=2, failed=1)
    assert decision(batch=batch, batch_count=3, counts=counts, total_failed=1, budget=1) == StartNextBatch()


def test_done_last_batch_completes_the_release() -> None:
    assert decision(batch=2, batch_count=3, counts=BatchCounts(succeeded=4)) == Complete()
    assert decision(batch=0, batch_count=1, counts=BatchCounts(succeeded=1)) == Complete()


def test_batch_counts_done_only_when_nothing_is_queued_or_dispatched() -> None:
    assert BatchCounts(succeeded=1, failed=1).done
    assert not BatchCounts(queued=1).done
    assert not BatchCounts(dispatched=1).done


def test_batch_budget_halts_even_within_the_release_budget() -> None:
    """Two failures in one batch spend a batch budget of 1 though the release budget of 5 holds."""
    result = decision(counts=BatchCounts(queued=1, failed=2), total_failed=2, budget=5, batch_budget=1)
    assert isinstance(result, Halt)
    assert "batch budget 1" in result.reason


def test_spent_budget_with_release_policy_rolls_the_release_back() -> None:
    """Policy `release`: a spent budget turns into a release rollback, not a plain halt."""
    result = decision(counts=BatchCounts(failed=1), total_failed=1, rollback_on_budget=True)
    assert isinstance(result, RollBackRelease)


def test_approval_gate_holds_the_next_batch_until_approved() -> None:
    """A done batch with an approval gate after it waits for approval; once approved the next batch starts."""
    gates = Gates(approval_after=frozenset({1}))
    done = BatchCounts(succeeded=2)
    assert decision(batch=0, counts=done, gates=gates) == AwaitApproval()
    assert decision(batch=0, counts=done, gates=gates, approved_batch=0) == StartNextBatch(report_completed=False)
    assert decision(batch=1, counts=done, gates=gates, approved_batch=0) == StartNextBatch()  # no gate after 2
    every = Gates(approval_every_batch=True)
    assert decision(batch=1, counts=done, gates=every, approved_batch=0) == AwaitApproval()


def test_pause_between_batches_sets_a_timer_that_later_fires() -> None:
    """A done batch with a pause waits until now + pause; the waiting release starts the next batch when due."""
    done = BatchCounts(succeeded=2)
    assert decision(counts=done, gates=Gates(pause_s=30)) == PauseUntil(NOW + timedelta(seconds=30))
    later = NOW + timedelta(seconds=30)
    assert decision(state=ReleaseState.WAITING, counts=done, resume_at=later) == Wait(until=later)
    assert decision(state=ReleaseState.WAITING, counts=done, resume_at=NOW) == StartNextBatch(report_completed=False)


def test_release_rollback_dispatches_within_the_window_then_ends() -> None:
    """Rolling back: deployed nodes go back max_parallel at a time, in-flight deploys finish first, then done."""
    rolling = ReleaseState.ROLLING_BACK
    empty = BatchCounts()
    assert decision(state=rolling, counts=empty, totals=BatchCounts(succeeded=5)) == DispatchRollbacks(2)
    assert decision(state=rolling, counts=empty, totals=BatchCounts(succeeded=5, rollback_dispatched=2)) == Wait()
    assert decision(state=rolling, counts=empty, totals=BatchCounts(dispatched=1)) == Wait()
    assert decision(state=rolling, counts=empty, totals=BatchCounts(rolled_back=5, rollback_failed=1)) == RolledBack()


def test_fast_release_rollback_sends_every_deployed_node_at_once() -> None:
    """Fast without rollback_parallel: all 7 deployed nodes at once, though max_parallel is 2; then it waits for
    their outcomes and ends like a normal rollback."""
    rolling, empty = ReleaseState.ROLLING_BACK, BatchCounts()
    assert decision(state=rolling, counts=empty, totals=BatchCounts(succeeded=7), fast_rollback=True) == (
        DispatchRollbacks(7)
    )
    in_flight = BatchCounts(rollback_dispatched=7, queued=3)
    assert decision(state=rolling, counts=empty, totals=in_flight, fast_rollback=True) == Wait()
    done = BatchCounts(rolled_back=6, rollback_failed=1, queued=3)
    assert decision(state=rolling, counts=empty, totals=done, fast_rollback=True) == RolledBack()


def test_fast_release_rollback_sends_deploys_in_flight_back_as_soon_as_they_land() -> None:
    """A deploy still in flight holds nothing back: the deployed nodes go at once, the late one when it lands."""
    rolling, empty = ReleaseState.ROLLING_BACK, BatchCounts()
    totals = BatchCounts(succeeded=4, dispatched=2)
    assert decision(state=rolling, counts=empty, totals=totals, fast_rollback=True) == DispatchRollbacks(4)
    landed = BatchCounts(succeeded=1, dispatched=1, rollback_dispatched=4)
    assert decision(state=rolling, counts=empty, totals=landed, fast_rollback=True) == DispatchRollbacks(1)


@pytest.mark.parametrize(
    ("totals", "expected"),
    [
        (BatchCounts(succeeded=7), DispatchRollbacks(3)),
        (BatchCounts(succeeded=5, rollback_dispatched=2), DispatchRollbacks(1)),
        (BatchCounts(succeeded=4, rollback_dispatched=2, dispatched=1), Wait()),
        (BatchCounts(succeeded=1, rollback_dispatched=1), DispatchRollbacks(1)),
    ],
)
def test_fast_release_rollback_keeps_to_rollback_parallel(totals: BatchCounts, expected: Decision) -> None:
    """rollback_parallel 3 (max_parallel 2): a fast rollback keeps 3 nodes in flight, deploys in flight included."""
    rolling = ReleaseState.ROLLING_BACK
    assert (
        decision(state=rolling, counts=BatchCounts(), totals=totals, fast_rollback=True, rollback_parallel=3)
        == expected
    )


def test_normal_release_rollback_keeps_max_parallel_whatever_rollback_parallel_says() -> None:
    """rollback_parallel is a fast rollback's window only: a normal one goes max_parallel (2) at a time."""
    rolling = ReleaseState.ROLLING_BACK
    totals = BatchCounts(succeeded=7)
    assert decision(state=rolling, counts=BatchCounts(), totals=totals, rollback_parallel=5) == DispatchRollbacks(2)
    assert decision(state=rolling, counts=BatchCounts(), totals=totals) == DispatchRollbacks(2)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "normal"])
def test_release_rollback_is_not_held_by_gates_pauses_or_approvals(fast: bool) -> None:
    """A rolling-back release with every gate set, a pause timer pending and no approval still sends rollbacks."""
    gates = Gates(pause_s=600, approval_every_batch=True, approval_after=frozenset({1, 2}))
    result = decision(
        state=ReleaseState.ROLLING_BACK,
        batch=1,
        counts=BatchCounts(succeeded=3),
        totals=BatchCounts(succeeded=6, queued=4),
        gates=gates,
        resume_at=NOW + timedelta(hours=1),
        fast_rollback=fast,
    )
    assert result == DispatchRollbacks(6 if fast else 2)


@pytest.mark.parametrize(
    ("fast", "rollback_parallel", "window"), [(False, None, 2), (False, 9, 2), (True, None, None), (True, 9, 9)]
)
def test_rollback_window_is_max_parallel_or_a_fast_rollbacks_own(
    fast: bool, rollback_parallel: int | None, window: int | None
) -> None:
    view = View(
        state=ReleaseState.ROLLING_BACK,
        batch=0,
        batch_count=1,
        batch_counts=BatchCounts(),
        totals=BatchCounts(),
        budget=0,
        batch_budget=None,
        max_parallel=2,
        gates=Gates(),
        approved_batch=-1,
        resume_at=None,
        now=NOW,
        rollback_on_budget=False,
        fast_rollback=fast,
        rollback_parallel=rollback_parallel,
    )
    assert rollback_window(view) == window
