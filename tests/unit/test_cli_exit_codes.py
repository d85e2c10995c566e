"""The CLI's exit codes: every release state has one, and each class of state its own."""

from __future__ import annotations

import pytest

from reactor.cli.exit_codes import ExitCode, for_release
from reactor.domain.pacer import FINAL, ReleaseState

pytestmark = pytest.mark.unit


def test_every_release_state_has_an_exit_code_by_what_a_script_should_do_next() -> None:
    """Completed is 0, a failed end 1, waiting for a person 3, and whatever goes on by itself 4."""
    assert {state: for_release(state) for state in ReleaseState} == {
        ReleaseState.COMPLETED: ExitCode.OK,
        ReleaseState.HALTED: ExitCode.FAILED,
        ReleaseState.ABORTED: ExitCode.FAILED,
        ReleaseState.ROLLED_BACK: ExitCode.FAILED,
        ReleaseState.AWAITING_APPROVAL: ExitCode.AWAITING_HUMAN,
        ReleaseState.PAUSED: ExitCode.AWAITING_HUMAN,
        ReleaseState.QUEUED: ExitCode.IN_PROGRESS,
        ReleaseState.RUNNING: ExitCode.IN_PROGRESS,
        ReleaseState.WAITING: ExitCode.IN_PROGRESS,
        ReleaseState.ROLLING_BACK: ExitCode.IN_PROGRESS,
    }


def test_only_final_states_end_a_poll() -> None:
    """A script polling `release status` until the code is 0 or 1 stops exactly when the release is over."""
    assert {state for state in ReleaseState if for_release(state) in {ExitCode.OK, ExitCode.FAILED}} == FINAL


def test_exit_code_values_are_the_documented_ones() -> None:
    """The numbers scripts compare with (README, Exit codes) never change."""
    assert [(code.name, int(code)) for code in ExitCode] == [
        ("OK", 0),
        ("FAILED", 1),
        ("INVALID", 2),
        ("AWAITING_HUMAN", 3),
        ("IN_PROGRESS", 4),
    ]
