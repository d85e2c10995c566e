"""The EventBus on Apache Kafka (aiokafka): CloudEvents binary mode, idempotent producer, manual commits.

Offsets are committed only for messages whose handling finished (the handler returned after its effects and
outcome were durable), and only up to the lowest offset still in flight in each partition. Different keys
of one partition are handled concurrently; one key's messages stay in order. On a rebalance the revoked
partitions stop being taken, their in-flight work drains within a grace period and finished offsets are
committed; what still runs goes on through the rebalance and is cancelled only if its partition went to another
member (uncommitted, so the new owner runs it again). The sticky assignor keeps partitions where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CommitFailedError,
    GroupAuthorizationFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    for_code,
)
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from reactor import logs
from reactor.adapters.dispatch import DLQ_DROPPED, KeyedDispatcher, dead_letter_record, deliver
from reactor.adapters.kafka_security import MAX_MESSAGE_BYTES, KafkaSecurity, started_producer
from reactor.codec import Record, check_size, encode
from reactor.errors import AccessDenied, BackendUnavailable, Misconfigured
from reactor.events import Event, Topic
from reactor.observability import CONSUMER_LAG, MISROUTED
from reactor.ports import Handler, Interest
from reactor.trust.enforcement import NO_SIGNATURES, Signatures

log = logs.get_logger(__name__)

# Topic settings `create_topics` gives the topics it creates, and raises to on topics that exist.
_TOPIC_CONFIGS: dict[Topic, dict[str, str]] = {Topic.RELEASES: {"max.message.bytes": str(MAX_MESSAGE_BYTES)}}
# The broker's default max.message.bytes, which every topic but releases keeps, and the fetch size of their readers.
_DEFAULT_MESSAGE_BYTES = 1024 * 1024
# DescribeConfigs (v1 and later): where a setting's value comes from; 1 is the topic's own (dynamic) setting.
_DYNAMIC_TOPIC_CONFIG = 1

# A message larger than its topic (or the producer) takes: the broker answers 10 or 18, as the size is counted.
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)

# The broker's ACLs refused this principal: not an outage (waiting does not help), so AccessDenied, not
# BackendUnavailable.
REFUSED = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


@dataclass(frozen=True, slots=True)
class _Message:
    topic: Topic
    partition: TopicPartition
    offset: int
    record: Record


@dataclass
class _PartitionProgress:
    """Offsets taken from one partition, in order, and which of them are finished."""

    taken: deque[int] = field(default_factory=deque)
    finished: set[int] = field(default_factory=set)
    committable: int | None = None

    def finish(self, offset: int) -> None:
        self.finished.add(offset)
        while self.taken and self.taken[0] in self.finished:
            done = self.taken.popleft()
            self.finished.discard(done)
            self.committable = done + 1


class KafkaBus:
    """Topics `<prefix>commands|outcomes|releases|dlq` on a Kafka cluster, read by consumer groups
    `<group_prefix><group>` (`group_prefix` None: the topic prefix, so deployments sharing a cluster under prefixes
    of their own share no group either)."""

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str = "reactor.",
        group_prefix: str | None = None,
        source: str = "/reactor",
        concurrency: int = 64,
        max_buffered: int = 1000,
        grace_s: float = 10.0,
        retry_delay_s: float = 0.5,
        commit_interval_s: float = 0.2,
        client_id: str = "deploy-reactor",
        signatures: Signatures = NO_SIGNATURES,
        security: KafkaSecurity | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.signatures = signatures
        self.security = security or KafkaSecurity()
        self.prefix = prefix
        self.group_prefix = prefix if group_prefix is None else group_prefix
        self.source = source
        self.concurrency = concurrency
        self.max_buffered = max_buffered
        self.grace_s = grace_s
        self.retry_delay_s = retry_delay_s
        self.commit_interval_s = commit_interval_s
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        # Messages seen on another partition than their key's murmur2 partition (a producer with another
        # partitioner); counted, logged once per topic, and still handled (see `_GroupMember.run`).
        self.misrouted = 0

    def topic_name(self, topic: Topic) -> str:
        """The Kafka topic of a logical topic."""
        return self.prefix + topic.value

    def group_id(self, group: str) -> str:
        """The Kafka consumer group of a reactor group (`executor`, `pacer`, ...)."""
        return self.group_prefix + group

    def logical(self, name: str) -> Topic:
        """The logical topic of a Kafka topic name."""
        return Topic(name.removeprefix(self.prefix))

    async def __aenter__(self) -> Self:
        self._producer = await started_producer(self.bootstrap, self.client_id, self.security)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def ping(self) -> None:
        """Raise unless the cluster answers a metadata request."""
        if self._producer is None:
            raise BackendUnavailable("kafka bus is not open")
        try:
            await self._producer.client.fetch_all_metadata()
        except KafkaError as exc:
            raise BackendUnavailable(f"kafka {self.bootstrap}: {exc}") from exc

    async def create_topics(self, *, partitions: int = 6, replication: int = 1) -> list[str]:
        """Create the four topics if missing; the names created. The releases topic takes messages of up to
        MAX_MESSAGE_BYTES (a release's request carries its nodes); one that exists with a smaller limit gets it."""
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, **self.security.client_options()
        )
        created = []
        try:
            await admin.start()
            for topic in Topic:
                name = self.topic_name(topic)
                configs = _TOPIC_CONFIGS.get(topic, {})
                try:
                    response = await admin.create_topics(
                        [
                            NewTopic(
                                name=name,
                                num_partitions=partitions,
                                replication_factor=replication,
                                topic_configs=configs,
                            )
                        ]
                    )
                    # aiokafka returns a topic's error in the response instead of raising it.
                    for _name, code, *_message in response.topic_errors:
                        if code:
                            raise for_code(code)(name)
                    created.append(name)
                except TopicAlreadyExistsError:
                    await _raise_limits(admin, name, configs)
                    continue
                except TopicAuthorizationFailedError as exc:
                    # A principal without CREATE (ACLs) is refused even for a topic that exists: fine if it does.
                    if name in await admin.list_topics():
                        continue
                    raise AccessDenied(f"kafka {self.bootstrap}: not allowed to create {name}") from exc
        except KafkaError as exc:
            raise BackendUnavailable(f"kafka {self.bootstrap}: cannot create topics: {exc}") from exc
        finally:
            await admin.close()
        return created

    async def publish(self, event: Event) -> None:
        """Send one event keyed by its subject, signed with this process's key; returns once the brokers have it.

        InvalidInput for an event larger than a reader takes (`codec.check_size`): nothing is sent.
        """
        record = encode(event, self.source)
        check_size(event, record)
        try:
            await self.publish_raw(event.TOPIC, self.signatures.sign(record))
        except BackendUnavailable as exc:
            if not isinstance(exc.__cause__, TOO_LARGE):
                raise
            # The topic was made before it took messages this size (or by hand): waiting will not change that.
            raise Misconfigured(
                f"kafka refused a message of {len(record.value):,} bytes on {self.topic_name(event.TOPIC)}: the"
                " topic takes less (its max.message.bytes); `reactor topics create` raises it"
            ) from exc

    async def publish_raw(self, topic: Topic, record: Record) -> None:
        """Send a message as it is; returns once the brokers acknowledged it."""
        if self._producer is None:
            raise BackendUnavailable("kafka bus is not open")
        try:
            await self._producer.send_and_wait(
                self.topic_name(topic), value=record.value, key=record.key, headers=list(record.headers)
            )
        except REFUSED as exc:
            raise AccessDenied(f"kafka {self.bootstrap}: not allowed to write {self.topic_name(topic)}: {exc}") from exc
        except KafkaError as exc:
            raise BackendUnavailable(f"kafka publish to {self.topic_name(topic)}: {exc}") from exc

    async def history(self, topic: Topic) -> list[Record]:
        """Every message of `topic` from the beginning to the current end, partition by partition."""
        name = self.topic_name(topic)
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, **self.security.client_options()
        )
        try:
            await admin.start()
            [description] = await admin.describe_topics([name])
        except KafkaError as exc:
            raise BackendUnavailable(f"kafka {self.bootstrap}: cannot describe {name}: {exc}") from exc
        finally:
            await admin.close()
        records: list[Record] = []
        assigned = [TopicPartition(name, item["partition"]) for item in description.get("partitions", [])]
        if not assigned:
            return records
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            client_id=self.client_id,
            # The broker answers one request of a connection at a time: a fetch waiting for data that will not come
            # (an empty partition, one read to its end) holds up the offset lookup and the close (TLS) behind it.
            fetch_max_wait_ms=10,
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
            **self.security.client_options(),
        )
        try:
            await consumer.start()
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            ends: dict[TopicPartition, int] = await consumer.end_offsets(assigned)
            remaining = {tp for tp in assigned if ends[tp] > await consumer.position(tp)}
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=1000)
                for tp, messages in batch.items():
                    for message in messages:
                        if message.offset < ends[tp]:
                            records.append(_record(message))
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        finally:
            await consumer.stop()
        return records

    async def consume(
        self, topics: Sequence[Topic], group: str, handler: Handler, *, wants: Interest | None = None
    ) -> None:
        """Feed events to `handler` as consumer group `group` until cancelled, then shut down in order; see
        EventBus.consume for `wants`."""
        member = _GroupMember(self, group, handler, large=Topic.RELEASES in topics, wants=wants)
        try:
            await member.start([self.topic_name(topic) for topic in topics])
        except BaseException:
            # Cancelled or failed while joining: close the consumer's connections before going.
            await member.consumer.stop()
            raise
        try:
            await member.run()
        finally:
            await member.shutdown()

    async def dead_letter(self, topic: Topic, record: Record, reason: str) -> None:
        """Send a rejected message to the dead-letter topic with the reason.

        A message near the broker's size limit no longer fits once the reason is added: its copy leaves out the
        body, then the headers and key too, and says so in header `reactor_dlq_dropped`.
        """
        log.warning("dead-lettered", topic=topic.value, reason=reason)
        letter = dead_letter_record(topic, record, reason)
        bare = dead_letter_record(topic, Record(key=None, value=b"", headers=()), reason)
        letters = (
            letter,
            Record(key=letter.key, value=b"", headers=(*letter.headers, (DLQ_DROPPED, b"value"))),
            Record(key=None, value=b"", headers=(*bare.headers, (DLQ_DROPPED, b"value, key, headers"))),
        )
        for index, letter in enumerate(letters):
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(letter.key, letter.value, list(letter.headers))
            if size > _DEFAULT_MESSAGE_BYTES and index < len(letters) - 1:
                # Over what the dead-letter topic takes (the broker's default): not sent for the broker to refuse.
                log.warning("dead letter over the size limit; sending a smaller copy", topic=topic.value)
                continue
            try:
                await self.publish_raw(Topic.DLQ, letter)
            except BackendUnavailable as exc:
                if index == len(letters) - 1 or not isinstance(exc.__cause__, TOO_LARGE):
                    raise
                log.warning("dead letter over the size limit; sending a smaller copy", topic=topic.value)
            else:
                return


async def _raise_limits(admin: AIOKafkaAdminClient, name: str, wanted: dict[str, str]) -> None:
    """Raise the numeric settings `wanted` of existing topic `name` to at least their wanted values, keeping the
    topic's other settings (Kafka's AlterConfigs replaces all of a topic's own settings at once). A principal that
    may not read or change a topic's settings leaves them as they are (the admin sets topics up)."""
    if not wanted:
        return
    [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    [(code, _message, _type, _name, entries)] = described.resources
    if code:
        log.warning("cannot read the topic's settings; leaving them", topic=name, error=for_code(code).__name__)
        return
    values = {entry[0]: entry[1] for entry in entries}
    low = {key: value for key, value in wanted.items() if int(values.get(key) or 0) < int(value)}
    if not low:
        return
    own = {entry[0]: entry[1] for entry in entries if entry[3] == _DYNAMIC_TOPIC_CONFIG}
    if any(entry[4] for entry in entries if entry[3] == _DYNAMIC_TOPIC_CONFIG):
        raise Misconfigured(f"kafka topic {name}: set {low} by hand (it has secret settings of its own to keep)")
    [altered] = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, {**own, **low})])
    [(code, message, *_rest)] = altered.resources
    if code:
        error = for_code(code)
        if issubclass(error, REFUSED):
            log.warning("not allowed to change the topic's settings; leaving them", topic=name, wanted=low)
            return
        raise Misconfigured(f"kafka topic {name}: cannot set {low}: {error.__name__}: {message}")
    log.info("topic settings raised", topic=name, settings=low)


class _GroupMember:
    """One member of a consumer group: takes messages, dispatches them, commits what finished."""

    def __init__(
        self, bus: KafkaBus, group: str, handler: Handler, *, large: bool = False, wants: Interest | None = None
    ) -> None:
        self.bus = bus
        self.wants = wants
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bus.bootstrap,
            group_id=bus.group_id(group),
            client_id=bus.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=500,
            # A reader of the releases topic fetches its largest message whole (`large`); the others keep the
            # default 1 MiB per partition, which is all their topics take.
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES if large else _DEFAULT_MESSAGE_BYTES,
            # Keep each member's partitions where it can on a rebalance, so fewer runs change hands.
            partition_assignment_strategy=(_own_sticky_assignor(),),
            **bus.security.client_options(),
        )
        self.handler = handler
        self.progress: dict[TopicPartition, _PartitionProgress] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.dispatcher: KeyedDispatcher[_Message] = KeyedDispatcher(self._process, self._done, limit=bus.concurrency)
        self.paused = False
        self.warned: set[str] = set()

    async def _process(self, message: _Message) -> None:
        await deliver(
            message.topic,
            message.record,
            self.handler,
            self.bus.dead_letter,
            retry_delay_s=self.bus.retry_delay_s,
            check=self.bus.signatures.check,
            wants=self.wants,
        )

    def _done(self, message: _Message) -> None:
        state = self.progress.get(message.partition)
        if state is not None:
            state.finish(message.offset)

    async def start(self, names: list[str]) -> None:
        self.consumer.subscribe(names, listener=_Rebalance(self))
        # A cancel in the middle of connecting would orphan the connection being made: let the start finish
        # (it is bounded by the client's timeouts) and only then close everything and pass the cancel on.
        starting = asyncio.ensure_future(self.consumer.start())
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await starting
            raise
        except REFUSED as exc:
            raise AccessDenied(f"kafka {self.bus.bootstrap}: not allowed to consume {names}: {exc}") from exc
        except KafkaError as exc:
            await self.bus.security.explain(self.bus.bootstrap)
            raise BackendUnavailable(f"kafka {self.bus.bootstrap}: {exc}") from exc

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.bus.commit_interval_s
        next_commit = loop.time() + interval
        while True:
            try:
                batch = await self.consumer.getmany(timeout_ms=int(interval * 1000))
            except REFUSED as exc:
                raise AccessDenied(f"kafka {self.bus.bootstrap}: not allowed to consume: {exc}") from exc
            if self.dispatcher.failure is not None:
                # A message this process may not finish (its write was refused): stop taking more. Its offset
                # and those after it stay uncommitted, so a member that is allowed runs them.
                raise self.dispatcher.failure
            for tp, messages in batch.items():
                state = self.progress.setdefault(tp, _PartitionProgress())
                for message in messages:
                    self._check_partition(tp, message.key)
                    state.taken.append(message.offset)
                    self.dispatcher.submit(
                        message.key, _Message(self.bus.logical(tp.topic), tp, message.offset, _record(message))
                    )
            self._apply_backpressure()
            if loop.time() >= next_commit:
                try:
                    await self.commit()
                except (CommitFailedError, IllegalStateError) as exc:
                    # The group rebalanced under this commit (after a broker restart, say). Nothing is lost: the
                    # offsets stay uncommitted, the rebalance's own commit or the partition's next owner takes over.
                    log.warning("offset commit refused; the group rebalanced", error=str(exc))
                self._report_lag()
                next_commit = loop.time() + interval

    def _check_partition(self, tp: TopicPartition, key: bytes | None) -> None:
        """Count a message its producer put on another partition than murmur2 of its key (the contract's rule).

        Such a message is still handled: the per-node compare-and-set in the store keeps one run per node at a
        time whatever the partition, but its order against the node's other messages is no longer guaranteed,
        so the operator is told which topic gets them.
        """
        partitions = self.consumer.partitions_for_topic(tp.topic)
        if key is None or not partitions:
            return
        expected = (murmur2(key) & 0x7FFFFFFF) % len(partitions)
        if expected == tp.partition:
            return
        self.bus.misrouted += 1
        MISROUTED.labels(tp.topic).inc()
        if tp.topic not in self.warned:
            self.warned.add(tp.topic)
            log.warning(
                "message on another partition than murmur2 of its key: its producer does not use Kafka's default"
                " partitioner, so per-node order is not guaranteed (librdkafka clients: partitioner=murmur2_random)",
                topic=tp.topic,
                partition=tp.partition,
                expected_partition=expected,
            )

    def _apply_backpressure(self) -> None:
        """Stop fetching while too much is buffered in memory; fetch again once half of it is done."""
        if not self.paused and self.dispatcher.pending >= self.bus.max_buffered:
            self.consumer.pause(*self.consumer.assignment())
            self.paused = True
        elif self.paused and self.dispatcher.pending < self.bus.max_buffered // 2:
            self.consumer.resume(*self.consumer.assignment())
            self.paused = False

    def _report_lag(self) -> None:
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                lag = highwater - self.committed.get(tp, 0)
                CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(lag, 0))

    async def commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit, per partition this member is assigned, up to the lowest offset not yet finished.

        A revoked partition whose runs go on through a rebalance keeps its progress but is not committed until the
        new assignment gives it back (the client refuses a commit of a partition it is not assigned).
        """
        assigned = self.consumer.assignment()
        offsets = {
            tp: state.committable
            for tp, state in self.progress.items()
            if state.committable is not None
            and self.committed.get(tp) != state.committable
            and (partitions is None or tp in partitions)
            and tp in assigned
        }
        if not offsets:
            return
        await self.consumer.commit(offsets)
        self.committed.update(offsets)

    async def shutdown(self) -> None:
        """Stop taking; let in-flight work finish within the grace period; cancel the rest, whose offsets stay
        uncommitted so the next owner runs it again; commit what finished; leave the group."""
        if not await self.dispatcher.drain(self.bus.grace_s):
            log.warning("grace period over; cancelling unfinished messages", pending=self.dispatcher.pending)
            await self.dispatcher.cancel()
        with contextlib.suppress(KafkaError):
            await asyncio.shield(self.commit())
        await self.consumer.stop()


def _own_sticky_assignor() -> type[StickyPartitionAssignor]:
    """A sticky assignor for one consumer alone: aiokafka keeps a member's last assignment in class attributes,
    so one class shared by a process's consumers would tell each group the last assigned group's partitions
    (and the assignment would not stick)."""
    return type(
        "OwnStickyPartitionAssignor",
        (StickyPartitionAssignor,),
        {"member_assignment": None, "generation": StickyPartitionAssignor.DEFAULT_GENERATION_ID},
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type information
    """Every rebalance revokes every partition, then assigns the new share (the sticky assignor keeps it as it
    was where it can). Before: drain the revoked partitions' messages within the grace period and commit what
    finished. What still runs keeps running through the rebalance: its claim is renewed, so no other member runs
    its node meanwhile. After: a partition that stayed with this member keeps its runs (a deploy is not started
    over because a worker joined or left); one that went to another member has its unfinished messages cancelled
    (uncommitted: the new owner runs them again, once the cancelled run gave its claim up).

    Abandoning the unfinished handlers instead would leave them running beside the new owner's.
    """

    def __init__(self, member: _GroupMember) -> None:
        self.member = member
        self.unsettled: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        log.info("partitions revoked; draining", partitions=sorted(str(tp) for tp in revoked))
        member = self.member

        def from_revoked(message: _Message) -> bool:
            return message.partition in revoked

        drained = await member.dispatcher.drain(member.bus.grace_s, from_revoked)
        with contextlib.suppress(KafkaError):
            await member.commit(list(revoked))
        self.unsettled = set() if drained else {message.partition for message in member.dispatcher.held(from_revoked)}
        if self.unsettled:
            log.info(
                "grace period over; runs go on until the new assignment says where their partitions went",
                partitions=sorted(str(tp) for tp in self.unsettled),
            )
        for tp in revoked - self.unsettled:
            member.progress.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned", partitions=sorted(str(tp) for tp in assigned))
        member = self.member
        lost, kept = self.unsettled - assigned, self.unsettled & assigned
        self.unsettled = set()
        if lost:
            log.warning(
                "cancelling the unfinished messages of partitions another member now owns",
                partitions=sorted(str(tp) for tp in lost),
            )
            await member.dispatcher.cancel(lambda message: message.partition in lost)
            for tp in lost:
                member.progress.pop(tp, None)
        for tp in kept:
            state = member.progress.get(tp)
            if state is not None and state.taken:
                # Its messages are still here (running or queued): fetch after them, not from the commit.
                member.consumer.seek(tp, state.taken[-1] + 1)
        if kept:
            log.info("partitions kept; their runs go on", partitions=sorted(str(tp) for tp in kept))


def _record(message: Any) -> Record:
    # A Kafka header value may be null: read as empty, which the codec refuses in a ce_* header and ignores elsewhere.
    headers = tuple((name, b"" if value is None else bytes(value)) for name, value in (message.headers or ()))
    return Record(key=message.key, value=message.value or b"", headers=headers)
