"""started and shielded: work runs in the caller's task up to its first wait and in a task of its own only from there;
shielded keeps asyncio.shield's promise (a cancelled caller stops waiting, the work goes on)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any

import pytest

from reactor.eager import run_all, shielded, started

pytestmark = pytest.mark.unit


def _counting_tasks() -> list[object]:
    """Count the tasks made on the running loop from now on: the list grows by one a task."""
    made: list[object] = []
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> asyncio.Task[Any]:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    return made


async def test_work_that_finishes_without_waiting_gives_its_result_and_makes_no_task() -> None:
    steps: list[str] = []

    async def write() -> int:
        steps.append("written")
        return 7

    made = _counting_tasks()
    try:
        assert await shielded(write()) == 7
    finally:
        asyncio.get_running_loop().set_task_factory(None)
    assert steps == ["written"]
    assert made == []


async def test_work_that_raises_before_waiting_raises_to_the_caller() -> None:
    async def refused() -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await shielded(refused())


async def test_work_that_waits_gives_its_result_and_its_errors_after_the_wait() -> None:
    async def slow(fail: bool) -> str:
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        if fail:
            raise ValueError("after the wait")
        return "done"

    assert await shielded(slow(False)) == "done"
    with pytest.raises(ValueError, match="after the wait"):
        await shielded(slow(True))


async def test_a_wait_that_fails_is_told_to_the_work_which_may_handle_it() -> None:
    failing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def tolerant() -> str:
        try:
            await failing
        except OSError as exc:
            return f"handled {exc}"
        return "not told"

    asyncio.get_running_loop().call_soon(failing.set_exception, OSError("gone"))
    assert await shielded(tolerant()) == "handled gone"


async def test_a_caller_cancelled_while_the_work_waits_stops_waiting_and_the_work_goes_on_to_its_end() -> None:
    gate, steps = asyncio.Event(), list[str]()

    async def write() -> str:
        steps.append("started")
        await gate.wait()
        steps.append("finished")
        return "written"

    caller = asyncio.create_task(shielded(write()))
    while not steps:
        await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert steps == ["started"]
    gate.set()
    [rest] = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    assert await rest == "written"
    assert steps == ["started", "finished"]


@pytest.mark.parametrize("turns", [0, 3], ids=["before-its-first-step", "while-it-waits"])
async def test_the_shielded_rest_cancelled_itself_cancels_the_work_where_it_waits(turns: int) -> None:
    """As a task would: when the loop cancels the task that runs the work's rest (it is closing), the work gets the
    cancellation where it waits and may clean up, whether that task had made its first step or not."""
    steps: list[str] = []

    async def write() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            steps.append("cleaned up")
            raise

    caller = asyncio.create_task(shielded(write()))
    await asyncio.sleep(0)
    [rest] = [task for task in asyncio.all_tasks() if task not in (asyncio.current_task(), caller)]
    for _ in range(turns):
        await asyncio.sleep(0)
    rest.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rest
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert steps == ["cleaned up"]


_SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="caller's")


async def test_started_work_runs_at_once_in_a_context_of_its_own_and_only_waiting_work_gets_a_task() -> None:
    """Work that does not wait is done when `started` returns, with no task; work that waits goes on in a task. Both
    run in a copy of the caller's context, as a task's work does: what they set does not leak into the caller's."""
    order: list[str] = []

    async def at_once(name: str) -> str:
        _SEEN.set(name)
        order.append(name)
        return _SEEN.get()

    async def waits(name: str) -> str:
        _SEEN.set(name)
        order.append(f"{name} began")
        await asyncio.sleep(0)
        order.append(f"{name} ended")
        return _SEEN.get()

    made = _counting_tasks()
    try:
        results = [started(at_once("a")), started(waits("b")), started(at_once("c"))]
        assert order == ["a", "b began", "c"]
        assert [result.done() for result in results] == [True, False, True]
        assert len(made) == 1
        assert _SEEN.get() == "caller's"
        assert [await result for result in results] == ["a", "b", "c"]
    finally:
        asyncio.get_running_loop().set_task_factory(None)
    assert order == ["a", "b began", "c", "b ended"]


async def test_run_all_waits_for_every_one_and_then_raises_the_first_error() -> None:
    """An error of one does not leave the others running unattended: all are done before it is raised; those that
    did not wait never had a task."""
    ended: list[str] = []

    async def fails_at_once() -> None:
        raise ValueError("refused")

    async def at_once() -> None:
        ended.append("at once")

    async def slow(fail: bool) -> None:
        await asyncio.sleep(0.01)
        ended.append("slow")
        if fail:
            raise OSError("late")

    made = _counting_tasks()
    try:
        with pytest.raises(ValueError, match="refused"):
            await run_all([at_once(), fails_at_once(), slow(True), at_once()])
    finally:
        asyncio.get_running_loop().set_task_factory(None)
    assert ended == ["at once", "at once", "slow"]
    assert len(made) == 1
    with pytest.raises(OSError, match="late"):
        await run_all([at_once(), slow(True)])
    await run_all([at_once(), slow(False)])


async def test_a_caller_cancelled_while_waiting_for_all_cancels_those_still_running_and_they_have_stopped() -> None:
    stopped: list[str] = []

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append("hangs")

    async def at_once() -> None:
        stopped.append("at once")

    caller = asyncio.create_task(run_all([at_once(), hangs()]))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert stopped == ["at once", "hangs"]
