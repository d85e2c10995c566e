"""Wiring: open the bus and the store for the configured mode and run consumers by role."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum

from reactor import logs
from reactor.adapters.cdevent_sinks import HttpCDEventSink, KafkaCDEventSink
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.memory_bus import MemoryBus
from reactor.adapters.mongo_store import MongoStore
from reactor.consumers.cdevents import CDEventsPublisher
from reactor.consumers.executor_worker import ExecutorWorker
from reactor.consumers.pacer import Pacer
from reactor.consumers.rollback import RollbackConsumer
from reactor.errors import InvalidInput, first_reactor_error
from reactor.events import Topic
from reactor.ports import CDEventSink, EventBus, ExecutorFactory, ExecutorSettings, Store
from reactor.settings import Settings
from reactor.trust import load_signing_key, load_trust_file
from reactor.trust.enforcement import NO_SIGNATURES, Signatures
from reactor.trust.keys import check_private_file
from reactor.trust.policy import Policy, load_policy

log = logs.get_logger(__name__)

# Python's own thresholds of its cyclic garbage collector, and the reactor process's. A node's handling makes hundreds
# of short-lived objects (tasks, models, log contexts) that reference counting frees; with Python's first threshold
# (700) a young collection runs every few nodes, the objects of the nodes in flight survive it, and so the oldest
# generation keeps filling and is collected in full, which reads every object of the process (a 100,000-node plan's
# too). Measured embedded (bench/pacer.py): full collections took 20% of a 10,000-node release's time and 31% of a
# 100,000-node one's; with these thresholds, 1% and under 1%, and the release 26% and 34% faster.
PYTHON_GC_THRESHOLDS = (700, 10, 10)
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> bool:
    """Set the reactor process's garbage collector thresholds (`GC_THRESHOLDS`) unless the process has set its own;
    whether it did. Called by the `reactor` command, before anything else."""
    if gc.get_threshold() != PYTHON_GC_THRESHOLDS:
        return False
    gc.set_threshold(*GC_THRESHOLDS)
    return True


class Role(StrEnum):
    """What a worker process does."""

    EXECUTOR = "executor"
    PACER = "pacer"
    ROLLBACK = "rollback"
    CDEVENTS = "cdevents"
    ALL = "all"  # executor, pacer and rollback; the cdevents role runs only when asked for


@dataclass
class Backends:
    """The bus and the store one process uses."""

    bus: EventBus
    store: Store
    memory_bus: MemoryBus | None = field(default=None)


_warned_unsigned = False


def load_signatures(settings: Settings) -> Signatures:
    """This process's signing key and trusted keys, as the settings name them; warns once when nothing is checked."""
    global _warned_unsigned  # noqa: PLW0603 (one warning per process, however many times the backends open)
    required = settings.signatures_required()
    if not required and not _warned_unsigned:
        _warned_unsigned = True
        log.warning(
            "signatures are not checked: any message on the bus is acted on (REACTOR_REQUIRE_SIGNED=false; "
            "the default in embedded mode). Set REACTOR_SIGNING_KEY, REACTOR_TRUST_FILE and "
            "REACTOR_REQUIRE_SIGNED=true to check them",
            mode=settings.mode,
        )
    key = None if settings.signing_key is None else load_signing_key(settings.signing_key)
    trust = None if settings.trust_file is None else load_trust_file(settings.trust_file)
    policy = load_policy_setting(settings)
    if key is None and trust is None and not required:
        return NO_SIGNATURES
    direct = frozenset() if policy is None else policy.direct_signers()
    return Signatures(key=key, trust=trust, required=required, direct_signers=direct)


def load_policy_setting(settings: Settings) -> Policy | None:
    """The deploy policy `REACTOR_POLICY_FILE` names (None: none is enforced); it needs verified signers."""
    if settings.policy_file is None:
        return None
    if not settings.signatures_required():
        raise InvalidInput(
            "policy_file", "a deploy policy decides by verified signer: set REACTOR_REQUIRE_SIGNED=true with it"
        )
    return load_policy(settings.policy_file)


@asynccontextmanager
async def open_backends(settings: Settings) -> AsyncIterator[Backends]:
    """The bus and store of the configured mode, closed on every path."""
    signatures = load_signatures(settings)
    if settings.mode == "embedded":
        async with (
            MemoryBus(
                source=settings.source,
                concurrency=settings.concurrency,
                signatures=signatures,
                history_limit=settings.memory_history,
            ) as bus,
            EmbeddedStore(settings.database_path) as store,
        ):
            yield Backends(bus=bus, store=store, memory_bus=bus)
        return
    async with (
        kafka_bus(settings, signatures) as kafka,
        mongo_store(settings) as mongo,
    ):
        yield Backends(bus=kafka, store=mongo)


def mongo_store(settings: Settings, database: str | None = None) -> MongoStore:
    """The MongoDB store the settings describe (not yet open), on `database` if given rather than theirs."""
    return MongoStore(
        settings.mongo_url,
        database or settings.mongo_database,
        compare_and_set=settings.mongo_compare_and_set,
        batch=settings.mongo_batch,
        pool_size=settings.mongo_pool_size,
        postgresql_url=settings.postgresql_url,
        sqlite_dir=settings.ferretdb_sqlite_dir,
    )


def kafka_bus(settings: Settings, signatures: Signatures = NO_SIGNATURES) -> KafkaBus:
    """The Kafka bus the settings describe (not yet open); it signs and checks as `signatures` says."""
    return KafkaBus(
        settings.kafka_bootstrap,
        prefix=settings.topic_prefix,
        group_prefix=settings.group_prefix,
        source=settings.source,
        concurrency=settings.concurrency,
        grace_s=settings.grace_s,
        signatures=signatures,
        security=settings.kafka_security(),
    )


def cdevent_sinks(settings: Settings) -> list[CDEventSink]:
    """The sinks the cdevents role publishes to (not yet open): the Kafka topic, then each HTTP sink."""
    sinks: list[CDEventSink] = []
    if settings.mode == "distributed" and settings.cdevents_topic:
        sinks.append(
            KafkaCDEventSink(
                settings.kafka_bootstrap,
                settings.topic_prefix + settings.cdevents_topic,
                partitions=settings.topic_partitions,
                replication=settings.topic_replication,
                security=settings.kafka_security(),
            )
        )
    sinks.extend(
        HttpCDEventSink(
            str(url),
            attempts=settings.cdevents_attempts,
            backoff_s=settings.cdevents_backoff_s,
            max_backoff_s=settings.cdevents_max_backoff_s,
            timeout_s=settings.cdevents_timeout_s,
        )
        for url in settings.cdevents_sinks
    )
    return sinks


@asynccontextmanager
async def cdevents_publisher(settings: Settings, wanted: bool) -> AsyncIterator[CDEventsPublisher | None]:
    """The cdevents role's publisher with its sinks open (closed after it), or None when the role is not run."""
    if not wanted:
        yield None
        return
    sinks = cdevent_sinks(settings)
    if not sinks:
        raise InvalidInput("cdevents sinks", "set REACTOR_CDEVENTS_TOPIC or REACTOR_CDEVENTS_SINKS")
    async with AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(sink) for sink in sinks]
        yield CDEventsPublisher(
            opened, source=settings.cdevents_source or settings.source, release_url=settings.cdevents_release_url
        )


async def run_roles(
    backends: Backends,
    settings: Settings,
    roles: set[Role],
    *,
    factories: dict[str, ExecutorFactory] | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Run the consumers of `roles` until cancelled."""
    if Role.ALL in roles:
        roles = {Role.EXECUTOR, Role.PACER, Role.ROLLBACK}
    publishing = roles & {Role.EXECUTOR, Role.PACER, Role.ROLLBACK}  # the cdevents role publishes no reactor event
    if settings.signatures_required() and settings.signing_key is None and publishing:
        # Checked before any message is taken: a worker that cannot sign would take commands and fail on each.
        raise InvalidInput(
            "signing_key", "REACTOR_REQUIRE_SIGNED is on: a worker signs what it emits; set REACTOR_SIGNING_KEY"
        )
    if Role.EXECUTOR in roles and settings.physical_private_key is not None:
        # OpenSSH refuses such a key, asyncssh would not: refused here for both drivers, before anything is taken.
        check_private_file(settings.physical_private_key, "SSH private key (REACTOR_PHYSICAL_PRIVATE_KEY)")
    bus, store = backends.bus, backends.store
    policy = load_policy_setting(settings)
    with first_reactor_error():
        async with cdevents_publisher(settings, Role.CDEVENTS in roles) as publisher, asyncio.TaskGroup() as tasks:
            if Role.EXECUTOR in roles:
                worker = ExecutorWorker(
                    store,
                    bus,
                    settings=ExecutorSettings(
                        local_root=settings.nodes_root,
                        stop_timeout_s=settings.stop_timeout_s,
                        noop_delay_s=settings.noop_delay_s,
                        physical_driver=settings.physical_driver,
                        physical_inventory=settings.physical_inventory,
                        physical_known_hosts=settings.physical_known_hosts,
                        physical_private_key=settings.physical_private_key,
                        physical_user=settings.physical_user,
                        physical_connect_timeout_s=settings.physical_connect_timeout_s,
                        physical_command_timeout_s=settings.physical_command_timeout_s,
                        physical_concurrency=settings.physical_concurrency,
                        kubeconfig=settings.kubeconfig,
                    ),
                    factories=factories,
                    lease=timedelta(seconds=settings.lease_s),
                    max_age=timedelta(seconds=settings.command_max_age_s) if settings.command_max_age_s else None,
                    policy=policy,
                )
                tasks.create_task(bus.consume([Topic.COMMANDS], "executor", worker.handle))
                keep = settings.processed_keep()
                if keep is not None:
                    tasks.create_task(worker.run_pruning(keep, every_s=min(3600.0, keep.total_seconds() / 4)))
            if Role.ROLLBACK in roles:
                rollback = RollbackConsumer(bus)
                tasks.create_task(bus.consume([Topic.OUTCOMES], "rollback", rollback.handle, wants=rollback.wants))
            if Role.PACER in roles:
                pacer = Pacer(
                    store,
                    bus,
                    concurrent_releases=settings.concurrent_releases,
                    limits=settings.in_flight_limits(),
                    policy=policy,
                )
                tasks.create_task(bus.consume([Topic.RELEASES, Topic.OUTCOMES], "pacer", pacer.handle))
                await pacer.recover_when_possible()
                tasks.create_task(pacer.run_timers(tick_s=settings.timer_tick_s, resend_s=settings.resend_after_s))
            if publisher is not None:
                tasks.create_task(bus.consume([Topic.RELEASES, Topic.OUTCOMES], "cdevents", publisher.handle))
            log.info("worker running", roles=sorted(role.value for role in roles))
            if started is not None:
                started.set()
