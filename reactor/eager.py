"""Work run at once in the caller's task up to its first wait, and in a task of its own only from there.

A task costs an object and a turn of the event loop. On the embedded store's hot path most work never waits (its calls
answer at once), so a task a node for it was a tenth of a node's whole cost. `started(work)` runs `work` right away,
in a copy of the caller's context as a task would, up to its first wait: work that finishes before waiting is done,
with no task; work that waits goes on in a task from where it stopped. (Python 3.12's eager tasks do this; this code
runs on 3.11.) Unlike in a task, `asyncio.current_task()` in the part before the first wait is the caller's: work
that needs its own task must not be started so.

`shielded(work)` is `asyncio.shield(work)` on that footing: a caller cancelled while `work` waits stops waiting and
`work` goes on to its end.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator, Iterable
from typing import Any, TypeVar, cast

T = TypeVar("T")


def started(work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run `work` now up to its first wait; the future of its result (done already when it did not wait)."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[T]
    try:
        result = _start(work, loop)
    except StopIteration as done:
        result = loop.create_future()
        result.set_result(cast(T, done.value))
    except asyncio.CancelledError:
        result = loop.create_future()
        result.cancel()
    except Exception as exc:  # noqa: BLE001  # the work's own error is its result, as a task's would be
        result = loop.create_future()
        result.set_exception(exc)
    return result


async def shielded(work: Coroutine[Any, Any, T]) -> T:
    """Await `work` as `asyncio.shield(work)` does (a cancelled caller stops waiting; `work` goes on), with no task
    when `work` finishes without waiting."""
    try:
        rest = _start(work, asyncio.get_running_loop())
    except StopIteration as done:
        return cast(T, done.value)
    return await asyncio.shield(rest)


async def run_all(works: Iterable[Coroutine[Any, Any, object]]) -> None:
    """Run `works`, each started at once in turn (`started`), and return once every one is done (none is left
    running), raising the first error if any. A caller cancelled meanwhile cancels those still running, and they
    have stopped when its cancellation goes on (as `asyncio.gather`'s)."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Task[object]] = []
    errors: list[BaseException] = []
    for work in works:
        try:
            waiting.append(_start(work, loop))
        except StopIteration:
            continue
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001  # raised once the others are done
            errors.append(exc)
    if waiting:
        try:
            await asyncio.wait(waiting)
        except asyncio.CancelledError:
            for task in waiting:
                task.cancel()
            await asyncio.wait(waiting)
            raise
        errors.extend(error for task in waiting if (error := task.exception()) is not None)
    if errors:
        raise errors[0]


def _start(work: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop) -> asyncio.Task[T]:
    """Run `work` up to its first wait, in a copy of this context (as a task would), and go on in a task from there.
    StopIteration when it finished without waiting (its value is the result); its error when it raised."""
    context = contextvars.copy_context()
    waiting = context.run(work.send, None)
    rest = _rest(work, waiting)
    rest.send(None)  # to its first stop, inside its handling: a task cancelled before its first step tells `work` too
    return loop.create_task(rest, context=context)


@types.coroutine
def _rest(work: Coroutine[Any, Any, T], waiting: Any) -> Generator[Any, Any, T]:
    """The rest of `work`, stopped where it waits for `waiting` (what it gave its task to wait for): the task that
    runs this waits for it, then `work` goes on; or `work` is told how the wait failed (a cancellation too)."""
    first = True
    while True:
        try:
            if first:
                first = False
                yield None  # where `started` leaves this; the task's first step comes in here
            yield waiting
        except GeneratorExit:  # this is closed before its end: so is `work`
            work.close()
            raise
        except BaseException as exc:  # noqa: BLE001  # the wait failed, or this task is cancelled: `work` is told
            try:
                waiting = work.throw(exc)
            except StopIteration as done:
                return cast(T, done.value)
            continue
        return (yield from cast(Generator[Any, Any, T], work))
