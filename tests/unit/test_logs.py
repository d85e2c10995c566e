"""logs: the log context of a block (restored after it), and the JSON lines a worker writes."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

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


class _Kind(StrEnum):
    DEPLOY = "deploy"


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


class _Described:
    def __structlog__(self) -> str:
        return "described"


def test_a_json_line_says_what_structlogs_renderer_says_on_one_line() -> None:
    """The compact renderer writes the values structlog's JSON renderer writes, one object on one line, whatever a
    value holds; values JSON has no form for are their `__structlog__()` or `repr`."""
    line = {
        "event": "claimed node",
        "text": 'quote " backslash \\ newline \n tab \t nul \x00 escape \x1b C1 \x9b bidi \u202e é',
        "count": 3,
        "big": 10**30,
        "ratio": 0.1,
        "unbounded": math.inf,
        "flag": True,
        "nothing": None,
        "nested": {"list": [1, "two", {"three": 3}]},
        "kind": _Kind.DEPLOY,
        "opaque": _Opaque(),
        "described": _Described(),
    }
    rendered = logs.render_json(None, "info", dict(line))
    assert isinstance(rendered, str)
    assert "\\n" in rendered  # the newline inside a value is escaped
    assert len(rendered.splitlines()) == 1
    assert rendered.isascii()
    assert rendered.isprintable()  # no control character of any kind reaches the terminal or file
    theirs = structlog.processors.JSONRenderer()(None, "info", dict(line))
    assert json.loads(rendered) == json.loads(theirs)
    assert list(json.loads(rendered)) == list(line)  # the order of the keys too


def test_a_line_the_fast_renderer_cannot_write_is_written_by_json_dumps() -> None:
    line = {"event": "raw", "payload": b"\xff\xfe", "path": Path("/srv/app")}
    assert json.loads(logs.render_json(None, "info", dict(line))) == {
        "event": "raw",
        "payload": repr(b"\xff\xfe"),
        "path": repr(Path("/srv/app")),
    }


@pytest.mark.parametrize(
    ("now", "stamp"),
    [
        (1_796_534_549.525472, "2026-12-06T05:22:29.525472Z"),
        (1_796_534_549.0, "2026-12-06T05:22:29Z"),  # a whole second: no fraction, as isoformat writes it
        (1_796_534_550.000042, "2026-12-06T05:22:30.000042Z"),
        (1_796_534_549.9999996, "2026-12-06T05:22:30Z"),  # rounded up into the next second
        (1_796_534_549.9999993, "2026-12-06T05:22:29.999999Z"),
    ],
)
def test_a_timestamp_is_written_as_structlogs_iso_utc_stamper_writes_it(
    monkeypatch: pytest.MonkeyPatch, now: float, stamp: str
) -> None:
    monkeypatch.setattr("reactor.logs.time.time", lambda: now)
    assert logs.add_timestamp(None, "info", {})["timestamp"] == stamp
    theirs = datetime.fromtimestamp(now, tz=UTC).isoformat().replace("+00:00", "Z")
    assert stamp == theirs


def test_each_line_is_stamped_with_the_time_it_is_logged() -> None:
    # To the microsecond: a stamp is rounded to the nearest one, `datetime.now()` truncates.
    micro = timedelta(microseconds=1)
    before = datetime.now(UTC)
    first = logs.add_timestamp(None, "info", {})["timestamp"]
    second = logs.add_timestamp(None, "info", {})["timestamp"]
    after = datetime.now(UTC)
    assert before - micro <= datetime.fromisoformat(first) <= datetime.fromisoformat(second) <= after + micro
