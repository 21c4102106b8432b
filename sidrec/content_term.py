"""The dense content term: weight * cos(the history's mean content vector, the item's).

Items whose id row training never saw (withheld, ingested) or saw only a few times have the
weakest vectors in the table; the term scores them by their content as well, as the
content-only baseline would. The other trained items may get it too (`warm_weight`): where
the next item is often like the last (Amazon's), content adds what the ids miss.
Calibration (offline/new_items.py) chooses the weights on validation, the bundle records
them (docs/bundle.md) and the service adds the same term (service/retrieval.py). Where the
catalog's fields name genres or years, validation may have the cosine read them beside the
content vector (sidrec/item_features.py), as it may the new items' content part. The cosine
is taken after subtracting the catalog's mean vector (`centre`): MiniLM's vectors of one
catalog share a large common direction, which makes every item look alike to every history;
centred, the content-only ranking finds the next item 1.3 to 3.3 times as often
(docs/results/content-tower.md, twenty-ninth session). The history's content vector may
weigh its recent items more (`half_life`, the content-only baseline's, chosen on
validation: offline/baselines.py): what a user bought or watched last says most of what
comes next. Torch-free: offline and the service both read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sidrec.item_features import ItemFeatures
from sidrec.sid_codebook import normalize_rows


@dataclass(frozen=True)
class ContentTerm:
    new_weight: float = 0.0  # items with no training event
    rare_weight: float = 0.0  # items with 1..rare_max_count training events
    rare_max_count: int = 0
    # the genres and years the cosine reads beside the content vector; None: the vector alone
    features: ItemFeatures | None = None
    # the catalog's mean of the vectors below before their last normalisation, subtracted
    # from every item's (centred_on); None: not centred (runs and bundles from before)
    centre: tuple[float, ...] | None = None
    # the history's event j of n weighs 0.5 ** ((n - 1 - j) / half_life) in its content
    # vector (history_weights); None: every event alike (runs and bundles from before)
    half_life: float | None = None
    # the other trained items (more than rare_max_count training events): the warm term
    warm_weight: float = 0.0

    @property
    def active(self) -> bool:
        """Whether any row gets the term (so the content vectors are needed)."""
        rare = self.rare_weight and self.rare_max_count > 0
        return bool(self.new_weight or rare or self.warm_weight)

    def row_weights(self, train_counts: np.ndarray) -> np.ndarray:
        """float32 [n + 1]: each row's weight from its training events (int [n + 1], row 0
        the padding row, which never gets the term)."""
        counts = np.asarray(train_counts)
        weights = np.where(counts == 0, self.new_weight, self.warm_weight)
        if self.rare_max_count > 0:
            rare = (counts > 0) & (counts <= self.rare_max_count)
            weights = np.where(rare, self.rare_weight, weights)
        weights[:1] = 0.0
        return weights.astype(np.float32)

    def history_weights(self, n: int) -> np.ndarray:
        """float32 [n]: the weights of a history's n events, oldest first, in its content
        vector (which is normalised, so only their ratios count)."""
        return recency_weights(n, self.half_life)

    @property
    def transforms(self) -> bool:
        """Whether vectors() does more than normalise a content vector."""
        return self.features is not None or self.centre is not None

    def _base(self, content: np.ndarray, fields: Sequence[dict[str, str]] | None) -> np.ndarray:
        """float32 [B, C']: the unit content vectors, extended where the term reads fields."""
        x = np.asarray(content, np.float32)
        if self.features is None:
            return normalize_rows(x).astype(np.float32)
        if fields is None:
            raise ValueError("this content term reads the items' fields too")
        return self.features.extend(x, fields)

    def vectors(
        self, content: np.ndarray, fields: Sequence[dict[str, str]] | None = None
    ) -> np.ndarray:
        """float32 [B, C'] unit vectors whose cosines the term adds: the content vectors
        [B, C], extended with the items' genres and years (their `fields`) where the term
        reads them (C' = C + features.dim), less the centre where it has one."""
        if not self.transforms:
            return normalize_rows(np.asarray(content, np.float32)).astype(np.float32)
        x = self._base(content, fields)
        if self.centre is not None:
            x = x - np.asarray(self.centre, np.float32)
        return normalize_rows(x).astype(np.float32)

    def centred_on(
        self, content: np.ndarray, fields: Sequence[dict[str, str]] | None = None
    ) -> ContentTerm:
        """This term with its centre set to the mean over `content` [n, C] (a catalog's
        vectors, with its items' fields where the term reads them)."""
        mean = self._base(content, fields).mean(0, dtype=np.float64).astype(np.float32)
        return replace(self, centre=tuple(float(v) for v in mean))

    def record(self) -> dict[str, Any]:
        """The fields new_items.json and the bundle's manifest keep (docs/bundle.md)."""
        return {
            "new_item_content_weight": self.new_weight,
            "rare_item_content_weight": self.rare_weight,
            "rare_item_max_count": self.rare_max_count,
            "content_term_features": None if self.features is None else self.features.record(),
            "content_term_centre": None if self.centre is None else list(self.centre),
            "content_term_half_life": self.half_life,
            "warm_item_content_weight": self.warm_weight,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ContentTerm:
        """The term `record` (a manifest's "model" or new_items.json) keeps; none where it
        keeps no field (bundles and runs from before the term, or before its features)."""
        features, centre = record.get("content_term_features"), record.get("content_term_centre")
        half_life = record.get("content_term_half_life")
        return cls(
            float(record.get("new_item_content_weight", 0.0)),
            float(record.get("rare_item_content_weight", 0.0)),
            int(record.get("rare_item_max_count", 0)),
            ItemFeatures.from_record(features) if features else None,
            tuple(float(v) for v in centre) if centre else None,
            None if half_life is None else float(half_life),
            float(record.get("warm_item_content_weight", 0.0)),
        )


def recency_weights(n: int, half_life: float | None) -> np.ndarray:
    """float32 [n]: 0.5 ** (age / half_life) per event of an n-event history, oldest first
    (age 0 the latest); ones where half_life is None."""
    if half_life is None:
        return np.ones(n, np.float32)
    if half_life <= 0:
        raise ValueError(f"half_life must be positive, not {half_life}")
    age = np.arange(n - 1, -1, -1, dtype=np.float64)
    return (0.5 ** (age / half_life)).astype(np.float32)
