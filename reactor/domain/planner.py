"""Turn a release plan's nodes and strategy into batches."""

from __future__ import annotations

import math

from reactor.errors import InvalidInput
from reactor.events import BatchSize, Strategy


def resolve_size(size: BatchSize, total: int) -> int:
    """A batch size or budget as a count of nodes: percent sizes round up (a 1% batch is never empty)."""
    if isinstance(size, int):
        return size
    return math.ceil(total * int(size.rstrip("%")) / 100)


def plan_batches(node_keys: list[str], strategy: Strategy) -> list[list[str]]:
    """Split nodes into batches in plan order; the last listed size repeats until every node is placed."""
    if not node_keys:
        raise InvalidInput("nodes", "a release needs at least one node")
    total = len(node_keys)
    batches: list[list[str]] = []
    position = 0
    index = 0
    while position < total:
        size = max(1, resolve_size(strategy.batches[min(index, len(strategy.batches) - 1)], total))
        batches.append(node_keys[position : position + size])
        position += size
        index += 1
    return batches


def failure_budget(strategy: Strategy, total: int) -> int:
    """How many failed nodes the release tolerates; one more halts it."""
    if isinstance(strategy.failure_budget, int):
        return strategy.failure_budget
    return math.floor(total * int(strategy.failure_budget.rstrip("%")) / 100)
