"""Multi-process training: `torchrun --nproc_per_node N -m sidrec.offline.train_ddp JOB OUT_DIR`.

A job file holds everything `train` needs (interactions, split, SIDs, config), written once by
the parent with `save_job`; every rank loads it, so all ranks train on identical inputs.
`launch` runs torchrun from Python and waits for it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sidrec.offline.data.dataset import Interactions
from sidrec.offline.split import Split
from sidrec.offline.train import LOG_FILE, TrainConfig, train


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


# A port that torchrun's agent found free and a rank then could not bind (or a peer that
# reset while the ranks were connecting) is a race with other processes on the machine, not a
# fault of the job: a launch that failed so before its first epoch is tried again, once. Any
# other failure is raised at once.
RENDEZVOUS_RETRIES = 1
TRANSIENT_RENDEZVOUS = re.compile(
    r"Address already in use|EADDRINUSE|Connection reset by peer|Connection refused"
    r"|DistNetworkError|RendezvousConnectionError|connectFullMesh"
)


class TrainingLaunchError(subprocess.CalledProcessError):
    """torchrun's non-zero exit, with the end of what the ranks printed in the message."""

    def __str__(self) -> str:
        output = f"{self.stdout or ''}{self.stderr or ''}".strip()
        tail = f"\n--- last lines of the ranks' output ---\n{output[-4000:]}" if output else ""
        return f"{super().__str__()}{tail}"


def launch(
    job_path: str | Path,
    out_dir: str | Path,
    nproc_per_node: int = 2,
    timeout: float | None = None,
    quiet: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the job under torchrun (same interpreter) and wait; raises TrainingLaunchError on a
    non-zero exit (after one retry if the ranks failed to connect).

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
    for attempt in range(1 + RENDEZVOUS_RETRIES):
        done = subprocess.run(command, capture_output=quiet, text=True, timeout=timeout, env=env)
        if done.returncode == 0:
            return done
        output = f"{done.stdout or ''}{done.stderr or ''}"
        started = (log := Path(out_dir) / LOG_FILE).exists() and log.stat().st_size > 0
        if attempt < RENDEZVOUS_RETRIES and not started and TRANSIENT_RENDEZVOUS.search(output):
            continue
        raise TrainingLaunchError(done.returncode, command, done.stdout, done.stderr)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="job file written by save_job")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    data, split, sids, codes_per_layer, cfg = load_job(args.job)
    train(data, split, sids, codes_per_layer, cfg, args.out_dir)


if __name__ == "__main__":
    main()
