"""The compare-and-set probe against fake collections: one that lets two writers win, one that is atomic."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from reactor.adapters.mongo_probe import ProbeCollection, probe_compare_and_set

Document = dict[str, Any]


@dataclass
class Matched:
    matched_count: int


class FakeCollection:
    """One document store shared by every writer's view; `atomic=False` reads, yields, then writes by `_id`."""

    def __init__(self, documents: dict[str, Document], *, atomic: bool) -> None:
        self.documents = documents
        self.atomic = atomic

    def _matches(self, document: Document, query: Mapping[str, Any]) -> bool:
        return all(document.get(key) == value for key, value in query.items() if not isinstance(value, dict))

    async def insert_one(self, document: Document) -> object:
        self.documents[document["_id"]] = dict(document)
        return None

    async def update_one(self, filter: Mapping[str, Any], update: Mapping[str, Any]) -> Matched:
        document = self.documents.get(filter["_id"])
        matched = document is not None and self._matches(document, filter)
        if not self.atomic:
            await asyncio.sleep(0)  # FerretDB 1.x: the query and the write are two steps others can run between
        if matched:
            self.documents[filter["_id"]] = {**self.documents[filter["_id"]], **update["$set"]}
        return Matched(int(matched))

    async def find_one(self, filter: Any, projection: Any = None) -> Document | None:
        document = self.documents.get(filter["_id"])
        return None if document is None else dict(document)

    async def delete_many(self, filter: Mapping[str, Any]) -> object:
        for key in [key for key, document in self.documents.items() if self._matches(document, filter)]:
            del self.documents[key]
        return None


def views(*, atomic: bool, writers: int = 16) -> tuple[dict[str, Document], list[ProbeCollection]]:
    documents: dict[str, Document] = {}
    return documents, [FakeCollection(documents, atomic=atomic) for _ in range(writers)]


async def test_a_server_that_lets_two_writers_win_is_found_not_atomic_in_the_first_round() -> None:
    documents, writers = views(atomic=False)
    result = await probe_compare_and_set(writers)
    assert (result.atomic, result.rounds) == (False, 1)
    assert result.winners > 1
    assert documents == {}, "the probe document is removed"


async def test_an_atomic_server_is_found_atomic_after_every_round() -> None:
    documents, writers = views(atomic=True)
    result = await probe_compare_and_set(writers, rounds=20)
    assert (result.atomic, result.rounds, result.winners) == (True, 20, 1)
    assert documents == {}


async def test_a_round_without_a_winner_is_not_taken_for_atomic() -> None:
    """A server that loses the write altogether is no better than one that lets two win."""

    class Forgetful(FakeCollection):
        async def update_one(self, filter: Mapping[str, Any], update: Mapping[str, Any]) -> Matched:
            return Matched(0)

    documents: dict[str, Document] = {}
    result = await probe_compare_and_set([Forgetful(documents, atomic=True) for _ in range(4)])
    assert (result.atomic, result.winners) == (False, 0)


async def test_the_probe_needs_two_writers() -> None:
    _, writers = views(atomic=True, writers=1)
    with pytest.raises(ValueError, match="two writers"):
        await probe_compare_and_set(writers)
