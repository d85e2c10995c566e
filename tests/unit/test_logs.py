"""logs.bound: the log context of a block, restored after it."""

from __future__ import annotations

import asyncio
import json

import pytest
import structlog

from reactor import logs

pytestmark = pytest.mark.unit


def test_bound_values_are_in_the_context_inside_the_block_and_what_was_there_before_comes_back() -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(release_id="outer")
    with logs.bound(release_id="inner", event_id="e1"):
        assert logs.context() == {"release_id": "inner", "event_id": "e1"}
        with logs.bound(event_id="e2"):
            assert logs.context() == {"release_id": "inner", "event_id": "e2"}
        assert logs.context() == {"release_id": "inner", "event_id": "e1"}
    assert logs.context() == {"release_id": "outer"}
    structlog.contextvars.clear_contextvars()


def test_bound_context_is_restored_when_the_block_raises() -> None:
    structlog.contextvars.clear_contextvars()
    with pytest.raises(RuntimeError), logs.bound(node_key="n1"):
        raise RuntimeError("handler failed")
    assert logs.context() == {}


async def test_each_task_sees_only_what_it_bound() -> None:
    inside = asyncio.Event()
    seen: dict[str, dict[str, object]] = {}

    async def handle(name: str) -> None:
        with logs.bound(event_id=name):
            await inside.wait()
            seen[name] = logs.context()

    tasks = [asyncio.create_task(handle(name)) for name in ("a", "b")]
    await asyncio.sleep(0)
    inside.set()
    await asyncio.gather(*tasks)
    assert seen == {"a": {"event_id": "a"}, "b": {"event_id": "b"}}


def test_a_module_logger_follows_each_configure(capsys: pytest.CaptureFixture[str]) -> None:
    """Bound once per configuration: a level set again applies to loggers that logged before it."""
    log = logs.get_logger("reactor.test")
    try:
        logs.configure("json", "warning")
        log.info("below the level")
        log.warning("at the level", node_key="n1")
        logs.configure("json", "info")
        log.info("now at the level")
    finally:
        logs.reset()
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["at the level", "now at the level"]
    assert json.loads(lines[0])["node_key"] == "n1"


def test_processors_changed_in_place_apply_to_a_logger_bound_before() -> None:
    """structlog's capture_logs changes the configured processors in place: a bound logger sees it."""
    log = logs.get_logger("reactor.test")
    log.info("binds the logger")
    with structlog.testing.capture_logs() as captured:
        log.warning("captured", release_id="r1")
    assert captured == [{"event": "captured", "release_id": "r1", "log_level": "warning"}]


def test_a_line_carries_what_is_bound_under_its_own_values(capsys: pytest.CaptureFixture[str]) -> None:
    """Rendered lines: the inner-most block's values, structlog's context variables for other keys, and a line's own
    value over both."""
    log = logs.get_logger("reactor.test")
    structlog.contextvars.clear_contextvars()
    try:
        logs.configure("json", "info")
        structlog.contextvars.bind_contextvars(identity="ci", release_id="outer")
        with logs.bound(release_id="r1", node_key="n1"), logs.bound(node_key="n2"):
            log.info("inside", event_id="e1")
            log.info("its own", node_key="n9")
        log.info("after")
    finally:
        structlog.contextvars.clear_contextvars()
        logs.reset()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    keys = ("event", "identity", "release_id", "node_key", "event_id")
    assert [{key: line.get(key) for key in keys} for line in lines] == [
        {"event": "inside", "identity": "ci", "release_id": "r1", "node_key": "n2", "event_id": "e1"},
        {"event": "its own", "identity": "ci", "release_id": "r1", "node_key": "n9", "event_id": None},
        {"event": "after", "identity": "ci", "release_id": "outer", "node_key": None, "event_id": None},
    ]
