"""Rollback consumer: a failed node whose policy asks for it gets a RollbackRequested.

One failure, one rollback: a deploy can be reported failed twice (the pacer's deadline, then the worker's own
late outcome, or a redelivery). The rollback's id derives from the failed request, not from the report, so
every report of one failed deploy asks for the same rollback and the worker runs it once (a repeat re-emits its
outcome). The first report names the cause; a later one changes nothing.
"""

from __future__ import annotations

from reactor import logs
from reactor.events import AutoRollback, Event, NodeFailed, RollbackRequested, derived_event_id
from reactor.ports import EventBus

log = logs.get_logger(__name__)


class RollbackConsumer:
    """Handles NodeFailed from the outcomes topic."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    @staticmethod
    def wants(event: Event) -> bool:
        """The outcomes this consumer acts on (its bus hands it no others: most outcomes are successes)."""
        return isinstance(event, NodeFailed) and event.auto_rollback != AutoRollback.NONE

    async def handle(self, event: Event) -> None:
        """Ask for a rollback of a failed node when its policy is `node` or `release`."""
        if not isinstance(event, NodeFailed) or not self.wants(event):
            return
        with logs.bound(event_id=event.event_id, node_key=event.node_key, release_id=event.release_id):
            if event.current_version is None:
                log.info("failed node ran nothing before; nothing to roll back to")
                return
            # A report without its request (published by hand) stands for itself.
            failed_request = event.causation_id or event.event_id
            log.info("requesting rollback", to_version=event.current_version, failed_request=failed_request)
            await self.bus.publish(
                RollbackRequested(
                    event_id=derived_event_id(failed_request, "rollback"),
                    node_key=event.node_key,
                    service=event.service,
                    release_id=event.release_id,
                    causation_id=event.event_id,
                    reason=f"automatic: {event.step} failed: {event.error}"[:4000],
                    actor="reactor/rollback",
                )
            )
