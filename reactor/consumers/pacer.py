"""The Pacer: turns a ReleaseRequested into batches of DeployRequested and moves on as outcomes arrive.

State lives in the store (release record + one row per node), so a Pacer that restarts resumes: nodes
dispatched before the restart are sent again with the same event ids, and the worker dedupes them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from reactor.domain.pacer import (
    BatchCounts,
    Complete,
    Dispatch,
    Halt,
    ItemState,
    NextBatch,
    ReleaseState,
    Wait,
    decide,
)
from reactor.domain.planner import failure_budget, plan_batches
from reactor.errors import ConflictError
from reactor.events import (
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeTarget,
    ReleaseCompleted,
    ReleaseHalted,
    ReleaseRequested,
    derived_event_id,
    utc_now,
)
from reactor.ports import EventBus, ReleaseNode, ReleaseRecord, Store

log = structlog.get_logger(__name__)


@dataclass
class _Turns:
    """Advance passes of one release: how many were asked for and how many a finished pass covered."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requested: int = 0
    completed: int = 0


class Pacer:
    """Handles ReleaseRequested (releases topic) and NodeDeployed/NodeFailed of releases (outcomes topic)."""

    def __init__(self, store: Store, bus: EventBus, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self._turns: defaultdict[str, _Turns] = defaultdict(_Turns)

    async def handle(self, event: Event) -> None:
        """Start a release, or count a node's outcome and dispatch what may go next."""
        if isinstance(event, ReleaseRequested):
            with structlog.contextvars.bound_contextvars(release_id=event.release_id, event_id=event.event_id):
                await self._start(event)
        elif isinstance(event, NodeDeployed | NodeFailed) and event.release_id is not None:
            with structlog.contextvars.bound_contextvars(
                release_id=event.release_id, node_key=event.node_key, event_id=event.event_id
            ):
                await self._count(event, event.release_id)

    async def watch_dispatched(self, interval_s: float) -> None:
        """Every `interval_s`, send again what is dispatched without an outcome, until cancelled.

        A pacer killed between recording a dispatch and publishing it would otherwise leave that node waiting
        forever. Sending again is safe: the command keeps its event id, one node's commands stay in order on
        their partition, and the worker re-emits the recorded outcome of a request it already finished.
        """
        while True:
            await asyncio.sleep(interval_s)
            await self.recover()

    async def recover(self) -> None:
        """After a restart: send again every node dispatched but without an outcome, then go on."""
        for record in await self.store.list_releases():
            if record.state != ReleaseState.RUNNING:
                continue
            for node in await self.store.list_release_nodes(record.release_id, state=ItemState.DISPATCHED):
                await self.bus.publish(self._deploy_request(record, node))
            await self._advance(record.release_id)

    async def _start(self, request: ReleaseRequested) -> None:
        if await self.store.get_release(request.release_id) is None:
            plan = request.plan
            batches = plan_batches([node.node_key for node in plan.nodes], plan.strategy)
            targets = {node.node_key: node for node in plan.nodes}
            now = self.clock()
            record = ReleaseRecord(
                release_id=request.release_id,
                plan=plan.spec(),
                batch_sizes=[len(batch) for batch in batches],
                budget=failure_budget(plan.strategy, len(plan.nodes)),
                request_id=request.event_id,
                actor=request.actor,
                created_at=now,
                updated_at=now,
            )
            # Rows first, record last: a record exists only once all of its nodes do.
            await self.store.add_release_nodes(
                [
                    ReleaseNode(
                        release_id=request.release_id, node_key=key, batch=index, position=position, target=targets[key]
                    )
                    for position, (index, key) in enumerate(
                        (index, key) for index, batch in enumerate(batches) for key in batch
                    )
                ]
            )
            if await self.store.put_release(record, expected_revision=0) is not None:
                log.info("release planned", batches=record.batch_sizes, budget=record.budget)
                await self._publish_batch_started(record, 0)
        else:
            log.info("release already known; resuming it")
        await self._advance(request.release_id)

    async def _count(self, outcome: NodeDeployed | NodeFailed, release_id: str) -> None:
        to_state = ItemState.SUCCEEDED if isinstance(outcome, NodeDeployed) else ItemState.FAILED
        moved = await self.store.move_release_node(
            release_id,
            outcome.node_key,
            from_states=[ItemState.DISPATCHED],
            to_state=to_state,
            outcome=outcome.event_id,
        )
        if moved:
            log.info("node outcome counted", state=to_state.value)
        await self._advance(release_id)

    async def _advance(self, release_id: str) -> None:
        """Apply pacing decisions until the release must wait for an outcome.

        Passes are serialised per release and coalesced: a caller waits for a pass that began after its own
        write (so it saw it), and one pass serves every caller queued behind the one running.
        """
        turn = self._turns[release_id]
        turn.requested += 1
        mine = turn.requested
        async with turn.lock:
            if turn.completed >= mine:
                return
            covered = turn.requested
            await self._advance_once(release_id)
            turn.completed = covered

    async def _advance_once(self, release_id: str) -> None:
        """One pass of pacing decisions, until the release must wait."""
        while True:
            record = await self.store.get_release(release_id)
            if record is None:
                return
            counts = await self.store.count_release_nodes(release_id, batch=record.batch)
            totals = await self.store.count_release_nodes(release_id)
            decision = decide(
                state=record.state,
                batch=record.batch,
                batch_count=len(record.batch_sizes),
                counts=BatchCounts(
                    queued=counts[ItemState.QUEUED],
                    dispatched=counts[ItemState.DISPATCHED],
                    succeeded=counts[ItemState.SUCCEEDED],
                    failed=counts[ItemState.FAILED],
                ),
                total_failed=totals[ItemState.FAILED],
                budget=record.budget,
                max_parallel=record.plan.strategy.max_parallel,
            )
            match decision:
                case Wait():
                    return
                case Dispatch(count=count):
                    await self._dispatch(record, count)
                    return
                case NextBatch():
                    await self._publish_batch_completed(record, counts)
                    await self._save(record, batch=record.batch + 1)
                    await self._publish_batch_started(record, record.batch + 1)
                case Complete():
                    await self._publish_batch_completed(record, counts)
                    await self._save(record, state=ReleaseState.COMPLETED)
                    log.info("release completed")
                    await self.bus.publish(
                        ReleaseCompleted(
                            event_id=derived_event_id(release_id, "completed"),
                            release_id=release_id,
                            causation_id=record.request_id,
                            succeeded=totals[ItemState.SUCCEEDED],
                            failed=totals[ItemState.FAILED],
                        )
                    )
                    return
                case Halt(reason=reason):
                    await self._save(record, state=ReleaseState.HALTED, reason=reason)
                    log.warning("release halted", reason=reason)
                    await self.bus.publish(
                        ReleaseHalted(
                            event_id=derived_event_id(release_id, "halted"),
                            release_id=release_id,
                            causation_id=record.request_id,
                            reason=reason,
                            succeeded=totals[ItemState.SUCCEEDED],
                            failed=totals[ItemState.FAILED],
                        )
                    )
                    return

    async def _dispatch(self, record: ReleaseRecord, count: int) -> None:
        queued = await self.store.list_release_nodes(
            record.release_id, batch=record.batch, state=ItemState.QUEUED, limit=count
        )

        async def dispatch(node: ReleaseNode) -> None:
            if await self.store.move_release_node(
                record.release_id, node.node_key, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
            ):
                await self.bus.publish(self._deploy_request(record, node))

        await asyncio.gather(*(dispatch(node) for node in queued))

    async def _save(self, record: ReleaseRecord, **changes: object) -> None:
        updated = record.model_copy(update={**changes, "updated_at": self.clock()})
        if await self.store.put_release(updated, expected_revision=record.revision) is None:
            raise ConflictError(f"release {record.release_id} changed under the pacer")

    async def _publish_batch_started(self, record: ReleaseRecord, batch: int) -> None:
        nodes = await self.store.list_release_nodes(record.release_id, batch=batch)
        await self.bus.publish(
            BatchStarted(
                event_id=derived_event_id(record.release_id, "batch", str(batch), "started"),
                release_id=record.release_id,
                causation_id=record.request_id,
                batch=batch,
                node_keys=[node.node_key for node in nodes],
            )
        )

    async def _publish_batch_completed(self, record: ReleaseRecord, counts: dict[ItemState, int]) -> None:
        await self.bus.publish(
            BatchCompleted(
                event_id=derived_event_id(record.release_id, "batch", str(record.batch), "completed"),
                release_id=record.release_id,
                causation_id=record.request_id,
                batch=record.batch,
                succeeded=counts[ItemState.SUCCEEDED],
                failed=counts[ItemState.FAILED],
            )
        )

    def _deploy_request(self, record: ReleaseRecord, node: ReleaseNode) -> DeployRequested:
        """The command for one node of a release; its id is fixed by release and node, so resending dedupes."""
        plan = record.plan
        target = node.target or NodeTarget(node_key=node.node_key)
        return DeployRequested(
            event_id=derived_event_id(record.release_id, node.node_key, "deploy"),
            node_key=node.node_key,
            service=plan.service,
            version=plan.version,
            package=target.package or plan.package,
            image=target.image or plan.image,
            container=target.container or plan.container,
            port=target.port,
            health=plan.health,
            auto_rollback=plan.strategy.auto_rollback,
            release_id=record.release_id,
            causation_id=record.request_id,
            actor=record.actor,
        )
