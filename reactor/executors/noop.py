"""An executor that changes nothing and always succeeds (after an optional delay): benchmarks and dry runs."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from reactor.domain.status import NodeState, NodeStatus
from reactor.ports import ExecutionContext


class NoopExecutor:
    """Reports the target version as deployed without touching anything."""

    platform: ClassVar[str] = "noop"

    def __init__(self, context: ExecutionContext) -> None:
        self.context = context

    async def deploy(self) -> NodeStatus:
        await self._work()
        current = self.context.current
        if current.current_version == self.context.target_version:
            return current.model_copy(update={"state": NodeState.SUCCESS})
        return current.model_copy(
            update={
                "state": NodeState.SUCCESS,
                "current_version": self.context.target_version,
                "prev_version": current.current_version,
            }
        )

    async def rollback(self) -> NodeStatus:
        await self._work()
        current = self.context.current
        return current.model_copy(
            update={
                "state": NodeState.ROLLED_BACK,
                "current_version": self.context.target_version,
                "prev_version": None,
            }
        )

    async def status(self) -> NodeStatus:
        return self.context.current

    async def _work(self) -> None:
        """Stand for the time a real deploy or rollback takes (`noop_delay_s`), so pacing can be measured."""
        if self.context.settings.noop_delay_s:
            await asyncio.sleep(self.context.settings.noop_delay_s)
