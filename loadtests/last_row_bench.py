"""The user encoder's graph before and after computing only the last query row of the last
block, side by side under ONNX Runtime (1 thread, ML-1M shape: d=50, 2 blocks, 200-item
histories). Prints the median of each and their ratio; checks both give the same vectors.

    python -m loadtests.last_row_bench
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sidrec.model.hstu import HSTU, UserEncoder
from sidrec.offline import onnx_export


class AllRowsEncoder(UserEncoder):
    """The previous graph: every row of the last block, then the last position read out."""

    def forward(self, item_vectors, timestamps, mask, query_time):  # type: ignore[override]
        b, n = mask.shape
        d = self.hstu.d
        last = (mask.long().sum(1) - 1).clamp(min=0)  # [B]
        shifted = torch.cat([timestamps[:, 1:], timestamps[:, -1:]], dim=1)
        is_last = torch.arange(n)[None, :] == last[:, None]
        next_ts = torch.where(is_last, query_time[:, None].expand(b, n), shifted)
        out = self.hstu(item_vectors, timestamps, next_ts, mask)  # [B, N, d]
        return out.gather(1, last.view(b, 1, 1).expand(b, 1, d)).view(-1, d)


def export_both(folder: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    hstu = HSTU()  # d=50, 2 blocks, padded 211: GR's ML-1M model
    paths = {"last row": folder / "last.onnx", "all rows": folder / "all.onnx"}
    onnx_export.export_user_encoder(hstu, 50, paths["last row"], 200)
    # export_user_encoder wraps the HSTU in the module's UserEncoder: swap in the old one
    onnx_export.UserEncoder = AllRowsEncoder  # type: ignore[misc]
    try:
        onnx_export.export_user_encoder(hstu, 50, paths["all rows"], 200)
    finally:
        onnx_export.UserEncoder = UserEncoder  # type: ignore[misc]
    return paths


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_both(Path(tmp))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for name, path in paths.items()
        }
        rng = np.random.default_rng(0)
        for batch, repeats in ((1, 60), (32, 15)):
            stamps = np.cumsum(rng.integers(1, 10**5, (batch, 200)), 1) + 10**9
            feeds = {
                "item_vectors": rng.normal(0, 0.1, (batch, 200, 50)).astype(np.float32),
                "timestamps": stamps.astype(np.int64),
                "mask": np.ones((batch, 200), bool),
                "query_time": (stamps[:, -1] + 60).astype(np.int64),
            }
            outs = [s.run(None, feeds)[0] for s in sessions.values()]
            assert np.abs(outs[0] - outs[1]).max() < 1e-5, "the two graphs disagree"
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(repeats):  # interleaved, so load on the machine hits both alike
                for name, session in sessions.items():
                    started = time.perf_counter()
                    session.run(None, feeds)
                    times[name].append(time.perf_counter() - started)
            ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
            print(
                f"batch {batch}: all rows {ms['all rows']:.2f} ms, last row only "
                f"{ms['last row']:.2f} ms (median of {repeats}), "
                f"{ms['all rows'] / ms['last row']:.2f}x"
            )


if __name__ == "__main__":
    main()
