"""The approximate (HNSW) retrieval index chosen by SIDREC_INDEX, and the serving benchmark
script (loadtests/serving_bench.py) run end to end with tiny sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RedisServer
from test_service_catalog import NEW_ITEM, add_history, neighbours, ranked

from sidrec.service.retrieval import IndexSpec, ItemTable

REPO = Path(__file__).resolve().parents[1]
PEERS = ("naive", "ort")  # the serving benchmark's peers of sidrec, in the order it runs them


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


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The benchmark's markdown table as dicts keyed by column name."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for line in lines[1:]
    ]


def test_serving_bench_prints_every_row_with_sane_numbers(
    bundle_dir: Path, checkpoint_path: Path
) -> None:
    args = ["--bundle", str(bundle_dir), "--checkpoint", str(checkpoint_path)]
    args += ["--users", "20", "--history-len", "30", "--requests", "60", "--duration", "1"]
    args += ["--concurrency", "1,4", "--rate", "40", "--rate-duration", "1"]
    args += ["--scales", "3000", "--vectors", "uniform", "--scale-queries", "60"]
    args += ["--ef-search", "16,64"]
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.serving_bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert first == "$ python -m loadtests.serving_bench " + " ".join(args), first
    rows = table_rows(done.stdout)
    by_name = {(r["section"], r["measurement"]): r for r in rows}

    def num(row: dict[str, str], column: str) -> float:
        return float(row[column])

    floor = [r for r in rows if r["section"] == "floor"]
    assert [r["measurement"].split(" ")[0] for r in floor] == [
        "Redis",
        "item",
        "ONNX",
        "FAISS",
        "total",
    ]
    for r in floor:
        assert 0 < num(r, "p50 ms") <= num(r, "p99 ms") < 1000, r
    assert num(floor[-1], "p50 ms") >= max(num(r, "p50 ms") for r in floor[:-1])

    measured = [
        ("sidrec", f"POST {route} concurrency {c}")
        for route in ("/v1/recommend", "/v1/items")
        for c in (1, 4)
    ]
    measured += [
        (section, f"POST /v1/recommend concurrency {c}")
        for section in ("sidrec-uncached", *PEERS)
        for c in (1, 4)
    ]
    measured += [
        (ours, "POST /v1/recommend open loop 40 rps") for ours in ("sidrec", "sidrec-uncached")
    ]
    for key in measured:
        r = by_name[key]
        assert r["errors"] == "0" and int(r["n"]) > 0, r
        assert 0 < num(r, "p50 ms") <= num(r, "p95 ms") <= num(r, "p99 ms") < 5000, r
        assert num(r, "req/s") > 0 and num(r, "cpu ms/req") > 0, r

    # The ORT peer answers every user with sidrec's top 10 (same ids, same order).
    agree = by_name[("ort", "top-10 ids equal to sidrec's (20 users, same query_time)")]
    assert num(agree, "value") == 1.0 and agree["n"] == "20", agree

    ratios = [r for r in rows if r["section"] == "ratio"]
    # e2e / floor for sidrec and sidrec without its user cache; then for each of them, per
    # peer: two levels, CPU per request, peaks
    assert len(ratios) == 2 + 2 * 4 * len(PEERS), ratios
    assert [r["measurement"] for r in ratios[6:10]] == [
        "sidrec / ORT peer throughput, concurrency 1",
        "sidrec / ORT peer throughput, concurrency 4",
        "ORT peer / sidrec CPU per request (best level each)",
        "peak sidrec / peak ORT peer throughput (best level each)",
    ]
    assert ratios[-1]["measurement"] == (
        "peak sidrec-uncached / peak ORT peer throughput (best level each)"
    )
    for ratio, section in zip(ratios[:2], ("sidrec", "sidrec-uncached"), strict=True):
        single = by_name[(section, "POST /v1/recommend concurrency 1")]
        assert num(ratio, "value") == pytest.approx(
            num(single, "p50 ms") / num(floor[-1], "p50 ms"),
            rel=0.05,  # cells are rounded
        )
    assert all(num(r, "value") > 0 for r in ratios)

    scale = [r for r in rows if r["section"] == "scale"]
    assert len(scale) == 2 + 2 * 2  # flat, then each efSearch; without and with exclusions
    for r in scale:
        assert 0 <= num(r, "value") <= 1 and 0 < num(r, "p99 ms") < 1000, r
    assert {num(r, "value") for r in scale if "flat" in r["measurement"]} == {1.0}
    assert num(by_name[("scale", "3,000 uniform, hnsw M=32 efSearch=64, k=10")], "value") > 0.8
    assert "targets:" in done.stdout and "e2e p50 / floor p50 (sidrec-uncached)" in done.stdout
    for line in (
        "sidrec / ORT peer throughput (peaks)",
        "ORT peer / sidrec CPU per request",
        "sidrec-uncached / ORT peer throughput (peaks)",
        "ORT peer / sidrec-uncached CPU per request",
    ):
        assert f"- {line}: " in done.stdout and f"- {line}: not measured" not in done.stdout
    assert "- ORT peer returns sidrec's top-10 ids: 100% of 20 users" in done.stdout


def test_ort_peer_imports_without_torch_or_sidrec() -> None:
    # The honest peer is what one writes from docs/bundle.md alone: no PyTorch, no sidrec code.
    code = (
        "import sys; sys.modules['torch'] = None; import loadtests.ort_service; "
        "assert not [m for m in sys.modules if m.startswith('sidrec')], 'sidrec imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_encoder_graph_bench_compares_todays_graph_with_the_forms_it_replaced() -> None:
    # run as documented (the repository root on the path); it asserts the graphs agree
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.encoder_graph_bench", "--repeats", "4"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 8", "batch 32"], done.stdout
    assert all("today" in line and "all rows" in line and "gathered bias" in line for line in lines)


def test_encoder_depth_bench_times_each_depth_against_the_first() -> None:
    # run as documented; every depth's graph must give one vector a user (asserted inside)
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.encoder_depth_bench", "--blocks", "1,3",
         "--repeats", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch 1", "batch 8", "batch 32"], done.stdout
    assert all("1 blocks" in line and "(1.00x)" in line and "3 blocks" in line for line in lines)


def test_content_term_bench_times_the_same_table_with_and_without_the_term() -> None:
    # run as documented; both tables rank a request (figures are printed, not asserted on)
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.content_term_bench", "--items", "500",
         "--requests", "40", "--history", "20", "--term-share", "0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert [line.split(" p50")[0].strip() for line in lines[:2]] == ["without term", "with term"]
    assert "(50 rows with the term)" in lines[2]


def test_faiss_threads_bench_searches_at_each_setting_from_every_thread() -> None:
    # run as documented; a setting the searching threads did not get stops the script
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.faiss_threads_bench", "--items", "500",
         "--history", "20", "--batch", "1,4", "--faiss", "0,3", "--seconds", "0.2",
         "--rounds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    names = [line.split(" p50")[0].strip() for line in done.stdout.splitlines()]
    assert names == [
        "faiss default, batch 1", "faiss 3, batch 1", "faiss default, batch 4", "faiss 3, batch 4"
    ]  # fmt: skip
    assert all("batches/s" in line for line in done.stdout.splitlines())
