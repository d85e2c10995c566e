"""The demo scenario end to end, in-process: real packages, real processes, checks over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.demo.scenario import run_demo, served_version
from reactor.domain.pacer import ReleaseState
from reactor.events import Event

pytestmark = pytest.mark.e2e


async def test_demo_deploys_two_releases_then_rolls_back_the_bad_canary(tmp_path: Path) -> None:
    """Every claim of the demo holds, the store agrees, and no service is left running."""
    seen: list[Event] = []
    said: list[str] = []
    result = await run_demo(tmp_path, observer=seen.append, say=said.append)

    failed = [claim for claim, holds in result.checks if not holds]
    assert failed == []
    assert len(result.checks) == 8
    async with EmbeddedStore(tmp_path / "state" / "reactor.db") as store:
        states = {record.release_id: record.state for record in await store.list_releases()}
    assert states == {
        "hello-1.0.0": ReleaseState.COMPLETED,
        "hello-1.1.0": ReleaseState.COMPLETED,
        "hello-1.2.0-bad": ReleaseState.HALTED,
    }
    assert said == ["stopped 3 service processes"]
    for path in (tmp_path / "nodes").glob("*/hello/run/pid"):
        pytest.fail(f"a service is still recorded as running: {path}")
    assert {type(event).__name__ for event in seen} >= {"NodeDeployed", "NodeFailed", "NodeRolledBack", "ReleaseHalted"}
    assert (tmp_path / "release-hello-1.2.0-bad.yaml").exists()


async def test_demo_result_fails_when_a_check_fails(tmp_path: Path) -> None:
    """The demo's verdict is the conjunction of its checks: one false claim makes it fail."""
    result = await run_demo(tmp_path)
    assert result.ok
    result.check("an impossible claim", False)
    assert not result.ok
    assert served_version(1) is None
