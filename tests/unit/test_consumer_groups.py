"""Which consumer groups a deployment's workers join: `<REACTOR_GROUP_PREFIX><role>`, the prefix defaulting to the
topic prefix (the real broker's side is tests/integration/test_kafka_groups.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from reactor.runtime import kafka_bus
from reactor.settings import Settings

pytestmark = pytest.mark.unit


def test_groups_are_under_the_topic_prefix_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REACTOR_GROUP_PREFIX", raising=False)
    assert kafka_bus(Settings()).group_id("executor") == "reactor.executor"
    assert kafka_bus(Settings(topic_prefix="staging.")).group_id("pacer") == "staging.pacer"


def test_a_group_prefix_of_its_own_and_the_bare_role_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REACTOR_GROUP_PREFIX", "")
    assert kafka_bus(Settings(topic_prefix="staging.")).group_id("executor") == "executor"
    monkeypatch.setenv("REACTOR_GROUP_PREFIX", "team-a.")
    assert kafka_bus(Settings()).group_id("rollback") == "team-a.rollback"


def test_a_group_prefix_kafka_would_not_take_as_a_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="group_prefix"):
        Settings(group_prefix="a b")
