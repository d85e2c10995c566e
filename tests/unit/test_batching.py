"""Batcher (group commit): batch sizes follow the load, each caller gets its own answer, errors and cancellations.

Every ordering here is held by latches (events), never by sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from reactor.adapters.batching import Batcher

pytestmark = pytest.mark.unit


class Gate:
    """A batch operation that doubles its items, records each batch and waits on a latch before answering; `fail`
    fails the next batch only."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = asyncio.Event()
        self.open = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        await self.open.wait()
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        return [item * 2 for item in items]


async def until(condition: object, *, what: str) -> None:
    """Yield to the loop until `condition()` holds (bounded, so a broken batcher fails rather than hangs)."""
    for _ in range(1000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


async def test_a_call_alone_goes_at_once_in_a_batch_of_one() -> None:
    gate = Gate()
    gate.open.set()
    batcher = Batcher(gate)
    assert await batcher(21) == 42
    assert gate.batches == [[21]]
    assert (batcher.batches, batcher.items) == (1, 1)


async def test_calls_made_while_a_batch_runs_go_together_as_the_next_batch() -> None:
    gate = Gate()
    batcher = Batcher(gate)
    first = asyncio.create_task(batcher(1))
    await gate.entered.wait()
    waiting = [asyncio.create_task(batcher(item)) for item in (2, 3, 4, 5)]
    await until(lambda: len(batcher._waiting) == 4, what="four calls queued")
    assert gate.batches == [[1]], "a second batch started while the first was in flight"
    gate.open.set()
    assert await first == 2
    assert [await task for task in waiting] == [4, 6, 8, 10]
    assert gate.batches == [[1], [2, 3, 4, 5]]


async def test_a_batch_is_never_larger_than_max_batch() -> None:
    gate = Gate()
    batcher = Batcher(gate, max_batch=3)
    first = asyncio.create_task(batcher(0))
    await gate.entered.wait()
    rest = [asyncio.create_task(batcher(item)) for item in range(1, 8)]
    await until(lambda: len(batcher._waiting) == 7, what="seven calls queued")
    gate.open.set()
    assert await asyncio.gather(first, *rest) == [item * 2 for item in range(8)]
    assert gate.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    gate = Gate()
    batcher = Batcher(gate)
    gate.fail = ConnectionError("server went away")
    first = asyncio.create_task(batcher(1))
    await gate.entered.wait()
    gate.entered.clear()
    second = [asyncio.create_task(batcher(item)) for item in (2, 3)]
    await until(lambda: len(batcher._waiting) == 2, what="two calls queued")
    gate.open.set()
    with pytest.raises(ConnectionError, match="went away"):
        await first
    assert [await task for task in second] == [4, 6]
    assert gate.batches == [[1], [2, 3]]


async def test_a_caller_cancelled_before_its_batch_starts_has_its_item_left_out() -> None:
    gate = Gate()
    batcher = Batcher(gate)
    first = asyncio.create_task(batcher(1))
    await gate.entered.wait()
    kept, dropped = asyncio.create_task(batcher(2)), asyncio.create_task(batcher(3))
    await until(lambda: len(batcher._waiting) == 2, what="two calls queued")
    dropped.cancel()
    await asyncio.wait([dropped])
    gate.open.set()
    assert (await first, await kept) == (2, 4)
    assert gate.batches == [[1], [2]]


async def test_a_settled_call_cancelled_while_its_item_runs_waits_for_it_then_is_cancelled() -> None:
    gate = Gate()
    batcher = Batcher(gate)
    call = asyncio.create_task(batcher.settled(7))
    await gate.entered.wait()
    call.cancel()
    await until(lambda: call.cancelling() == 1, what="the cancel delivered")
    for _ in range(20):
        await asyncio.sleep(0)
    assert not call.done(), "a settled call stopped waiting while its item still ran"
    gate.open.set()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert gate.batches == [[7]]


async def test_a_plain_call_cancelled_while_its_item_runs_stops_waiting_at_once() -> None:
    gate = Gate()
    batcher = Batcher(gate)
    call = asyncio.create_task(batcher(7))
    await gate.entered.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    gate.open.set()
    assert await batcher(8) == 16  # the batcher goes on
    assert gate.batches == [[7], [8]]


async def test_an_operation_answering_the_wrong_number_of_results_fails_its_callers() -> None:
    async def short(items: Sequence[int]) -> list[int]:
        return list(items)[:-1]

    batcher = Batcher(short)
    first = asyncio.create_task(batcher(1))
    second = asyncio.create_task(batcher(2))
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        await first
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        await second


def test_max_batch_must_be_positive() -> None:
    async def echo(items: Sequence[int]) -> list[int]:
        return list(items)

    with pytest.raises(ValueError, match="at least 1"):
        Batcher(echo, max_batch=0)


async def test_callers_are_cancelled_when_the_batch_task_itself_is() -> None:
    gate = Gate()
    batcher = Batcher(gate)
    running, queued = asyncio.create_task(batcher(1)), None
    await gate.entered.wait()
    queued = asyncio.create_task(batcher(2))
    await until(lambda: len(batcher._waiting) == 1, what="one call queued")
    assert batcher._runner is not None
    batcher._runner.cancel()
    for call in (running, queued):
        with pytest.raises(asyncio.CancelledError):
            await call
    gate.open.set()
    assert await batcher(3) == 6  # a new call starts a new batch task
