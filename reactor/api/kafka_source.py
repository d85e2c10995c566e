"""The feed's reader on Kafka: the release topics from the beginning, with no consumer group.

A worker's consumer group commits offsets and dead-letters what it cannot decode; an observer must do neither. With
no group, reading commits nothing, leaves no group behind on the broker, and a message the workers dead-letter is
only skipped here, so no `reactor serve` start adds a copy of it to `dlq`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from reactor import logs
from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.kafka_security import MAX_MESSAGE_BYTES
from reactor.codec import Record, decode
from reactor.errors import DecodeError
from reactor.events import Event, Topic

log = logs.get_logger(__name__)
_MAX_DELAY_S = 10.0


async def read_kafka(bus: KafkaBus, topics: tuple[Topic, ...], add: Callable[[Event], None]) -> None:
    """Hand every valid event of `topics` to `add`, from the beginning, until cancelled; reconnect on errors."""
    names = [bus.topic_name(topic) for topic in topics]
    delay = 1.0
    while True:
        consumer = AIOKafkaConsumer(
            *names,
            bootstrap_servers=bus.bootstrap,
            client_id=bus.client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            # The releases topic's largest message (a release's request) is fetched whole.
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
            **bus.security.client_options(),
        )
        try:
            await consumer.start()
            delay = 1.0
            async for message in consumer:
                headers = tuple((name, b"" if value is None else bytes(value)) for name, value in message.headers or ())
                try:
                    event, _source = decode(Record(key=message.key, value=message.value or b"", headers=headers))
                except DecodeError:
                    continue  # the workers' groups dead-letter it; the feed shows valid events only
                add(event)
        except KafkaError as exc:
            # The feed starts again from the beginning; events it has are not added twice (it dedupes on event id).
            log.warning("event feed lost kafka; reading again", error=str(exc), retry_in_s=delay)
        finally:
            await consumer.stop()
        await asyncio.sleep(delay)
        delay = min(delay * 2, _MAX_DELAY_S)
