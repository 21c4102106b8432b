"""Build Semantic IDs from content vectors: residual k-means (faiss) + a dedup digit.

Layer l runs k-means on what layers < l left unexplained (the residual), so the first code
is a coarse topic, the next ones refine it. Assignment goes through
`sidrec.sid_codebook.assign_layer`, the same function the service uses for new items, so
`Codebooks.assign(vectors)` reproduces the build codes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import faiss
import numpy as np
from rich.console import Console
from rich.table import Table

from sidrec.sid_codebook import (
    Codebooks,
    assign_layer,
    codebook_usage,
    dedup_digits,
    normalize_rows,
)


def default_sid_shape(num_items: int) -> tuple[int, int]:
    """(layers, codes per layer) sized to the catalog: 3 layers, K = 2^round(log2 sqrt(n)).

    Why sqrt(n): the first code then groups ~sqrt(n) items, coarse enough that every code
    is shared by many items (its embedding gets trained from all of them, which is what
    helps a cold item), while two layers already span K^2 ~ n cells and the third leaves
    K^3 ~ n^1.5 >> n tuples, so few items need the dedup digit. Clamped to [8, 256]: below
    8 a layer barely splits anything; above 256 each code sees too few items to learn from
    and k-means gets slow. ML-100K (1,682) -> 3 x 32, ML-1M (3,883) -> 3 x 64, ML-20M
    (27,278) -> 3 x 128 (the SID repo's shipped shape).
    """
    if num_items < 1:
        raise ValueError("num_items must be positive")
    k = 2 ** round(math.log2(math.sqrt(num_items)))
    return 3, int(min(max(k, 8), 256))


def build_sids(
    vectors: np.ndarray,
    layers: int,
    codes: int,
    normalize_residuals: bool = False,
    seed: int = 0,
    niter: int = 50,
) -> tuple[Codebooks, np.ndarray]:
    """vectors float32[n, D] -> (Codebooks, sids int64[n + 1, layers + 1]).

    sids row 0 is zeros (padding); row i holds item row i's `layers` codes in [0, codes)
    followed by its dedup digit, so every full SID is unique. Deterministic for a seed.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n < codes:
        raise ValueError(f"{n} items cannot fill {codes} codes per layer; use fewer codes")
    centroids = np.zeros((layers, codes, dim), dtype=np.float32)
    item_codes = np.zeros((n, layers), dtype=np.int64)
    residual = vectors.astype(np.float64)  # [n, D]
    # faiss k-means is multi-threaded; a fixed single thread makes its float sums run in
    # one order, so the same seed gives bit-identical centroids on any machine load.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for layer in range(layers):
            x = normalize_rows(residual) if normalize_residuals else residual
            kmeans = faiss.Kmeans(dim, codes, niter=niter, seed=seed + layer, verbose=False)
            # Small catalogs are fine to cluster; silence faiss' "too few points" warning.
            kmeans.cp.min_points_per_centroid = 1
            kmeans.cp.max_points_per_centroid = max(256, n // codes + 1)
            kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
            centroids[layer] = kmeans.centroids
            item_codes[:, layer], residual = assign_layer(
                residual, centroids[layer], normalize_residuals
            )
    finally:
        faiss.omp_set_num_threads(threads)
    sids = np.zeros((n + 1, layers + 1), dtype=np.int64)
    sids[1:, :layers] = item_codes
    sids[1:, layers] = dedup_digits(item_codes)
    return Codebooks(centroids, normalize_residuals), sids


def _pairs_share_genre(genre_sets: list[frozenset[str]], i: np.ndarray, j: np.ndarray) -> int:
    return sum(1 for a, b in zip(i, j, strict=True) if genre_sets[a] & genre_sets[b])


def genre_coherence(
    item_codes: np.ndarray, genres: Sequence[tuple[str, ...]], depth: int, seed: int = 0
) -> dict[str, float | int | None]:
    """How often two items with the same first `depth` codes share a genre, against random.

    item_codes int64[n, L]. Items without genres are left out of both rates. Pairs inside a
    prefix group are counted exactly (all of them); the random rate uses 20,000 seeded pairs
    of distinct items. lift = same_prefix / random: 1.0 means the codes ignore genre.
    """
    keep = np.array([len(g) > 0 for g in genres], dtype=bool)
    rows = np.flatnonzero(keep)
    genre_sets = [frozenset(g) for g in genres]
    if len(rows) < 2:
        return {"same_prefix": None, "random": None, "lift": None, "pairs": 0}
    _, group = np.unique(item_codes[rows, :depth], axis=0, return_inverse=True)
    group = group.reshape(-1)
    shared = pairs = 0
    for g in np.unique(group):
        members = rows[group == g]
        if len(members) < 2:
            continue
        i, j = np.triu_indices(len(members), k=1)
        pairs += len(i)
        shared += _pairs_share_genre(genre_sets, members[i], members[j])
    rng = np.random.default_rng(seed)
    a = rng.choice(rows, size=20_000)
    b = rng.choice(rows, size=20_000)
    distinct = a != b
    random_rate = _pairs_share_genre(genre_sets, a[distinct], b[distinct]) / int(distinct.sum())
    same_rate = shared / pairs if pairs else None
    lift = same_rate / random_rate if same_rate is not None and random_rate > 0 else None
    return {"same_prefix": same_rate, "random": random_rate, "lift": lift, "pairs": pairs}


def sid_report(
    sids: np.ndarray, genres: Sequence[tuple[str, ...]] | None, codebooks: Codebooks
) -> dict:
    """A JSON-serialisable summary of how well the SIDs use their codes.

    sids int64[n + 1, L + 1] from `build_sids`; genres per item row 1..n (or None).
    """
    layers, k = codebooks.layers, codebooks.codes
    item_codes = sids[1:, :layers]  # [n, L]
    n = len(item_codes)
    usage = codebook_usage(item_codes, k)
    _, tuple_id, tuple_size = np.unique(item_codes, axis=0, return_inverse=True, return_counts=True)
    size_per_item = tuple_size[tuple_id.reshape(-1)]  # [n] items sharing my tuple, me included
    report: dict = {
        "items": n,
        "layers": layers,
        "codes": k,
        "normalize_residuals": codebooks.normalize_residuals,
        "per_layer": [
            {
                "layer": layer + 1,
                "codes_used": round(usage[layer] * k),
                "usage_ratio": usage[layer],
                # Distinct prefixes of length layer + 1: how finely the first codes split.
                "distinct_prefixes": len(np.unique(item_codes[:, : layer + 1], axis=0)),
            }
            for layer in range(layers)
        ],
        "collision_rate": float((size_per_item > 1).mean()) if n else 0.0,
        "largest_group": int(tuple_size.max()) if n else 0,
        "max_dedup_digit": int(sids[1:, layers].max()) if n else 0,
        "unique_full_sids": len(np.unique(sids[1:], axis=0)) == n,
        "genre_coherence": None,
    }
    # Without a single genre every rate would be 0 or undefined: no table, and the printed
    # report says why (print_sid_report).
    if genres is not None and any(genres):
        if len(genres) != n:
            raise ValueError(f"genres has {len(genres)} entries for {n} items")
        report["genre_coherence"] = {
            f"prefix_{depth}": genre_coherence(item_codes, genres, depth)
            for depth in range(1, layers + 1)
        }
    return report


def print_sid_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(
        title=f"Semantic IDs: {report['items']} items, {report['layers']} x {report['codes']} "
        f"codes{' (normalised residuals)' if report['normalize_residuals'] else ''}"
    )
    for column in ("layer", "codes used", "usage", "distinct prefixes"):
        table.add_column(column, justify="right")
    for row in report["per_layer"]:
        table.add_row(
            str(row["layer"]),
            f"{row['codes_used']} / {report['codes']}",
            f"{row['usage_ratio']:.1%}",
            str(row["distinct_prefixes"]),
        )
    console.print(table)
    console.print(
        f"collision rate before dedup: {report['collision_rate']:.2%}, "
        f"largest group: {report['largest_group']}, max dedup digit: "
        f"{report['max_dedup_digit']}, full SIDs unique: {report['unique_full_sids']}"
    )
    console.print(
        "  (colliding items share their semantic codes; the dedup digit gives each a distinct "
        "full SID. The model reads only the semantic codes, so they share SID rows; trained "
        "items still differ by their id rows, and new ones by their content: the content "
        "tower (hybrid-tower) or hybrid-sum's content part. See docs/internals.md, "
        '"Content and SIDs".)'
    )
    coherence = report.get("genre_coherence")
    if not coherence:
        console.print("Genre coherence: not measured, the data has no genres for its items")
        return
    genre_table = Table(title="Genre coherence: pairs sharing a genre")
    for column in ("same prefix", "pairs", "rate", "random pairs", "lift"):
        genre_table.add_column(column, justify="right")
    for name, c in coherence.items():
        genre_table.add_row(
            name.replace("prefix_", "first ") + " code(s)",
            str(c["pairs"]),
            "-" if c["same_prefix"] is None else f"{c['same_prefix']:.1%}",
            "-" if c["random"] is None else f"{c['random']:.1%}",
            "-" if c["lift"] is None else f"{c['lift']:.2f}x",
        )
    console.print(genre_table)
