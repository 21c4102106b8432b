"""What a deeper user encoder costs a request: the exported user_encoder.onnx at each HSTU
depth, side by side under ONNX Runtime (1 thread, ML-1M's long-history shape: d=50, dot
scoring, attention normalised by length, 200-item histories), at batch sizes 1, 8 and 32.
Prints the median milliseconds of each depth per batch size and its ratio to the first.

    python -m loadtests.encoder_depth_bench [--blocks 2,4] [--repeats 60]

The weights are random: the shapes, not the values, set the time. Runs are interleaved, so
load on a shared machine hits every depth alike.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from loadtests.encoder_graph_bench import (
    HISTORY_LEN,
    D,
    history_feeds,
    interleaved_median_ms,
    repeats_at,
)
from sidrec.model.hstu import HSTU
from sidrec.offline import onnx_export


def export_depths(blocks: list[int], folder: Path) -> dict[int, Path]:
    paths = {}
    for b in blocks:
        torch.manual_seed(0)
        hstu = HSTU(D, num_blocks=b, attn_norm="length", scoring="dot")
        paths[b] = folder / f"user_encoder_{b}_blocks.onnx"
        onnx_export.export_user_encoder(hstu, D, paths[b], HISTORY_LEN)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="2,4", help="comma-separated HSTU depths")
    parser.add_argument("--repeats", type=int, default=60, help="runs per depth at batch 1")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {
            b: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for b, path in export_depths(blocks, Path(tmp)).items()
        }
        for batch in (1, 8, 32):
            repeats = repeats_at(batch, args.repeats)
            inputs = history_feeds(batch, rng)
            for session in sessions.values():  # warm-up; every depth gives one vector a user
                assert session.run(None, inputs)[0].shape == (batch, D)
            ms = interleaved_median_ms(sessions, inputs, repeats)
            first = blocks[0]
            cells = ", ".join(f"{b} blocks {ms[b]:.2f} ms ({ms[b] / ms[first]:.2f}x)" for b in ms)
            print(f"batch {batch}: {cells} (median of {repeats})")


if __name__ == "__main__":
    main()
