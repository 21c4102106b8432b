"""RecBole's SASRec on a sidrec split: the peer model of the quality benchmark.

Runs inside the RecBole virtual environment (recbole-requirements.txt), never in sidrec's:
offline/bench/peer.py exports the split and starts this script as a subprocess.

    python recbole_sasrec.py --data EXPORT --out OUT --metrics-py .../offline/metrics.py
        [--seed 0 --epochs 100 --patience 10 --max-len 50 ...]

Why these choices:
- Training is RecBole's own: its SequentialDataset reads the exported training sequences
  (one atomic .inter file, a position per event as the time) and makes every prefix a
  training row (RecBole's usual data augmentation), its TrainDataLoader batches them, its
  SASRec computes the loss (CE: a full softmax over the item table, no negative sampling) and
  its Trainer runs the epochs, the optimiser and the early stopping. An .item file lists every
  catalog row, so items with no training event still get an embedding row, as they do in
  RecBole's own pipeline, where the whole data set is the vocabulary.
- Validation and test are ours, not RecBole's: RecBole 1.2.1's full-sort evaluation of a
  sequential model leaves the user's history among the candidates. The Trainer's validation
  step is replaced by sidrec's ranking rule (offline/metrics.py, loaded by file path): the
  score of every catalog row from `full_sort_predict` on the user's last `max_len` history
  items, the user's whole history removed, ties counted against the target. Early stopping
  is on that validation NDCG@10 and the best epoch's weights are kept (in memory).
- Ranks are also written with the history left among the candidates (`*_kept.npy`), which
  shows what RecBole's own evaluation would have counted.

Writes to OUT: valid_ranks.npy, test_ranks.npy, valid_ranks_kept.npy, test_ranks_kept.npy
(int64 ranks in the order of the exported evaluation users) and peer_result.json (epochs,
per-epoch seconds, best epoch). RecBole's log/, log_tensorboard/ and saved/ land in the
working directory.

With --time-batches N it trains N batches, ranks one evaluation batch, writes
peer_timing.json (seconds per batch, batches per epoch, projected seconds per epoch) and
stops: on ML-1M an epoch is hours on a CPU, so a run is planned before it is started.
With --max-seconds S no epoch after the first starts once S seconds of training have passed
(a lent GPU's time limit); the best validation epoch so far is scored and the result says
it was cut. Each epoch's state is saved in OUT/peer_state.pt, and --resume continues from it
(the same settings; the data order after a resume is not the uninterrupted run's), so a run
longer than one lease is trained over several.

It also runs outside that venv, with the numpy 2 and the packages of a GPU machine's image
(carry recbole, colorlog and texttable as wheels): see `numpy2_aliases`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

DATASET = "peer"  # the export's RecBole data set: DATA/peer/peer.inter and peer.item
EVAL_FILE = "eval.npz"
STAGES = ("valid", "test")
RESULT_FILE = "peer_result.json"
TIMING_FILE = "peer_timing.json"
STATE_FILE = "peer_state.pt"
# What a resumed run must share with the run it continues (the rest may change between calls).
RESUME_KEYS = (
    "train_rows", "num_items", "seed", "max_len", "hidden_size", "n_layers", "n_heads",
    "inner_size", "hidden_dropout_prob", "attn_dropout_prob", "hidden_act", "layer_norm_eps",
    "initializer_range", "learning_rate", "weight_decay", "train_batch_size", "eval_step",
)  # fmt: skip


@dataclass
class EvalStage:
    """One evaluation stage as exported: CSR histories (item rows, oldest first) and targets."""

    users: np.ndarray  # int64[U]
    targets: np.ndarray  # int64[U] item rows
    offsets: np.ndarray  # int64[U + 1]
    items: np.ndarray  # int64[offsets[-1]] every history, concatenated

    def __len__(self) -> int:
        return len(self.targets)

    def history(self, i: int) -> np.ndarray:
        return self.items[self.offsets[i] : self.offsets[i + 1]]


def load_eval(folder: Path) -> tuple[int, dict[str, EvalStage]]:
    """(number of catalog rows n, {"valid": ..., "test": ...}) from the export's eval.npz."""
    with np.load(folder / EVAL_FILE) as f:
        num_items = int(f["num_items"])
        stages = {
            name: EvalStage(
                users=f[f"{name}_users"].astype(np.int64),
                targets=f[f"{name}_targets"].astype(np.int64),
                offsets=f[f"{name}_offsets"].astype(np.int64),
                items=f[f"{name}_items"].astype(np.int64),
            )
            for name in STAGES
        }
    return num_items, stages


def row_of_recbole_id(id_tokens: np.ndarray | list[str], num_items: int) -> np.ndarray:
    """int64[len(id_tokens)]: the catalog row of each RecBole item id (0 for [PAD]).

    RecBole renumbers tokens in order of appearance; the export's tokens are the rows
    themselves, so the map back is a permutation of 1..n. Fails unless every row has an id."""
    tokens = list(id_tokens)
    if len(tokens) != num_items + 1 or tokens[0] != "[PAD]":
        raise ValueError(
            f"RecBole has {len(tokens) - 1} item ids for a catalog of {num_items} rows: the "
            f"export's .item file must list every row"
        )
    rows = np.array([0] + [int(t) for t in tokens[1:]], dtype=np.int64)
    if not np.array_equal(np.sort(rows), np.arange(num_items + 1)):
        raise ValueError("RecBole's item tokens are not the catalog rows 1..n")
    return rows


def ndcg_at_10(ranks: np.ndarray) -> float:
    """Mean NDCG@10 of int ranks (metrics.py's definition), the early-stopping score."""
    ranks = np.asarray(ranks, dtype=np.float64)
    gain = np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)
    return float(gain.mean()) if len(ranks) else 0.0


def load_module(path: Path, name: str) -> ModuleType:
    """Imports one file by path: sidrec's metrics.py, without sidrec installed here."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _PlainFormatter(logging.Formatter):
    """RecBole colours its messages with ANSI codes; a log file reads better without."""

    _ansi = re.compile(r"\x1b\[[0-9;]*m")

    def format(self, record: logging.LogRecord) -> str:
        return self._ansi.sub("", super().format(record))


def numpy2_aliases() -> list[str]:
    """Restores the numpy 1 names RecBole 1.2.1's Config aliases at start-up
    (`compatibility_settings`: np.float = np.float_, ...), which numpy 2 removed; the names it
    assigns to are not used on our path. Returns the names added (none under numpy 1)."""
    added = []
    for old, new in (("float_", "float64"), ("complex_", "complex128"), ("unicode_", "str_")):
        if old not in np.__dict__:
            setattr(np, old, getattr(np, new))
            added.append(old)
    return added


class TimeUp(Exception):
    """Raised by the trainer at the start of an epoch once --max-seconds have passed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder written by export_split")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics-py", type=Path, required=True, help="sidrec's offline/metrics.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10, help="evaluations without a better one")
    p.add_argument("--eval-step", type=int, default=1, help="epochs between validations")
    p.add_argument("--max-len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--inner-size", type=int, default=256)
    p.add_argument("--hidden-dropout-prob", type=float, default=0.5)
    p.add_argument("--attn-dropout-prob", type=float, default=0.5)
    p.add_argument("--hidden-act", default="gelu")
    p.add_argument("--layer-norm-eps", type=float, default=1e-12)
    p.add_argument("--initializer-range", type=float, default=0.02)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--train-batch-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--time-batches", type=int, default=0, help="time this many batches and stop (0: train)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/peer_state.pt where it exists (else start; a run that "
        "ended by early stopping or --epochs is only scored again)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="start no epoch but the first after this many seconds of training (0: no limit)",
    )
    return p.parse_args(argv)


def recbole_config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """RecBole settings: SASRec defaults unless given, CE loss, our data and no splitting."""
    work = Path.cwd()
    return {
        "data_path": str(args.data.resolve()),
        "checkpoint_dir": str(work / "saved"),
        "seed": args.seed,
        "reproducibility": True,
        "gpu_id": "0" if args.device == "auto" else "",
        "use_gpu": args.device == "auto",
        "worker": 0,
        "show_progress": False,
        "log_wandb": False,
        "state": "INFO",
        # data: the exported training events only; RecBole makes each prefix a row
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "rm_dup_inter": None,
        # every training row stays in "train"; validation and test are ours (module docstring)
        "eval_args": {
            "split": {"RS": [1.0, 0.0, 0.0]},
            "group_by": "none",
            "order": "TO",
            "mode": "full",
        },
        # model: RecBole's SASRec.yaml defaults unless overridden
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "hidden_size": args.hidden_size,
        "inner_size": args.inner_size,
        "hidden_dropout_prob": args.hidden_dropout_prob,
        "attn_dropout_prob": args.attn_dropout_prob,
        "hidden_act": args.hidden_act,
        "layer_norm_eps": args.layer_norm_eps,
        "initializer_range": args.initializer_range,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        # training
        "epochs": args.epochs,
        "train_batch_size": args.train_batch_size,
        "eval_batch_size": args.eval_batch_size,
        "learner": "adam",
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "eval_step": args.eval_step,
        # RecBole stops after stopping_step + 1 evaluations without improvement; train.py's
        # patience counts evaluations without improvement until the stop.
        "stopping_step": max(args.patience - 1, 0),
        "valid_metric": "NDCG@10",
        "valid_metric_bigger": True,
        "metrics": ["NDCG", "Hit"],
        "topk": [10],
    }


def time_epoch(
    args: argparse.Namespace,
    trainer: Any,
    train_data: Any,
    valid: EvalStage,
    rank_stage: Any,
) -> dict[str, Any]:
    """Median seconds of args.time_batches training steps (batch loading included) as the
    Trainer takes them, and of one evaluation batch, projected to a whole epoch and a whole
    validation. The first step is left out of the median (allocations, thread start-up)."""
    model, optimizer = trainer.model, trainer.optimizer
    model.train()
    steps = []
    began = time.perf_counter()
    for i, batch in enumerate(train_data):
        batch = batch.to(trainer.device)
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
        now = time.perf_counter()
        steps.append(now - began)
        began = now
        if i == args.time_batches:  # the first step, then the timed ones
            break
    per_batch = float(np.median(steps[1:] if len(steps) > 1 else steps))
    b = args.eval_batch_size
    head = EvalStage(valid.users[:b], valid.targets[:b], valid.offsets[: b + 1], valid.items)
    began = time.perf_counter()
    rank_stage(head)
    eval_batch = time.perf_counter() - began
    eval_batches = -(-len(valid) // b)
    return {
        "batches_timed": max(len(steps) - 1, 1),
        "median_batch_seconds": round(per_batch, 4),
        "batches_per_epoch": len(train_data),
        "projected_epoch_train_seconds": round(per_batch * len(train_data), 1),
        "eval_batch_seconds": round(eval_batch, 4),
        "projected_valid_seconds": round(eval_batch * eval_batches, 1),
        "train_batch_size": args.train_batch_size,
        "max_len": args.max_len,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # RecBole's Config also parses sys.argv (`--key=value`); it must see none of ours.
    sys.argv = sys.argv[:1]
    started = time.perf_counter()

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_PlainFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    log = logging.getLogger("peer")

    aliased = numpy2_aliases()
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset
    from recbole.data.dataloader import TrainDataLoader
    from recbole.data.interaction import Interaction
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    # Importing recbole.model.sequential_recommender runs sine.py, which turns on autograd's
    # anomaly detection for the whole process: a debugging mode that records a stack trace
    # per op and made SASRec's training steps several times slower here. Results are the
    # same without it (the Trainer still stops on a NaN loss).
    anomaly_was_on = torch.is_anomaly_enabled()
    torch.autograd.set_detect_anomaly(False)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    metrics = load_module(args.metrics_py, "sidrec_metrics")
    num_items, stages = load_eval(args.data)

    config = Config(model=SASRec, dataset=DATASET, config_dict=recbole_config_dict(args))
    init_seed(config["seed"], config["reproducibility"])
    dataset_started = time.perf_counter()
    dataset = create_dataset(config)
    train_set, _, _ = dataset.build()
    train_data = TrainDataLoader(config, train_set, None, shuffle=config["shuffle"])
    dataset_seconds = time.perf_counter() - dataset_started
    log.info(f"{dataset}\n{len(train_set)} training rows ({dataset_seconds:.1f}s)")

    init_seed(config["seed"], config["reproducibility"])
    device = config["device"]
    model = SASRec(config, train_set).to(device)
    log.info(str(model))
    item_field = config["ITEM_ID_FIELD"]
    rows = row_of_recbole_id(dataset.field2id_token[item_field], num_items)
    recbole_id = np.zeros(num_items + 1, dtype=np.int64)
    recbole_id[rows] = np.arange(num_items + 1)
    rows_t = torch.as_tensor(rows, device=device)
    recbole_id_t = torch.as_tensor(recbole_id, device=device)

    @torch.no_grad()
    def rank_stage(stage: EvalStage) -> tuple[np.ndarray, np.ndarray]:
        """(ranks with the history excluded, ranks with it kept) of every user's target."""
        model.eval()
        excluded = np.zeros(len(stage), dtype=np.int64)
        kept = np.zeros(len(stage), dtype=np.int64)
        for start in range(0, len(stage), args.eval_batch_size):
            index = range(start, min(start + args.eval_batch_size, len(stage)))
            full = [stage.history(i) for i in index]
            recent = np.zeros((len(index), args.max_len), dtype=np.int64)  # left-aligned
            history = np.zeros((len(index), max(len(h) for h in full)), dtype=np.int64)
            for j, h in enumerate(full):
                tail = h[-args.max_len :]
                recent[j, : len(tail)] = tail
                history[j, : len(h)] = h
            recent_t = torch.as_tensor(recent, device=device)
            interaction = Interaction(
                {
                    model.ITEM_SEQ: recbole_id_t[recent_t],
                    model.ITEM_SEQ_LEN: torch.as_tensor(
                        [min(len(h), args.max_len) for h in full], device=device
                    ),
                }
            )
            by_id = model.full_sort_predict(interaction)  # [B, n + 1] in RecBole's id order
            scores = torch.empty_like(by_id)
            scores[:, rows_t] = by_id  # column r = row r; column 0 = [PAD], never a candidate
            targets = torch.as_tensor(stage.targets[start : index.stop], device=device)
            history_t = torch.as_tensor(history, device=device)
            none = torch.zeros((len(index), 1), dtype=torch.int64, device=device)
            excluded[start : index.stop] = (
                metrics.ranks_from_scores(scores, targets, history_t).cpu().numpy()
            )
            kept[start : index.stop] = (
                metrics.ranks_from_scores(scores, targets, none).cpu().numpy()
            )
        return excluded, kept

    epochs: list[dict[str, Any]] = []
    resume_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    resume_args.update(train_rows=len(train_set), num_items=num_items)
    seconds_before = 0.0  # the seconds of the calls a resumed run continues

    class PeerTrainer(Trainer):
        """RecBole's Trainer with sidrec's validation and the best weights kept in memory."""

        best_state: dict[str, torch.Tensor] | None = None
        best_epoch = 0
        fit_started = 0.0

        def save_state(self, next_epoch: int, finished: bool) -> None:
            """Everything --resume needs to go on after epoch `next_epoch` (0-based)."""
            state = {
                "args": resume_args,
                "next_epoch": next_epoch,
                "finished": finished,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "cur_step": self.cur_step,
                "best_valid_score": self.best_valid_score,
                "best_state": self.best_state,
                "best_epoch": self.best_epoch,
                "epochs": epochs,
                "seconds": seconds_before + time.perf_counter() - started,
                "rng": torch.get_rng_state(),
            }
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(state, args.out / f"{STATE_FILE}.tmp")
            (args.out / f"{STATE_FILE}.tmp").replace(args.out / STATE_FILE)

        def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):  # type: ignore[no-untyped-def]
            began = time.perf_counter()
            if epochs:  # the epoch before this one has been validated: a state to resume from
                self.save_state(epoch_idx, finished=False)
            # the first epoch always runs: a model with none would score as an untrained one
            if epochs and 0 < args.max_seconds < began - self.fit_started:
                raise TimeUp
            loss = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
            total = sum(loss) if isinstance(loss, tuple) else loss
            epochs.append(
                {
                    "epoch": epoch_idx + 1,
                    "train_loss": float(total) / max(len(train_data), 1),
                    "train_seconds": round(time.perf_counter() - began, 3),
                }
            )
            return loss

        def _valid_epoch(self, valid_data, show_progress=False):  # type: ignore[no-untyped-def]
            began = time.perf_counter()
            ranks, _ = rank_stage(valid_data)
            result = {
                "ndcg@10": round(ndcg_at_10(ranks), 6),
                "hr@10": round(float((ranks <= 10).mean()), 6),
            }
            epochs[-1].update(valid=result, valid_seconds=round(time.perf_counter() - began, 3))
            return result["ndcg@10"], result

        def _save_checkpoint(self, epoch, verbose=True, **kwargs):  # type: ignore[no-untyped-def]
            # Called on every new best validation score (ties included, RecBole's rule).
            self.best_epoch = epoch + 1
            self.best_state = copy.deepcopy(self.model.state_dict())

    trainer = PeerTrainer(config, model)
    if args.time_batches > 0:
        timing = time_epoch(args, trainer, train_data, stages["valid"], rank_stage)
        timing.update(train_rows=len(train_set), dataset_seconds=round(dataset_seconds, 3))
        timing.update(recbole=recbole.__version__, torch=torch.__version__, device=str(device))
        timing.update(threads=torch.get_num_threads())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / TIMING_FILE).write_text(json.dumps(timing, indent=2) + "\n")
        log.info(json.dumps(timing))
        return
    finished, resumed_at = False, 0
    if args.resume and (args.out / STATE_FILE).is_file():
        state = torch.load(args.out / STATE_FILE, map_location=device, weights_only=True)
        changed = [k for k in RESUME_KEYS if state["args"].get(k) != resume_args[k]]
        if changed:
            raise SystemExit(f"--resume: {STATE_FILE} was made with other {', '.join(changed)}")
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.start_epoch = resumed_at = state["next_epoch"]
        trainer.cur_step, trainer.best_valid_score = state["cur_step"], state["best_valid_score"]
        trainer.best_state, trainer.best_epoch = state["best_state"], state["best_epoch"]
        epochs.extend(state["epochs"])
        seconds_before, finished = state["seconds"], state["finished"]
        torch.set_rng_state(state["rng"].cpu())
        log.info(f"resumed after epoch {resumed_at} (best {trainer.best_epoch})")
    trainer.fit_started = time.perf_counter()
    time_up = False
    try:
        if not finished:
            trainer.fit(train_data, valid_data=stages["valid"], saved=True, show_progress=False)
            trainer.save_state(len(epochs), finished=True)
    except TimeUp:
        time_up = True
        log.info(f"--max-seconds {args.max_seconds:g} reached after {len(epochs)} epochs")
    if trainer.best_state is not None:
        model.load_state_dict(trainer.best_state)
    log.info(f"best epoch {trainer.best_epoch} of {len(epochs)}")

    args.out.mkdir(parents=True, exist_ok=True)
    for name in STAGES:
        excluded, kept = rank_stage(stages[name])
        np.save(args.out / f"{name}_ranks.npy", excluded)
        np.save(args.out / f"{name}_ranks_kept.npy", kept)
        log.info(
            f"{name}: NDCG@10 {ndcg_at_10(excluded):.4f} (history kept: {ndcg_at_10(kept):.4f})"
        )
    result = {
        "best_epoch": trainer.best_epoch,
        "epochs_run": len(epochs),
        "stopped_by_time_limit": time_up,
        "resumed_after_epoch": resumed_at,
        "args": resume_args,
        "epochs": epochs,
        "train_rows": len(train_set),
        "dataset_seconds": round(dataset_seconds, 3),
        "seconds": round(seconds_before + time.perf_counter() - started, 3),
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numpy2_aliases_added": aliased,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "anomaly_detection_turned_off": anomaly_was_on,
        "python": platform.python_version(),
    }
    (args.out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
