"""Rollback consumer: a failed node whose policy asks for it gets a RollbackRequested."""

from __future__ import annotations

import structlog

from reactor.events import AutoRollback, Event, NodeFailed, RollbackRequested, derived_event_id
from reactor.ports import EventBus

log = structlog.get_logger(__name__)


class RollbackConsumer:
    """Handles NodeFailed from the outcomes topic."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    async def handle(self, event: Event) -> None:
        """Ask for a rollback of a failed node when its policy is `node` or `release`."""
        if not isinstance(event, NodeFailed) or event.auto_rollback == AutoRollback.NONE:
            return
        with structlog.contextvars.bound_contextvars(
            event_id=event.event_id, node_key=event.node_key, release_id=event.release_id
        ):
            if event.current_version is None:
                log.info("failed node ran nothing before; nothing to roll back to")
                return
            log.info("requesting rollback", to_version=event.current_version)
            await self.bus.publish(
                RollbackRequested(
                    event_id=derived_event_id(event.event_id, "rollback"),
                    node_key=event.node_key,
                    service=event.service,
                    release_id=event.release_id,
                    causation_id=event.event_id,
                    reason=f"automatic: {event.step} failed: {event.error}"[:4000],
                    actor="reactor/rollback",
                )
            )
