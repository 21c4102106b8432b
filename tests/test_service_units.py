"""The service's parts on their own: history stores (Redis and in-process behave alike) and
their bulk load from a histories file, the atomic SID dedup counter, the item table + FAISS
index."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RedisServer
from redis.asyncio import Redis

from sidrec.histories_file import (
    HistoriesFileError,
    check_histories,
    read_histories,
    write_histories,
)
from sidrec.service.catalog import GenerationChanged, MemoryCatalogStore, RedisCatalogStore
from sidrec.service.history_load import load_histories
from sidrec.service.history_store import Event, MemoryHistoryStore, RedisHistoryStore
from sidrec.service.retrieval import ItemTable


def run(make: Callable[[Redis], Awaitable[Any]], redis_server: RedisServer) -> Any:
    async def main() -> Any:
        redis = Redis.from_url(redis_server.url)
        try:
            return await make(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_history_stores_behave_alike(kind: str, redis_server: RedisServer) -> None:
    async def scenario(redis: Redis) -> None:
        store = (
            RedisHistoryStore(redis, "t:", history_len=4, event_id_ttl_s=60)
            if kind == "redis"
            else MemoryHistoryStore(history_len=4, event_id_ttl_s=60)
        )
        assert await store.history("u") == []
        # Arrives out of order: read back by time, ties in arrival order.
        stored = await store.append([Event("u", "b", 20), Event("u", "a", 10), Event("u", "c", 20)])
        assert stored == 3
        assert await store.history("u") == [("a", 10), ("b", 20), ("c", 20)]
        # A retried event id is stored once; the same id for another user is another event.
        assert await store.append([Event("u", "d", 30, "e1"), Event("u", "d", 30, "e1")]) == 1
        assert await store.append([Event("v", "d", 30, "e1")]) == 1
        # Capped: the 4 newest arrivals are kept ("b" arrived first), read back by time.
        await store.append([Event("u", "e", 40)])
        assert await store.history("u") == [("a", 10), ("c", 20), ("d", 30), ("e", 40)]
        assert await store.history("v") == [("d", 30)]
        # Item ids with spaces survive the "ts item" encoding.
        await store.append([Event("w", "an item id", 5)])
        assert await store.history("w") == [("an item id", 5)]
        await store.ping()

    run(scenario, redis_server)


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_history_bulk_replace_and_erase(kind: str, redis_server: RedisServer) -> None:
    async def scenario(redis: Redis) -> None:
        store = (
            RedisHistoryStore(redis, "t:", history_len=3, event_id_ttl_s=60)
            if kind == "redis"
            else MemoryHistoryStore(history_len=3, event_id_ttl_s=60)
        )
        data = [
            ("u", [("a", 1), ("b", 2), ("c", 2), ("d", 3), ("e 5", 4)]),
            ("v", [("x", 0), ("y", 0)]),  # data without time: ts 0, file order kept
            ("nobody", []),
        ]
        # Newest 3 per user, read back as the service reads them; a re-run stores the same.
        for _ in range(2):
            assert await store.replace(data) == 5
            assert await store.history("u") == [("c", 2), ("d", 3), ("e 5", 4)]
            assert await store.history("v") == [("x", 0), ("y", 0)]
        # Live events after the load append as usual.
        await store.append([Event("u", "f", 5, "e1"), Event("w", "f", 5, "e2")])
        assert await store.history("u") == [("d", 3), ("e 5", 4), ("f", 5)]

        erased = await store.erase("u")
        assert (erased.history_events, erased.event_ids) == (3, 1)
        assert await store.history("u") == []
        # The event id is forgotten too: the same event again is new, not a duplicate.
        assert await store.append([Event("u", "f", 5, "e1")]) == 1
        assert await store.history("w") == [("f", 5)]  # other users untouched
        erased = await store.erase("never-seen")
        assert (erased.history_events, erased.event_ids) == (0, 0)
        if kind == "redis":
            await store.erase("u")
            assert sorted(await redis.keys("t:*{u}*")) == []  # no key of the user is left

    run(scenario, redis_server)


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_load_histories_from_a_histories_file(
    kind: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    # What SIDREC_HISTORIES does at start-up and `sidrec histories load` into Redis: the
    # service's loader takes (user, events) pairs, here read back from the file format the
    # offline side writes.
    given = [
        ("u", [("a", 1), ("b", 2), ("c 3", 2), ("d", 3)]),
        ("v", [("x", 0), ("y", 0)]),  # data without time: ts 0, file order kept
        ("nobody", []),  # not written: nothing to store
        ("é/1", [("ü", 7)]),
    ]
    path = tmp_path / "h.jsonl"
    assert write_histories(path, given) == (3, 7)
    assert list(read_histories(path)) == [h for h in given if h[1]]
    assert check_histories(path) == (3, 7)

    async def scenario(redis: Redis) -> None:
        store = (
            RedisHistoryStore(redis, "t:", history_len=3, event_id_ttl_s=60)
            if kind == "redis"
            else MemoryHistoryStore(history_len=3, event_id_ttl_s=60)
        )
        chunks: list[int] = []
        for _ in range(2):  # a re-run stores the same lists
            report = await load_histories(
                store, read_histories(path), chunk_events=3, advance=chunks.append
            )
            assert (report.users, report.events) == (3, 6)
            assert await store.history("u") == [("b", 2), ("c 3", 2), ("d", 3)]
            assert await store.history("v") == [("x", 0), ("y", 0)]
            assert await store.history("é/1") == [("ü", 7)]
        assert sum(chunks) == 2 * 3 and len(chunks) == 2 * 2  # users per chunk of >= 3 events

    run(scenario, redis_server)


def test_histories_file_mistakes_name_file_and_line(tmp_path: Path) -> None:
    def problem(text: str) -> str:
        path = tmp_path / "bad.jsonl"
        path.write_text(text)
        with pytest.raises(HistoriesFileError) as caught:
            check_histories(path)
        return str(caught.value)

    good = '{"user_id": "u", "events": [["a", 1]]}\n'
    assert problem(good + "\n" + "{oops\n").startswith(
        f"{tmp_path / 'bad.jsonl'}, line 3: not JSON"
    )
    assert "line 2: user_id: expected a non-empty string" in problem(
        good + '{"user_id": 5, "events": []}\n'
    )
    assert 'line 1: expected {"user_id"' in problem('{"user": "u", "events": []}\n')
    assert "events[1]: expected [item_id (string), ts (int)]" in problem(
        '{"user_id": "u", "events": [["a", 1], ["b", "2"]]}\n'
    )
    assert "events[0]" in problem('{"user_id": "u", "events": [["a", true]]}\n')
    with pytest.raises(HistoriesFileError, match="No such file or directory"):
        check_histories(tmp_path / "missing.jsonl")
    with pytest.raises(HistoriesFileError, match="a folder, not a histories file"):
        check_histories(tmp_path)


def test_event_id_index_forgets_expired_ids(redis_server: RedisServer) -> None:
    # The per-user index of event ids (what erasing reads) holds only ids still remembered,
    # so a user sending events for years does not grow it without bound.
    async def scenario(redis: Redis) -> None:
        store = RedisHistoryStore(redis, "t:", history_len=10, event_id_ttl_s=1)
        await store.append([Event("u", "a", 1, "old-1"), Event("u", "a", 1, "old-2")])
        assert await redis.zcard("t:evts:{u}") == 2
        await asyncio.sleep(2.1)
        await store.append([Event("u", "b", 2, "new")])
        assert await redis.zrange("t:evts:{u}", 0, -1) == [b"t:evt:{u}:new"]

    run(scenario, redis_server)


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_dedup_digits_are_unique_under_concurrency_and_idempotent(
    kind: str, redis_server: RedisServer
) -> None:
    async def scenario(redis: Redis) -> None:
        other = Redis.from_url(redis_server.url)  # a second "worker" connection
        stores: list[Any]
        if kind == "redis":
            stores = [RedisCatalogStore(redis, "t:"), RedisCatalogStore(other, "t:")]
        else:
            stores = [MemoryCatalogStore()] * 2
        gen = await stores[0].claim_generation("g1")
        assert await stores[1].claim_generation("g2") == gen  # the first claim stands
        # 40 items with one code tuple, asked for from two stores at once; the bundle already
        # holds digits 0..2 of that tuple.
        calls = [
            stores[i % 2].assign_dedup("v1", [("1,2,3", f"item-{i}", 3)], gen) for i in range(40)
        ]
        digits = [d for (d,) in await asyncio.gather(*calls)]
        assert sorted(digits) == list(range(3, 43))
        # Asking again for the same item and tuple (a retry) gives the same digit.
        again = await stores[1].assign_dedup("v1", [("1,2,3", "item-7", 3)], gen)
        assert again == [digits[7]]
        # Another bundle version counts on its own.
        assert await stores[0].assign_dedup("v2", [("1,2,3", "item-7", 3)], gen) == [3]
        if kind == "redis":
            # A worker still on an older generation (Redis lost its data since) is refused.
            with pytest.raises(GenerationChanged):
                await stores[0].assign_dedup("v1", [("1,2,3", "item-99", 3)], "stale")
        await other.aclose()

    run(scenario, redis_server)


def test_no_marker_is_claimed_while_a_worker_writes_back(redis_server: RedisServer) -> None:
    # A worker writing back after Redis lost its data holds a restore lease: nobody sets the
    # missing generation marker meanwhile (digits handed out under it could repeat items not
    # yet written back). A lease whose holder died lapses.
    async def scenario(redis: Redis) -> None:
        store = RedisCatalogStore(redis, "t:")
        await store.lease_restore("w1")
        await store.lease_restore("w2")
        assert 0 < await redis.pttl(store.restoring_key) <= 10_000
        assert await store.claim_generation("g1") is None
        await store.release_restore("w1")
        assert await store.claim_generation("g1") is None
        await store.release_restore("w2")
        assert await store.claim_generation("g1") == "g1"
        assert await store.claim_generation("g2") == "g1"  # the first claim stands
        await redis.delete(store.generation_key)  # lost again, and the one writing back died
        await redis.zadd(store.restoring_key, {"w3": 1})  # its lease ended long ago
        assert await store.claim_generation("g3") == "g3"

    run(scenario, redis_server)


def make_table(n: int = 6, d: int = 4) -> ItemTable:
    rng = np.random.default_rng(0)
    vectors = np.zeros((n + 1, d), np.float32)
    vectors[1:] = rng.normal(size=(n, d))
    sids = np.zeros((n + 1, 3), np.int64)
    sids[1:, 0] = np.arange(n) % 2
    sids[1:, 1] = np.arange(n) % 3
    return ItemTable(vectors, [f"i{r}" for r in range(1, n + 1)], sids, codes_per_layer=4)


def test_item_table_search_skips_padding_excluded_and_replaced_rows() -> None:
    table = make_table()
    query = table.vectors[1] / np.linalg.norm(table.vectors[1])
    hits = table.search(query, k=6, exclude_rows=set())
    assert hits[0][0] == 1 and len(hits) == 6 and 0 not in [r for r, _ in hits]
    assert [s for _, s in hits] == sorted([s for _, s in hits], reverse=True)
    assert 1 not in [r for r, _ in table.search(query, k=3, exclude_rows={1})]

    # Re-ingesting i1 with another vector: new row, the old one is never returned again.
    assert table.upsert("i1", np.array([1, 1, 0]), -table.vectors[1]) is False
    new_row = table.row("i1")
    assert new_row == 7 and table.live_items == 6 and table.dead == 1
    rows = [r for r, _ in table.search(query, k=6, exclude_rows=set())]
    assert 1 not in rows and len(rows) == 6 and rows[-1] == new_row  # now the farthest
    # Same SID and vector again: nothing changes.
    assert table.upsert("i1", np.array([1, 1, 0]), table.vectors[new_row].copy()) is False
    assert table.size == 8


def test_item_table_grows_and_counts_codebook_usage() -> None:
    table = make_table()
    assert table.codebook_usage() == [0.5, 0.75]  # layer 0 uses 2 of 4 codes, layer 1 uses 3
    for i in range(40):  # past the initial capacity
        vector = np.full(4, float(i + 1), np.float32)
        assert table.upsert(f"new-{i}", np.array([3, 3, i]), vector) is True
    assert table.live_items == 46 and table.codebook_usage() == [0.75, 1.0]
    assert np.array_equal(table.gather(np.array([table.row("new-39")]))[0], np.full(4, 40.0))
    assert table.item_ids[table.row("new-0")] == "new-0"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_item_table_scores_are_cosine_times_the_rows_scale(kind: str) -> None:
    from sidrec.service.retrieval import IndexSpec

    rng = np.random.default_rng(1)
    n, d = 12, 4
    vectors = np.zeros((n + 1, d), np.float32)
    vectors[1:] = rng.normal(size=(n, d))
    sids = np.zeros((n + 1, 3), np.int64)
    scales = np.ones(n + 1, np.float32)
    scales[5] = 1.5  # an item without a trained id, scored at the bundle's new-item scale
    table = ItemTable(vectors, [f"i{r}" for r in range(1, n + 1)], sids, 4, use_gpu=False,
                      index=IndexSpec(kind), scales=scales)  # fmt: skip
    query = rng.normal(size=d).astype(np.float32)
    query /= np.linalg.norm(query)
    unit = vectors[1:] / np.linalg.norm(vectors[1:], axis=1, keepdims=True)
    want = unit @ query * scales[1:]
    hits = dict(table.search(query, k=n, exclude_rows=set()))
    np.testing.assert_allclose([hits[r] for r in range(1, n + 1)], want, rtol=1e-5, atol=1e-6)
    # An upsert takes its own scale; the same vector at another scale is a change.
    assert table.upsert("new", np.zeros(3, np.int64), vectors[1], scale=0.5) is True
    assert dict(table.search(query, k=n + 1, exclude_rows=set()))[table.row("new")] == (
        pytest.approx(0.5 * float(unit[0] @ query), rel=1e-5)
    )
    assert table.upsert("new", np.zeros(3, np.int64), vectors[1], scale=0.5) is False
    assert table.upsert("new", np.zeros(3, np.int64), vectors[1], scale=1.0) is False
    assert table.scales[table.row("new")] == 1.0


@pytest.mark.parametrize("kind", ["flat", "hnsw", "torch"])
def test_item_table_of_a_dot_bundle_ranks_by_the_raw_inner_product(kind: str) -> None:
    from sidrec.service.retrieval import IndexSpec

    if kind == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    n, d = 12, 4
    vectors = np.zeros((n + 1, d), np.float32)
    vectors[1:] = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=(n, 1))  # norms differ
    sids = np.zeros((n + 1, 3), np.int64)
    table = ItemTable(vectors, [f"i{r}" for r in range(1, n + 1)], sids, 4, use_gpu=False,
                      index=IndexSpec(kind, device="cpu"), scoring="dot")  # fmt: skip
    query = rng.normal(size=d).astype(np.float32) * 3.0
    hits = dict(table.search(query, k=n, exclude_rows=set()))
    np.testing.assert_allclose([hits[r] for r in range(1, n + 1)], vectors[1:] @ query, rtol=1e-5)
    # a long vector wins over a better-aligned short one, as the model was trained to score
    assert table.upsert("long", np.zeros(3, np.int64), query * 10.0) is True
    assert table.search(query, k=1, exclude_rows=set())[0][0] == table.row("long")
    with pytest.raises(ValueError, match="scoring"):
        ItemTable(vectors, [f"i{r}" for r in range(1, n + 1)], sids, 4, scoring="euclid")


def brute_scores(table: ItemTable, query: np.ndarray) -> dict[str, float]:
    """Every live item's score computed with numpy alone: indexed(v) . u * scale - offset."""
    out = {}
    for item_id, row in table.row_of.items():
        v = table.vectors[row].astype(np.float64)
        if table.scoring == "cosine":
            v = v / np.linalg.norm(v)
        out[item_id] = float(v @ query) * float(table.scales[row]) - float(table.offsets[row])
    return out


def check_against_brute(table: ItemTable, query: np.ndarray) -> None:
    """rank_batch over every live item: the brute-force ranking and scores, offsets included."""
    want = brute_scores(table, query)
    (hits,) = table.rank_batch(query[None, :], [len(want)], [set()])
    assert [i for i, _, _ in hits] == sorted(want, key=want.__getitem__, reverse=True)
    np.testing.assert_allclose([s for _, s, _ in hits], [want[i] for i, _, _ in hits],
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("scoring", ["cosine", "dot"])
@pytest.mark.parametrize("kind", ["flat", "hnsw", "torch"])
def test_item_table_score_offsets_lower_exactly_their_rows(kind: str, scoring: str) -> None:
    """A row's score is indexed(v) . u * scale - offset (the extra index column): the rows with
    an offset drop by exactly it, the others keep their score; upserts, growing and compaction
    keep each row's offset."""
    from sidrec.service.retrieval import COMPACT_MIN_DEAD, IndexSpec

    if kind == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    n, d = 40, 8
    vectors = np.zeros((n + 1, d), np.float32)
    vectors[1:] = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))
    sids = np.zeros((n + 1, 3), np.int64)
    ids = [f"i{r}" for r in range(1, n + 1)]
    new_rows = [3, 8, 21, 34]  # items without a trained id: the bundle's new-item scale/offset
    scales = np.ones(n + 1, np.float32)
    offsets = np.zeros(n + 1, np.float32)
    scales[new_rows], offsets[new_rows] = 1.3, 0.4
    spec = IndexSpec(kind, device="cpu")
    plain = ItemTable(vectors, ids, sids, 4, use_gpu=False, index=spec, scales=scales,
                      scoring=scoring)  # fmt: skip
    table = ItemTable(vectors, ids, sids, 4, use_gpu=False, index=spec, scales=scales,
                      offsets=offsets, scoring=scoring)  # fmt: skip
    query = rng.normal(size=d).astype(np.float32)
    query /= np.linalg.norm(query)
    # The new items' rows are lower by exactly the offset, every other row is unchanged.
    with_offsets = dict(table.search(query, k=n, exclude_rows=set()))
    without = dict(plain.search(query, k=n, exclude_rows=set()))
    drop = [without[r] - with_offsets[r] for r in range(1, n + 1)]
    np.testing.assert_allclose(drop, offsets[1:], atol=1e-5)
    check_against_brute(table, query)
    # ... and it changes the ranking: some new item falls behind a row it beat without it.
    order = [r for r, _ in table.search(query, k=n, exclude_rows=set())]
    assert order != [r for r, _ in plain.search(query, k=n, exclude_rows=set())]
    # Similar items query with the item's unit vector (plus the 1): offsets apply there too.
    unit = table.vectors[table.row("i1")] / np.linalg.norm(table.vectors[table.row("i1")])
    similar = table.similar("i1", n)
    assert similar is not None
    want = brute_scores(table, unit.astype(np.float32))
    del want["i1"]
    assert [i for i, _, _ in similar] == sorted(want, key=want.__getitem__, reverse=True)
    np.testing.assert_allclose([s for _, s, _ in similar], [want[i] for i, _, _ in similar],
                               rtol=1e-5, atol=1e-5)  # fmt: skip

    # An upsert takes its own offset: a vector along the query would be first, its offset
    # puts it last; the same vector with another offset is a change (a new row).
    best = query * 30.0
    assert table.upsert("new", np.zeros(3, np.int64), best, scale=1.3, offset=0.0) is True
    assert table.rank_batch(query[None], [1], [set()])[0][0][0] == "new"
    assert table.upsert("new", np.zeros(3, np.int64), best, scale=1.3, offset=100.0) is False
    assert table.offsets[table.row("new")] == np.float32(100.0) and table.dead == 1
    (last,) = table.rank_batch(query[None], [table.live_items], [set()])
    indexed_best = 30.0 if scoring == "dot" else 1.0
    assert last[-1][0] == "new"
    assert last[-1][1] == pytest.approx(indexed_best * 1.3 - 100.0, abs=1e-4)
    assert table.upsert("new", np.zeros(3, np.int64), best, scale=1.3, offset=100.0) is False
    assert table.size == n + 3  # unchanged: no new row
    check_against_brute(table, query)

    # Past the table's capacity (it grows), with offsets on every other item.
    for j in range(2 * n):
        v = rng.normal(size=d).astype(np.float32)
        table.upsert(f"late-{j}", np.zeros(3, np.int64), v, scale=1.3, offset=0.25 * (j % 2))
    assert table.offsets[table.row("late-1")] == np.float32(0.25)
    check_against_brute(table, query)

    # Retire enough rows to compact: the live rows keep their offsets in the rebuilt index.
    retired = [*ids[::2], *[f"late-{j}" for j in range(0, 2 * n, 4)]]
    assert len(retired) >= COMPACT_MIN_DEAD
    for item_id in retired:
        table.retire(item_id)
    # The retires alone start a background rebuild (they pass COMPACT_MIN_DEAD); it may already
    # have finished, so count rebuilds rather than dead rows.
    wait_compacted(table)
    assert table.compactions >= 1
    table.compact()  # and once more by hand, to be sure a rebuild happened after the last change
    assert table.dead == 0
    assert table.offsets[table.row("new")] == np.float32(100.0)
    assert table.offsets[table.row("late-1")] == np.float32(0.25)
    assert table.offsets[table.row("i8")] == np.float32(0.4)  # bundle row 8, renumbered
    assert table.row("i8") != 8 and table.offsets[table.row("i10")] == 0.0
    check_against_brute(table, query)


@pytest.mark.parametrize("scoring", ["cosine", "dot"])
@pytest.mark.parametrize("kind", ["flat", "hnsw", "torch"])
def test_item_table_with_zero_offsets_ranks_as_a_scale_only_index(kind: str, scoring: str) -> None:
    """Offsets all zero (a bundle without new_item_score_offset): the same top-k and scores as
    an index of indexed(v) * scale alone, the way the table scored before offsets."""
    import faiss

    from sidrec.service.retrieval import IndexSpec, normalized

    if kind == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    n, d, k = 200, 16, 20
    vectors = np.zeros((n + 1, d), np.float32)
    vectors[1:] = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))
    sids = np.zeros((n + 1, 3), np.int64)
    ids = [f"i{r}" for r in range(1, n + 1)]
    scales = np.ones(n + 1, np.float32)
    scales[1::7] = 1.3
    indexed = vectors if scoring == "dot" else normalized(vectors)
    before = faiss.IndexFlatIP(d)  # d columns, no offset column: the scale-only index
    before.add(np.ascontiguousarray(indexed * scales[:, None], np.float32))
    queries = rng.normal(size=(32, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    want_scores, want_rows = before.search(queries, k + 1)  # + row 0, which is never returned
    for offsets in (None, np.zeros(n + 1, np.float32)):
        table = ItemTable(vectors, ids, sids, 4, use_gpu=False, index=IndexSpec(kind, device="cpu"),
                          scales=scales, offsets=offsets, scoring=scoring)  # fmt: skip
        got = table.search_batch(queries, [k] * len(queries), [set()] * len(queries))
        for hits, rows, scores in zip(got, want_rows, want_scores, strict=True):
            keep = rows > 0
            assert [r for r, _ in hits] == rows[keep][:k].tolist()
            np.testing.assert_allclose([s for _, s in hits], scores[keep][:k], rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
        (ranked,) = table.rank_batch(queries[:1], [k], [set()])
        assert [table.row(i) for i, _, _ in ranked] == [r for r, _ in got[0]]


def content_term_scores(
    table: ItemTable, query: np.ndarray, content_query: np.ndarray, k: int | None = None
) -> list[tuple[str, float]]:
    """Every live item's score with numpy alone, the content term included: brute_scores +
    weight * cos(content query, the row's content); best first."""
    assert table.content is not None
    base = brute_scores(table, query)
    unit = content_query / np.linalg.norm(content_query)
    out = {i: s + float(table.content_weights[table.row_of[i]])
           * float(table.content[table.row_of[i]] @ unit) for i, s in base.items()}  # fmt: skip
    return sorted(out.items(), key=lambda kv: -kv[1])[:k]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "torch"])
def test_item_table_content_term_lifts_only_its_rows_by_their_content(kind: str) -> None:
    """Rows with a content-term weight score base + W * cos(the history's mean content, their
    content); every other row keeps its score and the main index its d + 1 columns. The term
    follows ingests (with their content), retirements, replacements and compaction, and
    `similar` takes the item's own content as the query's."""
    from sidrec.service.retrieval import IndexSpec

    if kind == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    n, d, c = 60, 8, 6
    vectors = np.zeros((n + 1, d), np.float32)
    vectors[1:] = rng.normal(size=(n, d))
    content = np.zeros((n + 1, c), np.float32)
    content[1:] = rng.normal(size=(n, c))
    ids = [f"i{r}" for r in range(1, n + 1)]
    new_rows = [3, 8, 21, 34, 50]
    scales, offsets, weights = (np.ones(n + 1, np.float32), np.zeros(n + 1, np.float32),
                                np.zeros(n + 1, np.float32))  # fmt: skip
    scales[new_rows], offsets[new_rows], weights[new_rows] = 0.9, 0.1, 2.0
    spec = IndexSpec(kind, device="cpu", hnsw_ef_search=200)
    table = ItemTable(vectors, ids, np.zeros((n + 1, 3), np.int64), 4, use_gpu=False,
                      index=spec, scales=scales, offsets=offsets, scoring="dot",
                      content=content, content_weights=weights)  # fmt: skip
    plain = ItemTable(vectors, ids, np.zeros((n + 1, 3), np.int64), 4, use_gpu=False,
                      index=spec, scales=scales, offsets=offsets, scoring="dot")  # fmt: skip
    assert table.index.ntotal == n + 1 and table.term_rows == new_rows
    history = np.array([3, 4, 5, 30], np.int64)  # rows of a history
    with table.lock:
        cq = table.content_query(history)
    mean = content[history] / np.linalg.norm(content[history], axis=1, keepdims=True)
    np.testing.assert_allclose(cq, mean.mean(0) / np.linalg.norm(mean.mean(0)), atol=1e-6)
    query = rng.normal(size=d).astype(np.float32)

    def check(k: int | None = None) -> None:
        want = content_term_scores(table, query, cq, k)
        (got,) = table.rank_batch(query[None], [len(want)], [set()], None, cq[None])
        assert [i for i, _, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s, _ in got], [s for _, s in want], atol=1e-5)

    check()
    check(5)
    # only the weighted rows moved, by exactly W * their cosine
    with_term = dict(table.search(query, n, set(), cq))
    without = dict(plain.search(query, n, set()))
    for row in range(1, n + 1):
        unit = content[row] / np.linalg.norm(content[row])
        lift = weights[row] * float(unit @ cq)
        assert with_term[row] == pytest.approx(without[row] + lift, abs=1e-5)
    # a resolved history carries its content query
    resolved = table.resolve(["i3", "i4", "gone", "i5", "i30"])
    assert resolved.content is not None
    np.testing.assert_allclose(resolved.content, cq, atol=1e-6)
    # ingest a new item whose content matches the history, one without a term, retire one
    table.upsert("fresh", np.zeros(3, np.int64), vectors[7] * 0.1, 0.9, 0.1, cq * 5, 20.0)
    table.upsert("plain", np.zeros(3, np.int64), vectors[9] * 1.5, content=content[9])
    table.retire("i21")
    check()
    assert content_term_scores(table, query, cq, 1)[0][0] == "fresh"
    # replace new items (a new row each) until compaction renumbers the rows
    for r in [8, 34, 50] * 8:
        table.upsert(f"i{r}", np.zeros(3, np.int64), vectors[r] + rng.normal(size=d) * 0.01,
                     0.9, 0.1, content[r], 2.0)  # fmt: skip
    table.compact()
    assert table.dead == 0 and len(table.term_rows) == 5  # i3, i8, i34, i50, fresh
    check()
    # similar items: the item's own content is the content query
    similar = table.similar("fresh", 5)
    assert similar is not None
    own = table.content[table.row("fresh")]
    unit_query = table.vectors[table.row("fresh")] / np.linalg.norm(
        table.vectors[table.row("fresh")]
    )
    want = [(i, s) for i, s in content_term_scores(table, unit_query, own) if i != "fresh"][:5]
    assert [i for i, _, _ in similar] == [i for i, _ in want]
    # a table without content takes no weight
    with pytest.raises(ValueError, match="content"):
        plain.upsert("x", np.zeros(3, np.int64), vectors[1], content_weight=1.0)


def wait_compacted(table: ItemTable, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while table.compacting:
        assert time.monotonic() < deadline, "compaction did not finish"
        time.sleep(0.01)


def exact_top(table: ItemTable, query: np.ndarray, k: int, keep: Any = None) -> list[str]:
    """The exact top-k live item ids by the table's score, computed without its index."""
    scored = []
    for item_id, row in table.row_of.items():
        if keep is None or keep(item_id):
            unit = table.vectors[row] / np.linalg.norm(table.vectors[row])
            score = float(unit @ query) * float(table.scales[row]) - float(table.offsets[row])
            scored.append((score, item_id))
    return [i for _, i in sorted(scored, reverse=True)[:k]]


def check_consistent(table: ItemTable, vector_of: dict[str, np.ndarray]) -> None:
    assert set(table.row_of) == set(vector_of)
    assert table.index.ntotal == table.size
    for item_id, row in table.row_of.items():
        assert table.item_ids[row] == item_id and table.alive[row]
        assert np.array_equal(table.vectors[row], vector_of[item_id])
    assert table.live_items == len(vector_of)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_retiring_half_the_catalog_compacts_rows_and_index(kind: str) -> None:
    """Retired rows die at once and are compacted away in the background; daily churn
    (retire some, ingest as many) keeps the rows held near the live items."""
    from sidrec.service.retrieval import IndexSpec

    rng = np.random.default_rng(2)
    n, d = 2000, 16
    vectors = np.zeros((n + 1, d), np.float32)
    vectors[1:] = rng.normal(size=(n, d))
    ids = [f"i{r}" for r in range(1, n + 1)]
    table = ItemTable(vectors, ids, np.zeros((n + 1, 3), np.int64), 4, use_gpu=False,
                      index=IndexSpec(kind, hnsw_ef_search=400))  # fmt: skip
    vector_of = {i: vectors[r] for r, i in enumerate(ids, start=1)}
    memory_before = table.vectors.nbytes
    for i in ids[::2]:
        assert table.retire(i) is True
        del vector_of[i]
    assert table.retire(ids[0]) is False  # already gone
    wait_compacted(table)
    assert table.compactions >= 1
    check_consistent(table, vector_of)
    # Compaction ran on its own (a quarter dead) and keeps dead rows under that share ...
    assert table.rows_held <= (n // 2) / 0.75 + 2
    # ... and one run now leaves only the live rows, in the index and the table.
    table.compact()
    assert table.rows_held == table.index.ntotal == n // 2 + 1 and table.dead == 0
    assert table.vectors.nbytes <= memory_before // 2 + 16 * table.d * 4
    query = rng.normal(size=d).astype(np.float32)
    query /= np.linalg.norm(query)
    hits = [i for i, _, _ in table.rank_batch(query[None], [20], [set()])[0]]
    assert not set(hits) & set(ids[::2])
    if kind == "flat":
        assert hits == exact_top(table, query, 20)
    for day in range(10):  # churn: 20% of the catalog retired and replaced each day
        live = list(vector_of)
        for i in live[::5]:
            table.retire(i)
            del vector_of[i]
        for j in range(len(live[::5])):
            v = rng.normal(size=d).astype(np.float32)
            table.upsert(f"d{day}-{j}", np.zeros(3, np.int64), v)
            vector_of[f"d{day}-{j}"] = v
        wait_compacted(table)
        assert table.rows_held <= len(vector_of) / 0.75 + 2, (day, table.rows_held)
    check_consistent(table, vector_of)


def test_compaction_replays_changes_made_while_it_builds() -> None:
    table = make_table(n=300, d=8)
    vector_of = {i: table.vectors[r].copy() for i, r in table.row_of.items()}
    for i in list(vector_of)[:100]:
        table.retire(i)
        del vector_of[i]
    wait_compacted(table)
    # Start a compaction by hand and change items from another thread while it runs.
    for i in list(vector_of)[:50]:
        table.retire(i)
        del vector_of[i]
    worker = threading.Thread(target=table.compact)
    worker.start()
    for j in range(200):
        v = np.full(8, j + 1.0, np.float32)
        table.upsert(f"late-{j}", np.zeros(3, np.int64), v)
        vector_of[f"late-{j}"] = v
        if j % 3 == 0:
            victim = next(iter(vector_of))
            table.retire(victim)
            del vector_of[victim]
    worker.join()
    wait_compacted(table)
    check_consistent(table, vector_of)


def test_filtered_ranking_over_fetches_until_k_qualify() -> None:
    table = make_table(n=3000, d=8)
    rng = np.random.default_rng(3)
    query = rng.normal(size=8).astype(np.float32)
    query /= np.linalg.norm(query)
    rare = {f"i{r}" for r in range(7, 3001, 97)}  # 31 items, anywhere in the ranking
    accept = rare.__contains__
    (hits,) = table.rank_batch(query[None], [20], [set()], [accept])
    assert [i for i, _, _ in hits] == exact_top(table, query, 20, accept)
    (hits,) = table.rank_batch(query[None], [50], [{"i7"}], [accept])
    assert len(hits) == 30 and "i7" not in {i for i, _, _ in hits}  # all that qualify
    scores = [s for _, s, _ in hits]
    assert scores == sorted(scores, reverse=True)


def test_similar_items_exclude_the_item_and_retired_ones() -> None:
    table = make_table(n=50, d=8)
    twin = table.vectors[table.row("i3")] * 2  # same direction: the nearest item
    table.upsert("twin", np.zeros(3, np.int64), twin)
    hits = table.similar("i3", 5)
    assert hits is not None and hits[0][0] == "twin" and "i3" not in [i for i, _, _ in hits]
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    table.retire("twin")
    assert "twin" not in [i for i, _, _ in table.similar("i3", 50) or []]
    assert table.similar("twin", 5) is None


def test_bundle_content_term_needs_its_content_file(tmp_path: Path) -> None:
    from sidrec.bundle import Bundle, BundleError

    without = Bundle(tmp_path, {"model": {}, "files": {}})
    assert not without.content_term.active and without.item_content() is None
    content = np.zeros((3, 4), np.float32)
    content[1:, 0] = 1.0
    np.save(tmp_path / "item_content.npy", content)
    unlisted = Bundle(tmp_path, {"model": {"new_item_content_weight": 2.0}, "files": {}})
    with pytest.raises(BundleError, match=r"item_content\.npy"):
        unlisted.item_content()
    listed = Bundle(tmp_path, {"model": {"new_item_content_weight": 2.0},
                               "files": {"item_content.npy": "sha"}})  # fmt: skip
    got = listed.item_content()
    assert listed.content_term.new_weight == 2.0 and got is not None
    np.testing.assert_array_equal(got, content)
    # a term on rarely trained items alone needs the vectors too
    rare_only = {"rare_item_content_weight": 1.0, "rare_item_max_count": 2}
    with pytest.raises(BundleError, match=r"item_content\.npy"):
        Bundle(tmp_path, {"model": rare_only, "files": {}}).item_content()
    # a weight without a count (or a count without a weight) reaches no row
    for model in ({"rare_item_content_weight": 1.0}, {"rare_item_max_count": 2}):
        assert Bundle(tmp_path, {"model": model, "files": {}}).item_content() is None


def test_bundle_content_weights_follow_each_rows_training_events(tmp_path: Path) -> None:
    from sidrec.bundle import Bundle, ItemRecord
    from sidrec.content_term import ContentTerm
    from sidrec.service.catalog import bundle_content_weights

    popularity = [0, 1, 2, 3, 7, 0]  # rows 1..6
    records = [ItemRecord(item_id=f"i{row}", row=row, sid=(0, 0, 0), title="", text="",
                          popularity=count, fields={})
               for row, count in enumerate(popularity, start=1)]  # fmt: skip
    term = ContentTerm(new_weight=2.0, rare_weight=0.5, rare_max_count=2)
    bundle = Bundle(tmp_path, {"model": term.record(), "files": {}})
    assert bundle.content_term == term
    weights = bundle_content_weights(bundle, records)
    # row 0 (padding) none; new items W; 1..K events W_r; more none
    np.testing.assert_array_equal(weights, np.float32([0, 2, 0.5, 0.5, 0, 0, 2]))
    # the offline scorers read the same weights from the same counts
    counts = np.array([0, *popularity])
    np.testing.assert_array_equal(term.row_weights(counts), weights)
    assert not ContentTerm().active and not ContentTerm(0.0, 1.0, 0).active
    assert ContentTerm(0.0, 1.0, 1).active and ContentTerm(1.0).active


def test_a_content_term_reads_genres_and_years_beside_the_content_vector(tmp_path: Path) -> None:
    from sidrec.bundle import Bundle
    from sidrec.content_term import ContentTerm
    from sidrec.item_features import ItemFeatures

    content = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    fields = [{"genres": "Comedy|Drama", "year": "1995"}, {"genres": "Horror"}]
    # the content vector alone: unit rows
    np.testing.assert_allclose(ContentTerm(1.0).vectors(content), [[0.6, 0.8], [0.0, 1.0]])
    features = ItemFeatures(("comedy", "drama", "horror"), (1990, 2000))
    term = ContentTerm(1.0, features=features)
    vectors = term.vectors(content, fields)  # [2, 2 + 3 + 6]: unit rows of the extended vector
    assert vectors.shape == (2, 2 + features.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    extended = features.extend(content, fields)
    np.testing.assert_allclose(vectors, extended / np.linalg.norm(extended, axis=1)[:, None])
    # one item of two genres and a year (three unit parts), one of a genre and no year (two)
    np.testing.assert_allclose(vectors[0, :2], [0.6 / 3**0.5, 0.8 / 3**0.5], rtol=1e-6)
    np.testing.assert_allclose(vectors[1, :2], [0.0, 1 / 2**0.5], rtol=1e-6)
    assert vectors[1, 2 + 3 :].max() == 0.0  # no year part
    with pytest.raises(ValueError, match="fields"):
        term.vectors(content)
    # the manifest keeps what it reads; a manifest from before it reads the vector alone
    bundle = Bundle(tmp_path, {"model": term.record(), "files": {}})
    assert bundle.content_term == term
    assert Bundle(tmp_path, {"model": ContentTerm(1.0).record(), "files": {}}).content_term == (
        ContentTerm(1.0)
    )
    legacy = {k: v for k, v in term.record().items() if k != "content_term_features"}
    assert Bundle(tmp_path, {"model": legacy, "files": {}}).content_term.features is None


def test_a_centred_content_term_takes_its_cosine_about_the_catalogs_mean(tmp_path: Path) -> None:
    from sidrec.bundle import Bundle
    from sidrec.content_term import ContentTerm
    from sidrec.item_features import ItemFeatures

    # three items sharing one large direction (the first axis), apart in the second
    content = np.array([[4.0, 1.0], [4.0, -1.0], [4.0, 0.0]], np.float32)
    plain = ContentTerm(1.0).vectors(content)
    assert float(plain[0] @ plain[1]) > 0.8  # uncentred, two opposite items look alike
    term = ContentTerm(1.0).centred_on(content)
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)
    np.testing.assert_allclose(term.centre, unit.mean(0), rtol=1e-6)
    vectors = term.vectors(content)
    np.testing.assert_allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, rtol=1e-6)
    shifted = unit - unit.mean(0)
    np.testing.assert_allclose(
        vectors, shifted / np.linalg.norm(shifted, axis=1, keepdims=True), rtol=1e-5, atol=1e-6
    )
    assert float(vectors[0] @ vectors[1]) < -0.99  # centred: opposite
    # a new item is centred on the catalog's mean, not its own batch's
    np.testing.assert_allclose(term.vectors(content[:1]), vectors[:1], atol=1e-6)
    # with the genres and years: the mean of the extended vectors
    fields = [{"genres": "Comedy", "year": "1995"}, {"genres": "Horror"}, {"genres": "Comedy"}]
    features = ItemFeatures(("comedy", "horror"), (1990, 2000))
    extended = ContentTerm(1.0, features=features).centred_on(content, fields)
    np.testing.assert_allclose(extended.centre, features.extend(content, fields).mean(0), rtol=1e-6)
    moved = features.extend(content, fields) - np.asarray(extended.centre, np.float32)
    np.testing.assert_allclose(
        extended.vectors(content, fields),
        moved / np.linalg.norm(moved, axis=1, keepdims=True),
        rtol=1e-5,
        atol=1e-6,
    )
    assert term.transforms and not ContentTerm(1.0).transforms
    # the manifest keeps the centre to the bit; one from before it is not centred
    bundle = Bundle(tmp_path, {"model": extended.record(), "files": {}})
    assert bundle.content_term == extended
    np.testing.assert_array_equal(
        bundle.content_term.vectors(content, fields), extended.vectors(content, fields)
    )
    legacy = {k: v for k, v in term.record().items() if k != "content_term_centre"}
    assert Bundle(tmp_path, {"model": legacy, "files": {}}).content_term.centre is None


def test_a_content_term_with_a_half_life_weighs_the_latest_events_most(tmp_path: Path) -> None:
    from sidrec.bundle import Bundle
    from sidrec.content_term import ContentTerm, recency_weights

    np.testing.assert_allclose(recency_weights(4, 2.0), [2**-1.5, 2**-1.0, 2**-0.5, 1.0])
    np.testing.assert_array_equal(recency_weights(3, None), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="positive"):
        recency_weights(3, 0.0)
    term = ContentTerm(1.0, half_life=2.0)
    np.testing.assert_array_equal(term.history_weights(5), recency_weights(5, 2.0))
    # the manifest keeps it; one from before it weighs every event alike
    assert Bundle(tmp_path, {"model": term.record(), "files": {}}).content_term == term
    legacy = {k: v for k, v in term.record().items() if k != "content_term_half_life"}
    assert Bundle(tmp_path, {"model": legacy, "files": {}}).content_term.half_life is None

    # the service's query: the recency-weighted mean of the history's unit content vectors
    rng = np.random.default_rng(7)
    n, d, c = 20, 4, 5
    vectors = rng.normal(size=(n + 1, d)).astype(np.float32)
    content = rng.normal(size=(n + 1, c)).astype(np.float32)
    vectors[0] = content[0] = 0.0
    weights = np.zeros(n + 1, np.float32)
    weights[[2, 9]] = 1.0
    args = (vectors, [f"i{r}" for r in range(1, n + 1)], np.zeros((n + 1, 3), np.int64), 4)
    recent = ItemTable(*args, use_gpu=False, scoring="dot", content=content,
                       content_weights=weights, content_half_life=1.0)  # fmt: skip
    flat = ItemTable(*args, use_gpu=False, scoring="dot", content=content, content_weights=weights)
    history = np.array([5, 11, 3, 17], np.int64)  # oldest first
    unit = content[history] / np.linalg.norm(content[history], axis=1, keepdims=True)
    want = np.array([0.125, 0.25, 0.5, 1.0]) @ unit
    with recent.lock, flat.lock:
        np.testing.assert_allclose(
            recent.content_query(history), want / np.linalg.norm(want), atol=1e-6
        )
        plain = flat.content_query(history)
        np.testing.assert_allclose(plain, unit.mean(0) / np.linalg.norm(unit.mean(0)), atol=1e-6)
        # the order of the history matters only with a half-life
        np.testing.assert_allclose(flat.content_query(history[::-1]), plain, atol=1e-6)
        assert not np.allclose(recent.content_query(history[::-1]), recent.content_query(history))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_warm_content_term_weighs_every_trained_row_and_its_index_ranks_alone(
    kind: str, tmp_path: Path
) -> None:
    """A warm term (every trained item's, ContentTerm.warm_weight) puts every row in the
    term index: it alone ranks the table, exactly, before and after an ingest."""
    from sidrec.bundle import Bundle
    from sidrec.content_term import ContentTerm
    from sidrec.service.retrieval import IndexSpec

    term = ContentTerm(3.0, 2.0, 2, warm_weight=1.0)
    counts = np.array([0, 0, 1, 2, 5, 9])  # row 0 padding, then new, rare, rare, warm, warm
    np.testing.assert_array_equal(term.row_weights(counts), [0, 3, 2, 2, 1, 1])
    assert ContentTerm(warm_weight=1.0).active and not ContentTerm().active
    assert Bundle(tmp_path, {"model": term.record(), "files": {}}).content_term == term
    legacy = {k: v for k, v in term.record().items() if k != "warm_item_content_weight"}
    assert Bundle(tmp_path, {"model": legacy, "files": {}}).content_term.warm_weight == 0.0

    rng = np.random.default_rng(11)
    n, d, c = 80, 8, 6
    vectors = rng.normal(size=(n + 1, d)).astype(np.float32)
    content = rng.normal(size=(n + 1, c)).astype(np.float32)
    vectors[0] = content[0] = 0.0
    train_counts = np.concatenate([[0], rng.integers(0, 6, size=n)])
    weights = ContentTerm(3.0, warm_weight=1.5).row_weights(train_counts)
    assert (weights[1:] > 0).all()
    spec = IndexSpec(kind, device="cpu", hnsw_ef_search=200)
    table = ItemTable(vectors, [f"i{r}" for r in range(1, n + 1)], np.zeros((n + 1, 3), np.int64),
                      4, use_gpu=False, index=spec, scoring="dot", content=content,
                      content_weights=weights, content_half_life=2.0)  # fmt: skip
    assert table.term_rows == list(range(1, n + 1))
    with table.lock:
        cq = table.content_query(np.array([4, 9, 17], np.int64))
    query = rng.normal(size=d).astype(np.float32)
    for k in (5, n):
        want = content_term_scores(table, query, cq, k)
        (got,) = table.rank_batch(query[None], [k], [{"i3"}], None, cq[None])
        want = [(i, s) for i, s in want if i != "i3"][: len(got)]
        assert [i for i, _, _ in got] == [i for i, _ in want] and len(got) == min(k, n - 1)
        np.testing.assert_allclose([s for _, s, _ in got], [s for _, s in want], atol=1e-5)
    # an ingested item with its weight joins the term index, and the ranking stays exact
    vector, unit = rng.normal(size=d).astype(np.float32), rng.normal(size=c).astype(np.float32)
    table.upsert("new", np.zeros(3, np.int64), vector, 1.0, 0.0, unit, 3.0)
    assert len(table.term_rows) == n + 1
    want = content_term_scores(table, query, cq)
    (got,) = table.rank_batch(query[None], [len(want)], [set()], None, cq[None])
    assert [i for i, _, _ in got] == [i for i, _ in want]
