"""Leave-one-out split with a real validation item, a cold-start item hold-out and popularity bins.

Per user with sequence `s` (len >= 3):
- test:       history `s[:-1]`, target `s[-1]`
- validation: history `s[:-2]`, target `s[-2]`
- training:   `s[:-2]`
Users with fewer than 3 events only contribute their whole sequence to training (counted in
`Split.num_short_users`); they are never evaluated.

Cold start: a seeded fraction of the items that have interactions is withheld. Their events are
dropped from every training sequence (so the trainer never sees them, not even as negatives),
but they stay in evaluation histories and may be evaluation targets. `trained[row]` is True for
exactly the rows that occur in some training sequence; an item can be untrained without being
withheld (its only events were validation/test targets).

Popularity bins (by training interactions, computed after the hold-out): sort items by training
count, descending, ties by row ascending. Walking that order, an item is
- "hot"  if the training interactions of the items strictly before it are < 25% of all training
  interactions (so the item that crosses 25% is still hot),
- "mild" else if those interactions are < 75%,
- "cold" otherwise (the long tail; every item with zero training count, withheld ones included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sidrec.offline.data.dataset import Interactions

BIN_NAMES: tuple[str, ...] = ("hot", "mild", "cold")
HOT_SHARE = 0.25
MILD_SHARE = 0.75


@dataclass
class EvalSet:
    """One evaluation stage (validation or test): one row per evaluated user."""

    users: np.ndarray  # int64[U] indices into Interactions.users
    histories: list[np.ndarray]  # U arrays of item rows, oldest first (withheld items kept)
    history_timestamps: list[np.ndarray] | None  # same shapes, unix seconds; None without time
    targets: np.ndarray  # int64[U] item rows
    target_timestamps: np.ndarray | None  # int64[U]; None without time

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, index: np.ndarray) -> EvalSet:
        """The rows at `index` (int positions), in that order."""
        index = np.asarray(index, dtype=np.int64)
        has_time = self.history_timestamps is not None and self.target_timestamps is not None
        return EvalSet(
            users=self.users[index],
            histories=[self.histories[i] for i in index],
            history_timestamps=[self.history_timestamps[i] for i in index] if has_time else None,
            targets=self.targets[index],
            target_timestamps=self.target_timestamps[index] if has_time else None,
        )


@dataclass
class Split:
    num_items: int
    seed: int
    cold_fraction: float
    # Per user of Interactions (same order), withheld items removed. Len-3+ users: s[:-2].
    train_sequences: list[np.ndarray]
    train_timestamps: list[np.ndarray] | None
    valid: EvalSet
    test: EvalSet
    withheld: np.ndarray  # bool[n + 1], items held out of training for the cold-start eval
    trained: np.ndarray  # bool[n + 1], item occurs in some training sequence (row 0 False)
    train_counts: np.ndarray  # int64[n + 1], training interactions per item
    popularity_bin: np.ndarray  # int64[n + 1], index into BIN_NAMES (row 0 = cold, unused)
    num_short_users: int  # users with < 3 events: training only

    @property
    def num_train_events(self) -> int:
        return int(self.train_counts.sum())

    def stage(self, name: str) -> EvalSet:
        if name == "valid":
            return self.valid
        if name == "test":
            return self.test
        raise ValueError(f"unknown evaluation stage {name!r}; use 'valid' or 'test'")


def popularity_bins(train_counts: np.ndarray) -> np.ndarray:
    """Bin index per row (see module docstring) from int64[n + 1] training counts."""
    counts = train_counts[1:]
    total = counts.sum()
    # Stable sort on the negated counts keeps equal counts in row order (deterministic).
    order = np.argsort(-counts, kind="stable")
    before = np.cumsum(counts[order]) - counts[order]  # interactions of strictly more popular items
    bins_sorted = np.full(len(order), 2, dtype=np.int64)
    if total > 0:
        bins_sorted[before < MILD_SHARE * total] = 1
        bins_sorted[before < HOT_SHARE * total] = 0
    bins = np.full(len(train_counts), 2, dtype=np.int64)
    bins[1 + order] = bins_sorted
    # A zero-count item can never be hot or mild, even in a degenerate data set.
    bins[train_counts == 0] = 2
    return bins


def make_split(data: Interactions, cold_fraction: float = 0.05, seed: int = 0) -> Split:
    """Deterministic for (data, cold_fraction, seed)."""
    if not 0.0 <= cold_fraction < 1.0:
        raise ValueError(f"cold_fraction must be in [0, 1), got {cold_fraction}")
    n = data.num_items
    has_time = data.timestamps is not None

    # Withhold a seeded sample of the items that have at least one event.
    seen = np.zeros(n + 1, dtype=bool)
    for s in data.sequences:
        seen[s] = True
    candidates = np.flatnonzero(seen)
    num_withheld = round(cold_fraction * len(candidates))
    rng = np.random.default_rng(seed)
    withheld = np.zeros(n + 1, dtype=bool)
    withheld[np.sort(rng.choice(candidates, size=num_withheld, replace=False))] = True

    train_sequences: list[np.ndarray] = []
    train_timestamps: list[np.ndarray] = []
    stages: dict[str, dict[str, list]] = {
        name: {"users": [], "hist": [], "hist_ts": [], "target": [], "target_ts": []}
        for name in ("valid", "test")
    }
    num_short = 0
    for u, s in enumerate(data.sequences):
        s = np.asarray(s, dtype=np.int64)
        ts = np.asarray(data.timestamps[u], dtype=np.int64) if has_time else None
        if len(s) < 3:
            num_short += 1
            train_end = len(s)
        else:
            train_end = len(s) - 2
            for name, cut in (("valid", len(s) - 2), ("test", len(s) - 1)):
                stage = stages[name]
                stage["users"].append(u)
                stage["hist"].append(s[:cut])
                stage["target"].append(s[cut])
                if ts is not None:
                    stage["hist_ts"].append(ts[:cut])
                    stage["target_ts"].append(ts[cut])
        keep = ~withheld[s[:train_end]]
        train_sequences.append(s[:train_end][keep])
        if ts is not None:
            train_timestamps.append(ts[:train_end][keep])

    train_counts = np.zeros(n + 1, dtype=np.int64)
    for s in train_sequences:
        np.add.at(train_counts, s, 1)
    trained = train_counts > 0

    def eval_set(name: str) -> EvalSet:
        stage = stages[name]
        return EvalSet(
            users=np.asarray(stage["users"], dtype=np.int64),
            histories=stage["hist"],
            history_timestamps=stage["hist_ts"] if has_time else None,
            targets=np.asarray(stage["target"], dtype=np.int64),
            target_timestamps=np.asarray(stage["target_ts"], dtype=np.int64) if has_time else None,
        )

    return Split(
        num_items=n,
        seed=seed,
        cold_fraction=cold_fraction,
        train_sequences=train_sequences,
        train_timestamps=train_timestamps if has_time else None,
        valid=eval_set("valid"),
        test=eval_set("test"),
        withheld=withheld,
        trained=trained,
        train_counts=train_counts,
        popularity_bin=popularity_bins(train_counts),
        num_short_users=num_short,
    )


def split_summary(split: Split) -> dict[str, int | float]:
    """Counts worth logging next to any result."""
    bins = split.popularity_bin[1:]
    return {
        "train_events": split.num_train_events,
        "eval_users": len(split.test),
        "short_users": split.num_short_users,
        "withheld_items": int(split.withheld.sum()),
        "trained_items": int(split.trained.sum()),
        "hot_items": int((bins == 0).sum()),
        "mild_items": int((bins == 1).sum()),
        "cold_items": int((bins == 2).sum()),
        "cold_start_test_targets": int(split.withheld[split.test.targets].sum()),
    }
