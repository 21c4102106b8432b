"""History bootstrap: a data set's interactions into the history store, newest N per user.

Shared by `sidrec histories load` (into Redis) and the service's start-up with
SIDREC_HISTORIES (into the in-process store), so both store exactly what the running service
reads: the store's own `replace` writes the lists (service/history_store.py has the layout).

Item ids are the reader's (offline/data), the ids `sidrec export` writes to the bundle's
items.jsonl, so a loaded history names the items the model was trained on. Timestamps are the
data's unix seconds; data without time (a generic `order` column) gets ts 0 for every event,
which keeps the file order (the store sorts by ts, ties in arrival order) and is what the
offline evaluator feeds a model trained without time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .history_store import HistoryStore

if TYPE_CHECKING:  # pandas comes with the readers: imported only when data is read
    from sidrec.offline.data.dataset import Interactions

# Events per store call: one Redis pipeline each (about 5 MB of commands), and the progress
# bar's step.
CHUNK_EVENTS = 50_000


@dataclass(frozen=True)
class LoadReport:
    users: int  # users with at least one event stored
    events: int  # entries stored (at most history_len per user)
    events_in_data: int
    unknown_items: int  # events skipped: their item is not in the bundle (only with `known`)
    seconds: float  # writing, from the first store call to the last answer

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def check_data(path: Path) -> None:
    """Raise DataError (naming the folder) unless `path` holds a data set this install reads:
    what `sidrec serve` checks of SIDREC_HISTORIES before any worker starts."""
    from sidrec.offline.data.dataset import DataError  # plain numpy: fine in a service install

    try:
        from sidrec.offline.data.load import detect_format
    except ImportError as e:  # pandas: the train extra
        raise DataError(
            path, f"reading a data set needs the train extra ({e}): pip install 'sidrec[train]'"
        ) from None
    detect_format(path)


def read_interactions(data: str | Path, tie_order: str = "file") -> Interactions:
    """The data set at `data` (any format `sidrec train --data` takes, or 'ml-100k' to fetch
    it), read by the same reader as training. Needs the train extra (pandas)."""
    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.pipeline import resolve_data

    return load_dataset(resolve_data(data), tie_order=tie_order)


def user_histories(
    data: Interactions, history_len: int, known: set[str] | None = None
) -> Iterator[tuple[str, list[tuple[str, int]], int]]:
    """(user, newest history_len (item_id, ts) oldest first, events skipped as unknown)."""
    ids = data.catalog.ids
    for u, user_id in enumerate(data.users):
        rows = data.sequences[u]
        stamps = data.timestamps[u] if data.timestamps is not None else None
        skipped = 0
        if known is None:
            rows = rows[-history_len:]
            stamps = stamps[-history_len:] if stamps is not None else None
            items = [ids[r - 1] for r in rows.tolist()]
        else:
            keep = [i for i, r in enumerate(rows.tolist()) if ids[r - 1] in known]
            skipped = len(rows) - len(keep)
            keep = keep[-history_len:]
            items = [ids[rows[i] - 1] for i in keep]
            stamps = stamps[keep] if stamps is not None else None
        ts = stamps.tolist() if stamps is not None else [0] * len(items)
        yield user_id, list(zip(items, ts, strict=True)), skipped


async def load_histories(
    store: HistoryStore,
    data: Interactions,
    history_len: int,
    known: set[str] | None = None,
    chunk_events: int = CHUNK_EVENTS,
    advance: Callable[[int], None] | None = None,
) -> LoadReport:
    """Replace every user's stored history with their newest `history_len` events of `data`.

    Idempotent: a second run stores the same lists. `known`: the bundle's item ids; events of
    other items are skipped (the service could not encode them). `advance(n)` is called after
    each chunk with the number of users it covered (a progress bar's update)."""
    users = stored = unknown = 0
    started = time.perf_counter()
    chunk: list[tuple[str, list[tuple[str, int]]]] = []
    chunk_size = 0
    for user_id, events, skipped in user_histories(data, history_len, known):
        unknown += skipped
        chunk.append((user_id, events))
        chunk_size += len(events)
        users += bool(events)
        if chunk_size >= chunk_events:
            stored += await store.replace(chunk)
            if advance is not None:
                advance(len(chunk))
            chunk, chunk_size = [], 0
    if chunk:
        stored += await store.replace(chunk)
        if advance is not None:
            advance(len(chunk))
    seconds = time.perf_counter() - started
    return LoadReport(users, stored, data.num_events, unknown, seconds)
