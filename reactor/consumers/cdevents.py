"""CDEvents publisher: outcomes and release progress, mapped to CDEvents (`reactor.cdevents`), sent to every sink.

At-least-once: the handler returns (so the bus may commit the source event) only once every sink has the
CDEvent; while one cannot take it, the handler raises a retriable error and gets the event again. A sink that
already took it is not sent it again by this process on that retry, though after a restart every sink may get
it twice: subscribers dedupe on the CloudEvent id, which is derived from the source event id, so it is the same
on every re-send.
"""

from __future__ import annotations

from collections.abc import Sequence

from reactor import logs
from reactor.cdevents import PIPELINE_NAME, to_cdevent
from reactor.errors import InvalidInput
from reactor.events import Event
from reactor.ports import CDEventSink

log = logs.get_logger(__name__)

MAX_REMEMBERED = 10_000


class CDEventsPublisher:
    """Handles events of the releases and outcomes topics."""

    def __init__(
        self,
        sinks: Sequence[CDEventSink],
        *,
        source: str,
        release_url: str | None = None,
        pipeline_name: str = PIPELINE_NAME,
    ) -> None:
        if not sinks:
            raise InvalidInput("cdevents sinks", "name a Kafka topic or at least one HTTP sink")
        if not source or any(char.isspace() for char in source):
            # Checked here, once: each event would otherwise fail to map and be dead-lettered.
            raise InvalidInput("cdevents source", "a non-empty URI reference without spaces")
        self.sinks = list(sinks)
        self.source = source
        self.release_url = release_url
        self.pipeline_name = pipeline_name
        # Sinks that took a CDEvent whose other sinks did not yet: on the retry only those others get it.
        self._taken: dict[str, set[str]] = {}

    async def handle(self, event: Event) -> None:
        """Send the CDEvent of `event`, if it has one, to every sink that does not have it yet."""
        cdevent = to_cdevent(event, source=self.source, release_url=self.release_url, pipeline_name=self.pipeline_name)
        if cdevent is None:
            return
        with logs.bound(event_id=event.event_id, release_id=event.release_id, cdevent_type=_context(cdevent)["type"]):
            if len(self._taken) >= MAX_REMEMBERED:  # events never retried here (their partition moved on)
                self._taken.clear()
            taken = self._taken.setdefault(event.event_id, set())
            for sink in self.sinks:
                if sink.name in taken:
                    continue
                await sink.send(cdevent)
                taken.add(sink.name)
            del self._taken[event.event_id]
            log.debug("cdevent published", cdevent_id=_context(cdevent)["id"])


def _context(cdevent: dict[str, object]) -> dict[str, object]:
    context = cdevent["context"]
    assert isinstance(context, dict)  # noqa: S101 (to_cdevent always builds it as a dict)
    return context
