"""The HTTP binding from the contract's side: every ReleaseRequested the published schemas accept, sent over HTTP in
binary or structured mode, is taken as the same event the Kafka codec decodes from the Kafka message."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from reactor.api.binding import STRUCTURED, decode_request, record_of
from reactor.codec import Record, decode
from reactor.events import ReleaseRequested
from tests.contract import Message, valid_messages

# Release plans are costly to draw (see tests/unit/test_contract.py): few examples, more time than the default.
pytestmark = [pytest.mark.unit, pytest.mark.timeout(600)]


# What a header value may carry as it is; the binding percent-encodes the rest (space, '"', '%', beyond ASCII).
_SAFE = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) not in '"%')


def binary(message: Message) -> list[tuple[str, str]]:
    """The message's headers as HTTP binary mode carries them: `ce-` instead of `ce_`, values percent-encoded."""
    return [
        ("ce-" + name.removeprefix("ce_"), quote(value, safe=_SAFE)) if name.startswith("ce_") else (name, value)
        for name, value in message.headers.items()
    ] + ([] if "content-type" in message.headers else [("content-type", "application/json")])


def structured(message: Message) -> bytes:
    """The message as one structured-mode CloudEvent: attributes by name, the body as `data` (other headers, e.g.
    tracing ones, are no part of the event)."""
    envelope: dict[str, object] = {
        ("datacontenttype" if name == "content-type" else name.removeprefix("ce_")): value
        for name, value in message.headers.items()
        if name.startswith("ce_") or name == "content-type"
    }
    envelope["data"] = message.body
    return json.dumps(envelope).encode()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
)
@given(valid_messages(ReleaseRequested.TYPE))
def test_every_release_request_the_contract_accepts_is_taken_over_http_in_both_modes(message: Message) -> None:
    """Binary and structured HTTP requests decode to exactly the event the Kafka record decodes to."""
    key = None if message.key is None else message.key.encode()
    on_kafka, source = decode(Record(key=key, value=message.value(), headers=message.header_items()))
    assert record_of(binary(message), message.value()).header("ce_source") == source.encode()
    in_binary = decode_request(binary(message), message.value(), ReleaseRequested)
    in_structured = decode_request([("content-type", STRUCTURED)], structured(message), ReleaseRequested)
    assert in_binary == on_kafka
    assert in_structured == on_kafka
