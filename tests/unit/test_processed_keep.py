"""How long a worker keeps finished requests' outcomes: at least as long as a command may still run."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.runtime import Backends, Role, run_roles
from reactor.settings import Settings
from tests.support import until


def test_outcomes_are_kept_a_week_by_default_or_as_long_as_a_command_may_run_if_longer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().processed_keep() == timedelta(days=7)
    monkeypatch.setenv("REACTOR_COMMAND_MAX_AGE_S", str(30 * 86400))
    assert Settings().processed_keep() == timedelta(days=30)


def test_a_keep_shorter_than_a_command_may_run_is_refused_naming_both_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REACTOR_PROCESSED_KEEP_S", "3600")
    with pytest.raises(
        ValidationError, match=r"REACTOR_PROCESSED_KEEP_S \(3600\) .* REACTOR_COMMAND_MAX_AGE_S \(86400\)"
    ):
        Settings()
    monkeypatch.setenv("REACTOR_COMMAND_MAX_AGE_S", "3600")
    assert Settings().processed_keep() == timedelta(hours=1)


def test_outcomes_are_kept_for_good_when_told_or_when_commands_never_grow_too_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REACTOR_PROCESSED_KEEP_S", "0")
    assert Settings().processed_keep() is None
    monkeypatch.setenv("REACTOR_PROCESSED_KEEP_S", "604800")
    monkeypatch.setenv("REACTOR_COMMAND_MAX_AGE_S", "0")
    assert Settings().processed_keep() is None


async def test_a_running_executor_forgets_outcomes_older_than_kept_and_keeps_the_rest(tmp_path: Path) -> None:
    """The executor role prunes when it starts (and hourly after): an outcome from eight days ago goes, one from
    six days ago stays (the default keeps a week)."""
    now = datetime.now(UTC)
    async with EmbeddedStore(":memory:") as store:
        await store.put_processed("req-old", "old", at=now - timedelta(days=8))
        await store.put_processed("req-young", "young", at=now - timedelta(days=6))
        bus = MemoryBus()
        started = asyncio.Event()
        running = asyncio.create_task(
            run_roles(
                Backends(bus=bus, store=store, memory_bus=bus),
                Settings(state_dir=tmp_path),
                {Role.EXECUTOR},
                started=started,
            )
        )
        try:
            async with asyncio.timeout(30):
                await started.wait()

            async def pruned() -> bool:
                return await store.get_processed("req-old") is None

            await until(pruned, "the old outcome is pruned")
            assert await store.get_processed("req-young") == "young"
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
