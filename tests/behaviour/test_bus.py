"""Behaviour of the EventBus, written once against the `bus` fixture (every backend).

Consumers run in a task; each test waits (bounded) until the handler has seen what it should, then cancels them.
The fixture's parameters carry the backend marks (`unit` for the memory bus), so this module adds none of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from aiokafka.partitioner import murmur2

from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import Record, decode, encode
from reactor.errors import (
    AccessDenied,
    BackendUnavailable,
    ConflictError,
    ExecutorNotFound,
    IllegalTransition,
    InvalidInput,
    NodeBusy,
    ReactorError,
)
from reactor.events import Event, ReleaseApproved, ReleasePaused, Topic
from reactor.ports import EventBus, Handler
from tests.conftest import fresh_kafka_bus
from tests.support import running

TIMEOUT_S = 30.0  # a bound for failures only; passing tests return as soon as the condition holds
POLL_S = 0.002
DLQ_REASON = "reactor_dlq_reason"


# --- raw messages and the dead-letter topic: the one place to adapt for a backend --------------------


async def publish_raw(bus: EventBus, topic: Topic, record: Record) -> None:
    """Put a raw record, valid or not, on `topic`, as an outside producer could."""
    await bus.publish_raw(topic, record)


async def dead_letters(bus: EventBus) -> list[Record]:
    """Every record on the dead-letter topic so far, in order."""
    return await bus.history(Topic.DLQ)


# --- helpers ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def consuming(bus: EventBus, topics: Sequence[Topic], group: str, handler: Handler) -> AsyncIterator[None]:
    """Run a consumer of `group` while the block runs; cancel it after, surfacing any crash of its own."""
    async with running(bus.consume(topics, group, handler)):
        yield


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Return once `condition()` holds; fail the test if it does not within TIMEOUT_S."""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while not condition():
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise AssertionError(f"timed out after {TIMEOUT_S}s waiting until {what}") from None


async def eventually_dead_letters(bus: EventBus, count: int) -> list[Record]:
    """The dead letters, once there are at least `count` of them; fails the test if they do not come."""
    records: list[Record] = []
    pause = POLL_S
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while len(records := await dead_letters(bus)) < count:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.1)  # reading a topic's history may be costly (a Kafka consumer per call)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {count} dead letters, have {len(records)}") from None
    return records


def paused(release_id: str, sequence: int) -> ReleasePaused:
    """An event keyed by `release_id`, numbered by `sequence`."""
    return ReleasePaused(release_id=release_id, reason=str(sequence))


def sequence_of(event: Event) -> tuple[str, int]:
    """The key and number of an event made by `paused`."""
    assert isinstance(event, ReleasePaused)
    return event.release_id, int(event.reason)


def reason_of(record: Record) -> str:
    reason = record.header(DLQ_REASON)
    assert reason is not None, f"dead letter without a {DLQ_REASON} header: {record.headers}"
    return reason.decode()


# --- ordering and concurrency -------------------------------------------------------------------


async def test_events_of_one_key_are_handled_in_publish_order_even_when_earlier_ones_are_slow(bus: EventBus) -> None:
    started: list[tuple[str, int]] = []
    finished: list[tuple[str, int]] = []
    count = 5

    async def handler(event: Event) -> None:
        key, number = sequence_of(event)
        started.append((key, number))
        await asyncio.sleep(0.01 * (count - number))  # earlier events take longer
        finished.append((key, number))

    async with consuming(bus, [Topic.RELEASES], "ordered", handler):
        for number in range(count):
            await bus.publish(paused("rel-a", number))
            await bus.publish(paused("rel-b", number))
        await eventually(lambda: len(finished) == 2 * count, "every event is handled")

    for key in ("rel-a", "rel-b"):
        expected = [(key, number) for number in range(count)]
        assert [item for item in started if item[0] == key] == expected
        assert [item for item in finished if item[0] == key] == expected


async def test_events_of_different_keys_are_handled_concurrently(bus: EventBus) -> None:
    inside = {"rel-a": asyncio.Event(), "rel-b": asyncio.Event()}
    met: list[str] = []

    async def handler(event: Event) -> None:
        key = event.subject()
        inside[key].set()
        other = "rel-b" if key == "rel-a" else "rel-a"
        await inside[other].wait()  # never returns if the bus runs the two keys one after the other
        met.append(key)

    async with consuming(bus, [Topic.RELEASES], "concurrent", handler):
        await bus.publish(ReleaseApproved(release_id="rel-a"))
        await bus.publish(ReleaseApproved(release_id="rel-b"))
        await eventually(lambda: sorted(met) == ["rel-a", "rel-b"], "both handlers are inside at the same time")


async def test_one_slow_key_does_not_hold_up_another(bus: EventBus) -> None:
    release_slow = asyncio.Event()
    handled: list[str] = []

    async def handler(event: Event) -> None:
        if event.subject() == "rel-slow":
            await release_slow.wait()
        handled.append(event.subject())

    async with consuming(bus, [Topic.RELEASES], "slow", handler):
        await bus.publish(ReleaseApproved(release_id="rel-slow"))
        for _ in range(3):
            await bus.publish(ReleaseApproved(release_id="rel-fast"))
        await eventually(lambda: handled == ["rel-fast"] * 3, "the fast key is handled while the slow one waits")
        release_slow.set()
        await eventually(lambda: len(handled) == 4, "the slow key is handled once released")
    assert handled[-1] == "rel-slow"


# --- retries and the dead-letter topic ----------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [NodeBusy("local/h1/api is busy"), ConflictError("lost a CAS"), BackendUnavailable("store down")],
    ids=lambda error: type(error).__name__,
)
async def test_retriable_error_gets_the_event_again_until_it_is_handled_once(
    bus: EventBus, error: ReactorError
) -> None:
    assert error.retriable
    flaky = paused("rel-1", 0)
    after = paused("rel-1", 1)
    attempts: Counter[str] = Counter()
    handled: list[str] = []

    async def handler(event: Event) -> None:
        attempts[event.event_id] += 1
        if event.event_id == flaky.event_id and attempts[event.event_id] <= 2:
            raise error
        handled.append(event.event_id)

    async with consuming(bus, [Topic.RELEASES], "retry", handler):
        await bus.publish(flaky)
        await bus.publish(after)
        await eventually(lambda: after.event_id in handled, "the event after the flaky one is handled")

    # Same key: the later event waits for the retried one, which succeeds exactly once.
    assert handled == [flaky.event_id, after.event_id]
    assert attempts[flaky.event_id] == 3
    assert attempts[after.event_id] == 1
    assert await dead_letters(bus) == []


@pytest.mark.parametrize(
    "error",
    [IllegalTransition("finish from pending"), InvalidInput("version", "bad"), ExecutorNotFound("no executor: x")],
    ids=lambda error: type(error).__name__,
)
async def test_non_retriable_error_dead_letters_the_event_and_the_consumer_goes_on(
    bus: EventBus, error: ReactorError
) -> None:
    assert not error.retriable
    bad = paused("rel-1", 0)
    attempts: Counter[str] = Counter()
    handled: list[str] = []

    async def handler(event: Event) -> None:
        attempts[event.event_id] += 1
        if event.event_id == bad.event_id:
            raise error
        handled.append(event.event_id)

    async with consuming(bus, [Topic.RELEASES], "dlq", handler):
        await bus.publish(bad)
        same_key = paused("rel-1", 1)
        await bus.publish(same_key)
        [letter] = await eventually_dead_letters(bus, 1)
        later = paused("rel-2", 0)
        await bus.publish(later)
        await eventually(lambda: len(handled) == 2, "the events after the failing one are handled")

    assert sorted(handled) == sorted([same_key.event_id, later.event_id])
    assert attempts[bad.event_id] == 1
    assert str(error) in reason_of(letter)
    dead_event, _ = decode(letter)
    assert dead_event == bad
    assert len(await dead_letters(bus)) == 1


async def test_handler_crash_dead_letters_the_event_and_the_consumer_goes_on(bus: EventBus) -> None:
    bad = paused("rel-1", 0)
    handled: list[str] = []

    async def handler(event: Event) -> None:
        if event.event_id == bad.event_id:
            raise RuntimeError("handler bug")
        handled.append(event.event_id)

    async with consuming(bus, [Topic.RELEASES], "crash", handler):
        await bus.publish(bad)
        [letter] = await eventually_dead_letters(bus, 1)
        good = paused("rel-1", 1)
        await bus.publish(good)
        await eventually(lambda: handled == [good.event_id], "the next event is handled")

    assert "handler bug" in reason_of(letter)
    assert decode(letter)[0].event_id == bad.event_id


def invalid_records() -> list[tuple[str, Record]]:
    valid = encode(paused("rel-1", 0), "/tests")
    body = json.loads(valid.value)
    body["reason"] = 5
    renamed = tuple(
        (name, b"dev.deployreactor.release.unknown.v1" if name == "ce_type" else value) for name, value in valid.headers
    )
    return [
        ("garbage", Record(key=b"junk", value=b"\x00\x01 not an event", headers=())),
        ("no-key", Record(key=None, value=b"{", headers=())),
        ("unknown-type", Record(key=valid.key, value=valid.value, headers=renamed)),
        ("invalid-body", Record(key=valid.key, value=json.dumps(body).encode(), headers=valid.headers)),
    ]


@pytest.mark.parametrize("record", [record for _, record in invalid_records()], ids=[n for n, _ in invalid_records()])
async def test_invalid_record_goes_to_the_dead_letter_topic_and_the_consumer_goes_on(
    bus: EventBus, record: Record
) -> None:
    handled: list[Event] = []

    async def handler(event: Event) -> None:
        handled.append(event)

    async with consuming(bus, [Topic.RELEASES], "raw", handler):
        await publish_raw(bus, Topic.RELEASES, record)
        [letter] = await eventually_dead_letters(bus, 1)
        good = paused("rel-1", 1)
        await bus.publish(good)
        await eventually(lambda: len(handled) == 1, "the valid event after the invalid record is handled")

    assert handled == [good]
    assert letter.value == record.value
    assert letter.key == record.key
    assert reason_of(letter).strip()


async def test_events_the_consumer_does_not_want_never_reach_it_and_hold_nothing_up(bus: EventBus) -> None:
    """`wants` turns events down: they are finished without a call, and the events after them, of the same key too,
    go on in order. A message is still checked first: an invalid one is dead-lettered whatever it would have been."""
    handled: list[Event] = []

    async def handler(event: Event) -> None:
        handled.append(event)

    def wants(event: Event) -> bool:
        return isinstance(event, ReleasePaused)

    wanted = [paused("rel-1", number) for number in range(3)]
    async with running(bus.consume([Topic.RELEASES], "picky", handler, wants=wants)):
        for number, event in enumerate(wanted):
            for _ in range(5):  # turned down, same key
                await bus.publish(ReleaseApproved(release_id="rel-1", actor=f"ops-{number}"))
            await bus.publish(event)
        unwanted = ReleaseApproved(release_id="rel-1", actor="raw")
        await publish_raw(bus, Topic.RELEASES, encode(unwanted, "/outside"))
        await publish_raw(bus, Topic.RELEASES, Record(key=b"rel-1", value=b"{not json", headers=()))
        last = paused("rel-1", 3)
        await bus.publish(last)
        await eventually(lambda: len(handled) == 4, "every wanted event is handled")
        [letter] = await eventually_dead_letters(bus, 1)
        if isinstance(bus, MemoryBus):
            await bus.idle(timeout_s=TIMEOUT_S)  # every message finished: the turned-down ones too
    assert handled == [*wanted, last]
    assert letter.value == b"{not json"


# --- groups -------------------------------------------------------------------------------------


async def test_every_group_gets_every_event(bus: EventBus) -> None:
    seen: dict[str, list[str]] = {"pacer": [], "cli": []}

    def recorder(group: str) -> Handler:
        async def handle(event: Event) -> None:
            seen[group].append(event.event_id)

        return handle

    events = [paused("rel-1", 0), paused("rel-2", 0), paused("rel-1", 1)]
    async with (
        consuming(bus, [Topic.RELEASES], "pacer", recorder("pacer")),
        consuming(bus, [Topic.RELEASES], "cli", recorder("cli")),
    ):
        for event in events:
            await bus.publish(event)
        await eventually(lambda: all(len(ids) == 3 for ids in seen.values()), "both groups have every event")

    for ids in seen.values():
        assert sorted(ids) == sorted(event.event_id for event in events)


async def test_new_group_starts_at_the_beginning(bus: EventBus) -> None:
    events = [paused("rel-1", number) for number in range(3)]
    for event in events:
        await bus.publish(event)
    handled: list[Event] = []

    async def handler(event: Event) -> None:
        handled.append(event)

    async with consuming(bus, [Topic.RELEASES], "late", handler):
        await eventually(lambda: len(handled) == 3, "the late consumer has every earlier event")
    assert handled == events


async def test_consumer_gets_only_its_topics(bus: EventBus) -> None:
    handled: list[Event] = []

    async def handler(event: Event) -> None:
        handled.append(event)

    async with consuming(bus, [Topic.RELEASES], "releases-only", handler):
        await publish_raw(bus, Topic.OUTCOMES, encode(paused("rel-9", 0), "/tests"))
        wanted = paused("rel-1", 0)
        await bus.publish(wanted)
        await eventually(lambda: len(handled) >= 1, "the release event is handled")
        # Published after the outcome on the same key: a misrouted outcome would have been handled by now.
        marker = paused("rel-9", 1)
        await bus.publish(marker)
        await eventually(lambda: len(handled) >= 2, "the marker is handled")
    assert handled == [wanted, marker]


async def test_consumers_of_one_group_handle_each_event_once(bus: EventBus) -> None:
    handled: list[tuple[str, str]] = []

    def worker(name: str) -> Handler:
        async def handle(event: Event) -> None:
            await asyncio.sleep(0.001)
            handled.append((name, event.event_id))

        return handle

    events = [paused(f"rel-{number % 4}", number) for number in range(12)]
    async with (
        consuming(bus, [Topic.RELEASES], "workers", worker("one")),
        consuming(bus, [Topic.RELEASES], "workers", worker("two")),
    ):
        for event in events:
            await bus.publish(event)
            await asyncio.sleep(0)
        await eventually(lambda: len(handled) >= len(events), "every event is handled")
        # A duplicate of an earlier event would come before the marker published after it on the same key.
        markers = [paused(f"rel-{number}", 99) for number in range(4)]
        for marker in markers:
            await bus.publish(marker)
        await eventually(lambda: len(handled) >= len(events) + len(markers), "the markers are handled")

    assert sorted(event_id for _, event_id in handled) == sorted(event.event_id for event in [*events, *markers])


async def test_consumers_of_one_group_keep_the_order_of_one_key(bus: EventBus) -> None:
    finished: list[int] = []
    count = 4

    async def handler(event: Event) -> None:
        _, number = sequence_of(event)
        await asyncio.sleep(0.01 * (count - number))  # earlier events take longer
        finished.append(number)

    async with (
        consuming(bus, [Topic.RELEASES], "workers", handler),
        consuming(bus, [Topic.RELEASES], "workers", handler),
    ):
        await asyncio.sleep(0)  # both consumers are waiting for records
        for number in range(count):
            await bus.publish(paused("rel-1", number))
            await asyncio.sleep(0)  # records arrive one at a time, as they do from producers elsewhere
        await eventually(lambda: len(finished) == count, "every event is handled")
    assert finished == list(range(count))


async def test_events_interrupted_by_cancelling_the_consumer_are_delivered_again_to_its_group(bus: EventBus) -> None:
    """At-least-once: events whose handler never returned are not finished, so the group's next consumer gets them."""
    first, stuck_one, queued_behind = paused("rel-1", 0), paused("rel-1", 1), paused("rel-1", 2)
    handled: list[str] = []
    entered = asyncio.Event()

    async def stuck(event: Event) -> None:
        if event.event_id == stuck_one.event_id:
            entered.set()
            await asyncio.Event().wait()
        handled.append(event.event_id)

    second_run: list[str] = []

    async def handler(event: Event) -> None:
        second_run.append(event.event_id)

    async with consuming(bus, [Topic.RELEASES], "workers", stuck):
        for event in (first, stuck_one, queued_behind):
            await bus.publish(event)
        async with asyncio.timeout(TIMEOUT_S):
            await entered.wait()
    assert handled == [first.event_id]
    async with consuming(bus, [Topic.RELEASES], "workers", handler):
        await eventually(
            lambda: {stuck_one.event_id, queued_behind.event_id} <= set(second_run),
            "the interrupted events are delivered again",
        )
    # An already finished event may come again (at-least-once), but the unfinished ones keep their order.
    assert [event_id for event_id in second_run if event_id != first.event_id] == [
        stuck_one.event_id,
        queued_behind.event_id,
    ]


async def test_access_denied_stops_the_consumer_and_its_group_gets_the_event_again(bus: EventBus) -> None:
    """A handler refused a permission (AccessDenied: this process may not do what the event needs) stops its
    consumer with that error: the event is neither retried nor dead-lettered, and stays unfinished, so the group's
    next consumer gets it, with what came after it on its key."""
    denied, behind = paused("rel-1", 0), paused("rel-1", 1)
    attempts: Counter[str] = Counter()
    second_run: list[str] = []

    async def refused(event: Event) -> None:
        attempts[event.event_id] += 1
        if event.event_id == denied.event_id:
            raise AccessDenied("kafka: not allowed to write outcomes")

    async def handler(event: Event) -> None:
        second_run.append(event.event_id)

    await bus.publish(denied)
    await bus.publish(behind)
    with pytest.raises(AccessDenied, match="not allowed to write outcomes"):
        async with asyncio.timeout(TIMEOUT_S):
            await bus.consume([Topic.RELEASES], "denied", refused)
    assert attempts == {denied.event_id: 1}
    assert await dead_letters(bus) == []
    async with consuming(bus, [Topic.RELEASES], "denied", handler):
        await eventually(lambda: behind.event_id in second_run, "the next consumer handles both events")
    assert second_run == [denied.event_id, behind.event_id]


async def test_consumer_cancelled_while_starting_leaves_no_connection_open(bus: EventBus) -> None:
    """A consumer cancelled while it joins its group closes what it opened."""

    async def handler(_event: Event) -> None:
        return None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        task = asyncio.create_task(bus.consume([Topic.RELEASES], "short-lived", handler))
        await asyncio.sleep(0.01)  # it has begun to start, not finished
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(2):  # what the loop still holds is let go after a turn or two
            await asyncio.sleep(0.02)
            gc.collect()
    assert [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning)] == []


def one_key_per_partition(partitions: int) -> list[str]:
    """Release ids whose messages land on partitions 0, 1, ... (Kafka's default partitioner: murmur2 of the key)."""
    chosen: dict[int, str] = {}
    index = 0
    while len(chosen) < partitions:
        key = f"rel-{index}"
        chosen.setdefault((murmur2(key.encode()) & 0x7FFFFFFF) % partitions, key)
        index += 1
    return [chosen[partition] for partition in range(partitions)]


@pytest.mark.kafka
async def test_a_rebalance_cancels_only_the_runs_whose_partition_went_to_another_member(
    kafka_bootstrap: str,
) -> None:
    """One member runs a held message on each of the 4 partitions; a second member joins. The runs outlive the
    grace period; once the assignment is known, the two whose partition moved are cancelled (uncommitted: the new
    member runs them again) and the two whose partition stayed go on, uncancelled, and run once."""
    held = [paused(key, 1) for key in one_key_per_partition(4)]
    runs: Counter[str] = Counter()
    entered: set[str] = set()
    cancelled: set[str] = set()
    finished: set[str] = set()
    let_go = asyncio.Event()

    async def handler(event: Event) -> None:
        runs[event.event_id] += 1
        if runs[event.event_id] == 1:
            entered.add(event.event_id)
            try:
                await let_go.wait()
            except asyncio.CancelledError:
                cancelled.add(event.event_id)
                raise
        finished.add(event.event_id)

    async with (
        fresh_kafka_bus(kafka_bootstrap, retry_delay_s=0.01, grace_s=0.5) as bus,
        consuming(bus, [Topic.RELEASES], "workers", handler),
    ):
        for event in held:
            await bus.publish(event)
        await eventually(lambda: len(entered) == 4, "all four held runs began")
        async with consuming(bus, [Topic.RELEASES], "workers", handler):
            await eventually(lambda: len(finished) == 2, "the two runs whose partition moved ran again elsewhere")
            let_go.set()
            await eventually(lambda: len(finished) == 4, "the two runs whose partition stayed finished")
    assert len(cancelled) == 2
    kept = {event.event_id for event in held} - cancelled
    assert [runs[event_id] for event_id in sorted(kept)] == [1, 1]
    assert [runs[event_id] for event_id in sorted(cancelled)] == [2, 2]
