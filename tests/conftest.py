"""Shared fixtures. Behaviour tests take `store` and `bus`, parametrised by backend, written once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.ports import EventBus, Store

STORE_BACKENDS = [
    pytest.param("embedded", marks=pytest.mark.unit),
    pytest.param("embedded-file", marks=pytest.mark.unit),
]
BUS_BACKENDS = [pytest.param("memory", marks=pytest.mark.unit)]


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, empty store of each backend."""
    path: Path | str = ":memory:" if request.param == "embedded" else tmp_path / "reactor.db"
    async with EmbeddedStore(path) as opened:
        yield opened


@pytest.fixture(params=BUS_BACKENDS)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    """A fresh bus of each backend."""
    async with MemoryBus(retry_delay_s=0.01) as opened:
        yield opened
