"""KeyedDispatcher: draining and cancelling only the messages of revoked partitions; `deliver`: dead letters."""

from __future__ import annotations

import asyncio

import pytest

from reactor.adapters.dispatch import (
    DLQ_REASON,
    DLQ_TOPIC,
    MAX_REASON_CHARS,
    KeyedDispatcher,
    dead_letter_record,
    deliver,
)
from reactor.codec import Record
from reactor.errors import AccessDenied, BackendUnavailable, InvalidInput, first_reactor_error
from reactor.events import EVENT_ID, Event, Topic

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


async def test_at_most_limit_run_at_once_and_a_busy_key_hands_its_slot_to_one_waiting() -> None:
    """With 2 slots: a and b run, c waits; once a's first message finishes, c runs before a's second (a waits behind
    it), and no more than 2 ever run."""
    gates = {name: asyncio.Event() for name in ("a1", "a2", "b1", "c1")}
    started: list[str] = []
    done: list[str] = []
    most = 0

    async def process(message: str) -> None:
        nonlocal most
        started.append(message)
        most = max(most, dispatcher.running)
        await gates[message].wait()

    dispatcher: KeyedDispatcher[str] = KeyedDispatcher(process, done.append, limit=2)
    for key, message in ((b"a", "a1"), (b"a", "a2"), (b"b", "b1"), (b"c", "c1")):
        dispatcher.submit(key, message)

    async def started_count(count: int) -> None:
        async with asyncio.timeout(5):
            while len(started) < count:
                await asyncio.sleep(0)

    await started_count(2)
    for _ in range(5):  # c has no slot however long it waits
        await asyncio.sleep(0)
    assert started == ["a1", "b1"]
    gates["a1"].set()
    await started_count(3)
    assert started[2] == "c1", "the waiting key got the freed slot before a's next message"
    gates["c1"].set()
    await started_count(4)
    assert started[3] == "a2"
    gates["b1"].set()
    gates["a2"].set()
    assert await dispatcher.drain(5)
    assert done[:2] == ["a1", "c1"]
    assert sorted(done) == ["a1", "a2", "b1", "c1"]
    assert most == 2
    assert dispatcher.pending == 0
    assert dispatcher.running == 0


async def test_cancelled_lanes_give_their_slots_to_lanes_not_cancelled() -> None:
    """A slot freed by a cancelled lane goes to a waiting lane that was not cancelled, never to one that was."""
    gates = {name: asyncio.Event() for name in ("a1", "b1", "c1")}
    started: list[str] = []
    done: list[str] = []

    async def process(message: str) -> None:
        started.append(message)
        await gates[message].wait()

    dispatcher: KeyedDispatcher[str] = KeyedDispatcher(process, done.append, limit=1)
    dispatcher.submit(b"a", "a1")
    dispatcher.submit(b"b", "b1")  # waits
    dispatcher.submit(b"c", "c1")  # waits
    async with asyncio.timeout(5):
        while not started:
            await asyncio.sleep(0)
    await dispatcher.cancel(lambda message: message in ("a1", "b1"))
    gates["c1"].set()
    assert await dispatcher.drain(5)
    assert started == ["a1", "c1"]
    assert done == ["c1"]
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


async def _never_called(event: Event) -> None:
    raise AssertionError(f"an undecodable message reached the handler: {event!r}")


async def test_a_dead_letter_that_fails_for_a_while_is_retried_until_it_is_sent() -> None:
    """A retriable failure to dead-letter (the broker away for a moment) is retried, not raised: raised, it would
    end the message's lane, leaving the message unfinished and the messages queued behind it never run."""
    sent: list[tuple[Topic, Record, str]] = []
    failures = [BackendUnavailable("kafka away"), BackendUnavailable("kafka away")]

    async def send_to_dlq(topic: Topic, record: Record, reason: str) -> None:
        if failures:
            raise failures.pop()
        sent.append((topic, record, reason))

    record = Record(key=b"k", value=b"not json", headers=())
    await deliver(Topic.COMMANDS, record, _never_called, send_to_dlq, retry_delay_s=0.001)
    assert [(topic, parked) for topic, parked, _ in sent] == [(Topic.COMMANDS, record)]
    assert sent[0][2].startswith("not a CloudEvent")


async def test_a_dead_letter_that_cannot_be_sent_at_all_is_raised() -> None:
    async def send_to_dlq(topic: Topic, record: Record, reason: str) -> None:
        raise InvalidInput("dlq", "refused")

    with pytest.raises(InvalidInput):
        await deliver(Topic.COMMANDS, Record(None, b"", ()), _never_called, send_to_dlq, retry_delay_s=0.001)


async def test_a_reason_quoting_a_huge_value_is_shortened() -> None:
    """The reason quotes the refused header; cut, so the copy carrying both still fits the broker's limit."""
    reasons: list[str] = []

    async def send_to_dlq(topic: Topic, record: Record, reason: str) -> None:
        reasons.append(reason)

    record = Record(key=b"k", value=b"{}", headers=(("ce_specversion", b"1.0"), ("ce_id", b"x" * 100_000)))
    await deliver(Topic.COMMANDS, record, _never_called, send_to_dlq, retry_delay_s=0.001)
    whole = f"ce_id: {'x' * 100_000!r} does not match {EVENT_ID}"
    assert reasons == [f"{whole[:MAX_REASON_CHARS]}... ({len(whole) - MAX_REASON_CHARS} more characters)"]


def test_a_dead_letter_replaces_the_dead_letter_headers_the_message_carried() -> None:
    """A message that already carries a reason (a dead letter sent back to its topic, or a forged one) gets the new
    reason only: a reader taking the first reason header reads the product's."""
    record = Record(key=b"k", value=b"v", headers=(("a", b"1"), (DLQ_REASON, b"old"), (DLQ_TOPIC, b"releases")))
    letter = dead_letter_record(Topic.COMMANDS, record, "new")
    assert letter.headers == (("a", b"1"), (DLQ_REASON, b"new"), (DLQ_TOPIC, b"commands"))


async def test_an_error_process_lets_out_is_kept_for_the_consumer_and_its_message_is_not_done() -> None:
    """An error out of `process` (deliver lets AccessDenied out) is not lost with its lane's task: `failed()` gives
    it to the consumer, the message and the one queued behind it on its key are not reported done, and other keys
    go on."""
    done: list[str] = []

    async def process(message: str) -> None:
        if message == "a1":
            raise AccessDenied("kafka: not allowed to write outcomes")

    dispatcher: KeyedDispatcher[str] = KeyedDispatcher(process, done.append, limit=4)
    for key, message in ((b"a", "a1"), (b"a", "a2"), (b"b", "b1")):
        dispatcher.submit(key, message)
    async with asyncio.timeout(5):
        failure = await dispatcher.failed()
        assert await dispatcher.drain(5)
    assert isinstance(failure, AccessDenied)
    assert done == ["b1"]
    assert dispatcher.pending == 2


async def test_a_task_groups_reactor_error_is_raised_as_itself() -> None:
    """`first_reactor_error` turns a task group's ExceptionGroup into its ReactorError (the CLI's exit codes and
    messages depend on it), and lets any other group through unchanged."""

    async def refused() -> None:
        raise AccessDenied("kafka: not allowed to write outcomes")

    async def crashed() -> None:
        raise ValueError("a bug")

    with pytest.raises(AccessDenied, match="not allowed"), first_reactor_error():
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(refused())
    with pytest.raises(ExceptionGroup), first_reactor_error():
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(crashed())
