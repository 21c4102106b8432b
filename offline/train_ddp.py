"""Multi-process training: `torchrun --nproc_per_node N -m sidrec.offline.train_ddp JOB OUT_DIR`.

A job file holds everything `train` needs (interactions, split, SIDs, config), written once by
the parent with `save_job`; every rank loads it, so all ranks train on identical inputs.
`launch` runs torchrun from Python and waits for it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sidrec.offline.data.dataset import Interactions
from sidrec.offline.split import Split
from sidrec.offline.train import TrainConfig, train


def save_job(
    path: str | Path,
    data: Interactions,
    split: Split,
    sids: np.ndarray | None,
    codes_per_layer: int | None,
    cfg: TrainConfig,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    job = {
        "data": data,
        "split": split,
        "sids": sids,
        "codes_per_layer": codes_per_layer,
        "config": asdict(cfg),
    }
    torch.save(job, path)
    return path


def load_job(
    path: str | Path,
) -> tuple[Interactions, Split, np.ndarray | None, int | None, TrainConfig]:
    job = torch.load(path, map_location="cpu", weights_only=False)
    return (
        job["data"],
        job["split"],
        job["sids"],
        job["codes_per_layer"],
        TrainConfig(**job["config"]),
    )


def launch(
    job_path: str | Path,
    out_dir: str | Path,
    nproc_per_node: int = 2,
    timeout: float | None = None,
    quiet: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the job under torchrun (same interpreter) and wait; raises on a non-zero exit.

    quiet=True captures the ranks' output (returned); False lets it stream to the terminal.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m",
        "sidrec.offline.train_ddp",
        str(job_path),
        str(out_dir),
    ]
    # Unbuffered so rank 0's per-epoch lines stream as they happen when not captured.
    # OMP_NUM_THREADS=1 is what torchrun sets when it is unset, announcing it in a banner on
    # every launch; setting it here keeps that behaviour without the banner.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        command, check=True, capture_output=quiet, text=True, timeout=timeout, env=env
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="job file written by save_job")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    data, split, sids, codes_per_layer, cfg = load_job(args.job)
    train(data, split, sids, codes_per_layer, cfg, args.out_dir)


if __name__ == "__main__":
    main()
