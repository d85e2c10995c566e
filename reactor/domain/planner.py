"""Turn a release plan's nodes and strategy into batches."""

from __future__ import annotations

import math
from collections.abc import Sequence

from reactor.errors import InvalidInput
from reactor.events import BatchSize, NodeTarget, Strategy


def resolve_size(size: BatchSize, total: int) -> int:
    """A batch size or budget as a count of nodes: percent sizes round up (a 1% batch is never empty)."""
    if isinstance(size, int):
        return size
    return math.ceil(total * int(size.rstrip("%")) / 100)


def spread(nodes: Sequence[NodeTarget], label: str) -> list[NodeTarget]:
    """Nodes interleaved across the values of `label` (round robin, values in order of first appearance).

    Cutting the result into batches gives every batch nodes of as many label values (zones, racks) as it can.
    """
    groups: dict[str, list[NodeTarget]] = {}
    for node in nodes:
        groups.setdefault(node.labels.get(label, ""), []).append(node)
    interleaved: list[NodeTarget] = []
    for round_index in range(max((len(group) for group in groups.values()), default=0)):
        interleaved.extend(group[round_index] for group in groups.values() if round_index < len(group))
    return interleaved


def plan_batches(nodes: Sequence[NodeTarget | str], strategy: Strategy) -> list[list[str]]:
    """Split nodes into batches: explicit lists as given; otherwise an optional canary, then the listed sizes
    in plan order (spread across `spread_by` first), the last size repeating until every node is placed."""
    if not nodes:
        raise InvalidInput("nodes", "a release needs at least one node")
    explicit = [batch for batch in strategy.batches if isinstance(batch, list)]
    if explicit:
        return [list(batch) for batch in explicit]
    if strategy.spread_by is not None:
        targets = [node for node in nodes if isinstance(node, NodeTarget)]
        keys = [node.node_key for node in spread(targets, strategy.spread_by)]
    else:
        keys = [node.node_key if isinstance(node, NodeTarget) else node for node in nodes]
    total = len(keys)
    sizes: list[BatchSize] = [size for size in strategy.batches if not isinstance(size, list)]
    batches: list[list[str]] = []
    position = 0
    if strategy.canary is not None:
        canary = max(1, resolve_size(strategy.canary, total))
        batches.append(keys[:canary])
        position = canary
    index = 0
    while position < total:
        size = max(1, resolve_size(sizes[min(index, len(sizes) - 1)], total))
        batches.append(keys[position : position + size])
        position += size
        index += 1
    return batches


def failure_budget(budget: BatchSize, total: int) -> int:
    """How many failed nodes a budget tolerates out of `total`; one more spends it."""
    if isinstance(budget, int):
        return budget
    return math.floor(total * int(budget.rstrip("%")) / 100)
