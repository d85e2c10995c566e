"""The chaos tier's judge: a clean run passes, and each invariant catches the evidence of its own broken promise."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from reactor.events import (
    DeployRequested,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeTarget,
    Package,
    ReleaseCompleted,
    ReleaseHalted,
    ReleasePlan,
    RollbackRequested,
    derived_event_id,
)
from tests.chaos import judge
from tests.chaos.schedule import draw

NODES = ["local/host-0/hello", "local/host-1/hello"]
PACKAGE = Package(url="https://packages.example.test/hello-2.0.0.tar.gz", sha256="a" * 64)
BEGIN = datetime(2026, 1, 1, tzinfo=UTC)
PLAN = ReleasePlan(
    release_id="hello-2.0.0",
    service="hello",
    version="2.0.0",
    package=PACKAGE,
    nodes=[NodeTarget(node_key=node_key) for node_key in NODES],
)


def at(seconds: float) -> datetime:
    return BEGIN + timedelta(seconds=seconds)


def request(node_key: str) -> DeployRequested:
    return DeployRequested(
        event_id=derived_event_id(PLAN.release_id, node_key),
        occurred_at=at(10),
        release_id=PLAN.release_id,
        node_key=node_key,
        service="hello",
        version="2.0.0",
        package=PACKAGE,
    )


def deployed(command: DeployRequested, seconds: float = 20) -> NodeDeployed:
    return NodeDeployed(
        event_id=derived_event_id(command.event_id, "outcome"),
        occurred_at=at(seconds),
        release_id=PLAN.release_id,
        causation_id=command.event_id,
        node_key=command.node_key,
        service="hello",
        version="2.0.0",
    )


def clean() -> judge.Evidence:
    """Two nodes deployed once each, serving 2.0.0 with one service each; the release completed."""
    commands = [request(node_key) for node_key in NODES]
    return judge.Evidence(
        nodes=NODES,
        starts=[
            judge.Start(node_key=node_key, pid=100 + index, version="2.0.0", wall=at(12).timestamp())
            for index, node_key in enumerate(NODES)
        ],
        served=dict.fromkeys(NODES, "2.0.0"),
        running={node_key: [(100 + index, "2.0.0")] for index, node_key in enumerate(NODES)},
        releases=[PLAN],
        commands=commands,
        outcomes=[deployed(command) for command in commands],
        release_events=[ReleaseCompleted(release_id=PLAN.release_id, occurred_at=at(21), succeeded=2, failed=0)],
        dead_letters=0,
        reach_s=5.0,
    )


def test_a_clean_run_breaks_no_promise() -> None:
    assert judge.violations(clean()) == []


def test_a_service_started_while_another_of_its_node_ran_is_an_overlap() -> None:
    evidence = clean()
    evidence.starts = [*evidence.starts, judge.Start(NODES[0], 200, "2.0.0", at(13).timestamp(), (100,))]
    assert [problem.split(":")[0] for problem in judge.violations(evidence)] == ["overlap", "starts"]


def test_a_node_serving_another_version_than_its_final_outcome_says_is_caught() -> None:
    evidence = clean()
    evidence.served = {**evidence.served, NODES[1]: "1.0.0"}
    assert judge.violations(evidence) == [
        f"serving: {NODES[1]} answers '1.0.0' over HTTP; its final outcome NodeDeployed "
        f"({evidence.outcomes[1].event_id}) says '2.0.0'"
    ]


def test_two_services_alive_on_a_node_at_the_end_are_caught() -> None:
    evidence = clean()
    evidence.running = {**evidence.running, NODES[0]: [(100, "2.0.0"), (300, "1.0.0")]}
    assert [problem.split(":")[0] for problem in judge.violations(evidence)] == ["serving"]


def test_a_failed_node_must_serve_the_version_its_failure_says_it_kept() -> None:
    """NodeFailed tells the version the node still runs; the judge expects exactly that one."""
    evidence = clean()
    failed = NodeFailed(
        event_id=derived_event_id(evidence.commands[0].event_id, "outcome"),
        occurred_at=at(30),
        release_id=PLAN.release_id,
        causation_id=evidence.commands[0].event_id,
        node_key=NODES[0],
        service="hello",
        version="2.0.0",
        current_version="1.0.0",
        step="health",
        error="not healthy",
    )
    assert judge.told_version(failed) == "1.0.0"
    assert judge.final_outcomes([*evidence.outcomes, failed])[NODES[0]] is failed


def test_a_start_again_needs_a_fault_of_its_own_in_reach() -> None:
    """A start again with no fault since the node's previous start (less the reach) is caught; one fault in reach
    excuses one start again of a version, not two."""
    evidence = clean()
    again = [judge.Start(NODES[0], 200 + index, "2.0.0", at(20 + 10 * index).timestamp()) for index in range(2)]
    evidence.starts = [*evidence.starts, *again]
    assert judge.violations(evidence) == [
        f"starts: {NODES[0]}: 2.0.0 started 3 times; only 0 of those starts again had a fault of their own in "
        "reach (none)"
    ]
    long_before = judge.Fault("kill", at(12 - 6).timestamp())  # more than reach_s before the node's first start
    one = judge.Fault("freeze", at(18).timestamp())  # in reach of both starts again
    assert len(judge.starts_beyond_interruptions(replace(evidence, faults=[long_before, one]))) == 1
    other = judge.Fault("kafka", at(28).timestamp())
    assert judge.starts_beyond_interruptions(replace(evidence, faults=[long_before, one, other])) == []


def test_an_interrupted_switch_may_start_both_versions_again_on_one_fault() -> None:
    """One interruption puts 1.0.0 back and then 2.0.0 starts over: one start again of each version."""
    evidence = clean()
    evidence.starts = [
        judge.Start(NODES[0], 90, "1.0.0", at(1).timestamp()),
        *evidence.starts,
        judge.Start(NODES[0], 201, "1.0.0", at(14).timestamp()),
        judge.Start(NODES[0], 202, "2.0.0", at(16).timestamp()),
    ]
    evidence.running = {**evidence.running, NODES[0]: [(202, "2.0.0")]}
    assert [problem.split(":")[0] for problem in judge.violations(evidence)] == ["starts", "starts"]
    fault = judge.Fault("kill", at(13).timestamp())
    assert judge.violations(replace(evidence, faults=[fault])) == []


def test_a_request_told_two_different_outcomes_is_caught_but_a_re_emitted_copy_is_not() -> None:
    evidence = clean()
    evidence.outcomes = [*evidence.outcomes, evidence.outcomes[0]]  # the same outcome re-emitted: fine
    assert judge.violations(evidence) == []
    second_run = deployed(request(NODES[0]), seconds=25)  # same derived id, told by another run
    evidence.outcomes = [*evidence.outcomes, second_run]
    problems = judge.violations(evidence)
    assert [problem.split(":")[0] for problem in problems] == ["outcomes"]
    assert "1 outcome ids and 2 different outcomes" in problems[0]


def test_a_request_without_outcome_is_caught() -> None:
    evidence = clean()
    evidence.outcomes = evidence.outcomes[:1]
    assert [problem.split(":")[0] for problem in judge.violations(evidence)] == [
        "serving",
        "outcomes",
        "release hello-2.0.0",
    ]


def test_a_release_that_halted_or_rolled_a_node_back_is_not_as_planned() -> None:
    evidence = clean()
    rollback = RollbackRequested(release_id=PLAN.release_id, node_key=NODES[0], service="hello", occurred_at=at(22))
    evidence.commands = [*evidence.commands, rollback]
    evidence.release_events = [ReleaseHalted(release_id=PLAN.release_id, reason="budget", succeeded=1, failed=1)]
    problems = [problem for problem in judge.violations(evidence) if problem.startswith("release")]
    assert problems[0] == "release hello-2.0.0: unexpected command RollbackRequested"
    assert "ends with [('ReleaseHalted'" in problems[1]


def test_two_completions_of_one_release_are_caught() -> None:
    evidence = clean()
    events: list[Event] = [
        *evidence.release_events,
        ReleaseCompleted(release_id=PLAN.release_id, succeeded=2, failed=0),
    ]
    evidence.release_events = events
    assert [problem.split(":")[0] for problem in judge.violations(evidence)] == ["release hello-2.0.0"]


def test_dead_letters_beyond_the_injected_ones_are_caught() -> None:
    assert judge.violations(replace(clean(), dead_letters=1)) == ["dlq: 1 dead letters, 0 injected"]
    assert judge.violations(replace(clean(), dead_letters=3, injected_dead_letters=3)) == []


def test_what_the_test_saw_go_wrong_is_reported_first() -> None:
    assert judge.violations(replace(clean(), observed=["exit: worker 3 exited by itself (code 1)"])) == [
        "exit: worker 3 exited by itself (code 1)"
    ]


def test_a_seed_draws_the_same_schedule_every_time_with_every_fault_kind() -> None:
    plan = draw(7, releases=2, kills=7)
    assert plan == draw(7, releases=2, kills=7)
    assert plan != draw(8, releases=2, kills=7)
    kinds = [planned.kind for part in plan for planned in part]
    assert sorted(kinds) == sorted(["kill"] * 7 + ["freeze", "join", "leave", "kafka", "ferretdb"])
    assert {planned.kind for planned in plan[0]} & {"kafka", "ferretdb"}
    assert {planned.kind for planned in plan[1]} & {"kafka", "ferretdb"}
