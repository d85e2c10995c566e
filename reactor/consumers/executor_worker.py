"""Executor worker: claims the node, runs its Executor, records the status, emits the outcome.

Exactly-once effects over at-least-once delivery: a finished request re-emits its recorded outcome; an
interrupted one (node still deploying for the same request, or deployed but not yet observed for its
min_healthy window) runs again, which is safe because deploy and rollback are idempotent. A rollback with
nothing to roll back to is refused without running the executor, and leaves the node's record as it was.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from reactor import outcomes
from reactor.domain.status import (
    NO_ROLLBACK_TARGET,
    TERMINAL,
    NodeState,
    NodeStatus,
    claim,
    fail_min_healthy,
    finish,
    pending,
    rollback_target,
)
from reactor.errors import ConflictError, ReactorError
from reactor.events import DeployRequested, Event, HealthCheck, NodeEvent, RollbackRequested, utc_now
from reactor.executors import executor_factory
from reactor.ports import EventBus, ExecutionContext, Executor, ExecutorFactory, ExecutorSettings, Store

log = structlog.get_logger(__name__)


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
        lease: timedelta = timedelta(minutes=30),
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        self.bus = bus
        self.settings = settings or ExecutorSettings()
        self.factories = factories
        self.lease = lease
        self.clock = clock

    async def handle(self, event: Event) -> None:
        """Run a command; other events are not for this worker."""
        if isinstance(event, DeployRequested | RollbackRequested):
            with structlog.contextvars.bound_contextvars(
                event_id=event.event_id, node_key=event.node_key, release_id=event.release_id
            ):
                await self._run(event)

    async def _run(self, request: DeployRequested | RollbackRequested) -> None:
        recorded = await self.store.get_processed(request.event_id)
        if recorded is not None:
            log.info("request already finished; re-emitting its outcome")
            await self.bus.publish(outcomes.restore(recorded))
            return
        current = await self.store.get_node(request.node_key) or pending(request.node_key, request.service)
        if current.request_id == request.event_id and current.state in TERMINAL and not _unobserved(request, current):
            log.info("request finished but its outcome was not recorded; recording and emitting it")
            await self._emit(request, current, 0.0)
            return
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
            operation=operation,
            target_version=target,
            release_id=request.release_id,
            now=self.clock(),
            lease=self.lease,
        ).model_copy(
            update={"port": request.port or current.port, "health": request.health or current.health or HealthCheck()}
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
        log.info("claimed node", operation=operation, version=target)
        started = time.monotonic()
        result = await self._execute(request, written, target)
        final = finish(written, result, now=self.clock())
        # The effect happened: its record must be written even if this task is being cancelled.
        saved = await asyncio.shield(self.store.put_node(final, expected_revision=written.revision))
        if saved is None:
            raise ConflictError(f"{request.node_key} was taken over while {operation} ran")
        log.info("finished", operation=operation, state=saved.state.value, error=saved.last_error or None)
        if isinstance(request, DeployRequested) and _unobserved(request, saved):
            saved = await self._observe(request, saved)
        await self._emit(request, saved, time.monotonic() - started, before=current)

    async def _observe(self, request: DeployRequested, deployed: NodeStatus) -> NodeStatus:
        """Probe the deployed node through its min_healthy window; the node as it is at the end of it.

        Nothing is written while the window runs, so a cancelled or crashed observation leaves the request
        unrecorded and its redelivery deploys again (a no-op) and observes again.
        """
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
                return await self._unhealthy(deployed, running, f"after {elapsed:.1f}s of {window:g}s, {problem}")
            if undecided:
                log.info("probe could not tell; trying again", error=undecided)

    async def _unhealthy(self, deployed: NodeStatus, running: str | None, problem: str) -> NodeStatus:
        """Record the deployed node as failed at min_healthy, as its final status write."""
        failed = fail_min_healthy(deployed, running=running, error=problem, now=self.clock())
        saved = await asyncio.shield(self.store.put_node(failed, expected_revision=deployed.revision))
        if saved is None:
            raise ConflictError(f"{deployed.node_key} changed while it was observed")
        log.warning("did not stay healthy", error=saved.last_error)
        return saved

    def _executor(
        self, request: DeployRequested | RollbackRequested, status: NodeStatus, target: str | None
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
        )
        return executor_factory(status.platform, self.factories)(context)

    async def _execute(
        self, request: DeployRequested | RollbackRequested, claimed: NodeStatus, target: str | None
    ) -> NodeStatus:
        failed_state = NodeState.FAILED
        try:
            executor = self._executor(request, claimed, target)
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
        """Record the outcome of `request` (a redelivery re-emits it), then publish it."""
        await self.store.put_processed(request.event_id, outcomes.record(outcome))
        await self.bus.publish(outcome)


def _unobserved(request: DeployRequested | RollbackRequested, status: NodeStatus) -> bool:
    """The node is deployed for a request with a min_healthy window that has not been observed to its end."""
    return isinstance(request, DeployRequested) and request.min_healthy_s > 0 and status.state == NodeState.SUCCESS
