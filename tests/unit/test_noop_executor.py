"""The noop executor: changes nothing, and takes `noop_delay_s` for a rollback as for a deploy."""

from __future__ import annotations

import asyncio

import pytest

from reactor.domain.status import NodeState, pending
from reactor.executors.noop import NoopExecutor
from reactor.ports import ExecutionContext, ExecutorSettings

NODE = "noop/host-1/app"


def executor(delay_s: float, *, current: str, target: str) -> NoopExecutor:
    status = pending(NODE, "app").model_copy(
        update={"state": NodeState.SUCCESS, "current_version": current, "prev_version": "1.0.0"}
    )
    return NoopExecutor(
        ExecutionContext(
            node_key=NODE,
            service="app",
            host="host-1",
            current=status,
            target_version=target,
            settings=ExecutorSettings(noop_delay_s=delay_s),
        )
    )


@pytest.mark.parametrize("operation", ["deploy", "rollback"])
async def test_each_operation_takes_the_noop_delay(operation: str) -> None:
    """With noop_delay_s 0.2 a deploy and a rollback each take at least 0.2 s, so pacing can be measured."""
    target = "2.0.0" if operation == "deploy" else "1.0.0"
    noop = executor(0.2, current="1.5.0", target=target)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    status = await (noop.deploy() if operation == "deploy" else noop.rollback())
    assert loop.time() - begin >= 0.2
    assert status.current_version == target
    assert status.state == (NodeState.SUCCESS if operation == "deploy" else NodeState.ROLLED_BACK)
