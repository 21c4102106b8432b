"""Micro-batching of /v1/recommend (service/batching.py): a request ranked in a batch with
others, padded to the longest history, gets exactly what it gets alone, and every waiting
request receives its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sidrec.service.app import build_services
from sidrec.service.batching import Hits, RankBatcher, _Job
from sidrec.service.deps import Services
from sidrec.service.settings import Settings

QUERY_TIME = 1_400_000_000


@pytest.fixture(scope="module")
def services(bundle_dir: Path) -> Iterator[Services]:
    built = build_services(Settings(bundle=bundle_dir, device="cpu", ort_threads=1))
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
