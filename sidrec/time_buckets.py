"""The time-gap buckets of HSTU's relative attention bias, in one place for the model
(PyTorch, model/hstu.py) and the service (numpy: the user-vector cache keys on them), so both
bucket a gap the same way."""

from __future__ import annotations

import numpy as np

TIME_BUCKET_DIVISOR = 0.301  # ln(dt) / 0.301: buckets grow by a factor of e^0.301 ~ 1.35


def time_buckets_np(dt: np.ndarray, num_buckets: int) -> np.ndarray:
    """floor(ln(max(|dt|, 1)) / 0.301) clamped to [0, num_buckets], as model/hstu.py computes
    it (float64 log); dt int64 seconds -> int64 of the same shape."""
    dt = np.maximum(np.abs(np.asarray(dt, np.int64)), 1).astype(np.float64)
    return np.clip(np.floor(np.log(dt) / TIME_BUCKET_DIVISOR), 0, num_buckets).astype(np.int64)
