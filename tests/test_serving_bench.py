"""The approximate (HNSW) retrieval index chosen by SIDREC_INDEX, and the serving benchmark
script (loadtests/serving_bench.py) run end to end with tiny sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from conftest import RedisServer
from test_service_catalog import NEW_ITEM, add_history, neighbours, ranked

from sidrec.service.retrieval import IndexSpec, ItemTable


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """n unit vectors around the centres (item and user vectors cluster by taste)."""
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.normal(size=(n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_table(vectors: np.ndarray, index: IndexSpec) -> ItemTable:
    rows = np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors])  # row 0: pad
    n = len(vectors)
    sids = np.zeros((n + 1, 4), np.int64)
    return ItemTable(rows, [f"i{r}" for r in range(1, n + 1)], sids, 8, use_gpu=False, index=index)


def test_hnsw_recall_against_flat_and_new_items_are_found() -> None:
    d, n = 32, 20_000
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, d))
    items = clustered(rng, centres, n)
    flat = synthetic_table(items, IndexSpec("flat"))
    hnsw = synthetic_table(items, IndexSpec("hnsw", hnsw_m=16, hnsw_ef_search=64))
    assert "IndexHNSWFlat" in hnsw.index_kind and "IndexFlatIP" in flat.index_kind
    queries = clustered(rng, centres, 200)  # users, drawn like the items (not among them)
    found = 0
    for q in queries:
        exact = {row for row, _ in flat.search(q, 10, set())}
        found += len(exact & {row for row, _ in hnsw.search(q, 10, set())})
    recall = found / (10 * len(queries))
    assert 0.95 <= recall <= 1.0, recall

    # Items added while serving join the graph: each is its own nearest neighbour at once.
    for i in range(50):
        vector = rng.normal(size=d).astype(np.float32)
        assert hnsw.upsert(f"new-{i}", np.zeros(4, np.int64), vector)
        row = hnsw.row(f"new-{i}")
        query = vector / np.linalg.norm(vector)
        assert hnsw.search(query, 1, set())[0][0] == row
        # Excluding it, and asking for more rows than efSearch, still gives k live rows.
        hits = hnsw.search(query, 100, {row})
        assert len(hits) == 100 and row not in [r for r, _ in hits]
    # A re-ingested item's old row is dead: never returned, its new row is.
    old_row = hnsw.row("new-0")
    moved = -hnsw.vectors[old_row]
    hnsw.upsert("new-0", np.ones(4, np.int64), moved)
    rows = [r for r, _ in hnsw.search(moved / np.linalg.norm(moved), 5, set())]
    assert rows[0] == hnsw.row("new-0") and old_row not in rows


def test_service_with_hnsw_index_recommends_a_new_item_at_once(
    start_service: Any, shared_redis: RedisServer, bundle_dir: Path
) -> None:
    # efSearch far below what a request asks for: the search widens it to k + excluded rows.
    service = start_service(
        redis_url=shared_redis.url, key_prefix="hnsw-test:", index="hnsw", hnsw_ef_search=8
    )
    ready = service.get("/readyz").json()
    assert "IndexHNSWFlat" in ready["index"] and "efSearch=8" in ready["index"], ready
    item = {**NEW_ITEM, "item_id": "hnsw-new-scifi"}
    r = service.post("/v1/items", item)
    assert r.status_code == 200, r.text
    sid = r.json()["items"][0]["sid"]
    add_history(service, "hnsw-scifi-fan", neighbours(bundle_dir, sid))
    assert item["item_id"] in ranked(service, "hnsw-scifi-fan", 40)
    top = service.post("/v1/recommend", {"user_id": "hnsw-scifi-fan", "k": 1000}).json()["items"]
    assert len(top) == ready["index_items"] + 1 - len(set(neighbours(bundle_dir, sid)))
