"""Exact cache of user vectors: a request whose model inputs are those of an earlier one gets
that request's vector without running the user encoder.

A user vector is a function of the history's item vectors, their timestamps and the query
time, and the query time enters only through the time buckets of the last position
(model/hstu.py: the last real position's bias reads bucket(query_time - ts[j])). The item
vectors are named by the table's (layout, rows) (service/retrieval.py Resolved). The key is a
128-bit digest of exactly these, so a hit is what the encoder would compute: a new event, a
query time in another bucket, a re-ingested item or a compaction all miss. Users asking again
before their next event (page loads, refreshes, pagination) are what it saves.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from sidrec.time_buckets import time_buckets_np

from . import metrics

# HSTU's default bucket count (model/hstu.py). A model with fewer buckets gets a finer key,
# which is safe; gaps past bucket 128 (e^38 s) do not occur.
NUM_TIME_BUCKETS = 128


class UserVectorCache:
    """LRU of user vectors by input digest; thread-safe (the rank threads share it)."""

    def __init__(self, capacity: int, use_time: bool) -> None:
        self.capacity = capacity
        self.use_time = use_time
        self._vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._vectors)

    def key(self, layout: int, rows: np.ndarray, timestamps: np.ndarray, query_time: int) -> bytes:
        """The digest of one history's encoder inputs: rows [n] and timestamps [n] int64."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.int64(layout).tobytes())
        digest.update(np.int64(len(rows)).tobytes())
        digest.update(np.ascontiguousarray(rows, np.int64).tobytes())
        digest.update(np.ascontiguousarray(timestamps, np.int64).tobytes())
        if self.use_time:
            gaps = np.int64(query_time) - np.asarray(timestamps, np.int64)
            digest.update(time_buckets_np(gaps, NUM_TIME_BUCKETS).tobytes())
        return digest.digest()

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            vector = self._vectors.get(key)
            if vector is not None:
                self._vectors.move_to_end(key)
        metrics.USER_CACHE.labels(result="miss" if vector is None else "hit").inc()
        return vector

    def put(self, key: bytes, vector: np.ndarray) -> None:
        vector = np.array(vector, np.float32)  # a copy: the batch's array is reused
        vector.flags.writeable = False
        with self._lock:
            self._vectors[key] = vector
            self._vectors.move_to_end(key)
            while len(self._vectors) > self.capacity:
                self._vectors.popitem(last=False)
