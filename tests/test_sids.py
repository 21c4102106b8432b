"""SID codebooks and residual k-means: determinism, uniqueness, new-item assignment, report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from sidrec.offline.sids import build_sids, default_sid_shape, print_sid_report, sid_report
from sidrec.sid_codebook import Codebooks, CodePaths, codebook_usage, dedup_digits

LAYERS, CODES = 3, 8


def clustered_vectors(n: int = 600, dim: int = 32, topics: int = 12, seed: int = 0):
    """Unit vectors around `topics` centres (like content vectors), and each one's topic."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim))
    topic = rng.integers(0, topics, size=n)
    x = centres[topic] + 0.5 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), topic


def reference_assign(
    vectors: np.ndarray, centroids: np.ndarray, normalize: bool, paths: np.ndarray | None = None
) -> np.ndarray:
    """The RQ rule written out item by item, independent of sid_codebook's vectorised code;
    with `paths`, each layer takes the nearest centroid among the codes that some path
    continues the prefix with, found by looking the paths up one by one."""
    out = np.zeros((len(vectors), len(centroids)), dtype=np.int64)
    for i, v in enumerate(vectors.astype(np.float64)):
        r = v
        for layer, c in enumerate(centroids.astype(np.float64)):
            if normalize:
                r = r / max(np.linalg.norm(r), 1e-12)
            allowed = np.arange(len(c))
            if paths is not None:
                prefix = out[i, :layer]
                allowed = np.unique([p[layer] for p in paths if (p[:layer] == prefix).all()])
            out[i, layer] = allowed[int(np.argmin(((c[allowed] - r) ** 2).sum(axis=1)))]
            r = r - c[out[i, layer]]
    return out


def test_dedup_digits_hand_example() -> None:
    codes = np.array([[1, 2, 3], [1, 2, 3], [0, 0, 0], [1, 2, 3], [0, 0, 0], [5, 5, 5], [1, 2, 4]])
    assert dedup_digits(codes).tolist() == [0, 1, 0, 2, 1, 0, 0]
    assert dedup_digits(np.zeros((0, 3), dtype=np.int64)).tolist() == []


def test_default_sid_shape() -> None:
    assert default_sid_shape(1682) == (3, 32)  # ML-100K
    assert default_sid_shape(3883) == (3, 64)  # ML-1M
    assert default_sid_shape(27278) == (3, 128)  # ML-20M
    assert default_sid_shape(20) == (3, 8)  # clamped below
    assert default_sid_shape(10_000_000) == (3, 256)  # clamped above


@pytest.mark.parametrize("normalize", [False, True])
def test_build_is_deterministic_and_unique(normalize: bool) -> None:
    x, _ = clustered_vectors()
    books_a, sids_a = build_sids(x, LAYERS, CODES, normalize_residuals=normalize, seed=3)
    books_b, sids_b = build_sids(x, LAYERS, CODES, normalize_residuals=normalize, seed=3)
    np.testing.assert_array_equal(books_a.centroids, books_b.centroids)
    np.testing.assert_array_equal(sids_a, sids_b)
    # A different seed is a different clustering (so the equality above is not vacuous).
    books_c, _ = build_sids(x, LAYERS, CODES, normalize_residuals=normalize, seed=4)
    assert not np.array_equal(books_a.centroids, books_c.centroids)

    assert sids_a.shape == (len(x) + 1, LAYERS + 1) and sids_a.dtype == np.int64
    assert not sids_a[0].any()  # padding row
    assert sids_a[1:, :LAYERS].min() >= 0 and sids_a[1:, :LAYERS].max() < CODES
    assert len(np.unique(sids_a[1:], axis=0)) == len(x)  # every full SID unique
    np.testing.assert_array_equal(sids_a[1:, LAYERS], dedup_digits(sids_a[1:, :LAYERS]))
    assert books_a.normalize_residuals is normalize
    # The build codes follow the rule as written out item by item.
    np.testing.assert_array_equal(
        sids_a[1:, :LAYERS], reference_assign(x, books_a.centroids, normalize)
    )


def test_normalized_residuals_change_the_codes() -> None:
    x, _ = clustered_vectors()
    plain, sids_plain = build_sids(x, LAYERS, CODES, normalize_residuals=False)
    normed, sids_normed = build_sids(x, LAYERS, CODES, normalize_residuals=True)
    # Inputs are unit vectors, so layer 1 sees the same data; deeper layers see residuals
    # rescaled to unit length, so their centroids are much longer than the raw ones.
    deep_plain = np.linalg.norm(plain.centroids[1:], axis=-1).mean()
    deep_normed = np.linalg.norm(normed.centroids[1:], axis=-1).mean()
    assert deep_normed > 1.5 * deep_plain
    assert not np.array_equal(sids_plain[1:, 1:LAYERS], sids_normed[1:, 1:LAYERS])


@pytest.mark.parametrize("normalize", [False, True])
def test_new_items_get_build_codes(tmp_path: Path, normalize: bool) -> None:
    x, _ = clustered_vectors()
    books, sids = build_sids(x, LAYERS, CODES, normalize_residuals=normalize)
    path = tmp_path / "sid_codebooks.npz"
    books.save(path)
    assert path.exists()  # no ".npz" appended twice
    with np.load(path) as z:
        assert set(z.files) == {"centroids", "normalize_residuals"}
        assert z["centroids"].dtype == np.float32
    loaded = Codebooks.load(path)
    assert loaded.normalize_residuals is normalize
    assert (loaded.layers, loaded.codes, loaded.dim) == (LAYERS, CODES, x.shape[1])
    # The catalog at once, and one item at a time as the service ingests them.
    np.testing.assert_array_equal(loaded.assign(x), sids[1:, :LAYERS])
    singles = np.concatenate([loaded.assign(x[i : i + 1]) for i in range(50)])
    np.testing.assert_array_equal(singles, sids[1:51, :LAYERS])
    # A slightly edited copy of an item lands on that item's codes.
    rng = np.random.default_rng(1)
    noisy = x[:50] + 1e-4 * rng.normal(size=x[:50].shape).astype(np.float32)
    np.testing.assert_array_equal(loaded.assign(noisy)[:, :2], sids[1:51, :2])
    assert (loaded.assign(noisy) == sids[1:51, :LAYERS]).all(axis=1).mean() >= 0.95


def test_assign_rejects_wrong_dim() -> None:
    books = Codebooks(np.zeros((2, 4, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        books.assign(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        Codebooks(np.zeros((4, 8), dtype=np.float32))


def test_duplicates_get_dedup_digits() -> None:
    x, _ = clustered_vectors(n=200)
    x = np.concatenate([x, x[:3], x[:1]])  # rows 201-203 copy rows 1-3, row 204 copies row 1
    _, sids = build_sids(x, LAYERS, CODES)
    assert len(np.unique(sids[1:], axis=0)) == len(x)
    np.testing.assert_array_equal(sids[201:204, :LAYERS], sids[1:4, :LAYERS])
    assert sids[1, LAYERS] < sids[201, LAYERS] < sids[204, LAYERS]


def test_build_rejects_more_codes_than_items() -> None:
    x, _ = clustered_vectors(n=5)
    with pytest.raises(ValueError, match="5 items"):
        build_sids(x, LAYERS, CODES)


def test_sid_report_hand_example() -> None:
    # 6 items, L=2, K=4. Tuples: (0,1) x3, (2,3) x1, (1,0) x2. First code 0 = comedies.
    codes = np.array([[0, 1], [0, 1], [2, 3], [0, 1], [1, 0], [1, 0]])
    sids = np.zeros((7, 3), dtype=np.int64)
    sids[1:, :2] = codes
    sids[1:, 2] = dedup_digits(codes)
    books = Codebooks(np.zeros((2, 4, 5), dtype=np.float32))
    genres = [("Comedy",), ("Comedy", "Drama"), ("Horror",), ("Comedy",), ("War",), ("Drama",)]
    report = sid_report(sids, genres, books)
    json.dumps(report)  # the caller saves it as JSON
    assert [r["codes_used"] for r in report["per_layer"]] == [3, 3]
    assert [r["usage_ratio"] for r in report["per_layer"]] == [0.75, 0.75]
    assert codebook_usage(codes, 4) == [0.75, 0.75]
    assert [r["distinct_prefixes"] for r in report["per_layer"]] == [3, 3]
    assert report["collision_rate"] == pytest.approx(5 / 6)
    assert report["largest_group"] == 3
    assert report["max_dedup_digit"] == 2
    assert report["unique_full_sids"] is True
    first = report["genre_coherence"]["prefix_1"]
    # Same first code: 3 comedy pairs (all share) + 1 war/drama pair (doesn't) -> 3 / 4.
    assert first["pairs"] == 4 and first["same_prefix"] == pytest.approx(0.75)
    # Random distinct pairs: 4 of the 15 pairs share a genre -> ~0.267.
    assert first["random"] == pytest.approx(4 / 15, abs=0.02)
    assert first["lift"] == pytest.approx(0.75 / first["random"])
    assert sid_report(sids, None, books)["genre_coherence"] is None

    out = io.StringIO()
    print_sid_report(report, Console(file=out, width=120))
    text = out.getvalue()
    assert "3 / 4" in text and "75.0%" in text and "largest group: 3" in text
    assert "Genre coherence: pairs sharing a genre" in text
    # The collision line says what the dedup digit does, and where to read more (wrapped to
    # the console's width, so read with line ends as spaces).
    text = " ".join(text.split())
    assert "the dedup digit gives each a distinct full SID" in text
    assert "new ones by their content: the content tower (hybrid-tower) or hybrid-sum's" in text
    assert 'docs/internals.md, "Content and SIDs"' in text

    # No genres at all (a generic items file without a genres column): one line, no table.
    no_genres = sid_report(sids, [()] * 6, books)
    assert no_genres["genre_coherence"] is None
    out = io.StringIO()
    print_sid_report(no_genres, Console(file=out, width=120))
    text = out.getvalue()
    assert "Genre coherence: not measured, the data has no genres for its items" in text
    assert "pairs sharing a genre" not in text and "same prefix" not in text


def test_codes_follow_topics() -> None:
    # Content clusters should map to first codes: items of one topic share a first code far
    # more often than random pairs (the genre-coherence number, with topic as the genre).
    x, topic = clustered_vectors()
    books, sids = build_sids(x, LAYERS, CODES)
    report = sid_report(sids, [(f"t{t}",) for t in topic], books)
    first = report["genre_coherence"]["prefix_1"]
    assert first["lift"] > 3.0


@pytest.mark.parametrize("normalize", [False, True])
def test_assign_within_paths_takes_the_nearest_allowed_code_per_layer(normalize: bool) -> None:
    x, _ = clustered_vectors(n=300)
    codebooks, sids = build_sids(x, LAYERS, CODES, normalize_residuals=normalize, seed=0)
    codes = sids[1:, :LAYERS]
    paths = CodePaths(codes[:60])  # "trained": the first 60 items' paths
    new = clustered_vectors(n=80, seed=1)[0]
    within = codebooks.assign(new, within=paths)
    np.testing.assert_array_equal(
        within, reference_assign(new, codebooks.centroids, normalize, paths=codes[:60])
    )
    known = {tuple(p) for p in codes[:60].tolist()}
    assert all(tuple(c) in known for c in within.tolist())  # always one of the paths
    free = codebooks.assign(new)
    assert (within != free).any(axis=1).any()  # some free paths leave the 60 items' paths
    # where the free path is one of the paths, it is kept
    on_paths = np.array([tuple(c) in known for c in free.tolist()])
    assert on_paths.any()
    np.testing.assert_array_equal(within[on_paths], free[on_paths])
    # within every item's own path, the build's codes come back
    np.testing.assert_array_equal(codebooks.assign(x, within=CodePaths(codes)), codes)


def test_code_paths_refuse_empty_or_mismatched_paths() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        CodePaths(np.zeros((0, LAYERS), np.int64))
    codebooks = Codebooks(np.zeros((LAYERS, CODES, 4), np.float32))
    with pytest.raises(ValueError, match="layers"):
        codebooks.assign(np.zeros((1, 4), np.float32), within=CodePaths(np.zeros((2, 2), np.int64)))
