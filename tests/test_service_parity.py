"""Offline and online compute the same thing: one history through the offline evaluator's
scorer (PyTorch, the trained checkpoint) and through the HTTP service (ONNX + FAISS) gives the
same top-k with the same scores, for a cosine bundle with a content tower (the session's), a
dot-scored id one (the short-history defaults) and a dot-scored hybrid-sum one with a content
part and a new-item scale (the demo's)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Service

from sidrec.bundle import load_bundle
from sidrec.offline.evaluate import EvalBatch, Scorer
from sidrec.offline.tower import served_scorer

K = 20


@pytest.fixture(scope="module")
def dot_run(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> tuple[Path, Path]:
    """(bundle, checkpoint) of an id model trained with the pipeline's short-history defaults
    on the session's synthetic data: scored by dot product, d=64, a 50-item history."""
    from conftest import train_synthetic_bundle

    root = tmp_path_factory.mktemp("dot")
    cache = bundle_dir.parent / "cache"  # the session pipeline's MiniLM export, if it made one
    bundle = train_synthetic_bundle(
        root, "id", cache if cache.is_dir() else root / "cache", recommended_settings=True
    )
    assert load_bundle(bundle).model["scoring"] == "dot"  # 15-30 events per user: short
    return bundle, root / "run" / "id" / "checkpoint.pt"


@pytest.fixture(scope="module", params=["session", "dot", "hybrid-sum"])
def served(request: pytest.FixtureRequest, bundle_dir: Path) -> tuple[Path, Path]:
    """(bundle, its checkpoint): the session's (cosine, a content tower), a dot id model's and
    a dot hybrid-sum model's."""
    if request.param == "dot":
        return request.getfixturevalue("dot_run")
    if request.param == "hybrid-sum":
        return request.getfixturevalue("sum_run")
    return bundle_dir, request.getfixturevalue("checkpoint_path")


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, served: tuple[Path, Path]
) -> Iterator[Service]:
    svc = Service(served[0], tmp_path_factory.mktemp("parity") / "service.log")
    svc.start()  # in-process store: a history override never reads it
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def scorer(served: tuple[Path, Path]) -> Scorer:
    checkpoint_path = served[1]
    # the run's content vectors (pipeline.Steps writes them), for a content tower's rows
    content_path = checkpoint_path.parent.parent / "content_vectors.npy"
    content = np.load(content_path) if content_path.is_file() else None
    return served_scorer(checkpoint_path, content)


def theme(items: list[dict], _rng: np.random.Generator) -> list[int]:
    rows = [i["row"] for i in items if "Sci-Fi" in i["text"]]
    return (rows or [i["row"] for i in items])[:12]


def mixed(items: list[dict], rng: np.random.Generator) -> list[int]:
    return [int(r) for r in rng.choice(len(items), 25, replace=False) + 1]


def single(items: list[dict], _rng: np.random.Generator) -> list[int]:
    return [items[-1]["row"]]


def long_with_repeats(items: list[dict], rng: np.random.Generator) -> list[int]:
    return [int(r) for r in rng.choice(len(items), 150, replace=True) + 1]


@pytest.mark.parametrize("make_history", [theme, mixed, single, long_with_repeats])
def test_offline_scorer_and_http_agree(
    make_history: Callable[[list[dict], np.random.Generator], list[int]],
    scorer: Scorer,
    service: Service,
    served: tuple[Path, Path],
) -> None:
    bundle = served[0]
    items = [json.loads(line) for line in (bundle / "items.jsonl").read_text().splitlines()]
    # a history override holds at most the model's max_len events (50 for the dot model)
    rows = make_history(items, np.random.default_rng(0))[
        -int(load_bundle(bundle).model["max_len"]) :
    ]
    ts = [1_000_000_000 + 3_600 * n for n in range(len(rows))]
    query_time = ts[-1] + 7_200

    batch = EvalBatch(
        users=torch.zeros(1, dtype=torch.long),
        items=torch.tensor([rows]),
        timestamps=torch.tensor([ts]),
        mask=torch.ones(1, len(rows), dtype=torch.bool),
        query_time=torch.tensor([query_time]),
        full_history=torch.tensor([rows]),
    )
    scores = scorer(batch)[0].numpy().astype(np.float64)  # [n + 1]
    scores[0] = -np.inf
    scores[rows] = -np.inf  # the evaluator ranks without the history's items
    offline_rows = np.argsort(-scores, kind="stable")[:K]
    offline = {items[r - 1]["item_id"]: float(scores[r]) for r in offline_rows}

    history = [{"item_id": items[r - 1]["item_id"], "ts": t} for r, t in zip(rows, ts, strict=True)]
    r = service.post("/v1/recommend", {"history": history, "k": K, "query_time": query_time})
    assert r.status_code == 200, r.text
    online = [(i["item_id"], i["score"]) for i in r.json()["items"]]

    assert len(online) == K
    assert np.allclose([s for _, s in online], sorted(offline.values(), reverse=True), atol=1e-4)
    # The same items in the same order; only items whose scores tie within 1e-4 may swap.
    for (online_id, online_score), offline_id in zip(online, offline, strict=True):
        if online_id != offline_id:
            assert abs(offline.get(online_id, -9.0) - online_score) < 1e-4, (offline, online)
