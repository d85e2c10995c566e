"""Executor worker: claims the node, runs its Executor, records the status, emits the outcome.

Exactly-once effects over at-least-once delivery: a finished request re-emits its recorded outcome; an
interrupted one (node still deploying for the same request, or deployed but not yet observed for its
min_healthy window) runs again, which is safe because deploy and rollback are idempotent. A rollback with
nothing to roll back to is refused without running the executor, and leaves the node's record as it was.

Fencing: each worker process has an owner id; a claim records it with a new epoch. While the executor runs the
claim is renewed every lease/3, so a live run is never taken over; a claim left unrenewed for a whole lease
(its worker died or froze) may be taken by another worker, which raises the epoch. A run whose epoch is no
longer the node's is fenced: its writes are refused, it is cancelled if still running, and it emits nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NoReturn, TypeVar
from uuid import uuid4

from reactor import logs, outcomes
from reactor.domain.status import (
    NO_ROLLBACK_TARGET,
    TERMINAL,
    NodeState,
    NodeStatus,
    claim,
    fail_min_healthy,
    finish,
    holds,
    lease_expired,
    pending,
    renew,
    rollback_target,
)
from reactor.eager import shielded
from reactor.errors import ConflictError, Fenced, NodeBusy, PolicyRefused, ReactorError
from reactor.events import DeployRequested, Event, HealthCheck, NodeEvent, RollbackRequested, utc_now
from reactor.executors import executor_factory
from reactor.ports import EventBus, ExecutionContext, Executor, ExecutorFactory, ExecutorSettings, Store, unfenced
from reactor.trust.enforcement import current_signer
from reactor.trust.policy import Policy

log = logs.get_logger(__name__)

T = TypeVar("T")

DEFAULT_LEASE = timedelta(seconds=60)
"""How long a claim holds a node without being renewed; a running claim is renewed every third of it."""


def probe_interval(min_healthy_s: float) -> float:
    """Seconds between probes of a min_healthy window: five per window, at least 0.1 s and at most 5 s apart."""
    return min(max(min_healthy_s / 5, 0.1), 5.0)


class ExecutorWorker:
    """Handles DeployRequested and RollbackRequested from the commands topic."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        *,
        settings: ExecutorSettings | None = None,
        factories: dict[str, ExecutorFactory] | None = None,
        lease: timedelta = DEFAULT_LEASE,
        clock: Callable[[], datetime] = utc_now,
        owner: str | None = None,
        policy: Policy | None = None,
        max_age: timedelta | None = None,
    ) -> None:
        self.store = store
        # Commands older than this (by their `time`) are refused before anything runs (None: any age runs).
        self.max_age = max_age
        # The deploy policy every command is checked against before anything runs (None: everything is allowed).
        self.policy = policy
        self._releases: dict[str, _Release] = {}
        self.bus = bus
        self.settings = settings or ExecutorSettings()
        self.factories = factories
        self.lease = lease
        self.clock = clock
        # One id per worker process: a claim it made is its own to take again (its redelivery), no one else's.
        self.owner = owner or f"executor-{uuid4().hex}"
        self._renewals = _Renewals(lease.total_seconds() / 3)

    async def handle(self, event: Event) -> None:
        """Run a command; other events are not for this worker."""
        if isinstance(event, DeployRequested | RollbackRequested):
            with logs.bound(event_id=event.event_id, node_key=event.node_key, release_id=event.release_id):
                if self.policy is not None:
                    await self._check_policy(event, self.policy)
                await self._run(event)

    async def _check_policy(self, request: DeployRequested | RollbackRequested, policy: Policy) -> None:
        """Raise PolicyRefused unless the policy allows `request` as signed: inside a release its submitter may
        release to this node, or a direct command by an identity the policy allows."""
        signer = current_signer()
        release = None if request.release_id is None else await self._release_record(request.release_id)
        labels: dict[str, str] | None = None  # None: not a node of the release
        if release is not None and request.release_id is not None:
            # The node's own row, not the release's every row: a worker's memory does not grow with releases' sizes.
            row = await self.store.get_release_node(request.release_id, request.node_key)
            labels = None if row is None else {} if row.target is None else row.target.labels
        policy.check_node_command(
            None if signer is None else signer.name,
            signer is not None and signer.reactor,
            request,
            release_service=None if release is None else release.service,
            release_submitter=None if release is None else release.submitter,
            release_labels=labels,
        )

    async def _release_record(self, release_id: str) -> _Release | None:
        """A release's service and submitter; kept for the last releases asked about, since neither changes once the
        release is stored (its nodes are stored before it)."""
        known = self._releases.get(release_id)
        if known is not None:
            return known
        record = await self.store.get_release(release_id)
        if record is None:
            return None
        known = _Release(record.plan.service, record.submitter)
        if len(self._releases) >= _RELEASES_KEPT:
            self._releases.pop(next(iter(self._releases)))
        self._releases[release_id] = known
        return known

    async def _run(self, request: DeployRequested | RollbackRequested) -> None:
        recorded = await self.store.get_processed(request.event_id)
        if recorded is not None:
            log.info("request already finished; re-emitting its outcome")
            await self.bus.publish(outcomes.restore(recorded))
            return
        current = await self.store.get_node(request.node_key) or pending(request.node_key, request.service)
        if current.request_id == request.event_id and current.state in TERMINAL and not _unobserved(request, current):
            if current.owner not in (None, self.owner) and not lease_expired(
                current, now=self.clock(), lease=self.lease
            ):
                # Another worker's run of it just finished and records its outcome next: emitting one of ours now
                # would tell a second, different outcome (no duration, no `before`). Its record comes, or its lease
                # runs out (that worker died between the two writes) and the outcome is rebuilt from the status.
                raise NodeBusy(
                    f"{request.node_key}: request {request.event_id} finished on {current.owner}, "
                    "which records its outcome"
                )
            log.info("request finished but its outcome was not recorded; recording and emitting it")
            await self._emit(request, current, 0.0)
            return
        self._check_age(request)
        operation = "deploy" if isinstance(request, DeployRequested) else "rollback"
        target: str | None
        if isinstance(request, DeployRequested):
            target = request.version
        else:
            target = rollback_target(current, request.to_version)
        # Claimed in memory first: a node another request holds is busy (retried later) even for a refusal.
        claimed = claim(
            current,
            request_id=request.event_id,
            owner=self.owner,
            operation=operation,
            target_version=target,
            release_id=request.release_id,
            now=self.clock(),
            lease=self.lease,
            port=request.port,
            health=request.health or current.health or HealthCheck(),
        )
        if isinstance(request, RollbackRequested) and target is None:
            # Nothing on record to go back to: nothing runs and nothing changes, so the record stays as it was
            # and the outcome says so (RollbackFailed without a target), for the record and the log to agree.
            log.info("rollback refused", error=NO_ROLLBACK_TARGET)
            await self._publish(request, outcomes.refused(request, current, NO_ROLLBACK_TARGET))
            return
        written = await self.store.put_node(claimed, expected_revision=current.revision)
        if written is None:
            raise ConflictError(f"{request.node_key} changed while claiming it")
        held = _Held(written)
        log.info("claimed node", operation=operation, version=target, owner=self.owner, epoch=written.epoch)
        started = time.monotonic()
        result = await self._while_held(held, self._execute(request, written, target, partial(self._check, held)))
        final = finish(held.status, result, now=self.clock())
        # The effect happened: its record must be written even if this task is being cancelled (unless fenced).
        saved = await shielded(self._write(held, final))
        log.info("finished", operation=operation, state=saved.state, error=saved.last_error or None)
        if isinstance(request, DeployRequested) and _unobserved(request, saved):
            saved = await self._observe(request, held)
            if not holds(await self.store.get_node(request.node_key), saved):
                self._fenced(saved)
        await self._emit(request, saved, time.monotonic() - started, before=current)

    def _check_age(self, request: DeployRequested | RollbackRequested) -> None:
        """Raise PolicyRefused when `request` is older than `max_age`. Checked after its recorded outcome was looked
        for, so a late redelivery of a command that ran still re-emits that outcome."""
        if self.max_age is None:
            return
        age = self.clock() - request.occurred_at
        if age > self.max_age:
            raise PolicyRefused(
                f"policy: stale command: its time {request.occurred_at.isoformat()} is {age.total_seconds():.0f} s"
                f" old, more than REACTOR_COMMAND_MAX_AGE_S ({self.max_age.total_seconds():.0f} s); nothing ran"
            )

    async def _while_held(self, held: _Held, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` while renewing the claim every lease/3; Fenced (and `work` cancelled) if the claim is lost.

        `work` runs in this task, not a task of its own: a fenced claim's renewal cancels this task while `work` runs,
        and that cancellation is taken back here (`uncancel`) once it has stopped `work`."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a held run needs a task")
        heartbeat = _Heartbeat(self._renewals, partial(self._heartbeat, held))
        held.running = task
        try:
            result = await work
        except asyncio.CancelledError:
            held.running = None
            heartbeat.cancel()
            if held.cancelled and task.uncancel() == 0:  # cancelled for the fence alone
                raise Fenced(f"{held.status.node_key} was taken over while {held.status.operation} ran") from None
            if not held.fenced:
                # Stopping or revoked: give the claim up now that the executor stopped, so the next worker does not
                # wait out the lease. Shielded: this task is being cancelled.
                await asyncio.shield(self._release(held, heartbeat))
            raise
        finally:
            held.running = None
            heartbeat.cancel()
            await heartbeat.stopped()
        if held.cancelled:  # `work` caught the fence's cancellation and returned: take it back all the same
            task.uncancel()
        return result

    async def _release(self, held: _Held, heartbeat: _Heartbeat) -> None:
        """Give up an interrupted run's claim (owner none, same epoch) after its heartbeat stopped."""
        await heartbeat.stopped()
        try:
            await self._write(held, held.status.model_copy(update={"owner": None}))
        except ReactorError as exc:  # fenced meanwhile, or the store is away: the lease still frees the node
            log.warning("could not give the interrupted claim up; it frees itself after its lease", error=str(exc))
        else:
            log.info("interrupted; claim given up", epoch=held.status.epoch)

    async def _heartbeat(self, held: _Held) -> None:
        """Renew the claim now and every lease/3 after while its executor runs; cancel that once a newer claim fenced
        this one."""
        interval = self.lease.total_seconds() / 3
        while True:
            try:
                await self._write(held, renew(held.status, now=self.clock()))
            except Fenced:
                held.fenced = True
                if held.running is not None:
                    held.cancelled = True
                    held.running.cancel()
                return
            except ReactorError as exc:  # the store may answer again before the lease runs out
                log.warning("could not renew the claim; trying again", error=str(exc))
            await asyncio.sleep(interval)

    async def _write(self, held: _Held, status: NodeStatus) -> NodeStatus:
        """Write a status of the held claim with a compare-and-set; Fenced once a newer claim holds the node."""
        while True:
            saved = await self.store.put_node(status, expected_revision=held.status.revision)
            if saved is not None:
                held.status = saved
                return saved
            stored = await self.store.get_node(status.node_key)
            if stored is None or not holds(stored, held.status):
                self._fenced(held.status, stored)
            if stored.state != NodeState.DEPLOYING:
                raise ConflictError(f"{status.node_key} changed under its own claim")
            # A renewal of ours landed though its caller did not see it (cancelled while it ran): write over it.
            held.status = stored

    async def _check(self, held: _Held) -> None:
        """Raise Fenced unless the node as stored is still under the claim `held` (the executor's fence)."""
        stored = await self.store.get_node(held.status.node_key)
        if not holds(stored, held.status):
            self._fenced(held.status, stored)

    def _fenced(self, claimed: NodeStatus, stored: NodeStatus | None = None) -> NoReturn:
        log.warning(
            "fenced",
            owner=claimed.owner,
            epoch=claimed.epoch,
            holder=None if stored is None else stored.owner,
            holder_epoch=None if stored is None else stored.epoch,
        )
        raise Fenced(f"{claimed.node_key} was claimed again (epoch {claimed.epoch} is no longer the node's)")

    async def _observe(self, request: DeployRequested, held: _Held) -> NodeStatus:
        """Probe the deployed node through its min_healthy window; the node as it is at the end of it.

        Nothing is written while the window runs, so a cancelled or crashed observation leaves the request
        unrecorded and its redelivery deploys again (a no-op) and observes again.
        """
        deployed = held.status
        window = request.min_healthy_s
        interval = probe_interval(window)
        # A probe that hangs must not hold the window open; one that times out could not tell.
        probe_timeout = max(interval, (deployed.health or HealthCheck()).timeout_s)
        log.info("observing the deployed node", min_healthy_s=window, interval_s=interval)
        executor = self._executor(request, deployed, request.version)
        loop = asyncio.get_running_loop()
        started = loop.time()
        undecided = ""
        while True:
            remaining = started + window - loop.time()
            final = remaining <= interval
            await asyncio.sleep(max(remaining, 0.0) if final else interval)
            elapsed = loop.time() - started
            running, problem = deployed.current_version, ""
            try:
                async with asyncio.timeout(probe_timeout):
                    seen = await executor.status()
            except TimeoutError:
                undecided = f"the probe did not answer within {probe_timeout:g}s"
            except ReactorError as exc:
                if not exc.retriable:
                    problem = f"the probe failed: {exc}"
                undecided = str(exc)
            except Exception as exc:  # a probe that crashes fails the deploy, never passes it
                log.exception("probe crashed")
                problem = f"the probe crashed: {type(exc).__name__}: {exc}"
            else:
                if seen.state != NodeState.SUCCESS or seen.current_version != request.version:
                    running = seen.current_version
                    problem = f"the probe saw {seen.state.value}, running {seen.current_version or 'nothing'}" + (
                        f": {seen.last_error}" if seen.last_error else ""
                    )
                elif final:
                    log.info("stayed healthy through min_healthy", min_healthy_s=window)
                    return deployed
                else:
                    undecided = ""
            if not problem and final:
                problem = f"no probe could tell by the end of the window: {undecided}"
            if problem:
                return await self._unhealthy(held, running, f"after {elapsed:.1f}s of {window:g}s, {problem}")
            if undecided:
                log.info("probe could not tell; trying again", error=undecided)

    async def _unhealthy(self, held: _Held, running: str | None, problem: str) -> NodeStatus:
        """Record the deployed node as failed at min_healthy, as its final status write."""
        failed = fail_min_healthy(held.status, running=running, error=problem, now=self.clock())
        saved = await shielded(self._write(held, failed))
        log.warning("did not stay healthy", error=saved.last_error)
        return saved

    def _executor(
        self,
        request: DeployRequested | RollbackRequested,
        status: NodeStatus,
        target: str | None,
        fence: Callable[[], Awaitable[None]] = unfenced,
    ) -> Executor:
        context = ExecutionContext(
            node_key=request.node_key,
            service=request.service,
            host=status.host,
            current=status,
            target_version=target,
            package=request.package if isinstance(request, DeployRequested) else None,
            image=request.image if isinstance(request, DeployRequested) else None,
            container=request.container if isinstance(request, DeployRequested) else None,
            port=status.port,
            health=status.health or HealthCheck(),
            request_id=request.event_id,
            settings=self.settings,
            fence=fence,
        )
        return executor_factory(status.platform, self.factories)(context)

    async def _execute(
        self,
        request: DeployRequested | RollbackRequested,
        claimed: NodeStatus,
        target: str | None,
        fence: Callable[[], Awaitable[None]],
    ) -> NodeStatus:
        failed_state = NodeState.FAILED
        try:
            executor = self._executor(request, claimed, target, fence)
            if isinstance(request, DeployRequested):
                return await executor.deploy()
            return await executor.rollback()
        except ReactorError as exc:
            if exc.retriable:
                raise  # leave the claim: the redelivery runs the request again
            error = f"{claimed.operation}: {exc}"
        except Exception as exc:  # an executor bug becomes a failed outcome, never a silent loss
            log.exception("executor crashed")
            error = f"{claimed.operation}: executor crashed: {type(exc).__name__}: {exc}"
        return claimed.model_copy(update={"state": failed_state, "last_error": error})

    async def _emit(
        self,
        request: DeployRequested | RollbackRequested,
        status: NodeStatus,
        duration_s: float,
        before: NodeStatus | None = None,
    ) -> None:
        await self._publish(request, outcomes.outcome_for(request, status, duration_s, before))

    async def _publish(self, request: DeployRequested | RollbackRequested, outcome: NodeEvent) -> None:
        """Record the outcome of `request` (a redelivery re-emits it), then publish it; or, where an outcome of the
        request is recorded already, publish that one. A worker frozen between its final status and its record, for
        longer than its lease, finds on thawing the outcome another worker rebuilt from that status meanwhile (and
        published): telling its own now would give the request two different outcomes under one id."""
        if not await self.store.put_processed(request.event_id, outcomes.record(outcome), at=self.clock()):
            recorded = await self.store.get_processed(request.event_id)
            if recorded is not None:
                log.info("an outcome of the request was recorded first; publishing that one")
                outcome = outcomes.restore(recorded)
        await self.bus.publish(outcome)

    async def prune_processed(self, keep: timedelta) -> int:
        """Forget the recorded outcomes of requests finished more than `keep` ago; how many. `keep` is at least
        `max_age` (settings check it), so a forgotten request that comes again is refused as stale, not run."""
        pruned = await self.store.prune_processed(self.clock() - keep)
        if pruned:
            log.info("finished requests' outcomes forgotten", pruned=pruned, keep_s=keep.total_seconds())
        return pruned

    async def run_pruning(self, keep: timedelta, *, every_s: float) -> NoReturn:
        """Prune now and then every `every_s`, for good. A failure (the store down, or refusing the delete) is logged
        and tried again next time: the records only grow meanwhile, and commands go on being handled."""
        while True:
            try:
                await self.prune_processed(keep)
            except ReactorError as exc:
                log.warning("pruning finished requests' outcomes failed; trying again later", error=str(exc))
            await asyncio.sleep(every_s)


_RELEASES_KEPT = 64


@dataclass(frozen=True, slots=True)
class _Release:
    """What the policy check needs of a release record: its service and verified submitter."""

    service: str
    submitter: str | None


class _Heartbeat:
    """The renewals of a held claim: their task starts only when the first one is due (lease/3 after the claim), so a
    run that ends sooner costs an entry in its worker's `_Renewals`, not a task or a timer of its own."""

    def __init__(self, schedule: _Renewals, renewals: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.task: asyncio.Task[None] | None = None
        self._schedule = schedule
        self._renewals = renewals
        schedule.add(self)

    def start(self) -> None:
        """Start the renewals (their first one is due)."""
        self.task = asyncio.create_task(self._renewals())

    def cancel(self) -> None:
        """No renewal starts from now on; one under way is cancelled."""
        self._schedule.discard(self)
        if self.task is not None:
            self.task.cancel()

    async def stopped(self) -> None:
        """Wait until a renewal under way (if any) has stopped, after `cancel`."""
        if self.task is not None:
            await asyncio.wait([self.task])


class _Renewals:
    """When each held claim's renewals start, `after_s` after it was claimed: one timer for a worker's every run (set
    for the first due), rather than one a run. Runs come in the order they are due, since `after_s` is the same for
    all."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._due: dict[_Heartbeat, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, heartbeat: _Heartbeat) -> None:
        """Start `heartbeat` `after_s` from now, unless it is discarded first."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.after_s
        self._due[heartbeat] = due
        if self._timer is None or self._loop is not loop:  # none set, or set on a loop that is gone (tests)
            self._loop = loop
            self._timer = loop.call_at(due, self._fire)

    def discard(self, heartbeat: _Heartbeat) -> None:
        """`heartbeat` will not start (if it has not yet)."""
        self._due.pop(heartbeat, None)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._due:
            heartbeat, due = next(iter(self._due.items()))
            if due > now:
                self._timer = loop.call_at(due, self._fire)
                return
            del self._due[heartbeat]
            heartbeat.start()


@dataclass
class _Held:
    """A run's claim as last written (its revision moves with each renewal), and whether it was fenced."""

    status: NodeStatus
    fenced: bool = False
    # The task running the claim's executor, while it runs (a fenced claim's renewal cancels it).
    running: asyncio.Task[Any] | None = None
    # Whether the renewal cancelled `running` because the claim was fenced.
    cancelled: bool = False


def _unobserved(request: DeployRequested | RollbackRequested, status: NodeStatus) -> bool:
    """The node is deployed for a request with a min_healthy window that has not been observed to its end."""
    return isinstance(request, DeployRequested) and request.min_healthy_s > 0 and status.state == NodeState.SUCCESS
