"""Users' histories from a data set: the reading half of `sidrec histories load` and of
`sidrec serve --histories DIR` (cli.py hands what this yields to the service's loader, or
writes it to a histories file, sidrec/histories_file.py).

Item ids are the reader's (offline/data), the ids `sidrec export` writes to the bundle's
items.jsonl, so a loaded history names the items the model was trained on. Timestamps are the
data's unix seconds; data without time (a generic `order` column) gets ts 0 for every event,
which keeps the file order (the store sorts by ts, ties in arrival order) and is what the
offline evaluator feeds a model trained without time.

Needs the train extra (pandas) to read data; nothing here imports PyTorch or the service.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sidrec.histories_file import UserHistory
from sidrec.offline.data.dataset import DataError, Interactions


def check_data(path: Path) -> None:
    """Raise DataError (naming the folder) unless `path` holds a data set this install reads."""
    try:
        from sidrec.offline.data.load import detect_format
    except ImportError as e:  # pandas: the train extra
        raise DataError(
            path, f"reading a data set needs the train extra ({e}): pip install 'sidrec[train]'"
        ) from None
    detect_format(path)


def read_interactions(data: str | Path, tie_order: str = "file") -> Interactions:
    """The data set at `data` (any format `sidrec train --data` takes, or 'ml-100k' to fetch
    it), read by the same reader as training."""
    try:
        from sidrec.offline.data.load import load_dataset
        from sidrec.offline.pipeline import resolve_data
    except ImportError as e:  # pandas: the train extra
        raise DataError(
            data, f"reading a data set needs the train extra ({e}): pip install 'sidrec[train]'"
        ) from None
    return load_dataset(resolve_data(data), tie_order=tie_order)


def unknown_events(data: Interactions, known: set[str]) -> int:
    """Events of `data` whose item is not in `known` (a bundle's item ids)."""
    lacking = np.array([False] + [i not in known for i in data.catalog.ids])
    return sum(int(lacking[s].sum()) for s in data.sequences)


def user_histories(
    data: Interactions, history_len: int, known: set[str] | None = None
) -> Iterator[UserHistory]:
    """(user, their newest history_len (item_id, ts), oldest first), every user in data
    order (an empty list when none is left). `known`: the bundle's item ids; events of other
    items are skipped (the service could not encode them) before the newest are taken."""
    ids = data.catalog.ids
    for u, user_id in enumerate(data.users):
        rows = data.sequences[u]
        stamps = data.timestamps[u] if data.timestamps is not None else None
        if known is None:
            rows = rows[-history_len:]
            stamps = stamps[-history_len:] if stamps is not None else None
            items = [ids[r - 1] for r in rows.tolist()]
        else:
            keep = [i for i, r in enumerate(rows.tolist()) if ids[r - 1] in known]
            keep = keep[-history_len:]
            items = [ids[rows[i] - 1] for i in keep]
            stamps = stamps[keep] if stamps is not None else None
        ts = stamps.tolist() if stamps is not None else [0] * len(items)
        yield user_id, list(zip(items, ts, strict=True))
