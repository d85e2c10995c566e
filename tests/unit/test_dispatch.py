"""KeyedDispatcher: draining and cancelling only the messages of revoked partitions."""

from __future__ import annotations

import asyncio

import pytest

from reactor.adapters.dispatch import KeyedDispatcher

pytestmark = pytest.mark.unit


async def test_cancel_of_picked_messages_stops_their_running_handler_and_leaves_the_rest_running() -> None:
    """Messages picked (a revoked partition's) are cancelled, running ones included, and never reported done; a
    message of another partition queued behind one of them in the same key is queued again and finishes."""
    started: list[str] = []
    cancelled: list[str] = []
    done: list[str] = []
    gates = {name: asyncio.Event() for name in ("a1", "b1", "a2-other-partition")}

    async def process(message: str) -> None:
        started.append(message)
        try:
            await gates[message].wait()
        except asyncio.CancelledError:
            cancelled.append(message)
            raise

    dispatcher: KeyedDispatcher[str] = KeyedDispatcher(process, done.append, limit=10)
    dispatcher.submit(b"a", "a1")
    dispatcher.submit(b"a", "a2-other-partition")
    dispatcher.submit(b"b", "b1")
    async with asyncio.timeout(5):
        while len(started) < 2:
            await asyncio.sleep(0)

    def revoked(message: str) -> bool:
        return message == "a1"

    assert not await dispatcher.drain(0.05, revoked), "the revoked message still runs after the grace period"
    await dispatcher.cancel(revoked)
    assert cancelled == ["a1"]
    gates["a2-other-partition"].set()
    gates["b1"].set()
    assert await dispatcher.drain(5)
    assert sorted(done) == ["a2-other-partition", "b1"]
    assert dispatcher.pending == 0


async def test_drain_of_picked_messages_returns_once_they_finish_while_others_still_run() -> None:
    gates = {name: asyncio.Event() for name in ("a1", "b1")}
    done: list[str] = []

    async def process(message: str) -> None:
        await gates[message].wait()

    dispatcher: KeyedDispatcher[str] = KeyedDispatcher(process, done.append, limit=10)
    dispatcher.submit(b"a", "a1")
    dispatcher.submit(b"b", "b1")
    gates["a1"].set()
    assert await dispatcher.drain(5, lambda message: message == "a1")
    assert done == ["a1"]
    await dispatcher.cancel()
    assert dispatcher.pending == 0
