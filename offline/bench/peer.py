"""A real peer model for the quality benchmark: RecBole's SASRec (CE loss) on our split.

The benchmark's HSTU figures need a reference trained and scored the same way. This module
exports the very split the HSTU runs use (`make_split(data, cold_fraction, seed=SPLIT_SEED)`),
trains RecBole 1.2.1's own SASRec on its training sequences in a separate virtual
environment (RecBole needs numpy < 2 and old pins that sidrec must not inherit), reads back
the ranks, which recbole_sasrec.py computes with offline/metrics.py's rule, and writes a
metrics.json shaped like offline/train.py's, so the same report code reads both.

Runs in sidrec's venv and never imports recbole.

    python -m sidrec.offline.bench.peer DATA OUT --epochs 100 --patience 10 --max-len 50

On a machine where sidrec is not installed but RecBole is (a lent GPU), `--stage export`
writes the split and prints the recbole_sasrec.py command to run there; `--stage collect`
scores its output back here.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from sidrec.offline.data.dataset import Interactions
from sidrec.offline.split import Split

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "recbole-requirements.txt"
SCRIPT = HERE / "recbole_sasrec.py"
METRICS_PY = HERE.parent / "metrics.py"  # loaded by path inside the RecBole venv
VENV_FOLDER = "recbole-venv"
MARKER = "sidrec-requirements.sha256"  # written last: a venv without it is half-built
DATASET = "peer"  # RecBole's data set name: export/peer/peer.inter, .item (recbole_sasrec.py)
EVAL_FILE = "eval.npz"
EXPORT_FOLDER = "export"  # under a run's out_dir: what export_peer_split writes, collect checks
PEER_RESULT = "peer_result.json"
METRICS_FILE = "metrics.json"
TIMING_FILE = "peer_timing.json"  # what --time-batches writes instead of a run
LOG_FILE = "log.txt"
# What the venv build must import, or it is not finished (the script's whole import path).
SMOKE_IMPORTS = (
    "import numpy, torch, recbole, torch.utils.tensorboard; "
    "from recbole.config import Config; from recbole.data import create_dataset; "
    "from recbole.data.dataloader import TrainDataLoader; from recbole.trainer import Trainer; "
    "from recbole.model.sequential_recommender import SASRec"
)


class PeerVenvError(RuntimeError):
    """The RecBole venv could not be built; `output` holds what the failing command printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(f"{message}\n{output[-4000:]}" if output else message)
        self.output = output


@dataclass(frozen=True)
class PeerConfig:
    """RecBole's SASRec defaults (SASRec.yaml) and training settings; every one is passed to
    recbole_sasrec.py as --name-with-dashes and recorded in metrics.json."""

    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256
    hidden_dropout_prob: float = 0.5
    attn_dropout_prob: float = 0.5
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    train_batch_size: int = 256
    eval_batch_size: int = 512
    eval_step: int = 1

    def script_args(self) -> list[str]:
        return [
            part
            for f in fields(self)
            for part in (f"--{f.name.replace('_', '-')}", str(getattr(self, f.name)))
        ]


# ----------------------------------------------------------------------------- export


def _write_atomic(path: Path, header: list[str], columns: list[np.ndarray]) -> None:
    """A RecBole atomic file: tab-separated integer columns under a `name:type` header."""
    with path.open("w") as f:
        f.write("\t".join(header) + "\n")
        for row in zip(*(c.tolist() for c in columns), strict=True):
            f.write("\t".join(map(str, row)) + "\n")


def export_split(data: Interactions, split: Split, folder: Path) -> dict[str, int]:
    """Writes what the peer trains and is scored on into `folder`; returns counts.

    - peer/peer.inter: every training event (`split.train_sequences`: withheld items already
      removed), user index and item row as tokens, the position in the user's training
      sequence as the time, so RecBole keeps our order.
    - peer/peer.item: every catalog row 1..n, so each row has a RecBole id (and a score), trained
      or not.
    - eval.npz: the valid and test EvalSets (users, targets, histories as CSR offsets +
      items; the full histories, withheld items included) and n.

    (RecBole reads data set NAME from DATA_PATH/NAME/NAME.inter: hence the subfolder.)
    """
    if len(split.train_sequences) != len(data.sequences):
        raise ValueError("the split was not made from this data set")
    (folder / DATASET).mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(s) for s in split.train_sequences], dtype=np.int64)
    users = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    items = (
        np.concatenate(split.train_sequences).astype(np.int64)
        if lengths.sum()
        else np.zeros(0, dtype=np.int64)
    )
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(len(items), dtype=np.int64) - starts
    _write_atomic(
        folder / DATASET / f"{DATASET}.inter",
        ["user_id:token", "item_id:token", "timestamp:float"],
        [users, items, positions],
    )
    _write_atomic(
        folder / DATASET / f"{DATASET}.item",
        ["item_id:token"],
        [np.arange(1, split.num_items + 1, dtype=np.int64)],
    )
    arrays: dict[str, np.ndarray] = {
        "num_items": np.int64(split.num_items),
        "cold_fraction": np.float64(split.cold_fraction),  # what collect_peer_run checks
    }
    for name in ("valid", "test"):
        stage = split.stage(name)
        offsets = np.zeros(len(stage) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(h) for h in stage.histories])
        arrays[f"{name}_users"] = stage.users.astype(np.int64)
        arrays[f"{name}_targets"] = stage.targets.astype(np.int64)
        arrays[f"{name}_offsets"] = offsets
        arrays[f"{name}_items"] = (
            np.concatenate(stage.histories).astype(np.int64)
            if len(stage)
            else np.zeros(0, dtype=np.int64)
        )
    np.savez(folder / EVAL_FILE, **arrays)  # type: ignore[arg-type]
    return {
        "train_events": len(items),
        "train_users": int((lengths > 0).sum()),
        "items": split.num_items,
        "valid_users": len(split.valid),
        "test_users": len(split.test),
    }


# ----------------------------------------------------------------------------- venv


def requirements_digest(requirements: Path = REQUIREMENTS) -> str:
    """What the venv is keyed on: the pins and the Python it is made with."""
    h = hashlib.sha256(requirements.read_bytes())
    h.update(f"python {sys.version_info.major}.{sys.version_info.minor}".encode())
    return h.hexdigest()


def _run(command: list[str], what: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise PeerVenvError(f"{what} failed (exit {done.returncode}): {' '.join(command)}", output)
    return output


def peer_venv(
    cache_dir: Path | None = None,
    requirements: Path = REQUIREMENTS,
    log: Callable[[str], None] = print,
) -> Path:
    """The python of the RecBole venv, built once under cache_dir/recbole-venv/<digest>.

    Idempotent and safe to call from several processes: a lock file serialises builds, and
    the marker file (the digest) is written only after the install and an import check
    passed, so a build that died half-way is redone."""
    if cache_dir is None:
        from sidrec.offline.pipeline import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    digest = requirements_digest(requirements)
    root = Path(cache_dir) / VENV_FOLDER
    venv = root / digest[:16]
    python = venv / "bin" / "python"
    marker = venv / MARKER

    def ready() -> bool:
        return python.exists() and marker.is_file() and marker.read_text().strip() == digest

    if ready():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{digest[:16]}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():  # built by another process while we waited
            return python
        started = time.perf_counter()
        log(f"building the RecBole venv in {venv} (once; a minute or two)")
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], "creating the venv")
        _run(
            [
                str(python), "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--no-input", "-r", str(requirements),
            ],
            "installing recbole-requirements.txt",
        )  # fmt: skip
        _run([str(python), "-c", SMOKE_IMPORTS], "importing RecBole in the new venv")
        marker.write_text(digest + "\n")
        log(f"RecBole venv ready in {time.perf_counter() - started:.0f}s")
    return python


# ----------------------------------------------------------------------------- run


def export_peer_split(
    data_dir: Path, out_dir: Path, cold_fraction: float = 0.0, log: Callable[[str], None] = print
) -> tuple[Interactions, Split, Path]:
    """The benchmark's split of `data_dir` exported for the peer into out_dir/export."""
    from sidrec.offline.bench.runner import SPLIT_SEED
    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.split import make_split

    data = load_dataset(Path(data_dir))
    split = make_split(data, cold_fraction=cold_fraction, seed=SPLIT_SEED)
    export = Path(out_dir) / EXPORT_FOLDER
    counts = export_split(data, split, export)
    log(f"exported {counts} to {export}")
    return data, split, export


@dataclass(frozen=True)
class PeerRun:
    """How one run of recbole_sasrec.py trains: each field is one of its --options.

    `threads` = torch threads in the peer (0: torch's default, all cores). `time_batches` > 0
    trains only that many batches and projects an epoch and a validation from them, so a run
    can be sized before it is started. `max_seconds` > 0 starts no epoch but the first after
    that many seconds of training; `resume` continues the run whose state an earlier call
    left in the output folder."""

    seed: int = 0
    epochs: int = 100
    patience: int = 10
    max_len: int = 50  # RecBole's usual: 50 on Amazon sets, 200 on MovieLens
    device: str = "cpu"  # cpu | auto
    threads: int = 0
    time_batches: int = 0
    max_seconds: float = 0.0
    resume: bool = False
    config: PeerConfig = field(default_factory=PeerConfig)

    def script_args(self) -> list[str]:
        return [
            "--seed", str(self.seed), "--epochs", str(self.epochs),
            "--patience", str(self.patience), "--max-len", str(self.max_len),
            "--device", self.device, "--threads", str(self.threads),
            "--time-batches", str(self.time_batches), "--max-seconds", str(self.max_seconds),
            *(["--resume"] if self.resume else []), *self.config.script_args(),
        ]  # fmt: skip


def peer_command(
    python: str | Path,
    export: Path,
    out_dir: Path,
    run: PeerRun,
    script: Path = SCRIPT,
    metrics_py: Path = METRICS_PY,
) -> list[str]:
    """The recbole_sasrec.py command line that trains the peer on `export` into `out_dir`."""
    return [
        str(python), str(script), "--data", str(export), "--out", str(out_dir),
        "--metrics-py", str(metrics_py), *run.script_args(),
    ]  # fmt: skip


def run_recbole_sasrec(
    data_dir: Path,
    out_dir: Path,
    run: PeerRun | None = None,
    cold_fraction: float = 0.0,
    cache_dir: Path | None = None,
    timeout: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and score RecBole's SASRec on the benchmark's split of `data_dir`; writes
    out_dir/metrics.json (returned), log.txt, the ranks (*.npy) and peer_result.json.

    With `run.time_batches` > 0 it returns (and writes to out_dir/peer_timing.json) the
    projected seconds of an epoch and of a validation instead, and no metrics.json. The venv
    build (first call only) is not part of wall_seconds; its time is `venv_seconds`."""
    run = run or PeerRun()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    venv_started = time.perf_counter()
    python = peer_venv(cache_dir, log=log)
    venv_seconds = time.perf_counter() - venv_started

    data, split, export = export_peer_split(data_dir, out_dir, cold_fraction, log)
    work = out_dir / "recbole"  # RecBole writes log/, log_tensorboard/ and saved/ into its cwd
    work.mkdir(exist_ok=True)
    command = peer_command(python, export.resolve(), out_dir.resolve(), run)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    if run.threads > 0:
        env["OMP_NUM_THREADS"] = str(run.threads)
    log(f"training RecBole SASRec: log in {out_dir / LOG_FILE}")
    with (out_dir / LOG_FILE).open("w") as stdout:
        stdout.write(" ".join(command) + "\n")
        stdout.flush()
        done = subprocess.run(
            command, cwd=work, stdout=stdout, stderr=subprocess.STDOUT, env=env, timeout=timeout
        )
    if done.returncode != 0:
        tail = (out_dir / LOG_FILE).read_text()[-3000:]
        raise RuntimeError(f"recbole_sasrec.py failed (exit {done.returncode}):\n{tail}")

    if run.time_batches > 0:
        timing = json.loads((out_dir / TIMING_FILE).read_text())
        log(
            f"RecBole SASRec on {data.name}: {timing['median_batch_seconds']:.3f}s a batch of "
            f"{timing['train_batch_size']}, {timing['batches_per_epoch']} batches an epoch: "
            f"about {timing['projected_epoch_train_seconds'] / 60:.0f} minutes of training and "
            f"{timing['projected_valid_seconds'] / 60:.0f} of validation an epoch "
            f"({timing['threads']} threads, {timing['device']})"
        )
        return timing
    return collect_peer_run(data, split, out_dir, venv_seconds=venv_seconds, log=log)


def collect_peer_run(
    data: Interactions,
    split: Split,
    out_dir: Path,
    venv_seconds: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """metrics.json (written and returned) from what recbole_sasrec.py left in out_dir: its
    peer_result.json (the settings it ran with, epochs, times) and the ranks, scored as
    offline/train.py scores ours. Also reads a run made on another machine (a lent GPU)."""
    from sidrec.offline.bench.runner import SPLIT_SEED
    from sidrec.offline.evaluate import summarize
    from sidrec.offline.split import split_summary

    out_dir = Path(out_dir)
    exported = out_dir / EXPORT_FOLDER / EVAL_FILE
    if exported.is_file():  # a split with other withheld items would bin the ranks wrongly
        with np.load(exported) as f:
            made_with = float(f["cold_fraction"]) if "cold_fraction" in f else split.cold_fraction
        if made_with != split.cold_fraction:
            raise ValueError(
                f"{out_dir} was exported with cold fraction {made_with:g}, not "
                f"{split.cold_fraction:g}: collect with the export's --cold-fraction"
            )
    peer = json.loads((out_dir / PEER_RESULT).read_text())
    ranks = {
        f"{stage}{suffix}": np.load(out_dir / f"{stage}_ranks{suffix}.npy")
        for stage in ("valid", "test")
        for suffix in ("", "_kept")
    }
    for name, r in ranks.items():
        expected = len(split.stage(name.removesuffix("_kept")))
        if len(r) != expected or (len(r) and (r.min() < 1 or r.max() > split.num_items)):
            raise RuntimeError(f"{name} ranks: {len(r)} values, expected {expected} in 1..n")
    args = peer["args"]
    epochs_log = peer["epochs"]
    metrics = {
        "dataset": data.name,
        "model": "recbole-sasrec",
        "config": {
            "model": "RecBole SASRec",
            "loss_type": "CE",
            "train_neg_sample_args": None,
            "seed": args["seed"],
            "epochs": args["epochs"],
            "patience": args["patience"],
            "max_len": args["max_len"],
            "cold_fraction": split.cold_fraction,
            "split_seed": SPLIT_SEED,
            "device": args["device"],
            "threads": args["threads"],
            "max_seconds": args["max_seconds"],
            **{f.name: args[f.name] for f in fields(PeerConfig)},
        },
        "recbole": peer["recbole"],
        "torch": peer["torch"],
        "numpy": peer["numpy"],
        "python": peer["python"],
        "device": peer["device"],
        "best_epoch": peer["best_epoch"],
        "epochs_run": peer["epochs_run"],
        "stopped_by_time_limit": peer["stopped_by_time_limit"],
        "resumed_after_epoch": peer["resumed_after_epoch"],
        "mean_epoch_train_seconds": float(np.mean([e["train_seconds"] for e in epochs_log]))
        if epochs_log
        else 0.0,
        "wall_seconds": round(peer["seconds"], 1),
        "venv_seconds": round(venv_seconds, 1),
        "train_rows": peer["train_rows"],
        "split": split_summary(split),
        "epochs": epochs_log,
        "valid": summarize(ranks["valid"], split, "valid"),
        "test": summarize(ranks["test"], split, "test"),
        "valid_history_kept": summarize(ranks["valid_kept"], split, "valid"),
        "test_history_kept": summarize(ranks["test_kept"], split, "test"),
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    test = metrics["test"]["overall"]
    cut = ", cut by --max-seconds" if metrics["stopped_by_time_limit"] else ""
    log(
        f"RecBole SASRec: best epoch {metrics['best_epoch']} of {metrics['epochs_run']}{cut}, "
        f"test NDCG@10 {test['ndcg@10']:.4f} HR@10 {test['hr@10']:.4f} "
        f"({metrics['mean_epoch_train_seconds']:.1f}s per training epoch)"
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    defaults = PeerConfig()
    p = argparse.ArgumentParser(description="Train and score RecBole's SASRec on our split.")
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument(
        "--stage", choices=("all", "export", "collect"), default="all",
        help="all: export, train in the RecBole venv, score. export: write the split and print "
        "the training command, for a machine with RecBole and no sidrec (a lent GPU). collect: "
        "score what that command left in OUT",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--max-len", type=int, default=50, help="50 for Amazon sets, 200 for ML-1M")
    p.add_argument("--cold-fraction", type=float, default=0.0)
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="default: sidrec's cache folder")
    p.add_argument("--time-batches", type=int, default=0,
                   help="time this many training batches, project an epoch and stop")  # fmt: skip
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="start no epoch but the first after this many seconds")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue from the state an earlier call left in OUT")  # fmt: skip
    for f in fields(PeerConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))  # fmt: skip
    args = p.parse_args(argv)
    run = PeerRun(
        seed=args.seed, epochs=args.epochs, patience=args.patience, max_len=args.max_len,
        device=args.device, threads=args.threads, time_batches=args.time_batches,
        max_seconds=args.max_seconds, resume=args.resume,
        config=PeerConfig(**{f.name: getattr(args, f.name) for f in fields(PeerConfig)}),
    )  # fmt: skip
    if args.stage == "all":
        run_recbole_sasrec(args.data, args.out, run, args.cold_fraction, cache_dir=args.cache)
        return
    if args.stage == "export":
        _, _, export = export_peer_split(args.data, args.out, args.cold_fraction)
        command = peer_command(
            "python3",
            export,
            args.out,
            run,
            script=Path(os.path.relpath(SCRIPT)),
            metrics_py=Path(os.path.relpath(METRICS_PY)),
        )
        print("train it with (RecBole 1.2.1 installed; from this folder):")
        print(" ".join(command))
        print(f"then: python -m sidrec.offline.bench.peer {args.data} {args.out} --stage collect "
              f"--cold-fraction {args.cold_fraction:g}")  # fmt: skip
        return
    from sidrec.offline.bench.runner import SPLIT_SEED
    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.split import make_split

    data = load_dataset(args.data)
    collect_peer_run(data, make_split(data, args.cold_fraction, seed=SPLIT_SEED), args.out)


if __name__ == "__main__":
    main()
