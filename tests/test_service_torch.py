"""The torch engine (SIDREC_ENGINE=torch) and the torch top-k index (SIDREC_INDEX=torch): the
same user vectors, item vectors and rankings as ONNX Runtime and FAISS on the CPU, the service
end to end on them (recommend, cold-start ingestion), bundles without model.pt, and the same
engine on CUDA where PyTorch sees a GPU (CI has none: that test skips and says so)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_service_catalog import NEW_ITEM, add_history, neighbours, ranked
from test_service_ops import run_service

from sidrec.bundle import MANIFEST, TORCH_WEIGHTS, Bundle, BundleError, load_bundle, write_manifest
from sidrec.service.retrieval import IndexSpec, ItemTable
from sidrec.service.runtime import Engine, ProviderError, Runtime, load_engine
from sidrec.service.torch_engine import TorchRuntime

NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False; CI has none)"


@pytest.fixture(scope="module", params=["content-tower", "hybrid-sum"])
def bundle(request: pytest.FixtureRequest, bundle_dir: Path) -> Bundle:
    """The session's bundle (new items from a content tower) and a hybrid-sum one (new items
    from the SID plus the content part)."""
    if request.param == "hybrid-sum":
        bundle_dir = request.getfixturevalue("sum_run")[0]
    loaded = load_bundle(bundle_dir)
    if not loaded.lists(TORCH_WEIGHTS):
        pytest.skip(f"SIDREC_TEST_BUNDLE={bundle_dir} has no {TORCH_WEIGHTS} (an older export)")
    return loaded


@pytest.fixture(scope="module")
def onnx_engine(bundle: Bundle) -> Runtime:
    return Runtime(bundle, "cpu", threads=1)


def ragged_histories(
    bundle: Bundle, users: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, item vectors, timestamps, mask, query_time) of users with 1..max_len items,
    right padded as the batcher pads them."""
    rng = np.random.default_rng(seed)
    vectors = bundle.item_vectors()
    n_items, max_len = len(vectors) - 1, int(bundle.model["max_len"])
    lengths = [1, 2, max_len, *rng.integers(3, max_len, users - 3)]
    n = max(lengths)
    rows = np.zeros((users, n), np.int64)
    mask = np.zeros((users, n), np.bool_)
    for u, length in enumerate(lengths):
        rows[u, :length] = rng.integers(1, n_items + 1, length)
        mask[u, :length] = True
    start = 1_000_000_000 + rng.integers(0, 10**7, (users, 1))
    stamps = (start + rng.integers(60, 86_400, (users, n)).cumsum(1)) * mask
    query_time = stamps.max(1) + 3_600
    return rows, vectors[rows], stamps.astype(np.int64), mask, query_time.astype(np.int64)


def bundle_table(bundle: Bundle, index: IndexSpec) -> ItemTable:
    records = bundle.items()
    sids = np.zeros((len(records) + 1, len(records[0].sid)), np.int64)
    for r in records:
        sids[r.row] = r.sid
    codes = int(bundle.manifest["sid"]["codes"])
    ids = [r.item_id for r in records]
    return ItemTable(bundle.item_vectors(), ids, sids, codes, use_gpu=False, index=index)


def top_rows(table: ItemTable, users: np.ndarray, rows: np.ndarray, k: int = 10) -> list[list[int]]:
    excluded = [set(r[r > 0].tolist()) for r in rows]
    hits = table.search_batch(users, [k] * len(users), excluded)
    return [[row for row, _ in h] for h in hits]


def assert_same_as_onnx(engine: Engine, onnx_engine: Runtime, bundle: Bundle, tol: float) -> None:
    rows, vectors, stamps, mask, query_time = ragged_histories(bundle)
    expected = onnx_engine.encode_users(vectors, stamps, mask, query_time)
    got = engine.encode_users(vectors, stamps, mask, query_time)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert float(np.abs(got - expected).max()) < tol
    flat = bundle_table(bundle, IndexSpec("flat"))
    assert top_rows(flat, got, rows) == top_rows(flat, expected, rows)

    # SID -> vector: every bundle item's SID, and code tuples no item has (new items).
    codes = np.array([r.sid for r in bundle.items()], np.int64)
    rng = np.random.default_rng(1)
    unseen = rng.integers(0, int(bundle.manifest["sid"]["codes"]), (20, codes.shape[1]))
    codes = np.concatenate([codes, unseen])
    content = rng.standard_normal((len(codes), onnx_engine.content_dim)).astype(np.float32)
    expected_items = onnx_engine.new_item_vectors(codes, content)
    got_items = engine.new_item_vectors(codes, content)
    assert float(np.abs(got_items - expected_items).max()) < tol


def test_torch_engine_gives_onnx_runtimes_vectors_and_top10_on_cpu(
    bundle: Bundle, onnx_engine: Runtime
) -> None:
    engine = load_engine(bundle, "torch", "cpu", ort_threads=1, torch_threads=1)
    assert isinstance(engine, TorchRuntime) and engine.provider == "torch-cpu"
    assert (engine.max_len, engine.d, engine.content_dim) == (
        onnx_engine.max_len,
        onnx_engine.d,
        onnx_engine.content_dim,
    )
    assert_same_as_onnx(engine, onnx_engine, bundle, tol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_torch_engine_and_index_on_cuda(bundle: Bundle, onnx_engine: Runtime) -> None:
    engine = load_engine(bundle, "torch", "cuda", ort_threads=1)
    assert engine.provider == "torch-cuda"
    # float32 on the GPU (TF32 is off for matmuls by default), other kernels: a looser bound
    assert_same_as_onnx(engine, onnx_engine, bundle, tol=1e-4)
    flat = bundle_table(bundle, IndexSpec("flat"))
    on_gpu = bundle_table(bundle, IndexSpec("torch", device="cuda"))
    assert on_gpu.on_gpu and on_gpu.index_kind.startswith("torch-cuda")
    rows, vectors, stamps, mask, query_time = ragged_histories(bundle, seed=2)
    users = onnx_engine.encode_users(vectors, stamps, mask, query_time)
    assert top_rows(on_gpu, users, rows) == top_rows(flat, users, rows)
    new = users[0] * 3  # a new item right where user 0 looks
    on_gpu.upsert("gpu-new", np.zeros(flat.sids.shape[1], np.int64), new)
    assert on_gpu.search(users[0], 1, set())[0][0] == on_gpu.row("gpu-new")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: CUDA is not refused")
def test_cuda_without_a_gpu_is_refused_with_the_reason(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="SIDREC_DEVICE=cuda but PyTorch sees no CUDA GPU"):
        load_engine(bundle, "torch", "cuda")
    with pytest.raises(ProviderError, match="SIDREC_DEVICE=cuda"):
        IndexSpec("torch", device="cuda").build(8)
    done = run_service(bundle.path, tmp_path, engine="torch", device="cuda")
    assert done.returncode == 2 and "PyTorch sees no CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr


def test_torch_topk_ranks_like_faiss_exact_with_ingestion() -> None:
    rng = np.random.default_rng(0)
    d, n = 32, 5_000
    centres = rng.normal(size=(40, d))
    raw = centres[rng.integers(0, 40, n + 1)] + 0.5 * rng.normal(size=(n + 1, d))
    raw[0] = 0.0
    vectors = raw.astype(np.float32)
    sids = np.zeros((n + 1, 3), np.int64)
    ids = [f"i{r}" for r in range(1, n + 1)]
    faiss_table = ItemTable(vectors, ids, sids, 4, use_gpu=False, index=IndexSpec("flat"))
    torch_table = ItemTable(vectors, ids, sids, 4, use_gpu=False, index=IndexSpec("torch"))
    assert torch_table.index_kind.startswith("torch-cpu") and not torch_table.on_gpu

    def compare(queries: np.ndarray, k: int, excluded: list[set[int]]) -> None:
        expected = faiss_table.search_batch(queries, [k] * len(queries), excluded)
        got = torch_table.search_batch(queries, [k] * len(queries), excluded)
        for e, g in zip(expected, got, strict=True):
            assert [r for r, _ in g] == [r for r, _ in e]
            assert np.allclose([s for _, s in g], [s for _, s in e], atol=1e-5)

    queries = raw[rng.integers(1, n + 1, 64)] + 0.3 * rng.normal(size=(64, d))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    histories = [set(rng.integers(1, n + 1, 50).tolist()) for _ in range(64)]
    compare(queries, 10, [set()] * 64)
    compare(queries, 10, histories)
    compare(queries[:3], 200, histories[:3])

    # Items ingested while serving: more than the torch buffer held (it grows), one of them
    # re-ingested with another vector (its old row dead); both indexes stay in step.
    for i in range(3 * n // 2):
        vector = rng.normal(size=d).astype(np.float32)
        for table in (faiss_table, torch_table):
            assert table.upsert(f"new-{i}", np.zeros(3, np.int64), vector)
    moved = -faiss_table.vectors[faiss_table.row("new-0")]
    for table in (faiss_table, torch_table):
        assert not table.upsert("new-0", np.ones(3, np.int64), moved)
        assert table.dead == 1 and table.size == n + 1 + 3 * n // 2 + 1
    assert torch_table.index.ntotal == torch_table.size
    compare(queries, 10, histories)
    target = moved / np.linalg.norm(moved)
    compare(target[None, :], 5, [set()])
    assert torch_table.search(target, 1, set())[0][0] == torch_table.row("new-0")


def test_a_bundle_without_model_pt_serves_with_onnx_and_names_it_for_torch(
    bundle: Bundle, tmp_path: Path
) -> None:
    old = tmp_path / "old-bundle"
    old.mkdir()
    for path in bundle.path.iterdir():
        if path.name not in (TORCH_WEIGHTS, MANIFEST):
            (old / path.name).symlink_to(path.resolve())  # no copy of the 90 MB encoder
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    write_manifest(old, {k: v for k, v in manifest.items() if k != "files"})
    loaded = load_bundle(old)
    assert not loaded.lists(TORCH_WEIGHTS)
    engine = load_engine(loaded, "onnx", "cpu", ort_threads=1)
    _, vectors, stamps, mask, query_time = ragged_histories(loaded, users=4)
    assert engine.encode_users(vectors, stamps, mask, query_time).shape == (4, engine.d)
    with pytest.raises(BundleError, match=r"SIDREC_ENGINE=torch needs model\.pt") as e:
        load_engine(loaded, "torch", "cpu")
    assert "SIDREC_ENGINE=onnx" in str(e.value) and str(old) in str(e.value)
    done = run_service(old, tmp_path, engine="torch")  # the service stops, naming the file
    assert done.returncode == 2 and "needs model.pt" in done.stderr
    assert "Traceback" not in done.stderr


def test_service_on_the_torch_engine_and_index_recommends_like_onnx_and_ingests(
    start_service: Any, bundle: Bundle, bundle_dir: Path
) -> None:
    torch_service = start_service(engine="torch", index="torch", device="cpu", torch_threads=1)
    ready = torch_service.get("/readyz").json()
    assert ready["provider"] == "torch-cpu" and ready["index"].startswith("torch-cpu"), ready
    metrics = torch_service.get("/metrics").text
    assert 'provider="torch-cpu"' in metrics

    onnx_service = start_service()
    items = bundle.items()
    rng = np.random.default_rng(3)
    for length in (1, 17, 60):
        picked = rng.choice(len(items), length, replace=False)
        history = [
            {"item_id": items[i].item_id, "ts": 1_200_000_000 + 3_600 * n}
            for n, i in enumerate(picked)
        ]
        body = {"history": history, "k": 10, "query_time": 1_300_000_000}
        answers = [s.post("/v1/recommend", body) for s in (torch_service, onnx_service)]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        got, expected = (a.json()["items"] for a in answers)
        assert [i["item_id"] for i in got] == [i["item_id"] for i in expected]
        assert np.allclose([i["score"] for i in got], [i["score"] for i in expected], atol=1e-5)

    # Cold start through the torch engine: text -> SID -> vector (model.pt) -> torch index.
    item = {**NEW_ITEM, "item_id": "torch-new-scifi"}
    r = torch_service.post("/v1/items", item)
    assert r.status_code == 200, r.text
    sid = r.json()["items"][0]["sid"]
    add_history(torch_service, "torch-scifi-fan", neighbours(bundle_dir, sid))
    assert item["item_id"] in ranked(torch_service, "torch-scifi-fan", 40)
    assert torch_service.get(f"/v1/items/{item['item_id']}").status_code == 200
