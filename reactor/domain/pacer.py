"""Pacing decisions: what the Pacer does next for a release. Pure functions over plain data; no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class ReleaseState(StrEnum):
    """Where a release is: queued behind another release of its service, live, winding down, or over."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"
    AWAITING_APPROVAL = "awaiting_approval"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    HALTED = "halted"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


LIVE = frozenset({ReleaseState.RUNNING, ReleaseState.PAUSED, ReleaseState.WAITING, ReleaseState.AWAITING_APPROVAL})
ACTIVE = LIVE | {ReleaseState.ROLLING_BACK}
FINAL = frozenset({ReleaseState.COMPLETED, ReleaseState.HALTED, ReleaseState.ABORTED, ReleaseState.ROLLED_BACK})


class ItemState(StrEnum):
    """Where one node of a release is."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLBACK_DISPATCHED = "rollback_dispatched"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"


@dataclass(frozen=True, slots=True)
class BatchCounts:
    """How many nodes of one batch (or of the release) are in each item state."""

    queued: int = 0
    dispatched: int = 0
    succeeded: int = 0
    failed: int = 0
    rollback_dispatched: int = 0
    rolled_back: int = 0
    rollback_failed: int = 0

    @classmethod
    def of(cls, counts: dict[ItemState, int]) -> BatchCounts:
        """From a store's per-state counts."""
        get = counts.get
        return cls(
            get(ItemState.QUEUED, 0),
            get(ItemState.DISPATCHED, 0),
            get(ItemState.SUCCEEDED, 0),
            get(ItemState.FAILED, 0),
            get(ItemState.ROLLBACK_DISPATCHED, 0),
            get(ItemState.ROLLED_BACK, 0),
            get(ItemState.ROLLBACK_FAILED, 0),
        )

    def by_state(self) -> dict[ItemState, int]:
        """As a store counts them: per state."""
        return {
            ItemState.QUEUED: self.queued,
            ItemState.DISPATCHED: self.dispatched,
            ItemState.SUCCEEDED: self.succeeded,
            ItemState.FAILED: self.failed,
            ItemState.ROLLBACK_DISPATCHED: self.rollback_dispatched,
            ItemState.ROLLED_BACK: self.rolled_back,
            ItemState.ROLLBACK_FAILED: self.rollback_failed,
        }

    @property
    def done(self) -> bool:
        """Every node of the batch has an outcome."""
        return self.queued == 0 and self.dispatched == 0


@dataclass(frozen=True, slots=True)
class Gates:
    """What a release waits for between batches, from its strategy."""

    pause_s: float = 0.0
    approval_every_batch: bool = False
    approval_after: frozenset[int] = frozenset()  # 1-based batch numbers

    def needs_approval_after(self, batch: int) -> bool:
        """Whether the batch with 0-based index `batch` needs an approval before the next one starts."""
        return self.approval_every_batch or (batch + 1) in self.approval_after


@dataclass(frozen=True, slots=True)
class View:
    """Everything a decision needs about a release."""

    state: ReleaseState
    batch: int
    batch_count: int
    batch_counts: BatchCounts
    totals: BatchCounts
    budget: int
    batch_budget: int | None
    max_parallel: int
    gates: Gates
    approved_batch: int  # the last 0-based batch whose approval gate is passed; -1 for none
    resume_at: datetime | None
    now: datetime
    rollback_on_budget: bool
    # A fast release rollback takes no window from max_parallel: every deployed node at once, or at most
    # `rollback_parallel` (None: no cap of its own; limits across releases still apply).
    fast_rollback: bool = False
    rollback_parallel: int | None = None


def rollback_window(view: View) -> int | None:
    """How many nodes a release rollback keeps in flight at once: `max_parallel`, or with a fast rollback
    `rollback_parallel`; None: no window, every deployed node goes at once."""
    return view.rollback_parallel if view.fast_rollback else view.max_parallel


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send this many more queued nodes of the current batch."""

    count: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do until an outcome, a command or `until` (when set)."""

    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class StartNextBatch:
    """The current batch is done and every gate after it is passed: start the next (and report the finished
    one, unless a gate already did)."""

    report_completed: bool = True


@dataclass(frozen=True, slots=True)
class AwaitApproval:
    """The current batch is done; the next one waits for a ReleaseApproved."""


@dataclass(frozen=True, slots=True)
class PauseUntil:
    """The current batch is done; the next one starts at `resume_at`."""

    resume_at: datetime


@dataclass(frozen=True, slots=True)
class Complete:
    """The last batch is done within budget."""


@dataclass(frozen=True, slots=True)
class Halt:
    """The failure budget is spent: dispatch nothing more."""

    reason: str


@dataclass(frozen=True, slots=True)
class RollBackRelease:
    """The failure budget is spent and the policy is `release`: roll back every deployed node."""

    reason: str


@dataclass(frozen=True, slots=True)
class DispatchRollbacks:
    """Send this many more rollbacks of deployed nodes (newest batch first)."""

    count: int


@dataclass(frozen=True, slots=True)
class RolledBack:
    """Every rollback of the release has an outcome."""


Decision = (
    Dispatch
    | Wait
    | StartNextBatch
    | AwaitApproval
    | PauseUntil
    | Complete
    | Halt
    | RollBackRelease
    | DispatchRollbacks
    | RolledBack
)


def decide(view: View) -> Decision:
    """The next step of a release. In-flight nodes of a paused, halted or aborted release still finish."""
    match view.state:
        case ReleaseState.ROLLING_BACK:
            return _rolling_back(view)
        case ReleaseState.WAITING:
            if view.resume_at is not None and view.now < view.resume_at:
                return Wait(until=view.resume_at)
            return StartNextBatch(report_completed=False)
        case ReleaseState.RUNNING:
            return _running(view)
        case _:
            return Wait()


def _running(view: View) -> Decision:
    spent = _spent_budget(view)
    if spent is not None:
        return RollBackRelease(spent) if view.rollback_on_budget else Halt(spent)
    counts = view.batch_counts
    if counts.done:
        if view.batch + 1 >= view.batch_count:
            return Complete()
        if view.gates.needs_approval_after(view.batch):
            if view.approved_batch < view.batch:
                return AwaitApproval()
            return StartNextBatch(report_completed=False)
        if view.gates.pause_s > 0:
            return PauseUntil(resume_at=_later(view.now, view.gates.pause_s))
        return StartNextBatch()
    free = view.max_parallel - counts.dispatched
    if free > 0 and counts.queued > 0:
        return Dispatch(min(free, counts.queued))
    return Wait()


def _spent_budget(view: View) -> str | None:
    if view.totals.failed > view.budget:
        return f"failure budget spent: {view.totals.failed} failed, budget {view.budget}"
    if view.batch_budget is not None and view.batch_counts.failed > view.batch_budget:
        return (
            f"failure budget spent: {view.batch_counts.failed} failed in batch {view.batch + 1},"
            f" batch budget {view.batch_budget}"
        )
    return None


def _rolling_back(view: View) -> Decision:
    """Roll back every deployed node, gates and pauses aside: within the window (deploys still in flight take
    part of it), or all at once for a fast rollback without one. Deploys in flight finish, then go back too."""
    totals = view.totals
    if totals.succeeded == 0 and totals.rollback_dispatched == 0 and totals.dispatched == 0:
        return RolledBack()
    window = rollback_window(view)
    free = totals.succeeded if window is None else window - totals.rollback_dispatched - totals.dispatched
    if free > 0 and totals.succeeded > 0:
        return DispatchRollbacks(min(free, totals.succeeded))
    return Wait()


def _later(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)
