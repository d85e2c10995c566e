"""What every bus does with a taken message: per-key order, bounded concurrency, retry, dead-lettering.

Both buses feed `KeyedDispatcher`; it calls `deliver` for each message in key order (different keys run
concurrently) and reports each finished message through `on_done`, which is where a bus may commit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from reactor import logs
from reactor.codec import Record, decode
from reactor.errors import AccessDenied, DecodeError, PolicyRefused, ReactorError
from reactor.events import Event, Topic
from reactor.observability import DEAD_LETTERED
from reactor.ports import Handler, Interest
from reactor.trust.enforcement import SIGNER
from reactor.trust.identities import Identity
from reactor.trust.signing import Verified

log = logs.get_logger(__name__)

DLQ_REASON = "reactor_dlq_reason"
DLQ_TOPIC = "reactor_dlq_topic"
DLQ_DROPPED = "reactor_dlq_dropped"  # what a copy too large for the broker left out
# A reason may quote the refused value, which can be nearly as large as the message; the dead-letter copy carries
# both, so the reason is cut to keep the copy within the broker's message size limit.
MAX_REASON_CHARS = 1000
_DLQ_HEADERS = (DLQ_REASON, DLQ_TOPIC, DLQ_DROPPED)

M = TypeVar("M")
DeadLetter = Callable[[Topic, Record, str], Awaitable[None]]
# Raises DecodeError (a SignatureError) unless the message may be used; see reactor.trust.enforcement.
Check = Callable[[Record], Verified | None]


def dead_letter_record(topic: Topic, record: Record, reason: str) -> Record:
    """The original message with the reason and its source topic added as headers (replacing any it carried)."""
    kept = tuple((name, value) for name, value in record.headers if name not in _DLQ_HEADERS)
    headers = (*kept, (DLQ_REASON, reason.encode()), (DLQ_TOPIC, topic.value.encode()))
    return Record(key=record.key, value=record.value, headers=headers)


def shortened(reason: str) -> str:
    """`reason`, cut to MAX_REASON_CHARS characters with a note of how much was left out."""
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return f"{reason[:MAX_REASON_CHARS]}... ({len(reason) - MAX_REASON_CHARS} more characters)"


async def deliver(
    topic: Topic,
    record: Record | Callable[[], Record],
    handler: Handler,
    send_to_dlq: DeadLetter,
    *,
    retry_delay_s: float,
    event: Event | None = None,
    check: Check | None = None,
    wants: Interest | None = None,
) -> None:
    """Check, decode and handle one message: retriable failures retry with backoff, the rest are dead-lettered.

    `event` is the already-decoded message when the bus has it (in-process, so nothing to verify); `record` may
    then be a callable that encodes it, only needed if the message must be dead-lettered. `check` runs before
    the message is decoded: a message that fails it reaches no handler. An event `wants` turns down is finished
    without a call.
    """

    async def dead_letter(topic: Topic, reason: str) -> None:
        # Retried like a handler: a dead letter that fails and is left behind would leave its message unfinished,
        # so its partition's commits would stop there and the messages queued behind it would never run.
        reason = shortened(reason)
        delay = retry_delay_s
        while True:
            try:
                await send_to_dlq(topic, record() if callable(record) else record, reason)
            except ReactorError as exc:
                if not exc.retriable:
                    raise
                log.warning("retrying dead letter", error=str(exc), topic=topic.value)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                break
        DEAD_LETTERED.labels(topic.value).inc()

    signer: Identity | None = None
    if event is None:
        try:
            raw = record() if callable(record) else record
            verified = None if check is None else check(raw)
            signer = None if verified is None else verified.identity
            event, _source = decode(raw)
        except DecodeError as exc:
            await dead_letter(topic, str(exc))
            return
    if wants is not None and not wants(event):
        return
    delay = retry_delay_s
    while True:
        token = SIGNER.set(signer)  # the handler may ask who signed what it handles (the deploy policy does)
        try:
            await handler(event)
        except PolicyRefused as exc:
            await dead_letter(topic, str(exc))
            return
        except AccessDenied:
            # This process may not do what the message needs (a write its backend refused): the message is not at
            # fault, so it is neither dead-lettered nor retried; its consumer stops with it unfinished.
            raise
        except ReactorError as exc:
            if not exc.retriable:
                await dead_letter(topic, f"handler: {exc}")
                return
            log.warning("retrying event", error=str(exc), event_type=event.TYPE, event_id=event.event_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        except Exception as exc:  # a handler bug must not stop the worker: park the event with the reason
            log.exception("handler crashed; event dead-lettered", event_type=event.TYPE, event_id=event.event_id)
            await dead_letter(topic, f"handler crashed: {type(exc).__name__}: {exc}")
            return
        else:
            return
        finally:
            SIGNER.reset(token)


@dataclass
class _Lane(Generic[M]):
    queue: deque[M] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


class KeyedDispatcher(Generic[M]):
    """Runs `process` for messages in order per key and concurrently across keys, at most `limit` at once.

    Each key with queued messages has a lane; at most `limit` lanes have a task, and the others wait their turn in
    arrival order. A lane that finishes a message while others wait hands its slot on and waits again behind them,
    so a key with many messages does not keep a slot from the rest. (No semaphore: a task per waiting key, each
    woken in turn, cost more than the handlers for many small messages.)
    """

    def __init__(
        self,
        process: Callable[[M], Awaitable[None]],
        on_done: Callable[[M], None],
        *,
        limit: int,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._process = process
        self._on_done = on_done
        self._limit = limit
        self._running = 0  # lanes with a task
        self._waiting: deque[bytes | None] = deque()  # keys of lanes waiting for a slot, in turn
        self._lanes: dict[bytes | None, _Lane[M]] = {}
        self.pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._progressed = asyncio.Event()  # set whenever a message finishes or a lane ends
        # The first error `process` raised (it retries or dead-letters everything else, so this is a reason to
        # stop consuming, such as AccessDenied); the message stays unfinished and its lane ends.
        self.failure: Exception | None = None
        self._failed = asyncio.Event()

    @property
    def running(self) -> int:
        """How many lanes are running a message now (at most `limit`)."""
        return self._running

    def submit(self, key: bytes | None, message: M) -> None:
        """Queue a message behind earlier ones of the same key."""
        self.pending += 1
        self._idle.clear()
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
            lane.queue.append(message)
            self._waiting.append(key)
            self._start_waiting()
        else:
            lane.queue.append(message)

    def _start_waiting(self) -> None:
        """Give free slots to the lanes waiting longest."""
        while self._running < self._limit and self._waiting:
            key = self._waiting.popleft()
            lane = self._lanes.get(key)
            # A key may be listed again after its lane was cancelled and a new one made: skip what is not waiting.
            if lane is None or lane.task is not None or not lane.queue:
                continue
            self._running += 1
            lane.task = asyncio.create_task(self._run(key, lane))

    async def _run(self, key: bytes | None, lane: _Lane[M]) -> None:
        ended = True
        try:
            while lane.queue:
                message = lane.queue[0]
                await self._process(message)
                lane.queue.popleft()
                self.pending -= 1
                self._on_done(message)
                self._progressed.set()
                if lane.queue and self._waiting:
                    ended = False  # others wait for a slot: this lane waits behind them
                    break
        # Kept for the consumer to raise, not lost with this task; the lane's messages stay pending (unfinished).
        except Exception as exc:  # noqa: BLE001
            ended = True
            if self.failure is None:
                self.failure = exc
            self._failed.set()
        finally:
            self._running -= 1
            lane.task = None
            if self._lanes.get(key) is lane:
                if ended:
                    del self._lanes[key]
                else:
                    self._waiting.append(key)
            if not self._lanes:
                self._idle.set()
            self._progressed.set()
            if self.failure is None:
                self._start_waiting()

    async def failed(self) -> Exception:
        """Wait until a message's processing raised; that error."""
        await self._failed.wait()
        assert self.failure is not None  # noqa: S101 (set before the event)
        return self.failure

    def _holding(self, which: Callable[[M], bool] | None) -> list[tuple[bytes | None, _Lane[M]]]:
        return [
            (key, lane)
            for key, lane in self._lanes.items()
            if which is None or any(which(message) for message in lane.queue)
        ]

    def held(self, which: Callable[[M], bool]) -> list[M]:
        """The messages `which` picks that are queued or running."""
        return [message for lane in self._lanes.values() for message in lane.queue if which(message)]

    async def drain(self, timeout_s: float, which: Callable[[M], bool] | None = None) -> bool:
        """Wait until every queued message (or every one `which` picks) is processed; False if the time ran out."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._holding(which):
                    self._progressed.clear()
                    await self._progressed.wait()
        except TimeoutError:
            return False
        return True

    async def cancel(self, which: Callable[[M], bool] | None = None) -> None:
        """Cancel the lanes holding any message (or any one `which` picks), the running handler included; their
        messages are not reported done. Messages of those lanes that `which` does not pick are queued again."""
        held = self._holding(which)
        # Out of the lanes first, so a slot the cancelled tasks give back goes to none of the lanes cancelled here.
        for key, lane in held:
            if self._lanes.get(key) is lane:
                del self._lanes[key]
        tasks = [lane.task for _, lane in held if lane.task is not None]
        for task in tasks:
            task.cancel()
        # Only the tasks cancelled here are awaited, and their CancelledError is theirs, not ours.
        if tasks:
            await asyncio.wait(tasks)
        spared: list[tuple[bytes | None, M]] = []
        for key, lane in held:
            self.pending -= len(lane.queue)
            spared.extend((key, message) for message in lane.queue if which is not None and not which(message))
        if not self._lanes:
            self._idle.set()
        self._progressed.set()
        for key, message in spared:
            self.submit(key, message)
