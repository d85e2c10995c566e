"""The Pacer: turns a ReleaseRequested into batches of DeployRequested and moves on as outcomes arrive.

All decisions are pure functions (`reactor.domain.pacer.decide`) of the release as stored; every change is a
compare-and-set, so pacers can run anywhere and restart at any instant. Nodes dispatched before a restart are
sent again with the same event ids and the worker dedupes them. Timers (pauses between batches) and node
deadlines live in the store and are fired by `tick`, which the pacer holding the timer lease runs.

In-flight limits across releases (overall, per service, per label such as zone or cluster, and each release's
`max_parallel` across pacer processes) are slots in the store: a node is dispatched once it holds a slot of
every scope that applies to it, and gives them back with its outcome (`reactor.domain.limits`).

A release rollback takes every deployed node back within the release's window, newest batch first; a fast one
(asked with `fast`, or the strategy's `fast_rollback`) opens the window to `rollback_parallel` or to every node,
and only the limits across releases hold it back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import uuid4

from reactor import logs
from reactor.domain.limits import InFlightLimits, scopes_for
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
    rollback_window,
)
from reactor.domain.planner import failure_budget, plan_batches
from reactor.eager import run_all, started
from reactor.errors import ConflictError, ReactorError
from reactor.events import (
    AutoRollback,
    BatchCompleted,
    BatchStarted,
    DeployRequested,
    Event,
    NodeDeployed,
    NodeEvent,
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
    event_document,
    event_from_document,
    utc_now,
)
from reactor.ports import EventBus, ReleaseNode, ReleaseRecord, Store
from reactor.trust.enforcement import current_signer
from reactor.trust.policy import Command, Policy

log = logs.get_logger(__name__)

_FAN_OUT = 32
_TEMPLATES_KEPT = 64
TIMER_LEASE = "pacer-timers"
# A slot whose node is not in flight is a leftover of a pacer that died between taking it and dispatching
# (or between an outcome and giving it back); it is freed once it is this old. Far longer than the one store
# call between taking a node's slots and recording it as sent, even on a loaded store.
_SLOT_GRACE_S = 60.0
_DISPATCHED = (ItemState.DISPATCHED, ItemState.ROLLBACK_DISPATCHED)
# A node failed by its deadline is recorded before its NodeFailed is published, and marked once it is.
DEADLINE = "deadline"
DEADLINE_ANNOUNCED = "deadline, announced"


_COMMANDS: dict[type[Event], Command] = {
    ReleaseApproved: "approve",
    ReleasePaused: "pause",
    ReleaseResumed: "resume",
    ReleaseAborted: "abort",
    ReleaseRollbackRequested: "rollback",
}


def _summed(counts: Iterable[dict[ItemState, int]]) -> dict[ItemState, int]:
    """Per-state counts added up (a release's, from its batches')."""
    total: dict[ItemState, int] = defaultdict(int)
    for each in counts:
        for state, count in each.items():
            total[state] += count
    return total


@dataclass
class _Turns:
    """Advance passes of one release: how many were asked for and how many a finished pass covered, and whether
    a caller that did not wait asked for one while a pass ran (the pass runs again for it)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requested: int = 0
    completed: int = 0
    again: bool = False


class Pacer:
    """Handles the releases topic and the node outcomes that belong to a release."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        *,
        clock: Callable[[], datetime] = utc_now,
        concurrent_releases: str = "queue",
        limits: InFlightLimits | None = None,
        identity: str | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.store = store
        # The deploy policy checked on each release and release command (None: everything is allowed).
        self.policy = policy
        self.bus = bus
        self.clock = clock
        self.limits = limits or InFlightLimits()
        # Who holds the timer lease: one pacer process fires timers at a time.
        self.identity = identity or f"pacer-{uuid4().hex[:12]}"
        # One active release per service: a second one waits its turn ("queue") or is refused ("refuse").
        self.concurrent_releases = concurrent_releases
        self._turns: defaultdict[str, _Turns] = defaultdict(_Turns)
        # Dispatching a whole window at once must not open a store call per node all at the same time.
        self._fan_out = asyncio.Semaphore(_FAN_OUT)
        # Per release, nodes whose record as sent may have landed though no attempt answered (see `_record_sent`):
        # the release's next pass finishes them before anything else.
        self._unsettled: defaultdict[str, dict[str, tuple[ReleaseNode, ItemState, ItemState]]] = defaultdict(dict)
        # Per release (the last few), its first node's command, validated: the others' are copies of it with their
        # own fields (see `_deploy_request`).
        self._deploy_templates: dict[str, DeployRequested] = {}

    async def handle(self, event: Event) -> None:
        """Start a release, apply a release command, or count a node's outcome and dispatch what may go next."""
        bound: dict[str, object] = {"release_id": event.release_id, "event_id": event.event_id}
        if isinstance(event, NodeEvent):
            bound["node_key"] = event.node_key
        with logs.bound(**bound):
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
        """Publish what a pacer decided but may not have announced, send again every command dispatched
        without an outcome, then advance every active release."""
        for record in await self.store.list_releases():
            if record.outbox:
                record = await self._flush(record)  # noqa: PLW2901 (the record as it is after the flush)
            if record.state not in ACTIVE:
                continue
            for node in await self.store.list_release_nodes(record.release_id, state=ItemState.DISPATCHED):
                await self.bus.publish(self._deploy_request(record, node))
            for node in await self.store.list_release_nodes(record.release_id, state=ItemState.ROLLBACK_DISPATCHED):
                await self.bus.publish(self._rollback_request(record, node))
            # A deadline failure is recorded before it is published; a pacer that died between the two
            # leaves it unannounced. Same id each time: consumers dedupe.
            for node in await self.store.list_release_nodes(record.release_id, state=ItemState.FAILED):
                if node.outcome == DEADLINE:
                    await self._announce_deadline_failure(record, node)
            await self._advance(record.release_id)

    async def recover_when_possible(self, *, retry_s: float = 1.0) -> None:
        """`recover`, again every `retry_s` while the store cannot answer. A pacer that died mid-write leaves the
        release record's lock to expire (a minute), and the store may be down: a pacer starting then waits, rather
        than fail and take its worker process down with it. Every effect of `recover` is a CAS or a command with a
        fixed id, so a try that failed halfway is safe to make again."""
        while True:
            try:
                await self.recover()
            except ReactorError as exc:
                if not exc.retriable:
                    raise
                log.warning("recovering the releases failed; trying again", error=str(exc), retry_s=retry_s)
                await asyncio.sleep(retry_s)
            else:
                return

    async def tick(self) -> None:
        """Fire what is due: queued releases whose turn came, pauses that ended, nodes past their deadline.

        A release is advanced only when something of it is due (or, with limits across releases, when a slot
        another release gave back may let it go on), so a tick over idle releases costs a few reads.
        """
        now = self.clock()
        releases = await self.store.list_releases()
        for service in sorted({record.plan.service for record in releases if record.state == ReleaseState.QUEUED}):
            await self._promote(service)
        for record in releases:
            if record.state not in ACTIVE:
                continue
            due = False
            deadline = record.plan.strategy.node_deadline_s
            if deadline is not None:
                due = await self._expire(record, now - timedelta(seconds=deadline))
            if record.state == ReleaseState.WAITING and record.resume_at is not None and record.resume_at <= now:
                due = True
            if self.limits.global_ and record.state in {ReleaseState.RUNNING, ReleaseState.ROLLING_BACK}:
                due = True
            if due:
                await self._advance(record.release_id)
        if self.limits.any:
            await self._sweep_slots(now)

    async def run_timers(self, *, tick_s: float, resend_s: float) -> None:
        """While holding the timer lease, tick every `tick_s` and every `resend_s` send again what is
        dispatched without an outcome. Every pacer runs this; the lease lets one of them work at a time and
        passes to another within a few ticks of the holder dying.
        """
        loop = asyncio.get_running_loop()
        ttl_s = max(5 * tick_s, 3.0)
        next_resend = loop.time() + resend_s
        try:
            while True:
                await asyncio.sleep(tick_s)
                try:
                    if not await self.store.take_lease(TIMER_LEASE, self.identity, now=self.clock(), ttl_s=ttl_s):
                        continue
                    await self.tick()
                    if loop.time() >= next_resend:
                        await self.recover()
                        next_resend = loop.time() + resend_s
                except ReactorError as exc:
                    if not exc.retriable:
                        raise
                    # A store that does not answer now may at the next tick; every effect of a tick is a CAS.
                    log.warning("timer tick failed; trying again at the next one", error=str(exc))
        finally:
            # A pacer that stops hands the timers over at once rather than after the lease runs out.
            with contextlib.suppress(ReactorError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self.store.release_lease(TIMER_LEASE, self.identity))

    async def _sweep_slots(self, now: datetime) -> None:
        """Free slots whose node is not in flight (left by a pacer that died at the wrong instant)."""
        slots = await self.store.list_slots()
        old = now - timedelta(seconds=_SLOT_GRACE_S)
        for release_id in sorted({slot.release_id for slot in slots}):
            in_flight = {
                node.node_key
                for state in _DISPATCHED
                for node in await self.store.list_release_nodes(release_id, state=state)
            }
            leftovers = {
                slot.node_key
                for slot in slots
                if slot.release_id == release_id and slot.node_key not in in_flight and slot.taken_at <= old
            }
            for node_key in sorted(leftovers):
                log.warning("freeing a leftover slot", release_id=release_id, node_key=node_key)
                await self.store.free_slots(release_id, node_key)

    async def _expire(self, record: ReleaseRecord, dispatched_before: datetime) -> bool:
        """Fail the nodes dispatched before `dispatched_before` that have no outcome; whether any was."""
        expired = False
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
                    record.release_id, node.node_key, from_states=[state], to_state=failed, outcome=DEADLINE
                ):
                    continue
                expired = True
                log.warning("node missed its deadline", node_key=node.node_key)
                if self.limits.any:
                    await self.store.free_slots(record.release_id, node.node_key)
                if state == ItemState.DISPATCHED:
                    await self._announce_deadline_failure(record, node)
        return expired

    async def _announce_deadline_failure(self, record: ReleaseRecord, node: ReleaseNode) -> None:
        await self.bus.publish(await self._deadline_failure(record, node))
        await self.store.move_release_node(
            record.release_id,
            node.node_key,
            from_states=[ItemState.FAILED],
            to_state=ItemState.FAILED,
            outcome=DEADLINE_ANNOUNCED,
        )

    async def _deadline_failure(self, record: ReleaseRecord, node: ReleaseNode) -> NodeFailed:
        """The outcome the worker never sent, as seen by the pacer; the rollback policy applies to it."""
        status = await self.store.get_node(node.node_key)
        running = status.current_version if status is not None else None
        strategy = record.plan.strategy
        return NodeFailed(
            event_id=derived_event_id(record.release_id, node.node_key, DEADLINE),
            node_key=node.node_key,
            service=record.plan.service,
            version=record.plan.version,
            current_version=running,
            step="deadline",
            error=f"no outcome within {(strategy.node_deadline_s or 0) + strategy.min_healthy_s:g}s of dispatch",
            auto_rollback=strategy.auto_rollback,
            release_id=record.release_id,
            causation_id=derived_event_id(record.release_id, node.node_key, "deploy"),
        )

    # --- events ---

    async def _start(self, request: ReleaseRequested) -> None:
        signer = current_signer()
        submitter = None if signer is None else signer.name
        if self.policy is not None:
            # Before anything is stored: a refused release is dead-lettered with nothing planned.
            self.policy.check_release(submitter, request.plan)
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
                settled={},
                budget=failure_budget(strategy.failure_budget, len(plan.nodes)),
                request_id=request.event_id,
                actor=request.actor,
                submitter=submitter,
                created_at=now,
                updated_at=now,
            )
            # Rows first, record last: a record exists only once all of its nodes do. Made as the store takes them
            # (a generator): the rows of 100,000 nodes made at once took 150 MB.
            await self.store.add_release_nodes(
                ReleaseNode(
                    release_id=request.release_id, node_key=key, batch=index, position=position, target=targets[key]
                )
                for position, (index, key) in enumerate(
                    (index, key) for index, batch in enumerate(batches) for key in batch
                )
            )
            saved = await self.store.put_release(record, expected_revision=0)
            if saved is not None:
                log.info("release planned", batches=record.batch_sizes, budget=record.budget)
                busy = await self._active_release_of(saved.plan.service, besides=saved.release_id)
                if busy is None:
                    await self._save(saved, [await self._batch_started(saved, 0)])
                elif self.concurrent_releases == "refuse":
                    reason = f"refused: release {busy} of {plan.service} is active"
                    halted = await self._halted(saved, reason)
                    await self._save(saved, [halted], state=ReleaseState.HALTED, reason=reason)
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
            started = await self._save(
                oldest, [await self._batch_started(oldest, 0)], state=ReleaseState.RUNNING, reason=""
            )
        except ConflictError:
            return  # another pacer promoted it first
        log.info("queued release starts", release_id=started.release_id)
        await self._advance(started.release_id)

    async def _count(
        self, release_id: str, node_key: str, from_state: ItemState, to_state: ItemState, outcome: str
    ) -> None:
        counted = await self.store.move_release_node(
            release_id, node_key, from_states=[from_state], to_state=to_state, outcome=outcome
        )
        if counted:
            log.info("node outcome counted", state=to_state.value)
            if self.limits.any:
                await self.store.free_slots(release_id, node_key)
            if self.limits.global_:
                # The other releases get the first go at the freed slots, so releases sharing a limit take
                # turns rather than the first one keeping it until it is done.
                await self._wake_others(release_id)
        # The count is durable: a pass running now runs again for it, rather than this handler waiting (and
        # holding one of the bus's concurrent handlers) while a long pass, such as a whole window's dispatch, runs.
        await self._advance(release_id, wait=False)

    async def _wake_others(self, release_id: str) -> None:
        """A slot of a limit across releases came free: let the other releases that may use it go on."""
        for other in await self.store.list_releases():
            if other.release_id != release_id and other.state in {ReleaseState.RUNNING, ReleaseState.ROLLING_BACK}:
                await self._advance(other.release_id)

    async def _command(self, command: ReleaseEvent) -> None:
        record = await self.store.get_release(command.release_id)
        if record is None:
            log.warning("command for an unknown release ignored", command=type(command).__name__)
            return
        if self.policy is not None:
            signer = current_signer()
            self.policy.check_command(
                None if signer is None else signer.name, _COMMANDS[type(command)], record.plan.service, record.submitter
            )
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
                    "fast_rollback": command.fast or record.plan.strategy.fast_rollback,
                }
            case ReleaseRollbackRequested() if (
                command.fast and record.state == ReleaseState.ROLLING_BACK and not record.fast_rollback
            ):
                # A rollback under way is sped up: the nodes it has not sent yet go at once.
                changes = {"fast_rollback": True}
            case _:
                log.info("command does not apply", command=type(command).__name__, state=record.state.value)
        if changes is not None:
            announce: list[Event] = []
            if changes.get("state") == ReleaseState.ABORTED:
                announce.append(await self._halted(record, str(changes["reason"])))
            saved = await self._save(record, announce, **changes)
            log.info("release command applied", command=type(command).__name__, state=saved.state.value)
        await self._advance(command.release_id)

    # --- the decision loop ---

    async def _advance(self, release_id: str, *, wait: bool = True) -> None:
        """Apply pacing decisions until the release must wait.

        Passes are serialised per release and coalesced: a caller waits for a pass that began after its own
        write (so it saw it), and one pass serves every caller queued behind the one running. A caller that does
        not `wait` returns at once while a pass runs; that pass then runs again before it lets the release go, so
        the caller's write is still seen (and a pacer that dies meanwhile advances every release at its restart).
        """
        turn = self._turns[release_id]
        turn.requested += 1
        mine = turn.requested
        if not wait and turn.lock.locked():
            turn.again = True
            return
        ended: str | None = None
        async with turn.lock:
            if turn.completed >= mine:
                return
            if not wait:
                # An outcome's pass lets the handlers already due run first: the outcomes that came together are
                # all counted (their callers return, as a pass is running) before the one pass that serves them.
                await asyncio.sleep(0)
            while True:
                turn.again = False
                covered = turn.requested
                ended = await self._advance_once(release_id)
                turn.completed = covered
                if ended is not None or not turn.again:
                    break
        if ended is not None:
            await self._promote(ended)

    async def _advance_once(self, release_id: str) -> str | None:  # noqa: PLR0912 (one branch per kind of decision)
        """One pass of pacing decisions, until the release must wait; the service of a release that is over."""
        while True:
            record = await self.store.get_release(release_id)
            if record is None:
                return None
            if record.outbox:
                record = await self._flush(record)
            await self._settle_sent(record)
            if record.state in FINAL:
                return record.plan.service
            batch_counts, totals = await self._counts(record)
            view = self._view(record, batch_counts, totals)
            decision = decide(view)
            announce: list[Event]
            match decision:
                case Wait():
                    return None
                case Dispatch(count=count):
                    await self._dispatch(record, count)
                    return None
                case DispatchRollbacks(count=count):
                    window = rollback_window(view)
                    await self._dispatch_rollbacks(record, count, sum(record.batch_sizes) if window is None else window)
                    return None
                case StartNextBatch(report_completed=report):
                    announce = [self._batch_completed(record, batch_counts)] if report else []
                    announce.append(await self._batch_started(record, record.batch + 1))
                    settled = None if record.settled is None else _summed([record.settled, batch_counts.by_state()])
                    await self._save(
                        record,
                        announce,
                        batch=record.batch + 1,
                        settled=settled,
                        state=ReleaseState.RUNNING,
                        resume_at=None,
                    )
                case AwaitApproval():
                    approval = ReleaseAwaitingApproval(
                        event_id=derived_event_id(release_id, "batch", str(record.batch), "approval"),
                        release_id=release_id,
                        causation_id=record.request_id,
                        batch=record.batch,
                    )
                    announce = [self._batch_completed(record, batch_counts), approval]
                    await self._save(record, announce, state=ReleaseState.AWAITING_APPROVAL)
                    return None
                case PauseUntil(resume_at=resume_at):
                    announce = [self._batch_completed(record, batch_counts)]
                    await self._save(record, announce, state=ReleaseState.WAITING, resume_at=resume_at)
                    log.info("pausing between batches", resume_at=resume_at.isoformat())
                    return None
                case Complete():
                    completed = ReleaseCompleted(
                        event_id=derived_event_id(release_id, "completed"),
                        release_id=release_id,
                        causation_id=record.request_id,
                        succeeded=totals.succeeded,
                        failed=totals.failed,
                    )
                    announce = [self._batch_completed(record, batch_counts), completed]
                    await self._save(record, announce, state=ReleaseState.COMPLETED)
                    log.info("release completed")
                    return record.plan.service
                case Halt(reason=reason):
                    halted = await self._halted(record, reason, totals)
                    await self._save(record, [halted], state=ReleaseState.HALTED, reason=reason)
                    log.warning("release halted", reason=reason)
                    return record.plan.service
                case RollBackRelease(reason=reason):
                    halted = await self._halted(record, reason, totals)
                    fast = record.fast_rollback or record.plan.strategy.fast_rollback
                    await self._save(
                        record, [halted], state=ReleaseState.ROLLING_BACK, reason=reason, fast_rollback=fast
                    )
                    log.warning("rolling the release back", reason=reason, fast=fast)
                case RolledBack():
                    rolled_back = ReleaseRolledBack(
                        event_id=derived_event_id(release_id, "rolled_back"),
                        release_id=release_id,
                        causation_id=record.request_id,
                        rolled_back=totals.rolled_back,
                        failed=totals.rollback_failed,
                        fast=record.fast_rollback,
                    )
                    await self._save(record, [rolled_back], state=ReleaseState.ROLLED_BACK)
                    log.info("release rolled back", fast=record.fast_rollback)
                    return record.plan.service

    async def _counts(self, record: ReleaseRecord) -> tuple[BatchCounts, BatchCounts]:
        """The counts of the release's current batch and of the whole release, from one count of the store.

        While the release rolls forward only the current batch's nodes change: the batches before it are done (their
        counts are the record's `settled`) and those after it have not started (every node queued). So only the
        current batch is counted. Rolling back moves nodes of every batch: the whole release is counted.
        """
        if record.state in LIVE and record.settled is not None:
            current = await self.store.count_release_nodes(record.release_id, batch=record.batch)
            later = {ItemState.QUEUED: sum(record.batch_sizes[record.batch + 1 :])}
            return BatchCounts.of(current), BatchCounts.of(_summed([record.settled, current, later]))
        by_batch = await self.store.count_release_batches(record.release_id)
        return BatchCounts.of(by_batch.get(record.batch, {})), BatchCounts.of(_summed(by_batch.values()))

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
            fast_rollback=record.fast_rollback,
            rollback_parallel=strategy.rollback_parallel,
        )

    async def _dispatch(self, record: ReleaseRecord, count: int) -> None:
        # With per-label limits a node of a full zone is passed over for one of another zone, so every
        # queued node of the batch is a candidate; otherwise the first `count` are.
        queued = await self.store.list_release_nodes(
            record.release_id,
            batch=record.batch,
            state=ItemState.QUEUED,
            limit=None if self.limits.per_label else count,
        )
        await self._send(
            record,
            queued,
            count,
            ItemState.QUEUED,
            ItemState.DISPATCHED,
            self._deploy_request,
            parallel=record.plan.strategy.max_parallel,
        )

    async def _dispatch_rollbacks(self, record: ReleaseRecord, count: int, parallel: int) -> None:
        """Send `count` rollbacks of deployed nodes, newest first; `parallel` is the window the release's own
        slots hold them to across pacers (a fast rollback's, not max_parallel)."""
        newest_first: list[ReleaseNode] = []
        if self.limits.per_label:  # a node of a full zone is passed over for the next: every deployed node may go
            newest_first = await self.store.list_release_nodes(
                record.release_id, state=ItemState.SUCCEEDED, newest_first=True
            )
        else:
            # The `count` newest, a batch at a time from the last started (positions grow batch by batch), each
            # read served by the (release, batch, state, position) index: a pass costs what it sends, not what the
            # release deployed (reading every deployed node each pass made a rollback quadratic in its size).
            for batch in range(record.batch, -1, -1):
                newest_first += await self.store.list_release_nodes(
                    record.release_id,
                    batch=batch,
                    state=ItemState.SUCCEEDED,
                    limit=count - len(newest_first),
                    newest_first=True,
                )
                if len(newest_first) >= count:
                    break
        await self._send(
            record,
            newest_first,
            count,
            ItemState.SUCCEEDED,
            ItemState.ROLLBACK_DISPATCHED,
            self._rollback_request,
            parallel=parallel,
        )

    async def _send(
        self,
        record: ReleaseRecord,
        candidates: list[ReleaseNode],
        count: int,
        from_state: ItemState,
        to_state: ItemState,
        command: Callable[[ReleaseRecord, ReleaseNode], Event],
        *,
        parallel: int,
    ) -> None:
        """Send up to `count` of `candidates`, in order: record each as sent (a CAS: a node is sent once) and
        publish its command. With limits, a node goes only once it holds its slots (the release's own: `parallel`)."""
        if self.limits.holds(max_parallel=parallel, release_size=sum(record.batch_sizes)):
            await self._send_holding_slots(record, candidates, count, from_state, to_state, command, parallel=parallel)
            return
        chosen = candidates[:count]
        # `_FAN_OUT` nodes at a time: recorded as sent together (one statement on the embedded store, one batch of
        # writes on MongoDB), then their commands published, each started at once and in a task of its own only once
        # it waits (on the in-memory bus none does); all finish before an error, if any, goes on. (A whole window's
        # writes at once would swamp a store, as `_send_one` says.)
        for start in range(0, len(chosen), _FAN_OUT):
            chunk = chosen[start : start + _FAN_OUT]
            sent = await self._record_sent(record, chunk, from_state, to_state, self.clock())
            await run_all(self._publish(command(record, node)) for node in chunk if node.node_key in sent)

    async def _publish(self, event: Event) -> None:
        """Publish a command, at most `_FAN_OUT` at once."""
        async with self._fan_out:
            await self.bus.publish(event)

    async def _send_holding_slots(
        self,
        record: ReleaseRecord,
        candidates: list[ReleaseNode],
        count: int,
        from_state: ItemState,
        to_state: ItemState,
        command: Callable[[ReleaseRecord, ReleaseNode], Event],
        *,
        parallel: int,
    ) -> None:
        """Send the first `count` candidates that can take a slot of each of their scopes.

        Nodes whose scopes are the same (no per-label limit) take their slots a chunk of `_FAN_OUT` at a time, the
        chunk's takes at once: one after another, a window's dispatch was as slow as the store's round trip times
        the window. A chunk where a node could not take its slots is the last (its scopes are full). With per-label
        limits a node of a full zone is passed over for the next, so nodes take their slots one at a time, in order.
        Each node that got its slots is recorded as sent and its command published at once, beside the taking of the
        next ones' slots. The time its slots were taken is the time it is recorded sent with: the sweep frees a slot
        of a node not in flight only once it is old, so that gap must stay short.
        """
        sending: list[asyncio.Future[bool]] = []
        errors: list[BaseException] = []
        try:
            position = 0
            while position < len(candidates) and len(sending) < count and not errors:
                size = 1 if self.limits.per_label else min(_FAN_OUT, count - len(sending))
                chunk = candidates[position : position + size]
                position += size
                now = self.clock()
                taken = await asyncio.gather(
                    *(started(self._take_slots(record, node, parallel, now)) for node in chunk), return_exceptions=True
                )
                for node, took in zip(chunk, taken, strict=True):
                    if isinstance(took, BaseException):
                        errors.append(took)
                    elif took:
                        # If another pacer sent the node first, the slots taken here stay with it (same holder) until
                        # its outcome frees them all; for a node that moved on meanwhile, the sweep frees them.
                        sending.append(started(self._send_one(record, node, from_state, to_state, command, now)))
                if not self.limits.per_label and not all(took is True for took in taken):
                    break  # every node has the same scopes: the next ones would not fit either
        finally:
            # The sends under way finish (each a CAS and its command) before anything, an error too, goes on.
            results = await asyncio.gather(*sending, return_exceptions=True)
        for result in [*errors, *results]:
            if isinstance(result, BaseException):
                raise result
        sent = results.count(True)
        if sent < count:
            log.info("in-flight limit reached", sent=sent, wanted=count)

    async def _take_slots(self, record: ReleaseRecord, node: ReleaseNode, parallel: int, now: datetime) -> bool:
        """Take a slot of every scope that applies to `node` (the release's own: `parallel`), or none."""
        scopes = scopes_for(
            self.limits,
            release_id=record.release_id,
            service=record.plan.service,
            max_parallel=parallel,
            node_key=node.node_key,
            target=node.target,
            release_size=sum(record.batch_sizes),
        )
        return await self.store.take_slots(record.release_id, node.node_key, scopes, now=now)

    async def _send_one(
        self,
        record: ReleaseRecord,
        node: ReleaseNode,
        from_state: ItemState,
        to_state: ItemState,
        command: Callable[[ReleaseRecord, ReleaseNode], Event],
        now: datetime,
    ) -> bool:
        """Record `node` as sent and publish its command; False if it was not in `from_state` (sent by another). At
        most `_FAN_OUT` at once: a window's nodes may all be sent together, and that many writes at once swamp a
        store (FerretDB took 40% more CPU a node)."""
        async with self._fan_out:
            if node.node_key not in await self._record_sent(record, [node], from_state, to_state, now):
                return False
            await self.bus.publish(command(record, node))
            return True

    async def _record_sent(
        self, record: ReleaseRecord, nodes: list[ReleaseNode], from_state: ItemState, to_state: ItemState, now: datetime
    ) -> set[str]:
        """Record `nodes` as sent (a CAS each: one not in `from_state` is not), so their commands may be published;
        the keys of those recorded.

        A write that failed without an answer may still have landed; the pass would then fail with nodes recorded
        as sent and their commands never published, so nothing would send them until the resend timer. It is tried
        again accepting `to_state` too: a node already sent (by this write or another pacer's, whose command has the
        same id and dedupes) is sent now, one whose outcome came meanwhile is not.
        """
        keys = [node.node_key for node in nodes]
        try:
            return await self.store.move_release_nodes(
                record.release_id, keys, from_states=[from_state], to_state=to_state, dispatched_at=now
            )
        except ReactorError as exc:
            if not exc.retriable:
                raise
            log.warning("recording nodes as sent failed; trying again", nodes=len(keys), error=str(exc))
        accepted = [from_state, to_state]
        try:
            return await self.store.move_release_nodes(
                record.release_id, keys, from_states=accepted, to_state=to_state, dispatched_at=now
            )
        except ReactorError as exc:
            if exc.retriable:
                # Still unknown (a store this slow may keep the first attempt's lock for a while): the release's
                # next pass (this one's retry, or the next outcome's) tries again before anything else.
                unsettled = self._unsettled[record.release_id]
                for node in nodes:
                    unsettled[node.node_key] = (node, from_state, to_state)
            raise

    async def _settle_sent(self, record: ReleaseRecord) -> None:
        """Finish the nodes of `record` whose record as sent had no answer: send each one that is (or is now)
        recorded as sent; drop one that moved on (its outcome came). One that still has no answer stays."""
        if record.state in FINAL:
            self._unsettled.pop(record.release_id, None)
            return
        unsettled = self._unsettled.get(record.release_id)
        while unsettled:
            node_key, (node, from_state, to_state) = next(iter(unsettled.items()))
            if await self.store.move_release_node(
                record.release_id,
                node_key,
                from_states=[from_state, to_state],
                to_state=to_state,
                dispatched_at=self.clock(),
            ):
                command = self._deploy_request if to_state == ItemState.DISPATCHED else self._rollback_request
                await self.bus.publish(command(record, node))
                log.info("node recorded as sent without an answer is sent", node_key=node_key)
            unsettled.pop(node_key, None)

    async def _save(self, record: ReleaseRecord, announce: Sequence[Event] = (), **changes: object) -> ReleaseRecord:
        """Write `changes` (a CAS on the revision read) with the events that announce them in the record's
        outbox, then publish the outbox. A pacer that dies in between leaves the events to the next reader."""
        outbox = [*record.outbox, *(event_document(event) for event in announce)]
        updated = record.model_copy(update={**changes, "outbox": outbox, "updated_at": self.clock()})
        saved = await self.store.put_release(updated, expected_revision=record.revision)
        if saved is None:
            raise ConflictError(f"release {record.release_id} changed under the pacer")
        return await self._flush(saved) if saved.outbox else saved

    async def _flush(self, record: ReleaseRecord) -> ReleaseRecord:
        """Publish the record's outbox (ids are fixed, so publishing twice dedupes), then empty it."""
        for document in record.outbox:
            await self.bus.publish(event_from_document(document))
        emptied = record.model_copy(update={"outbox": [], "updated_at": self.clock()})
        saved = await self.store.put_release(emptied, expected_revision=record.revision)
        if saved is not None:
            return saved
        # Changed meanwhile: the writer kept the outbox (a change appends to it) and publishes it in turn.
        latest = await self.store.get_release(record.release_id)
        return latest if latest is not None else record

    # --- what the pacer announces ---

    async def _batch_started(self, record: ReleaseRecord, batch: int) -> BatchStarted:
        # Keys only: a batch of 100,000 nodes read as rows took 240 MB at once.
        node_keys = await self.store.list_release_node_keys(record.release_id, batch=batch)
        return BatchStarted(
            event_id=derived_event_id(record.release_id, "batch", str(batch), "started"),
            release_id=record.release_id,
            causation_id=record.request_id,
            batch=batch,
            node_keys=node_keys,
        )

    def _batch_completed(self, record: ReleaseRecord, counts: BatchCounts) -> BatchCompleted:
        return BatchCompleted(
            event_id=derived_event_id(record.release_id, "batch", str(record.batch), "completed"),
            release_id=record.release_id,
            causation_id=record.request_id,
            batch=record.batch,
            succeeded=counts.succeeded,
            failed=counts.failed,
        )

    async def _halted(self, record: ReleaseRecord, reason: str, totals: BatchCounts | None = None) -> ReleaseHalted:
        if totals is None:
            totals = BatchCounts.of(await self.store.count_release_nodes(record.release_id))
        return ReleaseHalted(
            event_id=derived_event_id(record.release_id, "halted"),
            release_id=record.release_id,
            causation_id=record.request_id,
            reason=reason,
            succeeded=totals.succeeded,
            failed=totals.failed,
        )

    def _deploy_request(self, record: ReleaseRecord, node: ReleaseNode) -> DeployRequested:
        """The command for one node of a release; its id is fixed by release and node, so resending dedupes.

        Every node's command says the same but for its id, time, node and the node's overrides. Those come validated
        already (a NodeTarget's fields have the command's types), so the first node's command is built and validated
        in full and the others' are copies of it with their own fields: building each in full took about 6% of a
        node's cost. A node whose command could not be valid (no artifact at all) is built in full, which raises as
        before.
        """
        plan = record.plan
        target = node.target
        template = self._deploy_templates.get(record.release_id)
        if (
            target is not None
            and target.node_key == node.node_key
            and template is not None
            and template.causation_id == record.request_id
        ):
            package = target.package or plan.package
            image = target.image or plan.image
            if package is not None or image is not None:
                return template.model_copy(
                    update={
                        "event_id": derived_event_id(record.release_id, node.node_key, "deploy"),
                        "occurred_at": utc_now(),
                        "node_key": node.node_key,
                        "package": package,
                        "image": image,
                        "container": target.container or plan.container,
                        "port": target.port,
                    }
                )
        command = self._full_deploy_request(record, node)
        if len(self._deploy_templates) >= _TEMPLATES_KEPT:
            self._deploy_templates.pop(next(iter(self._deploy_templates)))
        self._deploy_templates[record.release_id] = command
        return command

    def _full_deploy_request(self, record: ReleaseRecord, node: ReleaseNode) -> DeployRequested:
        """The command for one node of a release, built and validated from its every field."""
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
        """The release-level rollback of one node; its id is fixed by release and node (fast or not)."""
        kind = "fast release rollback" if record.fast_rollback else "release rollback"
        return RollbackRequested(
            event_id=derived_event_id(record.release_id, node.node_key, "rollback"),
            node_key=node.node_key,
            service=record.plan.service,
            release_id=record.release_id,
            causation_id=record.request_id,
            reason=f"{kind}: {record.reason}"[:4000],
            actor=record.actor,
        )
