"""Where CDEvents go: a Kafka topic (CloudEvents Kafka binding, binary mode) or HTTP endpoints (CloudEvents HTTP
binding, structured mode), each with the delivery rules subscribers rely on.

Both are at-least-once: `send` returns only once the sink has the event, and raises a retriable error when it
cannot tell, so the caller does not commit the source event and gets it again. A re-sent CDEvent carries the
same CloudEvent id (derived from the reactor event id), so a subscriber dedupes on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from prometheus_client import Counter

from reactor import logs
from reactor.adapters.kafka_security import KafkaSecurity, started_producer
from reactor.cdevents import http_structured, kafka_record
from reactor.errors import BackendUnavailable

log = logs.get_logger(__name__)

CDEVENTS_SENT = Counter(
    "reactor_cdevents_sent_total", "CDEvents delivery attempts by sink and result.", ["sink", "result"]
)
# Answers worth another try: the sink is overloaded, restarting or timed out; any other 4xx refuses the event.
RETRY_STATUSES = frozenset({408, 425, 429})


class KafkaCDEventSink:
    """CDEvents to one Kafka topic, keyed by subject id (node key or release id), idempotent producer."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        partitions: int = 6,
        replication: int = 1,
        client_id: str = "deploy-reactor-cdevents",
        security: KafkaSecurity | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.security = security or KafkaSecurity()
        self.topic = topic
        self.name = f"kafka:{topic}"
        self.partitions = partitions
        self.replication = replication
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> Self:
        await self._create_topic()
        self._producer = await started_producer(self.bootstrap, self.client_id, self.security)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _create_topic(self) -> None:
        """Create the topic if it is missing; a cluster that forbids it (ACLs) must have it created by hand."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, **self.security.client_options()
        )
        try:
            await admin.start()
            await admin.create_topics(
                [NewTopic(name=self.topic, num_partitions=self.partitions, replication_factor=self.replication)]
            )
            log.info("cdevents topic created", topic=self.topic)
        except TopicAlreadyExistsError:
            pass
        except KafkaError as exc:
            log.warning("cdevents topic not created; it must exist already", topic=self.topic, error=str(exc))
        finally:
            await admin.close()

    async def send(self, cdevent: Mapping[str, object]) -> None:
        """Publish one CDEvent; returns once the brokers acknowledged it."""
        if self._producer is None:
            raise BackendUnavailable("cdevents kafka sink is not open")
        record = kafka_record(cdevent)
        try:
            await self._producer.send_and_wait(
                self.topic, value=record.value, key=record.key, headers=list(record.headers)
            )
        except KafkaError as exc:
            CDEVENTS_SENT.labels(self.name, "retry").inc()
            raise BackendUnavailable(f"kafka publish to {self.topic}: {exc}") from exc
        CDEVENTS_SENT.labels(self.name, "sent").inc()


class HttpCDEventSink:
    """CDEvents POSTed to one URL in CloudEvents structured mode, retried with exponential backoff.

    A 2xx answer delivers the event. A 5xx, 408, 425 or 429 answer, a refused connection or a timeout is tried
    again after `backoff_s`, doubling up to `max_backoff_s`, `attempts` times in all; then `send` raises a
    retriable error and the source event comes back later (nothing is lost while the sink is down). Any other
    answer (400, 401, 404, ...) refuses this event for good: it is logged and counted, and not sent again.
    """

    def __init__(
        self,
        url: str,
        *,
        attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = url
        self.name = _without_credentials(url)  # logs and metric labels must not carry a password or token
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, cdevent: Mapping[str, object]) -> None:
        """POST one CDEvent until the sink takes it, refuses it, or `attempts` run out (then raise, retriable)."""
        if self._session is None:
            raise BackendUnavailable("cdevents http sink is not open")
        headers, body = http_structured(cdevent)
        delay = self.backoff_s
        problem = ""
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
            try:
                async with self._session.post(self.url, data=body, headers=headers) as response:
                    status = response.status
                    answer = (await response.text())[:200]
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= status < 300:
                    CDEVENTS_SENT.labels(self.name, "sent").inc()
                    return
                if status < 500 and status not in RETRY_STATUSES:
                    CDEVENTS_SENT.labels(self.name, "refused").inc()
                    log.error("cdevents sink refused the event", sink=self.name, status=status, answer=answer)
                    return
                problem = f"HTTP {status}: {answer}"
            CDEVENTS_SENT.labels(self.name, "retry").inc()
            log.warning("cdevents sink did not take the event", sink=self.name, attempt=attempt, problem=problem)
        raise BackendUnavailable(f"cdevents sink {self.name}: {problem} (after {self.attempts} attempts)")


def _without_credentials(url: str) -> str:
    """`url` without the user and password it may carry."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
