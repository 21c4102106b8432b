"""An item's genres and year as features beside its text embedding, for finding the trained
items a new item resembles.

MiniLM mean-pools an item's whole text (title, genres, cast, plot) into one vector; on a movie
catalog the cast and plot dominate it, and the trained movies nearest a new one by it share
little more of its audience than any movie does, where movies of its genres and years do
(docs/results/content-tower.md). `ItemFeatures.extend` appends those two parts, each of unit
norm, to the unit content vector; a new item's content part (model/item_embedding.py) can then
be fitted on the extended vector. Torch-free: offline and the service build the same vector
from the same fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sidrec.sid_codebook import normalize_rows

GENRE_KEYS = ("genres", "genre")  # field names, matched ignoring case (as item_text does)
YEAR_KEYS = ("year",)
# The year part: Gaussian bumps YEAR_STEP years apart, YEAR_WIDTH years wide (their standard
# deviation), so two items' year parts have a dot product that falls with their years' gap.
YEAR_STEP = 2.0
YEAR_WIDTH = 6.0
# A part is used where at least this share of the catalog has it, and a genre where at least
# MIN_GENRE_ITEMS items name it (a genre of one item matches nothing trained).
MIN_SHARE = 0.5
MIN_GENRE_ITEMS = 2


def _values(fields: dict[str, str], keys: tuple[str, ...]) -> list[str]:
    return [str(v) for k, v in fields.items() if k.strip().lower() in keys and v]


def item_genres(fields: dict[str, str]) -> set[str]:
    """The genres an item's fields name, lower-cased: 'Comedy|Drama' or 'Comedy, Drama'."""
    out: set[str] = set()
    for value in _values(fields, GENRE_KEYS):
        sep = "|" if "|" in value else ","
        out.update(g.strip().lower() for g in value.split(sep) if g.strip())
    return out


def item_year(fields: dict[str, str]) -> int | None:
    """The year an item's fields give ('1995', '1995-1998', '1995-11-22'), else None."""
    for value in _values(fields, YEAR_KEYS):
        head = value.strip()[:4]
        if head.isdecimal():
            return int(head)
    return None


@dataclass(frozen=True)
class ItemFeatures:
    genres: tuple[str, ...]  # the genre part's vocabulary, lower-case; empty: no genre part
    years: tuple[int, ...]  # (first, last) year of the catalog; empty: no year part

    @property
    def year_centres(self) -> np.ndarray:
        if not self.years:
            return np.zeros(0, np.float32)
        first, last = self.years
        return np.arange(first, last + YEAR_STEP, YEAR_STEP, dtype=np.float32)

    @property
    def dim(self) -> int:
        """Features appended to a content vector."""
        return len(self.genres) + len(self.year_centres)

    def parts(self, fields: Sequence[dict[str, str]]) -> np.ndarray:
        """float32 [B, dim]: per item its genre part (multi-hot) and year part (the bumps),
        each scaled to unit norm, zero where the item lacks it."""
        index = {g: i for i, g in enumerate(self.genres)}
        centres = self.year_centres
        out = np.zeros((len(fields), self.dim), np.float32)
        for row, item in enumerate(fields):
            hot = [index[g] for g in item_genres(item) if g in index]
            if hot:
                out[row, hot] = 1.0 / np.sqrt(len(hot))
            year = item_year(item) if len(centres) else None
            if year is not None:
                # a year beyond the catalog's reads as its nearest end (a bump far from every
                # centre would be all zeros)
                year = min(max(year, self.years[0]), self.years[1])
                bumps = np.exp(-((year - centres) ** 2) / (2 * YEAR_WIDTH**2))
                out[row, len(self.genres) :] = bumps / np.linalg.norm(bumps)
        return out

    def extend(self, content: np.ndarray, fields: Sequence[dict[str, str]]) -> np.ndarray:
        """content float32 [B, C] (any norm) and the items' fields -> float32 [B, C + dim]:
        the unit content vector and the unit parts, so each weighs alike in a cosine."""
        unit = normalize_rows(content)
        return np.concatenate([unit.astype(np.float32), self.parts(fields)], axis=1)

    @classmethod
    def fit(cls, fields: Sequence[dict[str, str]]) -> ItemFeatures | None:
        """The parts a catalog (its items' fields) supports; None where it supports neither."""
        n = max(len(fields), 1)
        named = [item_genres(item) for item in fields]
        counts = Counter(g for genres in named for g in genres)
        has_genres = sum(1 for genres in named if genres) / n >= MIN_SHARE
        genres = tuple(sorted(g for g, c in counts.items() if c >= MIN_GENRE_ITEMS))
        years = [y for y in (item_year(item) for item in fields) if y is not None]
        has_years = len(years) / n >= MIN_SHARE
        features = cls(
            genres if has_genres else (),
            (min(years), max(years)) if has_years else (),
        )
        return features if features.dim else None

    def record(self) -> dict[str, Any]:
        """What new_items.json and the bundle's manifest keep (docs/bundle.md)."""
        return {"genres": list(self.genres), "years": list(self.years)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ItemFeatures:
        return cls(tuple(record["genres"]), tuple(int(y) for y in record["years"]))
