"""What the CLI shows: one line per event when not on a terminal, a live table of nodes when on one.

Names, versions and errors come from users and hosts: they go into `Text`, which rich never reads as markup.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from reactor.domain.replay import refused
from reactor.domain.status import NodeStatus
from reactor.events import (
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    ReleaseCompleted,
    ReleaseHalted,
    ReleaseRequested,
    ReleaseRollbackRequested,
    ReleaseRolledBack,
    RollbackFailed,
    RollbackRequested,
    Strategy,
)

STATE_STYLE = {"success": "green", "failed": "red", "rolled_back": "yellow", "deploying": "cyan", "pending": "dim"}


def describe(event: Event) -> str:  # noqa: PLR0912 (one case per kind of event)
    """One human line for an event."""
    match event:
        case BatchStarted():
            return f"{event.release_id}: batch {event.batch + 1} started ({len(event.node_keys)} nodes)"
        case BatchCompleted():
            return (
                f"{event.release_id}: batch {event.batch + 1} completed "
                f"({event.succeeded} succeeded, {event.failed} failed)"
            )
        case ReleaseRequested():
            plan = event.plan
            return f"{event.release_id}: release of {plan.service} {plan.version} to {len(plan.nodes)} nodes requested"
        case ReleaseCompleted():
            return f"{event.release_id}: release completed ({event.succeeded} succeeded, {event.failed} failed)"
        case ReleaseHalted():
            return f"{event.release_id}: release HALTED: {event.reason}"
        case ReleaseRollbackRequested():
            return f"{event.release_id}: {'fast ' if event.fast else ''}rollback of the release requested"
        case ReleaseRolledBack():
            return (
                f"{event.release_id}: release rolled back{' fast' if event.fast else ''}"
                f" ({event.rolled_back} rolled back, {event.failed} failed)"
            )
        case DeployRequested():
            return f"{event.node_key}: deploy {event.version} requested"
        case NodeDeployed():
            return (
                f"{event.node_key}: deployed {event.version} (was {event.prev_version or '-'}, {event.duration_s:.1f}s)"
            )
        case NodeFailed():
            return (
                f"{event.node_key}: FAILED to deploy {event.version} at {event.step}: {event.error}"
                f" (now running {event.current_version or 'nothing'})"
            )
        case RollbackRequested():
            return f"{event.node_key}: rollback requested ({event.reason})"
        case NodeRolledBack():
            return f"{event.node_key}: rolled back to {event.version}"
        case RollbackFailed():
            what = "rollback REFUSED" if refused(event) else f"ROLLBACK FAILED at {event.step}"
            return f"{event.node_key}: {what}: {event.error}"
        case _:
            return f"{event.subject()}: {type(event).__name__}"


def node_table(nodes: list[NodeStatus], title: str = "Nodes") -> Table:
    """The node table of `reactor status`."""
    table = Table(title=title)
    for column in ("node", "state", "current", "previous", "deploying", "release", "last error"):
        table.add_column(column)
    for node in nodes:
        table.add_row(
            Text(node.node_key),
            Text(node.state.value, style=STATE_STYLE.get(node.state.value, "")),
            Text(node.current_version or "-"),
            Text(node.prev_version or "-"),
            Text(node.deploying_version or "-"),
            Text(node.release_id or "-"),
            Text(node.last_error),
        )
    return table


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of `reactor release plan`: its 1-based number, nodes, spread label values and the gate after it."""

    number: int
    node_keys: list[str]
    spread: list[str | None]
    """Values of the strategy's `spread_by` label among the batch's nodes (None: a node without it)."""
    gate_after: Literal["approval", "pause"] | None
    pause_after_s: float | None


def planned_batches(
    batches: list[list[str]], labels: dict[str, dict[str, str]], strategy: Strategy
) -> list[PlannedBatch]:
    """The batches of a plan with what `release plan` says about each; no gate after the last one."""
    planned = []
    label = strategy.spread_by
    for index, batch in enumerate(batches):
        values = {labels[key].get(label) for key in batch} if label is not None else set()
        gate: Literal["approval", "pause"] | None = None
        if index + 1 < len(batches):
            if strategy.approval_every_batch or index + 1 in strategy.approval_after_batches:
                gate = "approval"
            elif strategy.pause_between_batches_s:
                gate = "pause"
        planned.append(
            PlannedBatch(
                number=index + 1,
                node_keys=list(batch),
                spread=sorted(values, key=lambda value: (value is not None, value or "")),
                gate_after=gate,
                pause_after_s=strategy.pause_between_batches_s if gate == "pause" else None,
            )
        )
    return planned


def plan_table(batches: list[PlannedBatch], title: str = "Batches") -> Table:
    """The batch table of `reactor release plan`."""
    table = Table(title=title)
    for column in ("batch", "nodes", "spread", "after it"):
        table.add_column(column)
    for batch in batches:
        spread = ", ".join(value or "-" for value in batch.spread) or "-"
        gate = f"pause {batch.pause_after_s:g}s" if batch.gate_after == "pause" else batch.gate_after
        table.add_row(Text(str(batch.number)), Text(" ".join(batch.node_keys)), Text(spread), Text(gate or "-"))
    return table


class Reporter:
    """Prints events as they happen; on a terminal with `live`, also keeps a table of node progress."""

    def __init__(self, console: Console, *, live: bool) -> None:
        self.console = console
        self.live_enabled = live and console.is_terminal
        self._rows: dict[str, tuple[str, str]] = {}
        self._live: Live | None = None

    def __enter__(self) -> Self:
        if self.live_enabled:
            self._live = Live(self._table(), console=self.console, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def __call__(self, event: Event) -> None:
        """Show one event."""
        self.console.print(Text(describe(event)), soft_wrap=True)
        if isinstance(event, NodeDeployed):
            self._rows[event.node_key] = ("success", event.version)
        elif isinstance(event, NodeFailed):
            self._rows[event.node_key] = ("failed", event.current_version or "-")
        elif isinstance(event, NodeRolledBack):
            self._rows[event.node_key] = ("rolled_back", event.version)
        elif isinstance(event, BatchStarted):
            for key in event.node_keys:
                self._rows.setdefault(key, ("deploying", "-"))
        if self._live is not None:
            self._live.update(self._table())

    def _table(self) -> Table:
        table = Table(title="Release progress")
        table.add_column("node")
        table.add_column("state")
        table.add_column("version")
        for key, (state, version) in sorted(self._rows.items()):
            table.add_row(Text(key), Text(state, style=STATE_STYLE.get(state, "")), Text(version))
        return table
