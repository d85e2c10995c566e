"""Executors by platform, found through the `reactor.executors` entry-point group."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from reactor.errors import ExecutorNotFound
from reactor.ports import ExecutorFactory

GROUP = "reactor.executors"


@cache
def registered() -> dict[str, ExecutorFactory]:
    """Every executor factory installed, by platform name."""
    factories: dict[str, ExecutorFactory] = {}
    for entry in entry_points(group=GROUP):
        factories[entry.name] = entry.load()
    return factories


def executor_factory(platform: str, extra: dict[str, ExecutorFactory] | None = None) -> ExecutorFactory:
    """The factory for `platform`; `extra` (tests, embedding programs) wins over installed ones."""
    if extra and platform in extra:
        return extra[platform]
    factories = registered()
    if platform not in factories:
        known = ", ".join(sorted(factories)) or "none"
        raise ExecutorNotFound(f"no executor for platform {platform!r} (installed: {known})")
    return factories[platform]
