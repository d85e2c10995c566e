"""What the `reactor` CLI's exit code means, one meaning per code, so scripts can branch on it (README, Exit codes)."""

from __future__ import annotations

from enum import IntEnum

from reactor.domain.pacer import ReleaseState


class ExitCode(IntEnum):
    """The exit codes of every `reactor` command."""

    OK = 0
    """Done: the release completed, the command was carried out, or the read succeeded."""
    FAILED = 1
    """The release failed (halted, aborted or rolled back), the work failed, or the reactor met an error."""
    INVALID = 2
    """Invalid input: a bad file, bad settings or bad arguments; nothing was changed."""
    AWAITING_HUMAN = 3
    """The release waits for a person: an approval or a resume after a pause."""
    IN_PROGRESS = 4
    """The release goes on by itself (queued, running, waiting between batches, rolling back): ask again later."""


_BY_STATE = {
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


def for_release(state: ReleaseState) -> ExitCode:
    """The exit code that tells a script where a release in `state` is."""
    return _BY_STATE[state]
