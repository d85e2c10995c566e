"""Executors by platform, found through the `reactor.executors` entry-point group."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from reactor.errors import ExecutorNotFound
from reactor.ports import ExecutorFactory

GROUP = "reactor.executors"


@cache
def _load(platform: str) -> ExecutorFactory | None:
    # Only the platform asked for is imported: a broken or heavy plugin for another platform cannot break it.
    for entry in entry_points(group=GROUP, name=platform):
        factory: ExecutorFactory = entry.load()
        return factory
    return None


def executor_factory(platform: str, extra: dict[str, ExecutorFactory] | None = None) -> ExecutorFactory:
    """The factory for `platform`; `extra` (tests, embedding programs) wins over installed ones."""
    if extra and platform in extra:
        return extra[platform]
    factory = _load(platform)
    if factory is None:
        known = ", ".join(sorted(entry.name for entry in entry_points(group=GROUP))) or "none"
        raise ExecutorNotFound(f"no executor for platform {platform!r} (installed: {known})")
    return factory
