"""Offline and online compute the same thing: one history through the offline evaluator's
scorer (PyTorch, the trained checkpoint) and through the HTTP service (ONNX + FAISS) gives the
same top-k with the same scores, for a cosine bundle with a content tower (the session's), a
dot-scored id one (the short-history defaults), a dot-scored hybrid-sum one with a content
part and a new-item scale (the demo's) and that one again with a content term for new items
(on the content vectors, and on them and the items' genres)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _RUN, Service, sidrec_cache

from sidrec.bundle import load_bundle
from sidrec.content_term import ContentTerm
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


TERM_WEIGHT = 3.0  # large, so that new items reach the top K of most histories
RARE_WEIGHT = 1.0  # the rarely trained items' term: the rarest quarter of trained items


def _term_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    sum_run: tuple[Path, Path],
    item_features: bool,
    centred: bool,
    half_life: float | None = None,
    warm_weight: float = 0.0,
) -> tuple[Path, Path]:
    """(bundle, checkpoint) of the hybrid-sum run with its new items' content-term weight set
    to TERM_WEIGHT and its rarest trained quarter's to RARE_WEIGHT (whatever its calibration
    chose), the term reading the items' genres beside their content vectors where
    `item_features` and taken about the catalog's mean where `centred`, the history's events
    weighted by `half_life`, every other trained item's weight `warm_weight`, exported again."""
    from sidrec.item_features import ItemFeatures
    from sidrec.offline import pipeline
    from sidrec.offline.train import load_checkpoint

    source = sum_run[1].parent.parent.parent  # root/run/hybrid-sum/checkpoint.pt -> root
    root = tmp_path_factory.mktemp("term")
    shutil.copytree(source / "run", root / "run")
    record_path = root / "run" / "hybrid-sum" / "new_items.json"
    record = json.loads(record_path.read_text())
    assert "content_term" in record and "rare_term" in record  # calibration chose them
    counts = np.asarray(load_checkpoint(sum_run[1])[2]["train_counts"])
    rare_count = int(np.quantile(counts[counts > 0], 0.25))
    with sidrec_cache(_RUN.get("cache", source / "cache")):  # MiniLM's export
        steps = pipeline.Steps.open(source / "data", root / "run")
        features = ItemFeatures.fit(steps.data.catalog.fields) if item_features else None
        term = ContentTerm(TERM_WEIGHT, RARE_WEIGHT, rare_count, features, half_life=half_life,
                           warm_weight=warm_weight)  # fmt: skip
        if centred:
            term = term.centred_on(steps.content_vectors, steps.data.catalog.fields)
        record_path.write_text(json.dumps({**record, **term.record()}))
        bundle = steps.export("hybrid-sum", root / "bundle")
    loaded = load_bundle(bundle)
    assert loaded.content_term == term and loaded.lists("item_content.npy")
    assert sum(0 < r.popularity <= rare_count for r in loaded.items()) > 0
    content = loaded.item_content()
    width = loaded.manifest["content"]["dim"] + (features.dim if features else 0)
    assert content is not None and content.shape == (len(loaded.items()) + 1, width)
    return bundle, root / "run" / "hybrid-sum" / "checkpoint.pt"


@pytest.fixture(scope="module")
def term_run(
    tmp_path_factory: pytest.TempPathFactory, sum_run: tuple[Path, Path]
) -> tuple[Path, Path]:
    """The hybrid-sum run with a content term (_term_bundle) on the content vectors, not
    centred (as bundles exported before the twenty-ninth session)."""
    return _term_bundle(tmp_path_factory, sum_run, item_features=False, centred=False)


@pytest.fixture(scope="module")
def features_term_run(
    tmp_path_factory: pytest.TempPathFactory, sum_run: tuple[Path, Path]
) -> tuple[Path, Path]:
    """The hybrid-sum run with a content term (_term_bundle) on the content vectors and the
    items' genres (the synthetic catalog names them), centred as calibration centres it, the
    history's latest events weighing most (a half-life of 2 events), every other trained item
    with a warm term."""
    return _term_bundle(tmp_path_factory, sum_run, item_features=True, centred=True,
                        half_life=2.0, warm_weight=0.5)  # fmt: skip


@pytest.fixture(
    scope="module",
    params=["session", "dot", "hybrid-sum", "content-term", "content-term-features"],
)
def served(request: pytest.FixtureRequest, bundle_dir: Path) -> tuple[Path, Path]:
    """(bundle, its checkpoint): the session's (cosine, a content tower), a dot id model's, a
    dot hybrid-sum model's and that one with a content term, on the content vectors and on
    them and the items' genres (centred, by recency)."""
    if request.param == "dot":
        return request.getfixturevalue("dot_run")
    if request.param == "hybrid-sum":
        return request.getfixturevalue("sum_run")
    if request.param == "content-term":
        return request.getfixturevalue("term_run")
    if request.param == "content-term-features":
        return request.getfixturevalue("features_term_run")
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
    # the run's content vectors (pipeline.Steps writes them), for a content tower's rows or
    # a content term
    content_path = checkpoint_path.parent.parent / "content_vectors.npy"
    content = np.load(content_path) if content_path.is_file() else None
    # the catalog's fields, as exported, for a term that reads the items' genres
    fields = [r.fields for r in load_bundle(served[0]).items()]
    return served_scorer(checkpoint_path, content, fields)


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
    term = load_bundle(bundle).content_term
    if term.active and make_history in (theme, mixed):
        # the term is exercised: new items (no trained id) are among the K
        popularity = {i["item_id"]: i["popularity"] for i in items}
        assert any(popularity[i] == 0 for i, _ in online)
        if term.rare_weight == RARE_WEIGHT:  # term_run's: and rarely trained ones
            assert any(0 < popularity[i] <= term.rare_max_count for i, _ in online)
    assert np.allclose([s for _, s in online], sorted(offline.values(), reverse=True), atol=1e-4)
    # The same items in the same order; only items whose scores tie within 1e-4 may swap.
    for (online_id, online_score), offline_id in zip(online, offline, strict=True):
        if online_id != offline_id:
            assert abs(offline.get(online_id, -9.0) - online_score) < 1e-4, (offline, online)


def test_ingested_items_get_the_content_term_and_keep_it_across_a_restart(
    term_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """An item ingested with the content vector of an untrained bundle item Y gets Y's vector
    and so, with the content term, Y's score: W * cos(history's mean content, its content)
    above what the index alone gives it. A restart rebuilds it from Redis with its term."""
    from conftest import RedisServer

    bundle_path = term_run[0]
    bundle = load_bundle(bundle_path)
    content = bundle.item_content()
    assert content is not None
    items = [json.loads(line) for line in (bundle_path / "items.jsonl").read_text().splitlines()]
    history_rows = theme(items, np.random.default_rng(0))
    mean = content[history_rows].mean(0)
    mean /= np.linalg.norm(mean)
    untrained = [i["row"] for i in items if i["popularity"] == 0 and i["row"] not in history_rows]
    twin_of = max(untrained, key=lambda r: float(content[r] @ mean))
    lift = bundle.content_term.new_weight * float(content[twin_of] @ mean)
    assert lift > 0.05  # the term is worth testing for
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    service = Service(bundle_path, tmp_path / "service.log", redis_url=redis.url)
    try:
        service.start()
        r = service.post(
            "/v1/items", {"item_id": "twin", "content_vector": content[twin_of].tolist()}
        )
        assert r.status_code == 200, r.text
        history = [items[r - 1]["item_id"] for r in history_rows]

        def scores() -> dict[str, float]:
            r = service.post("/v1/recommend", {"history": history, "k": 1000})
            assert r.status_code == 200, r.text
            return {i["item_id"]: i["score"] for i in r.json()["items"]}

        before = scores()
        assert before["twin"] == pytest.approx(before[items[twin_of - 1]["item_id"]], abs=1e-4)
        service.stop()
        service.start()
        assert scores()["twin"] == pytest.approx(before["twin"], abs=1e-5)
    finally:
        service.stop()
        redis.stop()


def test_an_ingested_item_reads_its_genres_in_the_content_term(
    features_term_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """A bundle whose content term reads the items' genres beside their content vectors
    (model.content_term_features), about the catalog's mean (model.content_term_centre), the
    history weighted by recency (model.content_term_half_life): an
    item ingested with an untrained bundle item's content vector and fields scores as that
    item, the service extending and centring its vector as the export did; sent under another
    theme's genres, its term follows those genres."""
    bundle_path, checkpoint = features_term_run
    bundle = load_bundle(bundle_path)
    term = bundle.content_term
    assert term.features is not None and term.features.genres and term.centre is not None
    extended = bundle.item_content()  # [n + 1, C + F]
    plain = np.load(checkpoint.parent.parent / "content_vectors.npy")  # row r at r - 1
    assert extended is not None
    items = bundle.items()
    history_rows = theme([{"row": r.row, "text": r.text} for r in items], np.random.default_rng(0))
    # the history's content vector, its latest events weighing most (the term's half-life)
    assert term.half_life is not None
    mean = term.history_weights(len(history_rows)) @ extended[history_rows]
    mean /= np.linalg.norm(mean)
    untrained = [r for r in items if r.popularity == 0 and r.row not in history_rows]
    twin = max(untrained, key=lambda r: float(extended[r.row] @ mean))
    genres = sorted({r.fields["genres"] for r in items})
    recast = {**twin.fields, "genres": next(g for g in genres if g != twin.fields["genres"])}
    lift = {
        name: term.new_weight * float(term.vectors(plain[twin.row - 1][None, :], [f])[0] @ mean)
        for name, f in (("copy", twin.fields), ("recast", recast))
    }
    assert lift["copy"] == pytest.approx(term.new_weight * float(extended[twin.row] @ mean))
    assert abs(lift["copy"] - lift["recast"]) > 1e-3  # the genres move the term
    service = Service(bundle_path, tmp_path / "service.log")
    service.start()
    try:
        vector = plain[twin.row - 1].tolist()
        for name, fields in (("copy", twin.fields), ("recast", recast)):
            body = {"item_id": name, "content_vector": vector, "fields": fields}
            assert service.post("/v1/items", body).status_code == 200
        history = [items[r - 1].item_id for r in history_rows]
        r = service.post("/v1/recommend", {"history": history, "k": 1000})
        assert r.status_code == 200, r.text
        scores = {i["item_id"]: i["score"] for i in r.json()["items"]}
    finally:
        service.stop()
    assert scores["copy"] == pytest.approx(scores[twin.item_id], abs=1e-4)
    if bundle.item_features is None:  # the new-item graph reads the content vector alone
        moved = scores["recast"] - scores["copy"]
        assert moved == pytest.approx(lift["recast"] - lift["copy"], abs=1e-4)
    else:
        assert abs(scores["recast"] - scores["copy"]) > 1e-3
