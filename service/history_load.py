"""History bootstrap: users' event lists into the history store, newest N per user.

The store-facing half of `sidrec histories load` (into Redis; cli.py hands it the histories
offline/histories.py reads from a data set) and of the service's start-up with
SIDREC_HISTORIES (a histories file, sidrec/histories_file.py, into the in-process store). Both
store exactly what the running service reads: the store's own `replace` writes the lists
(service/history_store.py has the layout). Nothing here reads a data set: the service never
imports the offline side (docs/internals.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .history_store import HistoryStore

# Events per store call: one Redis pipeline each (about 5 MB of commands), and the progress
# bar's step.
CHUNK_EVENTS = 50_000


@dataclass(frozen=True)
class LoadReport:
    users: int  # users with at least one event stored
    events: int  # entries stored (at most the store's history_len per user)
    seconds: float  # writing, from the first store call to the last answer

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def load_histories(
    store: HistoryStore,
    histories: Iterable[tuple[str, Sequence[tuple[str, int]]]],
    chunk_events: int = CHUNK_EVENTS,
    advance: Callable[[int], None] | None = None,
) -> LoadReport:
    """Replace each given user's stored history with their newest history_len (the store's)
    (item_id, ts) events, given oldest first.

    Idempotent: a second run stores the same lists. `advance(n)` is called after each chunk
    with the number of users it covered (a progress bar's update)."""
    users = stored = 0
    started = time.perf_counter()
    chunk: list[tuple[str, Sequence[tuple[str, int]]]] = []
    chunk_size = 0
    for user_id, events in histories:
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
    return LoadReport(users, stored, time.perf_counter() - started)
