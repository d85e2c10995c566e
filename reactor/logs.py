"""structlog set-up: JSON lines when not on a terminal, readable lines on one; ids bound via contextvars."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType, TracebackType
from typing import Any, Literal

import pydantic_core
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Bumped by each `configure`: the loggers made before it bind themselves again on their next call.
_generation = 0

# What `bound` blocks bound, the inner-most last: one variable for all their keys (never changed in place).
_BOUND: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "reactor_log_context", default=MappingProxyType({})
)


def merge_bound(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: what `bound` blocks bound, under the line's own values."""
    values = _BOUND.get()
    return {**values, **event_dict} if values else event_dict


def context() -> dict[str, Any]:
    """The context a line logged here now carries: structlog's context variables, then what `bound` bound."""
    return {**structlog.contextvars.get_contextvars(), **_BOUND.get()}


def render_json(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """structlog processor: the line as one compact JSON object, made by pydantic-core (a fifth of the time
    structlog's `json.dumps` renderer takes: workers log a few lines a node). As there, the line is ASCII: a value
    from a host or a message (an executor's error) cannot put a terminal control or a bidirectional override into it.
    A value JSON has no form for is written as its `__structlog__()` or its `repr`, as structlog's renderer writes it;
    a line pydantic-core cannot write (bytes that are not UTF-8) goes through `json.dumps` as before."""
    try:
        return pydantic_core.to_json(
            event_dict, fallback=_fallback, inf_nan_mode="constants", ensure_ascii=True
        ).decode()
    except pydantic_core.PydanticSerializationError:
        return json.dumps(event_dict, default=_fallback)


def _fallback(value: Any) -> Any:
    method = getattr(value, "__structlog__", None)
    return method() if callable(method) else repr(value)


# The second the last line was stamped in, and its text: a line's stamp formats only its fraction of a second.
_second: tuple[int, str] = (-1, "")


def add_timestamp(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: `timestamp`, UTC in ISO 8601 with a "Z", as structlog's `TimeStamper(fmt="iso",
    utc=True)` writes it (no fraction at a whole second), in a third of its time."""
    global _second  # noqa: PLW0603 (one tuple, replaced whole: safe from any thread)
    now = time.time()
    second = int(now)
    micro = round((now - second) * 1_000_000)  # rounded half to even, as datetime rounds a time to microseconds
    if micro == 1_000_000:
        second, micro = second + 1, 0
    stamped = _second
    if stamped[0] != second:
        stamped = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    event_dict["timestamp"] = f"{stamped[1]}.{micro:06d}Z" if micro else f"{stamped[1]}Z"
    return event_dict


def configure(log_format: Literal["auto", "json", "console"] = "auto", level: str = "info") -> None:
    """Send structured logs to stderr, a line at a time."""
    global _generation  # noqa: PLW0603 (the one place the configuration changes)
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        render_json if as_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            merge_bound,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # Each line written and flushed at once, as PrintLogger does, without `print`'s two writes a line.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    _generation += 1


def reset() -> None:
    """Back to structlog's defaults (tests that configured logging undo it)."""
    global _generation  # noqa: PLW0603
    structlog.reset_defaults()
    _generation += 1


class Logger:
    """A module's logger: structlog's, bound once per configuration rather than on every call.

    structlog's lazy logger builds its bound logger again on each call (3.8 us, a call filtered out by its level
    included), unless it caches the first one for good, which would keep a configuration made before `configure`
    (such as a log line while the settings load). This one builds it on its first call after each `configure`; a
    call below the level then costs 0.3 us. Processors changed in place (structlog's `capture_logs`) apply at once.
    """

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._generation = -1

    def _logger(self) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger(self._name).bind()
            self._generation = _generation
        return self._bound

    def debug(self, event: str, **values: Any) -> None:
        """Log `event` at debug level with `values`."""
        self._logger().debug(event, **values)

    def info(self, event: str, **values: Any) -> None:
        """Log `event` at info level with `values`."""
        self._logger().info(event, **values)

    def warning(self, event: str, **values: Any) -> None:
        """Log `event` at warning level with `values`."""
        self._logger().warning(event, **values)

    def error(self, event: str, **values: Any) -> None:
        """Log `event` at error level with `values`."""
        self._logger().error(event, **values)

    def exception(self, event: str, **values: Any) -> None:
        """Log `event` at error level with `values` and the exception being handled."""
        self._logger().exception(event, **values)


def get_logger(name: str) -> Logger:
    """The logger of module `name`."""
    return Logger(name)


class bound:  # noqa: N801 (used like structlog's bound_contextvars)
    """Bind `values` to the log context for a `with` block, then restore what was bound before.

    What structlog's `bound_contextvars` does, in one context variable for all the keys (structlog's is a variable a
    key, set and reset one by one: 2.7 us a block of three, against 0.3). Lines carry these under their own values;
    a key bound both here and with structlog's `bind_contextvars` (the API binds the caller's identity so) is this
    one's.
    """

    __slots__ = ("_token", "_values")

    def __init__(self, **values: Any) -> None:
        self._values = values
        self._token: contextvars.Token[Mapping[str, Any]] | None = None

    def __enter__(self) -> None:
        self._token = _BOUND.set({**_BOUND.get(), **self._values})

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _BOUND.reset(self._token)
            self._token = None
