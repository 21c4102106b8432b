"""Semantic-ID codebooks: residual quantisation of content vectors into L codes in [0, K).

This module is the single definition of the assignment rule. `offline/sids.py` trains the
centroids layer by layer through `assign_layer` below and the service assigns newly
ingested items with `Codebooks.assign`, so an item gets the same codes at build time and
later. Torch-free on purpose (the service imports it): numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Residuals that are (numerically) zero stay zero instead of blowing up when normalised.
NORM_EPS = 1e-12


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """x[B, D] float64 -> rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [B, 1]
    return x / np.maximum(norms, NORM_EPS)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """x[B, D] float64, centroids[K, D] -> int64[B] index of the closest centroid (L2).

    Computed in float64 with numpy, ties to the lowest index. float64 matters: BLAS sums in
    a different order for a batch of 1 (a newly ingested item) than for the whole catalog,
    and in float32 that rounding noise can flip a near tie; in float64 it is ~1e-16 and does
    not. ||x||^2 is the same for every centroid, so it is left out of the distance.
    """
    c = centroids.astype(np.float64)  # [K, D]
    dist = (c * c).sum(axis=1)[None, :] - 2.0 * (x @ c.T)  # [B, K]
    return dist.argmin(axis=1).astype(np.int64)


def assign_layer(
    residual: np.ndarray, centroids: np.ndarray, normalize_residuals: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One residual-quantisation step: residual[B, D] float64, centroids[K, D] ->
    (codes int64[B], next residual[B, D] float64).

    With `normalize_residuals` the residual is L2-normalised before it is quantised, at
    every layer, the raw input included (GRID's RK-means rule).
    """
    x = normalize_rows(residual) if normalize_residuals else residual
    codes = nearest_centroid(x, centroids)
    return codes, x - centroids[codes].astype(np.float64)


class CodePaths:
    """A set of code tuples (paths), e.g. the SIDs of the items a model was trained on, read
    as a trie: which codes may follow a prefix."""

    def __init__(self, codes: np.ndarray) -> None:
        codes = np.asarray(codes, dtype=np.int64)  # [m, L]
        if codes.ndim != 2 or len(codes) == 0:
            raise ValueError(f"paths must be a non-empty [m, L] array, got shape {codes.shape}")
        self.layers = int(codes.shape[1])
        self._next: dict[tuple[int, ...], np.ndarray] = {}
        for layer in range(self.layers):
            pairs = np.unique(codes[:, : layer + 1], axis=0)  # [p, layer + 1], sorted
            prefixes, starts = np.unique(pairs[:, :layer], axis=0, return_index=True)
            for prefix, part in zip(prefixes, np.split(pairs[:, layer], starts[1:]), strict=True):
                self._next[tuple(prefix.tolist())] = part

    def next_codes(self, prefix: np.ndarray) -> np.ndarray:
        """int64[m] ascending: the codes that follow `prefix` (a prefix of some path)."""
        return self._next[tuple(np.asarray(prefix).tolist())]


@dataclass
class Codebooks:
    """centroids float32[L, K, D]: layer l quantises the residual left by layers < l."""

    centroids: np.ndarray
    normalize_residuals: bool = False

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 3:
            raise ValueError(f"centroids must be [L, K, D], got shape {self.centroids.shape}")
        self.normalize_residuals = bool(self.normalize_residuals)

    @property
    def layers(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def codes(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[2])

    def assign(self, vectors: np.ndarray, within: CodePaths | None = None) -> np.ndarray:
        """vectors float32[B, D] -> int64[B, L] codes (exactly the rule used at build time).

        `within`: at each layer only the codes that extend the prefix chosen so far to a
        prefix of one of these paths (the nearest such centroid), so the result is one of
        the paths. A model's SID rows are trained only for the paths of trained items: this
        gives an item without one the nearest path whose rows say something (its SID itself
        stays the free assignment)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be [B, {self.dim}], got shape {vectors.shape}")
        if within is not None and within.layers != self.layers:
            raise ValueError(f"paths have {within.layers} layers, the codebooks {self.layers}")
        residual = vectors.astype(np.float64)  # [B, D]
        codes = np.zeros((len(vectors), self.layers), dtype=np.int64)
        for layer in range(self.layers):
            if within is None:
                codes[:, layer], residual = assign_layer(
                    residual, self.centroids[layer], self.normalize_residuals
                )
                continue
            x = normalize_rows(residual) if self.normalize_residuals else residual
            c = self.centroids[layer].astype(np.float64)  # [K, D]
            dist = (c * c).sum(axis=1)[None, :] - 2.0 * (x @ c.T)  # [B, K], as nearest_centroid
            for b in range(len(vectors)):
                allowed = within.next_codes(codes[b, :layer])  # int64[m], ascending
                codes[b, layer] = allowed[dist[b, allowed].argmin()]
            residual = x - c[codes[:, layer]]
        return codes

    def save(self, path: str | Path) -> None:
        # Through a file handle so numpy does not append ".npz" to a path that lacks it.
        with open(path, "wb") as f:
            np.savez(
                f,
                centroids=self.centroids,
                normalize_residuals=np.bool_(self.normalize_residuals),
            )

    @classmethod
    def load(cls, path: str | Path) -> Codebooks:
        with np.load(path) as z:
            return cls(z["centroids"], bool(z["normalize_residuals"]))


def dedup_digits(codes: np.ndarray) -> np.ndarray:
    """codes int64[n, L] -> int64[n]: 0 for the first row with a code tuple, then 1, 2, ...

    Counted in row order. This differs from the SID repo (c-1, ..., 0 within a group of c)
    and GRID (1..c for every member of a colliding group, 0 only for unique tuples): with
    "first comes 0, then 1, 2, ..." the digits already handed out never change, and a newly
    ingested item simply takes the next free digit, which is the current size of its group.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.reshape(-1)  # [n] tuple id per row
    order = np.argsort(group, kind="stable")  # rows grouped by tuple, row order kept inside
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    sizes = np.diff(np.r_[starts, n])
    digits = np.empty(n, dtype=np.int64)
    digits[order] = np.arange(n) - np.repeat(starts, sizes)
    return digits


def codebook_usage(codes: np.ndarray, codes_per_layer: int) -> list[float]:
    """codes int64[n, L] -> per layer, the fraction of the K codes used by at least one item."""
    codes = np.asarray(codes, dtype=np.int64)
    return [len(np.unique(codes[:, layer])) / codes_per_layer for layer in range(codes.shape[1])]
