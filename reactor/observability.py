"""Prometheus metrics and the worker's small HTTP endpoint: GET /healthz and GET /metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Self

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from reactor import logs
from reactor.codec import Record
from reactor.events import Event, NodeDeployed, NodeFailed, NodeRolledBack, RollbackFailed, Topic
from reactor.ports import EventBus, Handler, Interest

log = logs.get_logger(__name__)

EVENTS_CONSUMED = Counter("reactor_events_consumed_total", "Events handed to a handler.", ["group", "type"])
EVENTS_PRODUCED = Counter("reactor_events_produced_total", "Events published.", ["type"])
EXECUTOR_OUTCOMES = Counter("reactor_executor_outcomes_total", "Node outcomes.", ["outcome"])
EXECUTOR_DURATION = Histogram(
    "reactor_executor_duration_seconds",
    "Time an executor took for one node.",
    ["outcome"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
IN_FLIGHT = Gauge("reactor_events_in_flight", "Events being handled now.", ["group"])
CONSUMER_LAG = Gauge("reactor_consumer_lag", "Messages behind the partition's end.", ["topic", "partition"])
MISROUTED = Counter(
    "reactor_misrouted_messages_total",
    "Messages found on another partition than the Java default partitioner (murmur2) gives their key.",
    ["topic"],
)
DEAD_LETTERED = Counter("reactor_dead_lettered_total", "Messages sent to the dead-letter topic.", ["topic"])

_OUTCOME_NAMES: dict[type[Event], str] = {
    NodeDeployed: "deployed",
    NodeFailed: "failed",
    NodeRolledBack: "rolled_back",
    RollbackFailed: "rollback_failed",
}


def counted(handler: Handler, group: str) -> Handler:
    """`handler`, counting what it consumes and how many it is handling at once."""

    async def handle(event: Event) -> None:
        EVENTS_CONSUMED.labels(group, event.TYPE).inc()
        gauge = IN_FLIGHT.labels(group)
        gauge.inc()
        try:
            await handler(event)
        finally:
            gauge.dec()

    return handle


class CountingBus:
    """An EventBus that counts what is published through it, and executor outcomes and durations."""

    def __init__(self, inner: EventBus) -> None:
        self.inner = inner

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def ping(self) -> None:
        await self.inner.ping()

    async def publish(self, event: Event) -> None:
        await self.inner.publish(event)
        EVENTS_PRODUCED.labels(event.TYPE).inc()
        outcome = _OUTCOME_NAMES.get(type(event))
        if outcome is not None and isinstance(event, NodeDeployed | NodeFailed | NodeRolledBack | RollbackFailed):
            EXECUTOR_OUTCOMES.labels(outcome).inc()
            EXECUTOR_DURATION.labels(outcome).observe(event.duration_s)

    async def publish_raw(self, topic: Topic, record: Record) -> None:
        await self.inner.publish_raw(topic, record)

    async def consume(
        self, topics: Sequence[Topic], group: str, handler: Handler, *, wants: Interest | None = None
    ) -> None:
        await self.inner.consume(topics, group, counted(handler, group), wants=wants)

    async def history(self, topic: Topic) -> list[Record]:
        return await self.inner.history(topic)


Probe = Callable[[], Awaitable[None]]


class HealthServer:
    """Serves /healthz (200 when every probe passes, else 503 with the reason) and /metrics."""

    def __init__(self, port: int, probes: Mapping[str, Probe], *, host: str = "0.0.0.0") -> None:  # noqa: S104 (a container's health port must be reachable from outside it)
        self.host = host
        self.port = port
        self.probes = probes
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health and metrics endpoint", port=self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def health(self) -> tuple[bool, str]:
        """Whether every probe passes, and what failed."""
        failures = []
        for name, probe in self.probes.items():
            try:
                async with asyncio.timeout(5):
                    await probe()
            except Exception as exc:  # noqa: BLE001 (any failure of a probe means not ready; the reason is the body)
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
        return not failures, "; ".join(failures) or "ok"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.split()
            path = parts[1].decode(errors="replace") if len(parts) > 1 else "/"
            if path == "/healthz":
                ok, reason = await self.health()
                status, body, kind = (200 if ok else 503), (reason + "\n").encode(), "text/plain"
            elif path == "/metrics":
                status, body, kind = 200, generate_latest(), CONTENT_TYPE_LATEST
            else:
                status, body, kind = 404, b"not found\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
