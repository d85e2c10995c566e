"""The published contract from outside: messages generated from schemas/ are accepted exactly when it says so.

Every message drawn valid from the files is decoded into the event it describes; every mutation of one is
accepted or refused as the files say, and a refusal names the field or header that broke the contract.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from reactor.codec import Record, decode
from reactor.errors import DecodeError
from tests.contract import Message, messages, mutated, valid_messages, verdict

pytestmark = pytest.mark.unit

# No shrinking: hypothesis-jsonschema's strategies do not replay the same way while shrinking (hypothesis reports
# them as flaky), so the first failing example is the one reported.
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
)
# Changed messages per type, by topic: most where workers act on them (about 1,300 examples in all with the valid).
EXAMPLES_CHANGED = {"commands": 100, "releases": 40, "outcomes": 30}
ALL_TYPES = sorted(messages())


def record(message: Message) -> Record:
    key = None if message.key is None else message.key.encode()
    return Record(key=key, value=message.value(), headers=message.header_items())


def assert_same(body: Any, decoded: Any, where: str = "") -> None:
    """Every value the body gave is the value the event holds (defaults the body left out are not compared)."""
    if isinstance(body, dict):
        assert isinstance(decoded, dict), where
        for name, value in body.items():
            assert_same(value, decoded.get(name), f"{where}.{name}")
    elif isinstance(body, list):
        assert isinstance(decoded, list), where
        assert len(body) == len(decoded), where
        for index, (left, right) in enumerate(zip(body, decoded, strict=True)):
            assert_same(left, right, f"{where}[{index}]")
    else:
        assert (body == decoded and type(body) is not bool) or decoded is body, f"{where}: {body!r} != {decoded!r}"


def check(message: Message) -> None:
    """Decode `message` and hold the result to the contract's verdict."""
    expected = verdict(message)
    try:
        event, source = decode(record(message))
    except DecodeError as exc:
        reason = str(exc)
        assert not expected.accepted, f"refused a message the contract accepts: {reason}\n{message}"
        assert any(name in reason for name in expected.names), f"{reason!r} names none of {sorted(expected.names)}"
        return
    assert expected.accepted, f"accepted a message the contract refuses ({sorted(expected.names)}): {message}"
    assert message.headers["ce_type"] == event.TYPE
    assert event.event_id == message.headers["ce_id"]
    assert event.subject() == message.headers["ce_subject"]
    assert source == message.headers["ce_source"]
    assert_same(message.body, event.model_dump(mode="json"))


@pytest.mark.parametrize("event_type", ALL_TYPES)
def test_every_message_the_contract_accepts_is_decoded_into_the_event_it_describes(event_type: str) -> None:
    @settings(SETTINGS, max_examples=30)
    @given(valid_messages(event_type))
    def run(message: Message) -> None:
        assert verdict(message).accepted, verdict(message)
        check(message)

    run()


@pytest.mark.parametrize("event_type", ALL_TYPES)
def test_a_changed_message_is_accepted_or_refused_exactly_as_the_contract_says(event_type: str) -> None:
    @settings(SETTINGS, max_examples=EXAMPLES_CHANGED.get(messages()[event_type]["topic"], 30))
    @given(mutated(event_type))
    def run(message: Message) -> None:
        check(message)

    run()
