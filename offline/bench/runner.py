"""Train the quality benchmark's runs, each in its own process, `jobs` at a time.

Why processes: a 2-block HSTU on ML-1M cannot keep a GPU (or two CPU cores) busy from one
Python process; a few independent runs side by side can (H100: 6 runs at once gave 2.3x the
epochs per second of one; 14 at once gave less than 6, the GPU time-slicing between them).

Each run writes its folder out/runs/<name>/ (train.py's checkpoint, log and metrics, plus
run.json when it finished), so an interrupted benchmark resumes where it stopped, and its
stages can run on different machines (prepare where MiniLM and faiss are, training where
the GPU is).

Worker: python -m sidrec.offline.bench.runner DATA OUT RUN --seeds S --epochs E ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sidrec.offline.data.dataset import Interactions
    from sidrec.offline.split import Split
    from sidrec.offline.train import SequentialRecommender
    from sidrec.sid_codebook import Codebooks

from sidrec.offline.bench.plan import HYBRID_FUSIONS, PEER, Run, plan_of, run_config

SPLIT_SEED = 0  # one split for every run: rows differ by training seed only
PREPARED = "prepared"
RUNS = "runs"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Budget:
    epochs: int = 100
    patience: int = 10
    seeds: int = 3


def run_dir(out: Path, run: Run) -> Path:
    return out / RUNS / run.name


def is_done(out: Path, run: Run) -> bool:
    return (run_dir(out, run) / RUN_FILE).is_file()


def best_hybrid(out: Path, seeds: int) -> str:
    """The hybrid fusion with the highest mean validation NDCG@10 over its headline seeds."""
    means = {}
    for group in HYBRID_FUSIONS:
        scores = [
            json.loads((out / RUNS / f"{group}.s{s}" / "metrics.json").read_text())["valid"][
                "overall"
            ]["ndcg@10"]
            for s in range(seeds)
        ]
        means[group] = float(np.mean(scores))
    return max(means, key=means.__getitem__)


def best_settings(out: Path, run: Run, seeds: int) -> tuple[str, dict[str, object]]:
    """(group, settings) of the group in run.best_of with the highest mean validation
    NDCG@10 over its finished runs (tune plan: validation-only model selection)."""
    means: dict[str, float] = {}
    settings: dict[str, dict[str, object]] = {}
    for other in plan_of(run.plan, seeds):
        if other.group not in run.best_of:
            continue
        metrics = json.loads((run_dir(out, other) / "metrics.json").read_text())
        means.setdefault(other.group, 0.0)
        means[other.group] += metrics["valid"]["overall"]["ndcg@10"]
        settings[other.group] = dict(other.settings)
    counts = {g: sum(r.group == g for r in plan_of(run.plan, seeds)) for g in means}
    group = max(means, key=lambda g: means[g] / counts[g])
    return group, settings[group]


def train_run(data_dir: Path, out: Path, run: Run, budget: Budget, device: str) -> dict:
    """Train one run into out/runs/<name>/ and write its run.json; returns run.json."""
    import torch

    if run.group == PEER:
        return _peer_run(data_dir, out, run, budget, device)

    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.pipeline import TOWER_VARIANTS, VARIANTS
    from sidrec.offline.split import make_split
    from sidrec.offline.train import TrainConfig, train
    from sidrec.sid_codebook import Codebooks

    started = time.perf_counter()
    variant = best_hybrid(out, budget.seeds) if run.variant == "best-hybrid" else run.variant
    data = load_dataset(data_dir)
    split = make_split(data, cold_fraction=run.cold_fraction, seed=SPLIT_SEED)
    picked = None
    if run.best_of:
        picked, settings = best_settings(out, run, budget.seeds)
        run = replace(run, settings=tuple(settings.items()))
    sids, codes = None, None
    # id-only runs (the tune plan) need no prepare stage; a content tower reads the SIDs
    if VARIANTS[variant][0] != "id" or variant in TOWER_VARIANTS:
        sids = np.load(out / PREPARED / f"sids-{run.sid_set}.npy")
        codes = Codebooks.load(out / PREPARED / f"codebooks-{run.sid_set}.npz").codes
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        # As the reference trainer does (TF32 matmuls); results stay within seed noise.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = TrainConfig(
        **run_config(run, VARIANTS[variant]),  # type: ignore[arg-type]
        epochs=budget.epochs,
        patience=budget.patience,
        threads=1,
        device=device,
        progress=False,
        group_by_length=True,
    )
    if data.timestamps is None:
        cfg.use_time = False
    folder = run_dir(out, run)
    result = train(data, split, sids, codes, cfg, folder)
    tower = None
    model = result.model
    # what a tower, calibration and a content term read; loaded once
    reads_content = cfg.variant != "id" or variant in TOWER_VARIANTS
    content = prepared_content(out, run) if reads_content else None
    if variant in TOWER_VARIANTS:
        from sidrec.offline.tower import attach_tower

        assert content is not None
        attach_tower(folder, split, content, codes, log=lambda _: None)
        tower = (folder, sids, content)
    elif content is not None:
        model = calibrated_model(folder, split, content, data, prepared_codebooks(out, run))
    info = {
        # the generative-retrieval papers' rule (history items stay candidates), for
        # comparing with their published figures; the benchmark's own rule excludes them
        "test_history_kept": history_kept_test(
            model, split, cfg.max_len, tower, folder, content, data.catalog.fields
        ),
        "run": run.as_dict(),
        "resolved_variant": variant,
        "picked_settings_of": picked,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.epochs),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "device": torch.cuda.get_device_name()
        if cfg.device != "cpu" and torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
    }
    (folder / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def calibrated_model(
    folder: Path, split: Split, content: np.ndarray, data: Interactions, codebooks: Codebooks
) -> SequentialRecommender:
    """Calibrate folder's trained SID model for new items (offline/new_items.py) and load it
    with the content part and paths calibration kept."""
    from sidrec.offline.new_items import calibrate_scale
    from sidrec.offline.train import CHECKPOINT_FILE, load_checkpoint

    calibrate_scale(folder, split, content, log=lambda _: None, codebooks=codebooks,
                    item_fields=data.catalog.fields)  # fmt: skip
    return load_checkpoint(folder / CHECKPOINT_FILE)[0]


def prepared_content(out: Path, run: Run) -> np.ndarray:
    """The content vectors [n, C] that `run`'s SID set was made from."""
    from sidrec.offline.bench.plan import SID_SETS

    return np.load(out / PREPARED / f"content-{SID_SETS[run.sid_set][0]}.npy")


def prepared_codebooks(out: Path, run: Run) -> Codebooks:
    """The codebooks of `run`'s SID set."""
    from sidrec.sid_codebook import Codebooks

    return Codebooks.load(out / PREPARED / f"codebooks-{run.sid_set}.npz")


def finish_stopped(data_dir: Path, out: Path, run: Run) -> dict | None:
    """Close a run that was stopped before early stopping ended it (a time limit, Ctrl-C):
    evaluate its best-validation checkpoint on test once, as train() would have, and write
    metrics.json and run.json, marked "stopped". Returns run.json, or None when the run has
    no checkpoint or is already done."""
    import torch

    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.split import make_split, split_summary
    from sidrec.offline.train import (
        CHECKPOINT_FILE,
        LOG_FILE,
        METRICS_FILE,
        evaluate_model,
        load_checkpoint,
    )  # fmt: skip

    folder = run_dir(out, run)
    if is_done(out, run) or not (folder / CHECKPOINT_FILE).is_file():
        return None
    model, cfg, ckpt = load_checkpoint(folder / CHECKPOINT_FILE)
    data = load_dataset(data_dir)
    split = make_split(data, cold_fraction=run.cold_fraction, seed=SPLIT_SEED)
    lines = [json.loads(x) for x in (folder / LOG_FILE).read_text().splitlines() if x]
    device = torch.device("cpu")
    valid = evaluate_model(model, split, "valid", cfg, device)
    test = evaluate_model(model, split, "test", cfg, device)
    note = f"stopped by hand after {len(lines)} epochs; best validation epoch {ckpt['epoch']}"
    metrics = {
        "dataset": data.name,
        "config": {**ckpt["config"], "device": "cpu"},
        "world_size": 1,
        "device": "cpu",
        "best_epoch": ckpt["epoch"],
        "epochs_run": len(lines),
        "mean_epoch_train_seconds": float(np.mean([x["train_seconds"] for x in lines])),
        "split": split_summary(split),
        "valid": valid,
        "test": test,
        "stopped": note,
    }
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    content = prepared_content(out, run) if cfg.variant != "id" else None
    if content is not None:
        model = calibrated_model(folder, split, content, data, prepared_codebooks(out, run))
    info = {
        "test_history_kept": history_kept_test(
            model, split, cfg.max_len, None, folder, content, data.catalog.fields
        ),
        "run": run.as_dict(),
        "resolved_variant": run.variant,
        "best_epoch": ckpt["epoch"],
        "epochs_run": len(lines),
        "wall_seconds": round(sum(x["seconds"] for x in lines), 1),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "stopped": note,
    }
    (folder / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def history_kept_test(
    model: SequentialRecommender,
    split: Split,
    max_len: int,
    tower: tuple[Path, np.ndarray, np.ndarray] | None = None,
    folder: Path | None = None,
    content: np.ndarray | None = None,
    item_fields: Sequence[dict[str, str]] | None = None,
) -> dict:
    """Test report of a trained model with the user's history items left as candidates;
    `tower` = (run folder, SIDs, content vectors) for a model with a content tower; `folder`,
    the run folder of one without, holds its new-item scale and content-term weight
    (offline/new_items.py; a term needs the catalog's `content` vectors, and its items'
    fields where it reads genres and years)."""
    from sidrec.content_term import ContentTerm
    from sidrec.offline.evaluate import evaluate
    from sidrec.offline.new_items import load_content_term, load_new_item_scale
    from sidrec.offline.tower import load_tower, model_scorer

    if tower is None:
        scale = 1.0 if folder is None else load_new_item_scale(folder)
        term = ContentTerm() if folder is None else load_content_term(folder)
        scorer = model_scorer(
            model, split.train_counts, content=content, new_item_scale=scale,
            content_term=term, item_fields=item_fields,
        )  # fmt: skip
    else:
        folder, sids, content = tower
        scorer = model_scorer(model, split.train_counts, sids, load_tower(folder), content)
    return evaluate(scorer, split, "test", max_history=max_len, keep_history=True)


def _peer_run(data_dir: Path, out: Path, run: Run, budget: Budget, device: str) -> dict:
    """RecBole's SASRec on the same split, in its own virtual environment (peer.py)."""
    from sidrec.offline.bench.peer import PeerRun, run_recbole_sasrec
    from sidrec.offline.data.load import load_dataset

    started = time.perf_counter()
    folder = run_dir(out, run)
    # RecBole's usual history lengths: 50 on short-sequence sets (Amazon), 200 on MovieLens.
    data = load_dataset(data_dir)
    mean_length = data.num_events / max(len(data.users), 1)
    peer_run = PeerRun(
        seed=run.seed, epochs=budget.epochs, patience=budget.patience,
        max_len=200 if mean_length >= 50 else 50, threads=1,
        device="cpu" if device == "cpu" else "auto",  # the peer script's choices
    )  # fmt: skip
    metrics = run_recbole_sasrec(data_dir, folder, peer_run, cold_fraction=run.cold_fraction)
    info = {
        "run": run.as_dict(),
        "resolved_variant": PEER,
        "best_epoch": metrics["best_epoch"],
        "epochs_run": metrics["epochs_run"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "device": metrics.get("device", device),
    }
    (folder / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def training_order(runs: list[Run]) -> list[Run]:
    """Runs others wait for, base headline and reference, large seed 0, ablations, then the
    large shape's other seeds (a large run costs about six base runs on CPU)."""
    awaited = {group for r in runs for group in r.after}

    def rank(run: Run) -> int:
        if run.group in awaited:
            return 0
        if run.shape == "large":
            return 2 if run.seed == 0 else 4
        return 3 if run.kind == "ablation" else 1

    return sorted(runs, key=rank)


def train_all(
    data_dir: Path,
    out: Path,
    runs: list[Run],
    budget: Budget,
    device: str,
    jobs: int,
    log: Callable[[str], None] = print,
    start_for: float | None = None,
) -> list[str]:
    """Train every run not done yet, `jobs` processes at a time; returns the failed names.

    With `start_for`, runs start only during the first `start_for` seconds; the ones running
    then finish and the rest are left for a later call. A time-limited call (a lent GPU's
    10-minute commands) so loses no half-trained run.

    Order: `training_order`, so a benchmark stopped early misses its least informative runs.
    A run waits until the groups in its `after` are done in every seed; it fails at once when
    one of those failed or is neither done nor among the runs to train.
    """
    pending = training_order([r for r in runs if not is_done(out, r)])
    done = {r.name for r in runs if is_done(out, r)}
    log(f"{len(runs) - len(pending)} of {len(runs)} runs already done; {len(pending)} to train")
    running: dict[subprocess.Popen[bytes], tuple[Run, float]] = {}
    failed: list[str] = []
    began = time.perf_counter()

    def waits_for(run: Run) -> list[str]:
        return [r.name for r in plan_of(run.plan, budget.seeds) if r.group in run.after]

    def blocker(run: Run) -> str | None:
        coming = {r.name for r in pending} | {r.name for r, _ in running.values()}
        for name in waits_for(run):
            if name in failed:
                return f"{name} failed"
            if name not in done and name not in coming:
                return f"it waits for {name}, which is neither done nor to be trained here"
        return None

    def start(run: Run) -> None:
        folder = run_dir(out, run)
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "sidrec.offline.bench.runner", str(data_dir), str(out),
            run.name, "--seeds", str(budget.seeds), "--epochs", str(budget.epochs),
            "--patience", str(budget.patience), "--device", device, "--plan", run.plan,
        ]  # fmt: skip
        with (folder / "log.txt").open("wb") as stdout:
            process = subprocess.Popen(
                command,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            )
        running[process] = (run, time.perf_counter())

    def finish(process: subprocess.Popen[bytes]) -> None:
        run, started = running.pop(process)
        folder = run_dir(out, run)
        seconds = time.perf_counter() - started
        if process.returncode == 0 and is_done(out, run):
            done.add(run.name)
            info = json.loads((folder / RUN_FILE).read_text())
            valid = json.loads((folder / "metrics.json").read_text())["valid"]["overall"]
            log(
                f"done {run.name} in {seconds:.0f}s: best epoch {info['best_epoch']} of "
                f"{info['epochs_run']}, valid NDCG@10 {valid['ndcg@10']:.4f}  "
                f"[{len(done)}/{len(runs)}, {len(running)} running]"
            )
        else:
            failed.append(run.name)
            log(f"FAILED {run.name} (exit {process.returncode}): see {folder}/log.txt")

    try:
        while pending or running:
            if pending and start_for is not None and time.perf_counter() - began > start_for:
                log(f"{len(pending)} runs left for a later call (--start-for {start_for:g}s)")
                pending.clear()
            for run in list(pending):
                reason = blocker(run)
                if reason:
                    pending.remove(run)
                    failed.append(run.name)
                    log(f"skipped {run.name}: {reason}")
                elif len(running) < jobs and all(n in done for n in waits_for(run)):
                    pending.remove(run)
                    start(run)
            time.sleep(0.5 if running else 0.0)
            for process in [p for p in running if p.poll() is not None]:
                finish(process)
    except KeyboardInterrupt:
        # Stopped (Ctrl-C, or SIGTERM from a time limit): finished runs stay, the rest rerun.
        for process, (run, _) in running.items():
            process.terminate()
            log(f"stopped {run.name}")
        for process in running:
            process.wait()
        raise
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one run of the quality benchmark.")
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plan", default="quality")
    args = parser.parse_args(argv)
    budget = Budget(args.epochs, args.patience, args.seeds)
    by_name = {r.name: r for r in plan_of(args.plan, args.seeds)}
    if args.run not in by_name:
        raise SystemExit(f"no run named {args.run!r} in the plan")
    info = train_run(args.data, args.out, by_name[args.run], budget, args.device)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
