"""A scriptable executor for consumer tests: the real executors are tested against real targets elsewhere."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from reactor.domain.status import NodeState, NodeStatus
from reactor.errors import BackendUnavailable, StepFailed
from reactor.ports import ExecutionContext

Behaviour = Literal["ok", "fail", "crash", "hang"]
# What one status() probe finds: the node as recorded, a failed health check, another version running, a target
# that cannot be reached right now (retriable), a probe that fails for good, a probe that crashes.
Probe = Literal["healthy", "unhealthy", "drift", "unreachable", "refused", "crash"]


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
    probes: dict[str, list[Probe]] = field(default_factory=dict)  # consumed in order; then "healthy"
    # Latched: every deploy and rollback waits, in flight, until the test lets it go (`let_go`).
    latched: bool = False
    gates: list[tuple[str, asyncio.Event]] = field(default_factory=list)

    @property
    def held(self) -> list[str]:
        """The node keys waiting on the latch, in the order they arrived."""
        return [node_key for node_key, _ in self.gates]

    def let_go(self, count: int | None = None) -> list[str]:
        """Let the first `count` held deploys (every one by default) go on; their node keys.

        They stop counting as held at once, though each finishes only when its task runs next.
        """
        chosen, self.gates[:count] = self.gates[:count], []
        for _, gate in chosen:
            gate.set()
        return [node_key for node_key, _ in chosen]


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
            if script.latched:
                gate = (self.context.node_key, asyncio.Event())
                script.gates.append(gate)
                try:
                    await gate[1].wait()
                finally:
                    if gate in script.gates:  # cancelled while held
                        script.gates.remove(gate)
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
        if current.current_version == self.context.target_version:
            return current.model_copy(update={"state": NodeState.SUCCESS})  # already there: nothing changes
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
        script, node = self.script, self.context.node_key
        script.calls[f"status:{node}"] += 1
        queued = script.probes.get(node)
        probe = queued.pop(0) if queued else "healthy"
        current = self.context.current
        match probe:
            case "healthy":
                return current
            case "unhealthy":
                return current.model_copy(update={"state": NodeState.FAILED, "last_error": "health check fails"})
            case "drift":
                return current.model_copy(update={"current_version": "0.0.1-drift"})
            case "unreachable":
                raise BackendUnavailable(f"{node} cannot be reached right now")
            case "refused":
                raise StepFailed("status", "permission denied")
            case "crash":
                raise RuntimeError("probe boom")


def scripted(script: Script) -> type[ScriptedExecutor]:
    """A ScriptedExecutor class bound to `script`."""
    return type("BoundScriptedExecutor", (ScriptedExecutor,), {"script": script})
