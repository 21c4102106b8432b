"""The user encoder's graph as exported today against the forms it replaced, side by side
under ONNX Runtime (1 thread, ML-1M shape: d=50, 2 blocks, 200-item histories). Prints the
median of each form per batch size and its ratio to today's; checks all give one vector.

- "all rows": every row of the last block, then the last position read out (replaced by
  computing only the last query row).
- "gathered bias": block 0's position bias gathered from its n x n indices at run time and
  the time buckets clamped as int64 (replaced by a padded table that ONNX Runtime folds at
  load, and float64 clamps).

    python -m loadtests.encoder_graph_bench [--repeats 60]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from sidrec.model import hstu as hstu_module
from sidrec.model.hstu import HSTU, RelativeBias, UserEncoder
from sidrec.offline import onnx_export

D, HISTORY_LEN = 50, 200  # GR's ML-1M model (HSTU's defaults) and its 200-item histories


class AllRowsEncoder(UserEncoder):
    """Every row of the last block, then the last position read out."""

    def forward(self, item_vectors, timestamps, mask, query_time):  # type: ignore[override]
        b, n = mask.shape
        d = self.hstu.d
        last = (mask.long().sum(1) - 1).clamp(min=0)  # [B]
        shifted = torch.cat([timestamps[:, 1:], timestamps[:, -1:]], dim=1)
        is_last = torch.arange(n)[None, :] == last[:, None]
        next_ts = torch.where(is_last, query_time[:, None].expand(b, n), shifted)
        out = self.hstu(item_vectors, timestamps, next_ts, mask)  # [B, N, d]
        return out.gather(1, last.view(b, 1, 1).expand(b, 1, d)).view(-1, d)


def _gathered_from_buckets(
    self: RelativeBias, n: int, buckets: torch.Tensor | None
) -> torch.Tensor:
    positions = torch.arange(n)
    rel = self.padded_len - 1 + positions[None, :] - positions[:, None]  # [N, N]
    bias = F.embedding(rel, self.pos_w[:, None]).squeeze(-1)[None]
    if self.use_time and buckets is not None:
        bias = bias + F.embedding(buckets, self.ts_w[:, None]).squeeze(-1)
    return bias


def _int64_time_buckets(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    dt = dt.abs().clamp(min=1).to(torch.float64)
    divisor = hstu_module.TIME_BUCKET_DIVISOR
    return torch.floor(torch.log(dt) / divisor).long().clamp(0, num_buckets)


@contextlib.contextmanager
def _all_rows() -> Iterator[None]:
    # export_user_encoder wraps the HSTU in the module's UserEncoder: swap in the old one
    onnx_export.UserEncoder = AllRowsEncoder  # type: ignore[misc]
    try:
        yield
    finally:
        onnx_export.UserEncoder = UserEncoder  # type: ignore[misc]


@contextlib.contextmanager
def _gathered_bias() -> Iterator[None]:
    today = RelativeBias.from_buckets, hstu_module.time_buckets
    RelativeBias.from_buckets = _gathered_from_buckets  # type: ignore[method-assign]
    hstu_module.time_buckets = _int64_time_buckets
    try:
        yield
    finally:
        RelativeBias.from_buckets, hstu_module.time_buckets = today  # type: ignore[method-assign]


FORMS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "today": contextlib.nullcontext,
    "all rows": _all_rows,
    "gathered bias": _gathered_bias,
}


def export_forms(folder: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    hstu = HSTU(attn_norm="length")  # d=50, 2 blocks, padded 211: GR's ML-1M model
    with torch.no_grad():  # trained-looking bias tables, so a wrong index shows
        for block in hstu.blocks:
            block.rel_bias.pos_w.normal_(0, 0.5)
            block.rel_bias.ts_w.normal_(0, 0.5)
    paths = {}
    for name, form in FORMS.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.onnx"
        with form():
            onnx_export.export_user_encoder(hstu, D, paths[name], HISTORY_LEN)
    return paths


def repeats_at(batch: int, repeats: int) -> int:
    """Runs at `batch` for `repeats` at batch 1: fewer for bigger batches, at least 5."""
    return max(5, repeats // batch * 2) if batch > 1 else repeats


def history_feeds(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """user_encoder.onnx inputs for `batch` full HISTORY_LEN-item histories of d=D vectors."""
    stamps = np.cumsum(rng.integers(1, 10**5, (batch, HISTORY_LEN)), 1) + 10**9
    return {
        "item_vectors": rng.normal(0, 0.1, (batch, HISTORY_LEN, D)).astype(np.float32),
        "timestamps": stamps.astype(np.int64),
        "mask": np.ones((batch, HISTORY_LEN), bool),
        "query_time": (stamps[:, -1] + 60).astype(np.int64),
    }


def interleaved_median_ms(
    sessions: dict[Any, ort.InferenceSession], feeds: dict[str, np.ndarray], repeats: int
) -> dict[Any, float]:
    """Median milliseconds of each session on `feeds`, the sessions run in turn `repeats`
    times, so load on the machine hits all alike."""
    times: dict[Any, list[float]] = {key: [] for key in sessions}
    for _ in range(repeats):
        for key, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds)
            times[key].append(time.perf_counter() - started)
    return {key: float(np.median(t)) * 1e3 for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=60, help="runs per form at batch 1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_forms(Path(tmp))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for name, path in paths.items()
        }
        rng = np.random.default_rng(0)
        for batch in (1, 8, 32):
            repeats = repeats_at(batch, args.repeats)
            feeds = history_feeds(batch, rng)
            outs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
            for name, out in outs.items():
                gap = np.abs(out - outs["today"]).max()
                assert gap < 1e-5, f"{name} disagrees with today's graph by {gap}"
            ms = interleaved_median_ms(sessions, feeds, repeats)
            others = ", ".join(
                f"{name} {ms[name]:.2f} ms ({ms[name] / ms['today']:.2f}x)"
                for name in ms
                if name != "today"
            )
            print(f"batch {batch}: today {ms['today']:.2f} ms, {others} (median of {repeats})")


if __name__ == "__main__":
    main()
