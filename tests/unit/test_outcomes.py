"""The stored form of outcomes: what a redelivered request re-emits."""

from __future__ import annotations

import json

import pytest

from reactor import outcomes
from reactor.events import NodeDeployed, NodeEvent, NodeFailed, NodeRolledBack, RollbackFailed

pytestmark = pytest.mark.unit

COMMON: dict[str, object] = {
    "node_key": "local/h1/api",
    "service": "api",
    "release_id": "rel-1",
    "causation_id": "3f2a6c4e-1d2b-4c8a-9e7f-0a1b2c3d4e5f",
    "duration_s": 1.25,
}


@pytest.mark.parametrize(
    "outcome",
    [
        NodeDeployed(version="2.0.0", prev_version="1.0.0", **COMMON),
        NodeFailed(version="2.0.0", current_version="1.0.0", step="download", error='a "quoted"\nerror', **COMMON),
        NodeRolledBack(version="1.0.0", from_version="2.0.0", **COMMON),
        RollbackFailed(version=None, target_version=None, step="rollback", error="nothing to go back to", **COMMON),
    ],
    ids=lambda outcome: type(outcome).__name__,
)
def test_a_recorded_outcome_restores_as_it_was_and_keeps_the_stored_form(outcome: NodeEvent) -> None:
    recorded = outcomes.record(outcome)
    assert outcomes.restore(recorded) == outcome
    # The document records written before (by json.dumps of the model's dump) had: both are read alike.
    assert json.loads(recorded) == {"type": outcome.TYPE, "data": outcome.model_dump(mode="json")}


def test_only_outcomes_are_restored() -> None:
    with pytest.raises(ValueError, match="not an outcome type"):
        outcomes.restore('{"type": "dev.deployreactor.release.completed.v1", "data": {}}')
