"""Pacing decisions: what the Pacer does next for a release, given counts. Pure; the consumer does I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from reactor.events import Model


class ReleaseState(StrEnum):
    """Where a release is."""

    RUNNING = "running"
    COMPLETED = "completed"
    HALTED = "halted"


class ItemState(StrEnum):
    """Where one node of a release is."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class BatchCounts(Model):
    """How many nodes of one batch are in each item state."""

    queued: int = 0
    dispatched: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def done(self) -> bool:
        """Every node of the batch has an outcome."""
        return self.queued == 0 and self.dispatched == 0


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send this many more queued nodes of the current batch."""

    count: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do until an outcome arrives."""


@dataclass(frozen=True, slots=True)
class NextBatch:
    """The current batch is done: report it and start the next one."""


@dataclass(frozen=True, slots=True)
class Complete:
    """The last batch is done within budget."""


@dataclass(frozen=True, slots=True)
class Halt:
    """The failure budget is spent: dispatch nothing more."""

    reason: str


Decision = Dispatch | Wait | NextBatch | Complete | Halt


def decide(
    *,
    state: ReleaseState,
    batch: int,
    batch_count: int,
    counts: BatchCounts,
    total_failed: int,
    budget: int,
    max_parallel: int,
) -> Decision:
    """The next step of a running release; in-flight nodes of a halted release still finish."""
    if state != ReleaseState.RUNNING:
        return Wait()
    if total_failed > budget:
        return Halt(f"failure budget spent: {total_failed} failed, budget {budget}")
    if counts.done:
        return Complete() if batch + 1 >= batch_count else NextBatch()
    free = max_parallel - counts.dispatched
    if free > 0 and counts.queued > 0:
        return Dispatch(min(free, counts.queued))
    return Wait()
