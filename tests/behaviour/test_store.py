"""Behaviour of the Store port, written once against the `store` fixture (every backend).

The fixture's parameters carry the backend marks (`unit` for the embedded store, `mongo` for MongoDB), so this
module adds none of its own; the tests that open an EmbeddedStore directly are marked `unit` one by one.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from reactor.adapters import embedded_store
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.planner import plan_batches
from reactor.domain.status import NodeState, NodeStatus, pending
from reactor.events import NodeTarget, ReleasePlan, Strategy
from reactor.ports import ReleaseNode, ReleaseRecord, Store

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
IMAGE = "registry.example.com/shop/api:2.0.0"


def status(node_key: str, *, service: str = "api", release_id: str | None = None) -> NodeStatus:
    return pending(node_key, service).model_copy(update={"release_id": release_id})


def plan(release_id: str, count: int = 3, batches: list[int | str] | None = None) -> ReleasePlan:
    return ReleasePlan(
        release_id=release_id,
        service="api",
        version="2.0.0",
        image=IMAGE,
        nodes=[NodeTarget(node_key=f"local/h{index}/api") for index in range(count)],
        strategy=Strategy(batches=batches or [1, "100%"]),
    )


def batches_of(count: int, strategy: Strategy) -> list[list[str]]:
    """The node keys `local/h<i>/api` of a `count`-node release, in batches."""
    return plan_batches([f"local/h{index}/api" for index in range(count)], strategy)


def release(release_id: str, *, created_at: datetime = T0, count: int = 3) -> ReleaseRecord:
    the_plan = plan(release_id, count)
    return ReleaseRecord(
        release_id=release_id,
        plan=the_plan.spec(),
        batch_sizes=[len(batch) for batch in batches_of(count, the_plan.strategy)],
        request_id=f"req-{release_id}",
        actor="alice",
        created_at=created_at,
        updated_at=created_at,
    )


def release_nodes(record: ReleaseRecord) -> list[ReleaseNode]:
    """The nodes `local/h<i>/api` of `record`, numbered in plan order and cut by its batch sizes."""
    batch_of = [index for index, size in enumerate(record.batch_sizes) for _ in range(size)]
    return [
        ReleaseNode(
            release_id=record.release_id,
            node_key=f"local/h{position}/api",
            batch=batch,
            position=position,
            target=NodeTarget(node_key=f"local/h{position}/api"),
        )
        for position, batch in enumerate(batch_of)
    ]


async def seeded_release(store: Store, count: int = 5) -> ReleaseRecord:
    """A release of `count` nodes in batches [1, 2, 2, ...], its nodes added in reverse order."""
    batches = batches_of(count, Strategy(batches=[1, 2]))
    record = release("rel-1", count=count).model_copy(update={"batch_sizes": [len(batch) for batch in batches]})
    await store.add_release_nodes(list(reversed(release_nodes(record))))
    return record


# --- nodes --------------------------------------------------------------------------------------


async def test_unknown_node_is_none(store: Store) -> None:
    assert await store.get_node("local/h1/api") is None


async def test_put_node_with_revision_zero_inserts_it_at_revision_one(store: Store) -> None:
    written = await store.put_node(status("local/h1/api"), expected_revision=0)
    assert written is not None
    assert written.revision == 1
    assert await store.get_node("local/h1/api") == written


async def test_claim_owner_epoch_and_heartbeat_round_trip(store: Store) -> None:
    """The fencing fields of a claim (owner, epoch, the renewed `updated_at`) come back as written."""
    held = status("local/h1/api").model_copy(
        update={"state": NodeState.DEPLOYING, "owner": "executor-a", "epoch": 7, "updated_at": T0}
    )
    first = await store.put_node(held, expected_revision=0)
    assert first is not None
    assert await store.get_node("local/h1/api") == first
    renewed = first.model_copy(update={"updated_at": T0 + timedelta(seconds=20)})
    second = await store.put_node(renewed, expected_revision=first.revision)
    assert second is not None
    stored = await store.get_node("local/h1/api")
    assert stored is not None
    assert (stored.owner, stored.epoch, stored.updated_at) == ("executor-a", 7, T0 + timedelta(seconds=20))


async def test_second_insert_with_revision_zero_fails_and_keeps_the_first(store: Store) -> None:
    first = await store.put_node(status("local/h1/api", release_id="rel-1"), expected_revision=0)
    second = await store.put_node(status("local/h1/api", release_id="rel-2"), expected_revision=0)
    assert second is None
    assert await store.get_node("local/h1/api") == first


async def test_update_with_the_stored_revision_succeeds_and_bumps_it(store: Store) -> None:
    first = await store.put_node(status("local/h1/api"), expected_revision=0)
    assert first is not None
    changed = first.model_copy(update={"state": NodeState.SUCCESS, "current_version": "2.0.0"})
    second = await store.put_node(changed, expected_revision=first.revision)
    assert second is not None
    assert second.revision == 2
    assert (second.state, second.current_version) == (NodeState.SUCCESS, "2.0.0")
    assert await store.get_node("local/h1/api") == second


async def test_update_with_a_stale_revision_fails_and_leaves_the_stored_node_unchanged(store: Store) -> None:
    first = await store.put_node(status("local/h1/api"), expected_revision=0)
    assert first is not None
    second = await store.put_node(first.model_copy(update={"current_version": "2.0.0"}), expected_revision=1)
    assert second is not None
    stale = first.model_copy(update={"state": NodeState.FAILED, "last_error": "lost the race"})
    assert await store.put_node(stale, expected_revision=1) is None
    assert await store.get_node("local/h1/api") == second


async def test_update_of_an_absent_node_fails(store: Store) -> None:
    assert await store.put_node(status("local/h1/api"), expected_revision=3) is None
    assert await store.get_node("local/h1/api") is None


async def test_list_nodes_filters_by_release_and_service_ordered_by_node_key(store: Store) -> None:
    for node_key, service, release_id in [
        ("local/h3/api", "api", "rel-1"),
        ("local/h1/api", "api", "rel-1"),
        ("local/h2/web", "web", "rel-1"),
        ("local/h2/api", "api", "rel-2"),
        ("local/h0/api", "api", None),
    ]:
        assert await store.put_node(status(node_key, service=service, release_id=release_id), expected_revision=0)

    def node_keys(nodes: list[NodeStatus]) -> list[str]:
        return [node.node_key for node in nodes]

    assert node_keys(await store.list_nodes()) == [
        "local/h0/api",
        "local/h1/api",
        "local/h2/api",
        "local/h2/web",
        "local/h3/api",
    ]
    assert node_keys(await store.list_nodes(release_id="rel-1")) == ["local/h1/api", "local/h2/web", "local/h3/api"]
    assert node_keys(await store.list_nodes(service="api")) == [
        "local/h0/api",
        "local/h1/api",
        "local/h2/api",
        "local/h3/api",
    ]
    assert node_keys(await store.list_nodes(release_id="rel-1", service="api")) == ["local/h1/api", "local/h3/api"]
    assert await store.list_nodes(release_id="rel-9") == []


async def test_list_nodes_follows_the_release_of_an_updated_node(store: Store) -> None:
    first = await store.put_node(status("local/h1/api", release_id="rel-1"), expected_revision=0)
    assert first is not None
    assert await store.put_node(first.model_copy(update={"release_id": "rel-2"}), expected_revision=1)
    assert await store.list_nodes(release_id="rel-1") == []
    assert [node.node_key for node in await store.list_nodes(release_id="rel-2")] == ["local/h1/api"]


# --- processed requests -------------------------------------------------------------------------


async def test_processed_outcome_is_none_until_recorded(store: Store) -> None:
    assert await store.get_processed("req-1") is None
    await store.put_processed("req-1", '{"type": "deployed"}')
    assert await store.get_processed("req-1") == '{"type": "deployed"}'
    assert await store.get_processed("req-2") is None


async def test_processed_first_write_wins_and_each_write_says_whether_it_is_the_one_stored(store: Store) -> None:
    assert await store.put_processed("req-1", "first")
    assert not await store.put_processed("req-1", "second")
    assert await store.get_processed("req-1") == "first"


async def test_processed_outcomes_finished_before_a_time_are_pruned_and_later_ones_kept(store: Store) -> None:
    await store.put_processed("req-old", "old", at=T0)
    await store.put_processed("req-edge", "edge", at=T0 + timedelta(hours=1))
    await store.put_processed("req-new", "new", at=T0 + timedelta(hours=2))
    # Written again later (a redelivery): the first write, and its time, stay.
    await store.put_processed("req-old", "again", at=T0 + timedelta(hours=3))

    assert await store.prune_processed(T0 + timedelta(hours=1)) == 1
    assert await store.get_processed("req-old") is None
    assert await store.get_processed("req-edge") == "edge"
    assert await store.get_processed("req-new") == "new"
    assert await store.prune_processed(T0 + timedelta(hours=1)) == 0
    # A time in another zone is the same instant.
    assert (
        await store.prune_processed((T0 + timedelta(hours=1, minutes=1)).astimezone(timezone(timedelta(hours=5)))) == 1
    )
    assert await store.get_processed("req-edge") is None
    assert await store.get_processed("req-new") == "new"


async def test_a_processed_outcome_recorded_without_a_time_is_timed_now(store: Store) -> None:
    before = datetime.now(UTC)
    await store.put_processed("req-1", "outcome")
    assert await store.prune_processed(before - timedelta(minutes=1)) == 0
    assert await store.prune_processed(datetime.now(UTC) + timedelta(minutes=1)) == 1


# --- releases -----------------------------------------------------------------------------------


async def test_unknown_release_is_none(store: Store) -> None:
    assert await store.get_release("rel-1") is None


async def test_put_release_with_revision_zero_inserts_and_a_second_insert_fails(store: Store) -> None:
    written = await store.put_release(release("rel-1"), expected_revision=0)
    assert written is not None
    assert written.revision == 1
    assert (
        await store.put_release(release("rel-1").model_copy(update={"actor": "mallory"}), expected_revision=0) is None
    )
    assert await store.get_release("rel-1") == written


async def test_release_update_with_the_stored_revision_succeeds(store: Store) -> None:
    first = await store.put_release(release("rel-1"), expected_revision=0)
    assert first is not None
    changed = first.model_copy(update={"batch": 1, "state": ReleaseState.HALTED, "reason": "budget"})
    second = await store.put_release(changed, expected_revision=1)
    assert second is not None
    assert second.revision == 2
    assert await store.get_release("rel-1") == second
    assert second.plan == first.plan


async def test_release_update_with_a_stale_revision_fails_and_leaves_it_unchanged(store: Store) -> None:
    first = await store.put_release(release("rel-1"), expected_revision=0)
    assert first is not None
    second = await store.put_release(first.model_copy(update={"batch": 1}), expected_revision=1)
    assert second is not None
    assert await store.put_release(first.model_copy(update={"state": ReleaseState.HALTED}), expected_revision=1) is None
    assert await store.put_release(first, expected_revision=7) is None
    assert await store.get_release("rel-1") == second


async def test_list_releases_is_newest_first(store: Store) -> None:
    for release_id, minutes in [("rel-b", 10), ("rel-a", 0), ("rel-c", 20), ("rel-d", 5)]:
        assert await store.put_release(
            release(release_id, created_at=T0 + timedelta(minutes=minutes)), expected_revision=0
        )
    assert [record.release_id for record in await store.list_releases()] == ["rel-c", "rel-b", "rel-d", "rel-a"]


async def test_list_releases_orders_by_instant_whatever_the_utc_offset(store: Store) -> None:
    plus_two = timezone(timedelta(hours=2))
    # rel-newer is 30 minutes later in real time, but its wall-clock text (12:30+00:00 < 14:00+02:00) reads earlier.
    assert await store.put_release(release("rel-older", created_at=T0.astimezone(plus_two)), expected_revision=0)
    assert await store.put_release(release("rel-newer", created_at=T0 + timedelta(minutes=30)), expected_revision=0)
    assert [record.release_id for record in await store.list_releases()] == ["rel-newer", "rel-older"]


async def test_list_releases_is_empty_without_releases(store: Store) -> None:
    assert await store.list_releases() == []


async def test_list_releases_order_survives_updates(store: Store) -> None:
    older = await store.put_release(release("rel-old", created_at=T0), expected_revision=0)
    assert await store.put_release(release("rel-new", created_at=T0 + timedelta(hours=1)), expected_revision=0)
    assert older is not None
    assert await store.put_release(older.model_copy(update={"updated_at": T0 + timedelta(days=1)}), expected_revision=1)
    assert [record.release_id for record in await store.list_releases()] == ["rel-new", "rel-old"]


# --- release nodes ------------------------------------------------------------------------------


async def test_add_release_nodes_is_idempotent_and_keeps_progress(store: Store) -> None:
    record = await seeded_release(store)
    assert await store.move_release_node(
        "rel-1", "local/h0/api", from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
    )
    await store.add_release_nodes(release_nodes(record))
    nodes = await store.list_release_nodes("rel-1")
    assert len(nodes) == 5
    assert [node.state for node in nodes] == [ItemState.DISPATCHED] + [ItemState.QUEUED] * 4


async def test_add_release_nodes_reads_rows_from_a_generator_once_and_stores_every_one(store: Store) -> None:
    """The pacer hands the rows as a generator (made as the store takes them): more rows than one request carries
    on MongoDB (1,000), each made once, all stored in plan order; handed again, none is added twice."""
    record = release("rel-1", count=2500).model_copy(update={"batch_sizes": [1000, 1500]})
    made: list[str] = []

    def rows() -> Iterator[ReleaseNode]:
        for node in release_nodes(record):
            made.append(node.node_key)
            yield node

    await store.add_release_nodes(rows())
    assert len(made) == 2500 == len(set(made))
    keys = await store.list_release_node_keys("rel-1")
    assert keys == [f"local/h{position}/api" for position in range(2500)]
    await store.add_release_nodes(rows())
    counts = await store.count_release_batches("rel-1")
    assert counts == {0: {ItemState.QUEUED: 1000}, 1: {ItemState.QUEUED: 1500}}


async def test_move_release_node_moves_from_an_allowed_state_and_records_the_outcome(store: Store) -> None:
    await seeded_release(store)
    assert await store.move_release_node(
        "rel-1", "local/h1/api", from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
    )
    assert await store.move_release_node(
        "rel-1",
        "local/h1/api",
        from_states=[ItemState.QUEUED, ItemState.DISPATCHED],
        to_state=ItemState.SUCCEEDED,
        outcome="evt-deployed-1",
    )
    [moved] = [node for node in await store.list_release_nodes("rel-1") if node.node_key == "local/h1/api"]
    assert (moved.state, moved.outcome) == (ItemState.SUCCEEDED, "evt-deployed-1")
    assert (moved.batch, moved.position) == (1, 1)


async def test_move_release_node_refuses_a_node_in_another_state(store: Store) -> None:
    await seeded_release(store)
    assert not await store.move_release_node(
        "rel-1", "local/h1/api", from_states=[ItemState.DISPATCHED], to_state=ItemState.SUCCEEDED, outcome="x"
    )
    [node] = [node for node in await store.list_release_nodes("rel-1") if node.node_key == "local/h1/api"]
    assert (node.state, node.outcome) == (ItemState.QUEUED, None)


async def test_move_release_node_out_of_a_state_succeeds_only_once(store: Store) -> None:
    """Two outcomes for one dispatched node: the first moves it, the second finds it no longer dispatched."""
    await seeded_release(store)
    assert await store.move_release_node(
        "rel-1", "local/h0/api", from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
    )
    moves = [
        await store.move_release_node(
            "rel-1", "local/h0/api", from_states=[ItemState.DISPATCHED], to_state=to_state, outcome=str(to_state)
        )
        for to_state in (ItemState.FAILED, ItemState.SUCCEEDED)
    ]
    assert moves == [True, False]
    [node] = await store.list_release_nodes("rel-1", batch=0)
    assert (node.state, node.outcome) == (ItemState.FAILED, "failed")


@pytest.mark.parametrize(("release_id", "node_key"), [("rel-1", "local/h9/api"), ("rel-9", "local/h0/api")])
async def test_move_release_node_of_an_unknown_node_is_false(store: Store, release_id: str, node_key: str) -> None:
    await seeded_release(store)
    assert not await store.move_release_node(
        release_id, node_key, from_states=list(ItemState), to_state=ItemState.DISPATCHED
    )
    assert await store.list_release_nodes("rel-9") == []


async def test_move_release_nodes_moves_each_node_in_an_allowed_state_and_tells_which(store: Store) -> None:
    """Several nodes recorded as sent at once: each is its own compare-and-set. A node in another state, a node of
    another release and an unknown key do not move; the counts follow the nodes that did."""
    await seeded_release(store)
    await store.add_release_nodes(release_nodes(release("rel-2", count=2)))
    assert await store.move_release_node(
        "rel-1", "local/h2/api", from_states=[ItemState.QUEUED], to_state=ItemState.FAILED
    )
    sent = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    keys = ["local/h0/api", "local/h2/api", "local/h3/api", "local/h9/api"]

    moved = await store.move_release_nodes(
        "rel-1", keys, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED, dispatched_at=sent
    )

    assert moved == {"local/h0/api", "local/h3/api"}
    nodes = {node.node_key: node for node in await store.list_release_nodes("rel-1")}
    assert {key: (node.state, node.dispatched_at) for key, node in nodes.items()} == {
        "local/h0/api": (ItemState.DISPATCHED, sent),
        "local/h1/api": (ItemState.QUEUED, None),
        "local/h2/api": (ItemState.FAILED, None),
        "local/h3/api": (ItemState.DISPATCHED, sent),
        "local/h4/api": (ItemState.QUEUED, None),
    }
    assert [node.state for node in await store.list_release_nodes("rel-2")] == [ItemState.QUEUED] * 2
    counts = await store.count_release_nodes("rel-1")
    assert (counts[ItemState.QUEUED], counts[ItemState.DISPATCHED], counts[ItemState.FAILED]) == (2, 2, 1)
    # Again, accepting the state they were moved to (a retry of a write whose answer was lost): those sent are there.
    again = await store.move_release_nodes(
        "rel-1",
        keys,
        from_states=[ItemState.QUEUED, ItemState.DISPATCHED],
        to_state=ItemState.DISPATCHED,
        dispatched_at=sent,
    )
    assert again == {"local/h0/api", "local/h3/api"}
    assert (await store.count_release_nodes("rel-1"))[ItemState.DISPATCHED] == 2
    assert (
        await store.move_release_nodes("rel-1", [], from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED)
        == set()
    )


async def test_list_release_nodes_in_position_order_by_batch_state_and_limit(store: Store) -> None:
    await seeded_release(store, count=5)  # batches: [h0] [h1 h2] [h3 h4]
    await store.add_release_nodes(release_nodes(release("rel-2", count=2)))
    for node_key in ("local/h3/api", "local/h1/api"):
        assert await store.move_release_node(
            "rel-1", node_key, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
        )

    async def listed(
        batch: int | None = None,
        state: ItemState | None = None,
        limit: int | None = None,
        *,
        newest_first: bool = False,
    ) -> list[str]:
        nodes = await store.list_release_nodes(
            "rel-1", batch=batch, state=state, limit=limit, newest_first=newest_first
        )
        assert all(node.release_id == "rel-1" for node in nodes)
        return [node.node_key.split("/")[1] for node in nodes]

    assert await listed() == ["h0", "h1", "h2", "h3", "h4"]
    assert await listed(batch=1) == ["h1", "h2"]
    assert await listed(batch=2) == ["h3", "h4"]
    assert await listed(batch=3) == []
    assert await listed(state=ItemState.QUEUED) == ["h0", "h2", "h4"]
    assert await listed(state=ItemState.DISPATCHED) == ["h1", "h3"]
    assert await listed(batch=2, state=ItemState.QUEUED) == ["h4"]
    assert await listed(limit=2) == ["h0", "h1"]
    assert await listed(state=ItemState.QUEUED, limit=2) == ["h0", "h2"]
    assert await listed(batch=1, state=ItemState.SUCCEEDED) == []
    assert await listed(newest_first=True) == ["h4", "h3", "h2", "h1", "h0"]
    assert await listed(batch=1, newest_first=True) == ["h2", "h1"]
    assert await listed(state=ItemState.QUEUED, limit=2, newest_first=True) == ["h4", "h2"]
    assert await listed(batch=2, state=ItemState.DISPATCHED, limit=5, newest_first=True) == ["h3"]


async def test_list_release_node_keys_are_the_listed_nodes_keys_in_plan_order(store: Store) -> None:
    await seeded_release(store, count=5)  # batches: [h0] [h1 h2] [h3 h4], added in reverse order
    await store.add_release_nodes(release_nodes(release("rel-2", count=2)))
    assert await store.list_release_node_keys("rel-1") == [f"local/h{index}/api" for index in range(5)]
    assert await store.list_release_node_keys("rel-1", batch=1) == ["local/h1/api", "local/h2/api"]
    assert await store.list_release_node_keys("rel-1", batch=3) == []
    assert await store.list_release_node_keys("rel-2") == ["local/h0/api", "local/h1/api"]
    assert await store.list_release_node_keys("rel-9") == []


async def test_list_release_nodes_keeps_batch_and_position(store: Store) -> None:
    record = await seeded_release(store, count=5)
    assert await store.list_release_nodes("rel-1") == release_nodes(record)


async def test_count_release_nodes_per_batch_and_in_total_with_every_state(store: Store) -> None:
    await seeded_release(store, count=5)
    moves = [
        ("local/h0/api", ItemState.SUCCEEDED),
        ("local/h1/api", ItemState.FAILED),
        ("local/h2/api", ItemState.DISPATCHED),
    ]
    for node_key, to_state in moves:
        assert await store.move_release_node("rel-1", node_key, from_states=[ItemState.QUEUED], to_state=to_state)

    def counts(queued: int = 0, dispatched: int = 0, succeeded: int = 0, failed: int = 0) -> dict[ItemState, int]:
        return {
            **dict.fromkeys(ItemState, 0),
            ItemState.QUEUED: queued,
            ItemState.DISPATCHED: dispatched,
            ItemState.SUCCEEDED: succeeded,
            ItemState.FAILED: failed,
        }

    assert await store.count_release_nodes("rel-1") == counts(queued=2, dispatched=1, succeeded=1, failed=1)
    assert await store.count_release_nodes("rel-1", batch=0) == counts(succeeded=1)
    assert await store.count_release_nodes("rel-1", batch=1) == counts(dispatched=1, failed=1)
    assert await store.count_release_nodes("rel-1", batch=2) == counts(queued=2)
    assert await store.count_release_nodes("rel-1", batch=7) == counts()
    assert await store.count_release_nodes("rel-unknown") == counts()


async def test_count_release_batches_gives_each_batch_its_states_in_one_count(store: Store) -> None:
    await seeded_release(store, count=5)
    await store.add_release_nodes(release_nodes(release("rel-2", count=2)))
    moves = [
        ("local/h0/api", ItemState.SUCCEEDED),
        ("local/h1/api", ItemState.FAILED),
        ("local/h2/api", ItemState.DISPATCHED),
    ]
    for node_key, to_state in moves:
        assert await store.move_release_node("rel-1", node_key, from_states=[ItemState.QUEUED], to_state=to_state)
    # Moved on again: a state a node left counts no longer (an empty state may be absent, never a stale one).
    assert await store.move_release_node(
        "rel-1", "local/h2/api", from_states=[ItemState.DISPATCHED], to_state=ItemState.SUCCEEDED
    )

    assert await store.count_release_batches("rel-1") == {
        0: {ItemState.SUCCEEDED: 1},
        1: {ItemState.SUCCEEDED: 1, ItemState.FAILED: 1},
        2: {ItemState.QUEUED: 2},
    }
    assert await store.count_release_batches("rel-2") == {0: {ItemState.QUEUED: 1}, 1: {ItemState.QUEUED: 1}}
    assert await store.count_release_batches("rel-unknown") == {}


async def test_get_release_node_is_that_node_of_that_release_with_its_labels_and_progress(store: Store) -> None:
    record = release("rel-2", count=2)
    labelled = [
        node.model_copy(update={"target": NodeTarget(node_key=node.node_key, labels={"zone": f"z{node.position}"})})
        for node in release_nodes(record)
    ]
    await store.add_release_nodes(labelled)
    await seeded_release(store)  # rel-1: the same node keys, other batches
    assert await store.move_release_node(
        "rel-2", "local/h1/api", from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
    )
    node = await store.get_release_node("rel-2", "local/h1/api")
    assert node is not None
    assert (node.release_id, node.node_key, node.position, node.state) == (
        "rel-2",
        "local/h1/api",
        1,
        ItemState.DISPATCHED,
    )
    assert node.target is not None
    assert node.target.labels == {"zone": "z1"}
    other = await store.get_release_node("rel-1", "local/h1/api")
    assert other is not None
    assert (other.state, other.target) == (ItemState.QUEUED, NodeTarget(node_key="local/h1/api"))
    assert await store.get_release_node("rel-2", "local/h4/api") is None
    assert await store.get_release_node("rel-9", "local/h0/api") is None


async def test_release_nodes_of_different_releases_are_separate(store: Store) -> None:
    await seeded_release(store, count=3)
    await store.add_release_nodes(release_nodes(release("rel-2", count=2)))
    assert await store.move_release_node(
        "rel-2", "local/h0/api", from_states=[ItemState.QUEUED], to_state=ItemState.FAILED
    )
    assert (await store.count_release_nodes("rel-1"))[ItemState.QUEUED] == 3
    assert (await store.count_release_nodes("rel-2"))[ItemState.FAILED] == 1
    assert [node.state for node in await store.list_release_nodes("rel-1")] == [ItemState.QUEUED] * 3


# --- embedded store only ------------------------------------------------------------------------


@pytest.mark.unit
async def test_embedded_file_store_keeps_everything_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with EmbeddedStore(path) as store:
        node = await store.put_node(status("local/h1/api", release_id="rel-1"), expected_revision=0)
        record = await store.put_release(release("rel-1"), expected_revision=0)
        assert record is not None
        await store.add_release_nodes(release_nodes(record))
        assert await store.move_release_node(
            "rel-1", "local/h0/api", from_states=[ItemState.QUEUED], to_state=ItemState.SUCCEEDED, outcome="evt-1"
        )
        await store.put_processed("req-1", "outcome-1")
        nodes_before = await store.list_release_nodes("rel-1")

    async with EmbeddedStore(path) as reopened:
        assert await reopened.get_node("local/h1/api") == node
        assert await reopened.get_release("rel-1") == record
        assert await reopened.list_releases() == [record]
        assert await reopened.get_processed("req-1") == "outcome-1"
        assert await reopened.list_release_nodes("rel-1") == nodes_before
        assert (await reopened.count_release_nodes("rel-1"))[ItemState.SUCCEEDED] == 1
        # Compare-and-set goes on from the stored revision.
        assert node is not None
        assert await reopened.put_node(node, expected_revision=0) is None
        updated = await reopened.put_node(node, expected_revision=1)
        assert updated is not None
        assert updated.revision == 2


@pytest.mark.unit
async def test_an_embedded_file_from_before_outcomes_had_a_time_opens_and_keeps_those_outcomes(tmp_path: Path) -> None:
    """A file whose `processed` table has no time column gets one; its outcomes, whose age cannot be told, are kept
    by pruning while new ones are pruned by their time."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE processed (event_id TEXT PRIMARY KEY, outcome TEXT NOT NULL)")
    old.execute("INSERT INTO processed VALUES ('req-1', 'outcome-1')")
    old.commit()
    old.close()
    async with EmbeddedStore(path) as store:
        assert await store.get_processed("req-1") == "outcome-1"
        await store.put_processed("req-2", "outcome-2", at=T0)
        assert await store.prune_processed(datetime.now(UTC) + timedelta(days=1)) == 1
        assert await store.get_processed("req-1") == "outcome-1"
        assert await store.get_processed("req-2") is None


@pytest.mark.unit
async def test_an_embedded_file_whose_release_rows_kept_their_progress_in_the_document_opens_and_moves_on(
    tmp_path: Path,
) -> None:
    """Release rows once kept state, outcome and time sent only in their document: a file from then gets columns
    for them, its rows read as they were written, and they move on from there."""
    path = tmp_path / "old.db"
    sent = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE release_nodes (release_id TEXT NOT NULL, node_key TEXT NOT NULL, batch INTEGER NOT NULL,"
        " position INTEGER NOT NULL, state TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (release_id, node_key))"
    )
    rows = [
        ReleaseNode(release_id="rel-1", node_key="local/h1/api", batch=0, position=0),
        ReleaseNode(
            release_id="rel-1",
            node_key="local/h2/api",
            batch=0,
            position=1,
            state=ItemState.SUCCEEDED,
            dispatched_at=sent,
            outcome="outcome-2",
        ),
    ]
    for row in rows:
        old.execute(
            "INSERT INTO release_nodes VALUES (?, ?, ?, ?, ?, ?)",
            (row.release_id, row.node_key, row.batch, row.position, row.state.value, row.model_dump_json()),
        )
    old.commit()
    old.close()
    async with EmbeddedStore(path) as store:
        assert await store.list_release_nodes("rel-1") == rows
        assert (await store.count_release_nodes("rel-1"))[ItemState.SUCCEEDED] == 1
        assert await store.move_release_node(
            "rel-1", "local/h2/api", from_states=[ItemState.SUCCEEDED], to_state=ItemState.ROLLED_BACK, outcome="o-3"
        )
        moved = await store.get_release_node("rel-1", "local/h2/api")
        assert moved == rows[1].model_copy(update={"state": ItemState.ROLLED_BACK, "outcome": "o-3"})
        assert await store.move_release_node(
            "rel-1", "local/h1/api", from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED, dispatched_at=sent
        )
        assert await store.get_release_node("rel-1", "local/h1/api") == rows[0].model_copy(
            update={"state": ItemState.DISPATCHED, "dispatched_at": sent}
        )


@pytest.mark.unit
async def test_embedded_store_moves_more_release_nodes_than_one_statement_takes() -> None:
    """Keys beyond one statement's share (`_KEYS_AT_ONCE`) go in further statements; every node moves once."""
    count = embedded_store._KEYS_AT_ONCE * 2 + 7
    async with EmbeddedStore() as store:
        record = release("rel-1", count=count)
        await store.add_release_nodes(release_nodes(record))
        keys = [f"local/h{position}/api" for position in range(count)]
        moved = await store.move_release_nodes(
            "rel-1", keys, from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
        )
        assert moved == set(keys)
        assert (await store.count_release_nodes("rel-1"))[ItemState.DISPATCHED] == count


# --- in-flight slots and leases ---


async def test_take_slots_up_to_each_scope_limit_and_free_them(store: Store) -> None:
    scopes = [("all", 3), ("label/zone=a", 2)]
    taken = [await store.take_slots("r1", f"local/h{index}/api", scopes, now=T0) for index in range(3)]
    assert taken == [True, True, False], "the zone scope holds two nodes"
    assert await store.take_slots("r1", "local/h9/api", [("all", 3), ("label/zone=b", 2)], now=T0)
    assert not await store.take_slots("r2", "local/h8/api", [("all", 3)], now=T0), "all three overall slots are held"
    held = await store.list_slots()
    assert sorted((slot.scope, slot.index, slot.node_key) for slot in held) == [
        ("all", 0, "local/h0/api"),
        ("all", 1, "local/h1/api"),
        ("all", 2, "local/h9/api"),
        ("label/zone=a", 0, "local/h0/api"),
        ("label/zone=a", 1, "local/h1/api"),
        ("label/zone=b", 0, "local/h9/api"),
    ]
    await store.free_slots("r1", "local/h0/api")
    assert await store.take_slots("r2", "local/h8/api", [("all", 3)], now=T0), "a freed slot can be taken again"
    assert {slot.node_key for slot in await store.list_slots() if slot.scope == "all"} == {
        "local/h1/api",
        "local/h8/api",
        "local/h9/api",
    }


async def test_take_slots_is_all_or_nothing_and_never_counts_slots_held_already(store: Store) -> None:
    assert await store.take_slots("r1", "local/h0/api", [("label/zone=a", 1)], now=T0)
    refused = await store.take_slots("r1", "local/h1/api", [("all", 5), ("label/zone=a", 1)], now=T0)
    assert not refused
    assert [slot.node_key for slot in await store.list_slots()] == ["local/h0/api"], "no slot of `all` was kept"
    # Taking again needs a slot of its own: the one held might be given back by whoever took it.
    assert not await store.take_slots("r1", "local/h0/api", [("label/zone=a", 1)], now=T0)
    assert await store.take_slots("r1", "local/h0/api", [("label/zone=a", 2)], now=T0)
    assert [slot.index for slot in await store.list_slots()] == [0, 1]
    await store.free_slots("r1", "local/h0/api")
    assert await store.list_slots() == [], "every slot of the node given back"


async def test_concurrent_takers_never_exceed_a_limit(store: Store) -> None:
    results = await asyncio.gather(
        *(store.take_slots("r1", f"local/h{index}/api", [("all", 4)], now=T0) for index in range(12))
    )
    assert sum(results) == 4
    assert len(await store.list_slots()) == 4


async def test_lease_is_held_by_one_holder_until_it_expires(store: Store) -> None:
    assert await store.take_lease("timers", "pacer-a", now=T0, ttl_s=10)
    assert not await store.take_lease("timers", "pacer-b", now=T0 + timedelta(seconds=5), ttl_s=10)
    assert await store.take_lease("timers", "pacer-a", now=T0 + timedelta(seconds=6), ttl_s=10), "the holder renews"
    assert not await store.take_lease("timers", "pacer-b", now=T0 + timedelta(seconds=15), ttl_s=10)
    assert await store.take_lease("timers", "pacer-b", now=T0 + timedelta(seconds=16), ttl_s=10), "expired: taken over"
    assert not await store.take_lease("timers", "pacer-a", now=T0 + timedelta(seconds=17), ttl_s=10)
    assert await store.take_lease("other", "pacer-a", now=T0, ttl_s=10), "leases are separate by name"
