"""Executor worker: claims the node, runs its Executor, records the status, emits the outcome.

Exactly-once effects over at-least-once delivery: a finished request re-emits its recorded outcome; an
interrupted one (node still deploying for the same request) runs again, which is safe because deploy and
rollback are idempotent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from reactor import outcomes
from reactor.domain.status import TERMINAL, NodeState, NodeStatus, claim, finish, pending, rollback_target
from reactor.errors import ConflictError, ReactorError
from reactor.events import DeployRequested, Event, HealthCheck, RollbackRequested, utc_now
from reactor.executors import executor_factory
from reactor.ports import EventBus, ExecutionContext, ExecutorFactory, ExecutorSettings, Store

log = structlog.get_logger(__name__)


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
        if current.request_id == request.event_id and current.state in TERMINAL:
            log.info("request finished but its outcome was not recorded; recording and emitting it")
            await self._emit(request, current, 0.0)
            return
        operation = "deploy" if isinstance(request, DeployRequested) else "rollback"
        target: str | None
        if isinstance(request, DeployRequested):
            target = request.version
        else:
            target = rollback_target(current, request.to_version)
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
        await self._emit(request, saved, time.monotonic() - started, before=current)

    async def _execute(
        self, request: DeployRequested | RollbackRequested, claimed: NodeStatus, target: str | None
    ) -> NodeStatus:
        context = ExecutionContext(
            node_key=request.node_key,
            service=request.service,
            host=claimed.host,
            current=claimed,
            target_version=target,
            package=request.package if isinstance(request, DeployRequested) else None,
            image=request.image if isinstance(request, DeployRequested) else None,
            container=request.container if isinstance(request, DeployRequested) else None,
            port=claimed.port,
            health=claimed.health or HealthCheck(),
            request_id=request.event_id,
            settings=self.settings,
        )
        failed_state = NodeState.FAILED
        try:
            executor = executor_factory(claimed.platform, self.factories)(context)
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
        outcome = outcomes.outcome_for(request, status, duration_s, before)
        await self.store.put_processed(request.event_id, outcomes.record(outcome))
        await self.bus.publish(outcome)
