"""Group commit: concurrent single calls of one kind become one round trip per batch.

A `Batcher` runs its operation on a batch of items at a time. The first call starts a batch at once (an idle
process pays no delay); calls made while a batch is in flight queue up and go together as the next one, up to
`max_batch` items. So the batch size follows the load: one when calls come one by one, the consumers'
concurrency when they come together. Each caller gets its own item's result, or the batch's error.

A caller cancelled while its item waits or runs only stops waiting: the item may still be executed (as a call
whose reply was lost may have been). Operations whose effect must not be orphaned say so with `settle`: a cancelled
caller then waits for its item's result (shielded) before the cancellation goes on (see MongoStore's locks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

I = TypeVar("I")  # noqa: E741  # one item of a batch
R = TypeVar("R")  # one item's result
T = TypeVar("T")

BatchOperation = Callable[[Sequence[I]], Awaitable[Sequence[R]]]


async def settled(work: Coroutine[Any, Any, T]) -> T:
    """Await `work`; if the caller is cancelled meanwhile, `work` still runs to its end before the cancellation
    goes on, so that what the caller does next (give a lock back) is not overtaken by it."""
    running = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        if not running.done():
            await asyncio.wait([running])
        raise


class Batcher(Generic[I, R]):
    """Runs `operation` on the items of concurrent calls, one batch in flight at a time.

    `operation` returns one result per item, in the items' order; if it raises, every caller of that batch gets
    the error. Batches run in the order their first call came.
    """

    def __init__(self, operation: BatchOperation[I, R], *, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.operation = operation
        self.max_batch = max_batch
        self._waiting: list[tuple[I, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None
        # Sizes of the batches run so far (tests and benchmarks read them).
        self.batches = 0
        self.items = 0

    async def __call__(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def settled(self, item: I) -> R:
        """As a call, but a cancelled caller still waits until its item is done (its effect then is known)."""
        return await settled(self(item))

    async def _run(self) -> None:
        while self._waiting:
            # A caller cancelled before its batch started never had its item run.
            self._waiting = [(item, future) for item, future in self._waiting if not future.cancelled()]
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            if not batch:
                break
            items = [item for item, _ in batch]
            self.batches += 1
            self.items += len(items)
            try:
                results = await self.operation(items)
            except asyncio.CancelledError:  # this task itself is cancelled (its loop is closing): so is every call
                for _, future in batch + self._waiting:
                    future.cancel()
                self._waiting.clear()
                raise
            except Exception as exc:  # noqa: BLE001  # each caller gets its batch's error; the next batch goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if len(results) != len(items):
                error = RuntimeError(f"batch operation returned {len(results)} results for {len(items)} items")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
