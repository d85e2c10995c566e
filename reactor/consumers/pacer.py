"""The Pacer: turns a ReleaseRequested into batches of DeployRequested and moves on as outcomes arrive.

All decisions are pure functions (`reactor.domain.pacer.decide`) of the release as stored; every change is a
compare-and-set, so pacers can run anywhere and restart at any instant. Nodes dispatched before a restart are
sent again with the same event ids and the worker dedupes them. Timers (pauses between batches) and node
deadlines live in the store and are fired by `tick`, which any pacer may run.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from reactor.domain.pacer import (
    ACTIVE,
    FINAL,
    LIVE,
    AwaitApproval,
    BatchCounts,
    Complete,
    Dispatch,
    DispatchRollbacks,
    Gates,
    Halt,
    ItemState,
    PauseUntil,
    ReleaseState,
    RollBackRelease,
    RolledBack,
    StartNextBatch,
    View,
    Wait,
    decide,
)
from reactor.domain.planner import failure_budget, plan_batches
from reactor.errors import ConflictError
from reactor.events import (
    AutoRollback,
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeFailed,
    NodeRolledBack,
    NodeTarget,
    ReleaseAborted,
    ReleaseApproved,
    ReleaseAwaitingApproval,
    ReleaseCompleted,
    ReleaseEvent,
    ReleaseHalted,
    ReleasePaused,
    ReleaseRequested,
    ReleaseResumed,
    ReleaseRollbackRequested,
    ReleaseRolledBack,
    RollbackFailed,
    RollbackRequested,
    derived_event_id,
    utc_now,
)
from reactor.ports import EventBus, ReleaseNode, ReleaseRecord, Store

log = structlog.get_logger(__name__)

_FAN_OUT = 32


@dataclass
class _Turns:
    """Advance passes of one release: how many were asked for and how many a finished pass covered."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requested: int = 0
    completed: int = 0


class Pacer:
    """Handles the releases topic and the node outcomes that belong to a release."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        *,
        clock: Callable[[], datetime] = utc_now,
        concurrent_releases: str = "queue",
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        # One active release per service: a second one waits its turn ("queue") or is refused ("refuse").
        self.concurrent_releases = concurrent_releases
        self._turns: defaultdict[str, _Turns] = defaultdict(_Turns)
        # Dispatching a whole window at once must not open a store call per node all at the same time.
        self._fan_out = asyncio.Semaphore(_FAN_OUT)

    async def handle(self, event: Event) -> None:
        """Start a release, apply a release command, or count a node's outcome and dispatch what may go next."""
        with structlog.contextvars.bound_contextvars(release_id=event.release_id, event_id=event.event_id):
            match event:
                case ReleaseRequested():
                    await self._start(event)
                case NodeDeployed() | NodeFailed() if event.release_id is not None:
                    state = ItemState.SUCCEEDED if isinstance(event, NodeDeployed) else ItemState.FAILED
                    await self._count(event.release_id, event.node_key, ItemState.DISPATCHED, state, event.event_id)
                case NodeRolledBack() | RollbackFailed() if event.release_id is not None:
                    state = ItemState.ROLLED_BACK if isinstance(event, NodeRolledBack) else ItemState.ROLLBACK_FAILED
                    await self._count(
                        event.release_id, event.node_key, ItemState.ROLLBACK_DISPATCHED, state, event.event_id
                    )
                case ReleaseApproved() | ReleasePaused() | ReleaseResumed() | ReleaseAborted():
                    await self._command(event)
                case ReleaseRollbackRequested():
                    await self._command(event)
                case _:
                    return

    # --- recovery and timers ---

    async def recover(self) -> None:
        """Send again every command dispatched without an outcome, then advance every active release."""
        for record in await self.store.list_releases():
            if record.state not in ACTIVE:
                continue
            for node in await self.store.list_release_nodes(record.release_id, state=ItemState.DISPATCHED):
                await self.bus.publish(self._deploy_request(record, node))
            for node in await self.store.list_release_nodes(record.release_id, state=ItemState.ROLLBACK_DISPATCHED):
                await self.bus.publish(self._rollback_request(record, node))
            await self._advance(record.release_id)

    async def tick(self) -> None:
        """Fire what is due: pauses that ended, nodes past their deadline."""
        now = self.clock()
        releases = await self.store.list_releases()
        for record in releases:
            if record.state == ReleaseState.QUEUED:
                await self._promote(record.plan.service)
        for record in releases:
            if record.state not in ACTIVE:
                continue
            deadline = record.plan.strategy.node_deadline_s
            if deadline is not None:
                await self._expire(record, now - timedelta(seconds=deadline))
            if record.state == ReleaseState.WAITING and record.resume_at is not None and record.resume_at <= now:
                await self._advance(record.release_id)

    async def run_timers(self, *, tick_s: float, resend_s: float) -> None:
        """Tick every `tick_s`; every `resend_s`, send again what is dispatched without an outcome."""
        loop = asyncio.get_running_loop()
        next_resend = loop.time() + resend_s
        while True:
            await asyncio.sleep(tick_s)
            await self.tick()
            if loop.time() >= next_resend:
                await self.recover()
                next_resend = loop.time() + resend_s

    async def _expire(self, record: ReleaseRecord, dispatched_before: datetime) -> None:
        # A deploy's min_healthy observation is part of its run, not the worker's delay; rollbacks have none.
        observation = timedelta(seconds=record.plan.strategy.min_healthy_s)
        for state, failed, grace in (
            (ItemState.DISPATCHED, ItemState.FAILED, observation),
            (ItemState.ROLLBACK_DISPATCHED, ItemState.ROLLBACK_FAILED, timedelta(0)),
        ):
            for node in await self.store.list_release_nodes(record.release_id, state=state):
                if node.dispatched_at is None or node.dispatched_at > dispatched_before - grace:
                    continue
                if not await self.store.move_release_node(
                    record.release_id, node.node_key, from_states=[state], to_state=failed, outcome="deadline"
                ):
                    continue
                log.warning("node missed its deadline", node_key=node.node_key)
                if state == ItemState.DISPATCHED:
                    await self.bus.publish(await self._deadline_failure(record, node))
        await self._advance(record.release_id)

    async def _deadline_failure(self, record: ReleaseRecord, node: ReleaseNode) -> NodeFailed:
        """The outcome the worker never sent, as seen by the pacer; the rollback policy applies to it."""
        status = await self.store.get_node(node.node_key)
        running = status.current_version if status is not None else None
        strategy = record.plan.strategy
        return NodeFailed(
            event_id=derived_event_id(record.release_id, node.node_key, "deadline"),
            node_key=node.node_key,
            service=record.plan.service,
            version=record.plan.version,
            current_version=running,
            step="deadline",
            error=f"no outcome within {strategy.node_deadline_s:g}s of dispatch",
            auto_rollback=strategy.auto_rollback,
            release_id=record.release_id,
            causation_id=derived_event_id(record.release_id, node.node_key, "deploy"),
        )

    # --- events ---

    async def _start(self, request: ReleaseRequested) -> None:
        if await self.store.get_release(request.release_id) is None:
            plan = request.plan
            batches = plan_batches(plan.nodes, plan.strategy)
            targets = {node.node_key: node for node in plan.nodes}
            strategy = plan.strategy
            now = self.clock()
            record = ReleaseRecord(
                release_id=request.release_id,
                plan=plan.spec(),
                batch_sizes=[len(batch) for batch in batches],
                budget=failure_budget(strategy.failure_budget, len(plan.nodes)),
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
            saved = await self.store.put_release(record, expected_revision=0)
            if saved is not None:
                log.info("release planned", batches=record.batch_sizes, budget=record.budget)
                busy = await self._active_release_of(saved.plan.service, besides=saved.release_id)
                if busy is None:
                    await self._publish_batch_started(saved, 0)
                elif self.concurrent_releases == "refuse":
                    refused = await self._save(
                        saved, state=ReleaseState.HALTED, reason=f"refused: release {busy} of {plan.service} is active"
                    )
                    await self._publish_halted(refused)
                    return
                else:
                    await self._save(saved, state=ReleaseState.QUEUED, reason=f"queued behind release {busy}")
                    log.info("release queued", behind=busy)
                    return
        else:
            log.info("release already known; resuming it")
        await self._advance(request.release_id)

    async def _active_release_of(self, service: str, *, besides: str) -> str | None:
        """The id of another active release of `service`, if there is one."""
        for other in await self.store.list_releases():
            if other.release_id != besides and other.plan.service == service and other.state in ACTIVE:
                return other.release_id
        return None

    async def _promote(self, service: str) -> None:
        """Start the oldest queued release of `service` once no other release of it is active."""
        releases = await self.store.list_releases()
        if any(other.plan.service == service and other.state in ACTIVE for other in releases):
            return
        queued = [other for other in releases if other.plan.service == service and other.state == ReleaseState.QUEUED]
        if not queued:
            return
        oldest = min(queued, key=lambda other: other.created_at)
        try:
            started = await self._save(oldest, state=ReleaseState.RUNNING, reason="")
        except ConflictError:
            return  # another pacer promoted it first
        log.info("queued release starts", release_id=started.release_id)
        await self._publish_batch_started(started, 0)
        await self._advance(started.release_id)

    async def _count(
        self, release_id: str, node_key: str, from_state: ItemState, to_state: ItemState, outcome: str
    ) -> None:
        with structlog.contextvars.bound_contextvars(node_key=node_key):
            if await self.store.move_release_node(
                release_id, node_key, from_states=[from_state], to_state=to_state, outcome=outcome
            ):
                log.info("node outcome counted", state=to_state.value)
            await self._advance(release_id)

    async def _command(self, command: ReleaseEvent) -> None:
        record = await self.store.get_release(command.release_id)
        if record is None:
            log.warning("command for an unknown release ignored", command=type(command).__name__)
            return
        who = getattr(command, "actor", None) or "someone"
        why = getattr(command, "reason", "")
        changes: dict[str, object] | None = None
        match command:
            case ReleaseApproved() if record.state == ReleaseState.AWAITING_APPROVAL:
                changes = {"state": ReleaseState.RUNNING, "approved_batch": record.batch}
            case ReleasePaused() if record.state in LIVE - {ReleaseState.PAUSED}:
                changes = {"state": ReleaseState.PAUSED, "resume_at": None}
            case ReleaseResumed() if record.state == ReleaseState.PAUSED:
                changes = {"state": ReleaseState.RUNNING}
            case ReleaseAborted() if record.state in LIVE:
                changes = {"state": ReleaseState.ABORTED, "reason": f"aborted by {who}{': ' + why if why else ''}"}
            case ReleaseRollbackRequested() if record.state not in {
                ReleaseState.ROLLING_BACK,
                ReleaseState.ROLLED_BACK,
            }:
                changes = {
                    "state": ReleaseState.ROLLING_BACK,
                    "reason": f"rollback requested by {who}{': ' + why if why else ''}",
                }
            case _:
                log.info("command does not apply", command=type(command).__name__, state=record.state.value)
        if changes is not None:
            saved = await self._save(record, **changes)
            log.info("release command applied", command=type(command).__name__, state=saved.state.value)
            if saved.state == ReleaseState.ABORTED:
                await self._publish_halted(saved)
        await self._advance(command.release_id)

    # --- the decision loop ---

    async def _advance(self, release_id: str) -> None:
        """Apply pacing decisions until the release must wait.

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
        record = await self.store.get_release(release_id)
        if record is not None and record.state in FINAL:
            await self._promote(record.plan.service)

    async def _advance_once(self, release_id: str) -> None:  # noqa: PLR0912 (one branch per kind of decision)
        """One pass of pacing decisions, until the release must wait."""
        while True:
            record = await self.store.get_release(release_id)
            if record is None:
                return
            batch_counts = BatchCounts.of(await self.store.count_release_nodes(release_id, batch=record.batch))
            totals = BatchCounts.of(await self.store.count_release_nodes(release_id))
            decision = decide(self._view(record, batch_counts, totals))
            match decision:
                case Wait():
                    return
                case Dispatch(count=count):
                    await self._dispatch(record, count)
                    return
                case DispatchRollbacks(count=count):
                    await self._dispatch_rollbacks(record, count)
                    return
                case StartNextBatch(report_completed=report):
                    if report:
                        await self._publish_batch_completed(record, batch_counts)
                    saved = await self._save(record, batch=record.batch + 1, state=ReleaseState.RUNNING, resume_at=None)
                    await self._publish_batch_started(saved, saved.batch)
                case AwaitApproval():
                    await self._publish_batch_completed(record, batch_counts)
                    await self._save(record, state=ReleaseState.AWAITING_APPROVAL)
                    await self.bus.publish(
                        ReleaseAwaitingApproval(
                            event_id=derived_event_id(release_id, "batch", str(record.batch), "approval"),
                            release_id=release_id,
                            causation_id=record.request_id,
                            batch=record.batch,
                        )
                    )
                    return
                case PauseUntil(resume_at=resume_at):
                    await self._publish_batch_completed(record, batch_counts)
                    await self._save(record, state=ReleaseState.WAITING, resume_at=resume_at)
                    log.info("pausing between batches", resume_at=resume_at.isoformat())
                    return
                case Complete():
                    await self._publish_batch_completed(record, batch_counts)
                    await self._save(record, state=ReleaseState.COMPLETED)
                    log.info("release completed")
                    await self.bus.publish(
                        ReleaseCompleted(
                            event_id=derived_event_id(release_id, "completed"),
                            release_id=release_id,
                            causation_id=record.request_id,
                            succeeded=totals.succeeded,
                            failed=totals.failed,
                        )
                    )
                    return
                case Halt(reason=reason):
                    saved = await self._save(record, state=ReleaseState.HALTED, reason=reason)
                    log.warning("release halted", reason=reason)
                    await self._publish_halted(saved)
                    return
                case RollBackRelease(reason=reason):
                    saved = await self._save(record, state=ReleaseState.ROLLING_BACK, reason=reason)
                    log.warning("rolling the release back", reason=reason)
                    await self._publish_halted(saved)
                case RolledBack():
                    await self._save(record, state=ReleaseState.ROLLED_BACK)
                    log.info("release rolled back")
                    await self.bus.publish(
                        ReleaseRolledBack(
                            event_id=derived_event_id(release_id, "rolled_back"),
                            release_id=release_id,
                            causation_id=record.request_id,
                            rolled_back=totals.rolled_back,
                            failed=totals.rollback_failed,
                        )
                    )
                    return

    def _view(self, record: ReleaseRecord, batch_counts: BatchCounts, totals: BatchCounts) -> View:
        strategy = record.plan.strategy
        batch_size = record.batch_sizes[record.batch] if record.batch < len(record.batch_sizes) else 0
        return View(
            state=record.state,
            batch=record.batch,
            batch_count=len(record.batch_sizes),
            batch_counts=batch_counts,
            totals=totals,
            budget=record.budget,
            batch_budget=None
            if strategy.batch_failure_budget is None
            else failure_budget(strategy.batch_failure_budget, batch_size),
            max_parallel=strategy.max_parallel,
            gates=Gates(
                pause_s=strategy.pause_between_batches_s,
                approval_every_batch=strategy.approval_every_batch,
                approval_after=frozenset(strategy.approval_after_batches),
            ),
            approved_batch=record.approved_batch,
            resume_at=record.resume_at,
            now=self.clock(),
            rollback_on_budget=strategy.auto_rollback == AutoRollback.RELEASE,
        )

    async def _dispatch(self, record: ReleaseRecord, count: int) -> None:
        queued = await self.store.list_release_nodes(
            record.release_id, batch=record.batch, state=ItemState.QUEUED, limit=count
        )
        await self._send(record, queued, ItemState.QUEUED, ItemState.DISPATCHED, self._deploy_request)

    async def _dispatch_rollbacks(self, record: ReleaseRecord, count: int) -> None:
        deployed = await self.store.list_release_nodes(record.release_id, state=ItemState.SUCCEEDED)
        newest_first = sorted(deployed, key=lambda node: node.position, reverse=True)[:count]
        await self._send(
            record, newest_first, ItemState.SUCCEEDED, ItemState.ROLLBACK_DISPATCHED, self._rollback_request
        )

    async def _send(
        self,
        record: ReleaseRecord,
        nodes: list[ReleaseNode],
        from_state: ItemState,
        to_state: ItemState,
        command: Callable[[ReleaseRecord, ReleaseNode], Event],
    ) -> None:
        """Record each node as sent (a CAS: a node is sent once) and publish its command."""
        now = self.clock()

        async def send(node: ReleaseNode) -> None:
            async with self._fan_out:
                if await self.store.move_release_node(
                    record.release_id, node.node_key, from_states=[from_state], to_state=to_state, dispatched_at=now
                ):
                    await self.bus.publish(command(record, node))

        await asyncio.gather(*(send(node) for node in nodes))

    async def _save(self, record: ReleaseRecord, **changes: object) -> ReleaseRecord:
        updated = record.model_copy(update={**changes, "updated_at": self.clock()})
        saved = await self.store.put_release(updated, expected_revision=record.revision)
        if saved is None:
            raise ConflictError(f"release {record.release_id} changed under the pacer")
        return saved

    # --- what the pacer publishes ---

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

    async def _publish_batch_completed(self, record: ReleaseRecord, counts: BatchCounts) -> None:
        await self.bus.publish(
            BatchCompleted(
                event_id=derived_event_id(record.release_id, "batch", str(record.batch), "completed"),
                release_id=record.release_id,
                causation_id=record.request_id,
                batch=record.batch,
                succeeded=counts.succeeded,
                failed=counts.failed,
            )
        )

    async def _publish_halted(self, record: ReleaseRecord) -> None:
        totals = BatchCounts.of(await self.store.count_release_nodes(record.release_id))
        await self.bus.publish(
            ReleaseHalted(
                event_id=derived_event_id(record.release_id, "halted"),
                release_id=record.release_id,
                causation_id=record.request_id,
                reason=record.reason,
                succeeded=totals.succeeded,
                failed=totals.failed,
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
            min_healthy_s=plan.strategy.min_healthy_s,
            release_id=record.release_id,
            causation_id=record.request_id,
            actor=record.actor,
        )

    def _rollback_request(self, record: ReleaseRecord, node: ReleaseNode) -> RollbackRequested:
        """The release-level rollback of one node; its id is fixed by release and node."""
        return RollbackRequested(
            event_id=derived_event_id(record.release_id, node.node_key, "rollback"),
            node_key=node.node_key,
            service=record.plan.service,
            release_id=record.release_id,
            causation_id=record.request_id,
            reason=f"release rollback: {record.reason}"[:4000],
            actor=record.actor,
        )
