"""A scriptable executor for consumer tests: the real executors are tested against real targets elsewhere."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from reactor.domain.status import NodeState, NodeStatus
from reactor.ports import ExecutionContext

Behaviour = Literal["ok", "fail", "crash", "hang"]


@dataclass
class Script:
    """How each node behaves, and what the executor saw."""

    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    delay_s: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    order: list[str] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    release: asyncio.Event | None = None


class ScriptedExecutor:
    """An Executor whose outcome per node comes from a Script."""

    platform: ClassVar[str] = "fake"
    script: ClassVar[Script] = Script()

    def __init__(self, context: ExecutionContext) -> None:
        self.context = context

    async def _enter(self, operation: str) -> Behaviour:
        script = self.script
        script.calls[f"{operation}:{self.context.node_key}"] += 1
        script.order.append(self.context.node_key)
        script.in_flight += 1
        script.peak_in_flight = max(script.peak_in_flight, script.in_flight)
        try:
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
            behaviour = script.behaviour.get(self.context.node_key, "ok")
            if behaviour == "hang":
                assert script.release is not None
                await script.release.wait()
            return behaviour
        finally:
            script.in_flight -= 1

    async def deploy(self) -> NodeStatus:
        behaviour = await self._enter("deploy")
        current = self.context.current
        if behaviour == "crash":
            raise RuntimeError("boom")
        if behaviour == "fail":
            return current.model_copy(update={"state": NodeState.FAILED, "last_error": "health: did not answer"})
        return current.model_copy(
            update={
                "state": NodeState.SUCCESS,
                "current_version": self.context.target_version,
                "prev_version": current.current_version,
            }
        )

    async def rollback(self) -> NodeStatus:
        await self._enter("rollback")
        return self.context.current.model_copy(
            update={"state": NodeState.ROLLED_BACK, "current_version": self.context.target_version}
        )

    async def status(self) -> NodeStatus:
        return self.context.current


def scripted(script: Script) -> type[ScriptedExecutor]:
    """A ScriptedExecutor class bound to `script`."""
    return type("BoundScriptedExecutor", (ScriptedExecutor,), {"script": script})
