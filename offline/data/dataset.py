"""The in-memory shape every reader produces and every later step consumes.

Items get dense rows 1..n in catalog order; row 0 is padding everywhere (item tables, SID
tables, sequences). External ids stay strings so any catalog's ids survive a round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A user's data file is missing or malformed. The message names file, line and expectation."""

    def __init__(self, path: object, problem: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


@dataclass
class Catalog:
    """Items and their text. Index i describes item row i + 1."""

    ids: list[str]
    titles: list[str]
    # Free text fields per item, e.g. {"year": "1995", "genres": "Animation, Comedy", "plot": ...}.
    fields: list[dict[str, str]]
    genres: list[tuple[str, ...]]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.titles) == len(self.fields) == len(self.genres) == n):
            raise ValueError("catalog columns differ in length")
        self._row = {item_id: i + 1 for i, item_id in enumerate(self.ids)}
        if len(self._row) != n:
            raise ValueError("duplicate item ids in catalog")

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, item_id: str) -> int:
        """Dense row (1-based) of an external item id; KeyError if unknown."""
        return self._row[item_id]

    def has(self, item_id: str) -> bool:
        return item_id in self._row


@dataclass
class Interactions:
    """Per-user chronological item sequences over a catalog.

    `sequences[u]` holds item rows (int64, 1-based), sorted stably by (timestamp, original
    order). `timestamps[u]` holds unix seconds of the same length, or the whole list is None
    when the source has no time at all (time features are then off).
    """

    name: str
    catalog: Catalog
    users: list[str]
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None
    # How timestamps were obtained: "observed", "interpolated" (some were filled in between
    # known neighbours of the same user) or "none".
    time_source: str = "observed"
    notes: list[str] = field(default_factory=list)
    # How events with equal timestamps are ordered: "file" (stably, by position in the file,
    # every reader's default) or "gr" (ML-1M ratings.dat only: the order of GR's research
    # preprocessing, an unstable sort of the whole file by timestamp; see movielens.py).
    tie_order: str = "file"

    def __post_init__(self) -> None:
        if len(self.users) != len(self.sequences):
            raise ValueError("users and sequences differ in length")
        if self.timestamps is not None:
            if len(self.timestamps) != len(self.sequences):
                raise ValueError("timestamps and sequences differ in length")
            for s, t in zip(self.sequences, self.timestamps, strict=True):
                if len(s) != len(t):
                    raise ValueError("a user's timestamps and items differ in length")
        elif self.time_source != "none":
            self.time_source = "none"

    @property
    def num_items(self) -> int:
        return len(self.catalog)

    @property
    def num_events(self) -> int:
        return int(sum(len(s) for s in self.sequences))


def id_order(ids: Sequence[str]) -> list[int]:
    """Stable display order of external ids: by numeric value when every id is a decimal
    integer (so "10" follows "9"), else the order given."""
    if ids and all(i.isdecimal() for i in ids):
        return sorted(range(len(ids)), key=lambda k: int(ids[k]))
    return list(range(len(ids)))


def group_by_user(
    user_codes: np.ndarray,
    num_users: int,
    columns: Sequence[np.ndarray],
    keys: Sequence[np.ndarray] = (),
) -> list[list[np.ndarray]]:
    """Splits event columns into per-user arrays, each user's events sorted stably by `keys`.

    user_codes[E] in [0, num_users); columns and keys are [E]. Events equal in every key keep
    their input order, so the file order breaks timestamp ties (pandas' default quicksort
    would not). Returns, per column, num_users arrays (views into one sorted copy).
    """
    user_codes = np.asarray(user_codes, dtype=np.int64)
    order: np.ndarray | None = None
    if len(keys) == 1 and len(user_codes) and np.issubdtype(np.asarray(keys[0]).dtype, np.integer):
        # One sort of user * span + key is several times faster than two stable passes
        # (about 1 s instead of 10 s on 20M events) and gives the same order.
        key = np.asarray(keys[0], dtype=np.int64)
        low, high = int(key.min()), int(key.max())
        span = high - low + 1
        if num_users * span < 2**62:
            order = np.argsort(user_codes * span + (key - low), kind="stable")
    if order is None:
        # Stable passes from the least significant key up; the user goes last, so it is primary.
        order = np.arange(len(user_codes), dtype=np.int64)
        for key in [*reversed(keys), user_codes]:
            order = order[np.argsort(np.asarray(key)[order], kind="stable")]
    counts = np.bincount(user_codes, minlength=num_users)
    cuts = np.cumsum(counts)[:-1]
    return [np.split(np.asarray(column)[order], cuts) for column in columns]
