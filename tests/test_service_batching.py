"""Micro-batching of /v1/recommend (service/batching.py): a request ranked in a batch with
others, padded to the longest history, gets exactly what it gets alone, and every waiting
request receives its own answer."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sidrec.service import metrics
from sidrec.service.app import build_services
from sidrec.service.batching import Hits, RankBatcher, _Job
from sidrec.service.deps import Services
from sidrec.service.retrieval import search_threads, set_search_threads
from sidrec.service.settings import Settings
from sidrec.service.user_cache import UserVectorCache

QUERY_TIME = 1_400_000_000


@pytest.fixture(scope="module")
def services(bundle_dir: Path) -> Iterator[Services]:
    # No cache: these tests compare batched answers with ones the encoder computes.
    built = build_services(
        Settings(bundle=bundle_dir, device="cpu", ort_threads=1, user_cache_size=0)
    )
    yield built
    built.ranker.stop()


def histories(services: Services, count: int) -> list[tuple[list[str], np.ndarray]]:
    """Histories of very different lengths (1 .. longer than max_len), with repeats."""
    rng = np.random.default_rng(0)
    n = services.catalog.table.num_bundle_items
    lengths = [1, 3, 17, services.runtime.max_len + 40, 64, 2, 120, 9][:count]
    out = []
    for length in lengths:
        rows = rng.integers(1, n + 1, length).astype(np.int64)
        stamps = np.sort(rng.integers(1_300_000_000, QUERY_TIME, length)).astype(np.int64)
        out.append(([services.catalog.table.item_ids[r] for r in rows], stamps))
    return out


async def rank_all(ranker: RankBatcher, cases: list[tuple[list[str], np.ndarray]]) -> list[Hits]:
    return list(
        await asyncio.gather(*(ranker.rank(ids, ts, QUERY_TIME, 10, set(ids)) for ids, ts in cases))
    )


def same_hits(got: Hits, expected: Hits) -> None:
    assert [i for i, _, _ in got] == [i for i, _, _ in expected]
    np.testing.assert_allclose([s for _, s, _ in got], [s for _, s, _ in expected], atol=1e-5)


def test_a_padded_batch_ranks_each_history_as_alone(services: Services) -> None:
    ranker = services.ranker
    cases = histories(services, 8)
    alone = [asyncio.run(rank_all(ranker, [case])) for case in cases]
    # One run of the whole batch, as the batch thread makes it when requests queue up.
    keep = ranker.runtime.max_len  # rank() keeps the most recent max_len items
    jobs = [_job(ids[-keep:], ts[-keep:], set(ids)) for ids, ts in cases]
    together = ranker._run(jobs)
    assert len(together) == len(cases)
    for got, (expected,) in zip(together, alone, strict=True):
        assert len(got) == 10
        same_hits(got, expected)


def test_concurrent_requests_each_get_their_own_answer(services: Services) -> None:
    ranker = services.ranker
    cases = histories(services, 8) * 4  # 32 requests in flight at once
    alone = [asyncio.run(rank_all(ranker, [case]))[0] for case in cases[:8]]
    for got, expected in zip(asyncio.run(rank_all(ranker, cases)), alone * 4, strict=True):
        same_hits(got, expected)
    # The history's own items are never recommended back.
    for (ids, _), got in zip(cases, alone * 4, strict=True):
        assert not set(ids) & {i for i, _, _ in got}


def _job(ids: list[str], ts: np.ndarray, exclude: set[str]) -> _Job:
    loop = asyncio.new_event_loop()
    try:
        return _Job(ids, ts, QUERY_TIME, 10, exclude, loop.create_future(), loop)
    finally:
        loop.close()


def test_rank_threads_run_batches_at_the_same_time(services: Services) -> None:
    """With two rank threads two batches are computed at once (ORT and FAISS release the
    GIL, so a 2-core worker computes on both cores): a barrier inside the batch run only
    opens when both threads are in it, so one thread alone would break it."""
    barrier = threading.Barrier(2, timeout=20)

    class Gated(RankBatcher):
        def _run(self, jobs: list[_Job]) -> list[Hits]:
            barrier.wait()
            return super()._run(jobs)

    ranker = Gated(services.runtime, services.catalog.table, max_batch=1, threads=2)
    try:
        assert ranker.threads == 2
        cases = histories(services, 2)
        expected = [asyncio.run(rank_all(services.ranker, [case]))[0] for case in cases]
        for got, want in zip(asyncio.run(rank_all(ranker, cases)), expected, strict=True):
            same_hits(got, want)
    finally:
        ranker.stop()
    assert not any(t.is_alive() for t in ranker._threads)
    with pytest.raises(ValueError, match="threads"):
        RankBatcher(services.runtime, services.catalog.table, threads=0)


def test_queued_requests_share_one_batch_and_stop_serves_every_queued_one(
    services: Services,
) -> None:
    """Requests that arrive while the only rank thread is busy are ranked together in its
    next batch; stop() while they wait still answers each of them, then ends the thread, and
    a request after stop() is refused."""
    gate = threading.Event()
    sizes: list[int] = []

    class Held(RankBatcher):
        def _run(self, jobs: list[_Job]) -> list[Hits]:
            assert gate.wait(20)
            sizes.append(len(jobs))
            return super()._run(jobs)

    ranker = Held(services.runtime, services.catalog.table, threads=1)
    cases = histories(services, 8)
    expected = [asyncio.run(rank_all(services.ranker, [case]))[0] for case in cases]

    async def scenario() -> list[Hits]:
        first = asyncio.ensure_future(rank_all(ranker, cases[:1]))
        await asyncio.sleep(0.2)  # the thread took it and waits at the gate
        rest = asyncio.ensure_future(rank_all(ranker, cases[1:]))
        await asyncio.sleep(0.2)  # the other seven are queued
        stopper = threading.Thread(target=ranker.stop)
        stopper.start()
        await asyncio.sleep(0.2)
        gate.set()
        got = [*await first, *await rest]
        await asyncio.to_thread(stopper.join, 20)
        return got

    for got, want in zip(asyncio.run(scenario()), expected, strict=True):
        same_hits(got, want)
    assert sizes == [1, 7]
    assert not any(t.is_alive() for t in ranker._threads)
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(rank_all(ranker, cases[:1]))


def test_rank_threads_default_to_cores_per_worker(bundle_dir: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert Settings(bundle=bundle_dir).rank_thread_count() == cores
    assert Settings(bundle=bundle_dir, rank_threads=3).rank_thread_count() == 3
    two = Settings(bundle=bundle_dir, workers=2, redis_url="redis://127.0.0.1:1/0")
    assert two.rank_thread_count() == max(1, cores // 2)


def test_user_cache_key_names_exactly_the_encoder_inputs() -> None:
    cache = UserVectorCache(capacity=10, use_time=True)
    rows = np.array([5, 9, 2], np.int64)
    ts = np.array([1_000, 5_000, 90_000], np.int64)
    key = cache.key(0, rows, ts, 100_000)
    assert key == cache.key(0, rows.copy(), ts.copy(), 100_000)
    # the last event is 10,000 s old: bucket floor(ln(10000) / 0.301) = 30 spans 8,398..11,350 s
    assert key == cache.key(0, rows, ts, 100_500)
    assert key != cache.key(0, rows, ts, 90_000 + 12_000)  # the next bucket
    assert key != cache.key(1, rows, ts, 100_000)  # rows renumbered by a compaction
    assert key != cache.key(0, rows[[1, 0, 2]], ts, 100_000)
    assert key != cache.key(0, rows, ts + np.array([0, 0, 1]), 100_000)
    assert key != cache.key(0, rows[:2], ts[:2], 100_000)
    untimed = UserVectorCache(capacity=10, use_time=False)
    assert untimed.key(0, rows, ts, 100_000) == untimed.key(0, rows, ts, 10**9)


def test_user_cache_is_a_bounded_lru() -> None:
    cache = UserVectorCache(capacity=2, use_time=False)
    a, b, c = (cache.key(0, np.array([r]), np.array([0]), 0) for r in (1, 2, 3))
    cache.put(a, np.ones(4))
    cache.put(b, np.full(4, 2.0))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, np.full(4, 3.0))
    assert len(cache) == 2 and cache.get(b) is None
    np.testing.assert_array_equal(cache.get(a), np.ones(4, np.float32))
    np.testing.assert_array_equal(cache.get(c), np.full(4, 3.0, np.float32))


def test_equal_keys_mean_equal_encoder_outputs(services: Services) -> None:
    """The cache's claim, checked on the exported encoder: query times whose keys agree give
    bit-identical user vectors; ones whose keys differ give other vectors."""
    ((ids, ts),) = histories(services, 1)
    got = services.catalog.table.resolve(ids)
    cache = UserVectorCache(capacity=10, use_time=True)
    keep = ts[got.known]
    runtime = services.runtime
    last = int(keep[-1])

    def encode(query_time: int) -> np.ndarray:
        return runtime.encode_users(
            got.vectors[None], keep[None], np.ones((1, len(keep)), bool), np.array([query_time])
        )[0]

    times = [last + gap for gap in (3_600, 3_601, 3_700, 4_000, 5_000, 10**6, 10**7)]
    keys = [cache.key(got.layout, got.rows, keep, t) for t in times]
    vectors = [encode(t) for t in times]
    assert len(set(keys)) > 2
    for i in range(len(times)):
        for j in range(len(times)):
            same = np.array_equal(vectors[i], vectors[j])
            if keys[i] == keys[j]:
                assert same, (times[i], times[j])
    assert not np.array_equal(vectors[0], vectors[-1])


def test_cached_answers_equal_computed_ones(services: Services) -> None:
    cache = UserVectorCache(capacity=100, use_time=True)
    ranker = RankBatcher(services.runtime, services.catalog.table, threads=2, cache=cache)
    try:
        cases = histories(services, 8)
        expected = [asyncio.run(rank_all(services.ranker, [case]))[0] for case in cases]
        hits_before = metrics.USER_CACHE.labels(result="hit")._value.get()
        first = asyncio.run(rank_all(ranker, cases))
        assert len(cache) == len(cases)
        again = asyncio.run(rank_all(ranker, cases))  # every vector from the cache
        assert metrics.USER_CACHE.labels(result="hit")._value.get() - hits_before == len(cases)
        for a, b, want in zip(first, again, expected, strict=True):
            same_hits(a, want)
            same_hits(b, want)
    finally:
        ranker.stop()


def test_rank_threads_search_with_the_faiss_threads_set(services: Services) -> None:
    """OpenMP keeps FAISS's thread count per thread, so SIDREC_FAISS_THREADS must be applied
    in each rank thread, where the batched searches run. Observed from inside the search:
    `accept` runs there."""
    assert services.ranker.search_threads == Settings.model_fields["faiss_threads"].default == 1
    fresh: list[int] = []
    probe = threading.Thread(target=lambda: fresh.append(search_threads()))
    probe.start()
    probe.join()
    default, here = fresh[0], search_threads()
    ids, stamps = histories(services, 1)[0]
    for wanted, expected in ((3, 3), (0, default)):
        seen: set[int] = set()

        def accept(item_id: str, seen: set[int] = seen) -> bool:
            seen.add(search_threads())
            return True

        ranker = RankBatcher(
            services.runtime, services.catalog.table, threads=2, search_threads=wanted
        )
        try:
            asyncio.run(
                asyncio.wait_for(ranker.rank(ids, stamps, QUERY_TIME, 10, set(ids), accept), 20)
            )
        finally:
            ranker.stop()
        assert seen == {expected}, (wanted, seen)
    assert search_threads() == here  # the caller's own setting is untouched


def test_faiss_threads_need_no_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank thread serving the torch index on a machine without FAISS (gpu_bench's GPU
    image) must not die setting FAISS's threads."""
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    set_search_threads(1)
