"""structlog set-up: JSON lines when not on a terminal, readable lines on one; ids bound via contextvars."""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(log_format: Literal["auto", "json", "console"] = "auto", level: str = "info") -> None:
    """Send structured logs to stderr."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class bound:  # noqa: N801 (used like structlog's bound_contextvars)
    """Bind `values` to the log context for a `with` block, then restore what was bound before.

    What structlog's `bound_contextvars` does, by resetting the variables it set rather than copying the whole
    context on the way in: that copy cost more than the handler of a small message.
    """

    __slots__ = ("_tokens", "_values")

    def __init__(self, **values: Any) -> None:
        self._values = values
        self._tokens: Mapping[str, contextvars.Token[Any]] = {}

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._values)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)
