"""Train the HSTU recommender on a `Split`: autoregressive sampled softmax, early stopping on
validation NDCG@10, test metrics once from the best-validation checkpoint.

The same `train` runs in one process or under `torchrun` (DistributedDataParallel, gloo on
CPU, nccl on CUDA): users are sharded with a DistributedSampler, `batch_size` is the global
batch, every rank ranks a share of the validation/test users and gets the whole report (so
all ranks keep the same best state and stop at the same epoch), rank 0 logs and saves.

Speed (CPU): each batch is cut to its longest row (attention still divides by padded_len);
by default one draw of R negatives per sequence is shared by its positions (the same
marginal per position as the reference's per-position draw; 3.3x faster steps on ML-1M, see
model/loss.py). With negatives="position" only real positions get negatives, and when the
catalog is small (n + 1 <= R * d) they are scored against the whole table instead of
gathering [P, R, d] vectors (same loss, ~4x faster than the gather and its scatter-back). On
a busy 2-core machine one thread per process is much faster than two (OpenMP threads wait on
each other): use threads=1, and torchrun with 2 processes for both cores.

Training sequences: per user the split's training sequence t (= s[:-2] minus withheld
items); inputs t[:-1] predict t[1:] at every position, both cut to the `max_len` most recent
(`windows`: the earlier targets too, in more rows).
Position i's time bias uses next_ts = the time of t[i + 1], the event it predicts.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from sidrec.model.hstu import ATTN_NORMS, HSTU
from sidrec.model.item_embedding import ItemEmbedding
from sidrec.model.loss import (
    full_softmax_loss,
    log_inclusion_probability,
    sample_negatives,
    sampled_softmax_logq,
    sampled_softmax_loss,
    sampled_softmax_shared,
    sampled_softmax_via_table,
)
from sidrec.offline.data.dataset import Interactions
from sidrec.offline.evaluate import hstu_scorer, rank_targets, summarize
from sidrec.offline.split import Split, split_summary

LOSSES = ("full", "sampled-logq", "sampled-uniform")
DEFAULT_NEGATIVES = {"sampled-logq": 4096, "sampled-uniform": 128}
# loss="auto": the full softmax scores every item at every position of a batch. The chunked
# loss (model/loss.py) keeps memory small whatever the catalog, so the bound is on work: at
# most this many scores per batch (batch_size x max_len x catalog rows): 128 x 200 x 21k,
# i.e. ML-1M and both Amazon sets are full, a 50k-item catalog is sampled; 16x that on CUDA.
FULL_SOFTMAX_MAX_SCORES = 1 << 29
WINDOWS = ("last", "all", "overlap", "prefix")
LOG_FILE = "train_log.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainConfig:
    variant: str = "hybrid"  # id | sid-prefixn | sid-rqsum | hybrid
    fusion: str = "sum"  # sum | alpha (hybrid only)
    d: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dqk: int = 50
    dv: int = 50
    max_len: int = 200
    padded_len: int = 211
    # Which training targets a user longer than max_len contributes: last (the reference's
    # rule: only the max_len most recent), all or overlap (earlier ones too, in more rows;
    # see training_sequences); prefix: one row per target, as RecBole trains SASRec.
    windows: str = "last"
    dropout: float = 0.2
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    # AdamW decay of the SID table alone (None = weight_decay). Decoupled decay shrinks every
    # row each step, and a shared SID row is refreshed by many items' gradients where an id
    # row only by its own item's: stronger decay on the SID rows leaves item-specific signal
    # to the id rows.
    sid_weight_decay: float | None = None
    batch_size: int = 128  # global: split across DDP ranks
    epochs: int = 100
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    # > 0: halve the learning rate after this many epochs without a better validation
    # NDCG@10 (ReduceLROnPlateau), so a model that stalls takes smaller steps before early
    # stopping ends it; 0 = constant lr (the reference's).
    lr_plateau: int = 0
    # full: exact softmax over every trained item; sampled-logq: the batch's targets plus
    # num_negatives uniform draws, logQ-corrected (for catalogs too big to score whole);
    # sampled-uniform: GR's reference, 1 positive vs num_negatives uniform negatives;
    # auto: full while a batch's scores stay under FULL_SOFTMAX_MAX_SCORES, else
    # sampled-logq. The resolved name is what metrics.json and the bundle record.
    loss: str = "auto"
    num_negatives: int = 0  # 0 = the loss's default: 128 (sampled-uniform), 4096 (sampled-logq)
    # sampled-uniform only: where the R negatives are drawn: once per sequence, shared by its
    # positions (3.3x faster CPU steps, same marginal per position), or per position as the
    # reference does (ML-1M notes in docs/results/ml-1m.md).
    negatives: str = "sequence"  # sequence | position
    temperature: float = 0.05  # cosine scoring only: dot products are used as they are
    attn_norm: str = "padded"  # padded (the reference's constant 1/211) | length (model/hstu.py)
    scoring: str = "cosine"  # cosine (the reference) | dot (model/hstu.py SCORINGS)
    ffn_mult: int = 0  # > 0: a feed-forward layer of that width multiple after each block
    attn_dropout: float = 0.0  # dropout on the attention weights (the reference's, 0 there)
    attention: str = "silu"  # silu (the reference) | softmax (SASRec's; model/hstu.py ATTENTIONS)
    norm: str = "pre"  # pre (the reference) | post (SASRec's; model/hstu.py NORMS)
    id_dropout: float = 0.0
    # ItemEmbedding's cold-start options, passed through (see model/item_embedding.py). The
    # defaults are the measured best for never-seen items on ML-100K (validation cold-start
    # HR@10 0.229 vs 0.083 for the reference-style learned/hashed rows, warm NDCG@10 equal):
    # a dropped id contributes zero, every catalog prefix owns a row, and rows no trained item
    # reads contribute nothing, so a new tuple falls back to its shared shorter prefixes.
    unknown_id: str = "zero"  # learned | zero
    prefix_table: str = "exact"  # hashed | exact
    hybrid_sid: str = "prefixn"  # prefixn | rqsum
    trained_rows_only: bool = True
    # hybrid-sum: scale the SID part by a learned factor per log2 training-count bucket
    # (model/item_embedding.py), so popular items can lean on their id rows
    sid_gate: bool = False
    use_time: bool = True
    sid_layers: int | None = None  # None = every semantic layer of `sids`
    seed: int = 0
    # torch intra-op threads per process (0 = torch's default). One, and more processes under
    # torchrun for more cores: see the module docstring.
    threads: int = 1
    device: str = "auto"  # auto | cpu | cuda
    # Small on CPU on purpose: users are batched by history length, so small batches pad
    # little (ML-100K validation: 0.8 s at 32 vs 2.9 s at 512, one thread). 0 = 32 on CPU,
    # 512 on CUDA.
    eval_batch_size: int = 0
    progress: bool = True  # tqdm bar per epoch (rank 0)
    # Batch users of similar length (sorted within windows of 16 batches, batch order
    # shuffled): far less padding, so far less [N, N] attention work on real data.
    group_by_length: bool = False

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.max_len > self.padded_len:
            raise ValueError(f"max_len {self.max_len} exceeds padded_len {self.padded_len}")
        if self.windows not in WINDOWS:
            raise ValueError(f"windows must be one of {WINDOWS}, not {self.windows!r}")
        if self.negatives not in ("sequence", "position"):
            raise ValueError(f"negatives must be sequence or position, not {self.negatives!r}")
        if self.loss not in ("auto", *LOSSES):
            raise ValueError(f"loss must be auto or one of {LOSSES}, not {self.loss!r}")
        if self.attn_norm not in ATTN_NORMS:
            raise ValueError(f"attn_norm must be one of {ATTN_NORMS}, not {self.attn_norm!r}")
        if self.lr_plateau < 0:
            raise ValueError(f"lr_plateau must be 0 (off) or more, not {self.lr_plateau}")

    def resolved(self, num_items: int, device: torch.device) -> TrainConfig:
        """A copy with loss and num_negatives made concrete for this catalog and device."""
        loss = self.loss
        if loss == "auto":
            limit = FULL_SOFTMAX_MAX_SCORES * (16 if device.type == "cuda" else 1)
            scores = self.batch_size * self.max_len * (num_items + 1)
            loss = "full" if scores <= limit else "sampled-logq"
        negatives = self.num_negatives or DEFAULT_NEGATIVES.get(loss, 0)
        return replace(self, loss=loss, num_negatives=negatives)


@dataclass
class TrainResult:
    checkpoint_path: Path | None  # rank 0 only
    best_epoch: int
    epochs: list[dict]  # one log line per epoch (as written to train_log.jsonl); [] on ranks > 0
    valid: dict  # evaluation report of the best epoch on the validation stage
    test: dict  # the same on the test stage, computed once at the end
    model: SequentialRecommender  # best weights loaded, eval mode, on CPU
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


class SequentialRecommender(nn.Module):
    """Item embedding + HSTU encoder; forward returns the training loss (so DDP can wrap it)."""

    def __init__(self, items: ItemEmbedding, encoder: HSTU) -> None:
        super().__init__()
        self.items = items
        self.encoder = encoder

    def forward(
        self,
        inputs: torch.Tensor,
        timestamps: torch.Tensor,
        next_timestamps: torch.Tensor,
        targets: torch.Tensor,
        negatives: torch.Tensor,
        temperature: float,
        per_sequence: bool = False,
        loss: str = "sampled-uniform",
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # inputs, timestamps, next_timestamps, targets: [B, N]; negatives: sampled-uniform:
        # [B, R] (one draw per sequence) or [P, R] (per position, P = positions with a
        # target (targets != 0), row-major); sampled-logq: [R]; full: unused. candidates: full: bool
        # [n + 1] rows that compete; sampled-logq: float [n + 1] log inclusion probabilities.
        mask = inputs != 0  # [B, N] items the attention reads
        scored_at = targets != 0  # [B, N] positions in the loss: mask minus context-only ones
        # One embedding call per step: id dropout then drops an item everywhere at once
        # (input, positive and negative alike). The whole table is cheaper than torch.unique
        # over P * R rows for catalogs of this size.
        all_rows = torch.arange(self.items.num_items + 1, device=inputs.device)
        table = self.items(all_rows)  # [n + 1, d] raw
        # the rows the user vectors are scored against: unit rows over a temperature (cosine),
        # or the raw rows as they are (dot; model/hstu.py SCORINGS)
        if self.encoder.scoring == "cosine":
            scored = F.normalize(table, dim=-1, eps=1e-6)
        else:
            scored, temperature = table, 1.0
        out = self.encoder(table[inputs], timestamps, next_timestamps, mask)  # [B, N, d]
        if loss == "full":
            assert candidates is not None
            return full_softmax_loss(
                out[scored_at], scored, targets[scored_at], candidates, temperature
            )
        if loss == "sampled-logq":
            assert candidates is not None
            return sampled_softmax_logq(
                out[scored_at], scored, targets[scored_at], negatives, candidates, temperature
            )
        if per_sequence:
            user = out * scored_at[..., None]  # other rows zero: no NaN can reach a gradient
            return sampled_softmax_shared(user, scored, targets, negatives, scored_at, temperature)
        user = out[scored_at]  # [P, d], only scored positions: padding costs no negatives
        pos_rows = targets[scored_at]  # [P]
        if table.shape[0] <= negatives.shape[1] * table.shape[1]:
            return sampled_softmax_via_table(user, scored, pos_rows, negatives, temperature)
        return sampled_softmax_loss(
            user, scored[pos_rows], scored[negatives], pos_rows, negatives, temperature
        )


def build_model(
    cfg: TrainConfig, num_items: int, sids: np.ndarray | None, codes_per_layer: int | None
) -> SequentialRecommender:
    items = ItemEmbedding(
        cfg.variant,
        num_items,
        cfg.d,
        sids=None if sids is None else torch.as_tensor(sids, dtype=torch.int64),
        codes_per_layer=codes_per_layer,
        sid_layers=cfg.sid_layers,
        fusion=cfg.fusion,
        id_dropout=cfg.id_dropout,
        unknown_id=cfg.unknown_id,
        prefix_table=cfg.prefix_table,
        hybrid_sid=cfg.hybrid_sid,
        trained_rows_only=cfg.trained_rows_only,
        sid_gate=cfg.sid_gate,
    )
    encoder = HSTU(
        cfg.d,
        cfg.num_blocks,
        cfg.num_heads,
        cfg.dqk,
        cfg.dv,
        padded_len=cfg.padded_len,
        dropout=cfg.dropout,
        use_time=cfg.use_time,
        attn_norm=cfg.attn_norm,
        ffn_mult=cfg.ffn_mult,
        scoring=cfg.scoring,
        attn_dropout=cfg.attn_dropout,
        attention=cfg.attention,
        norm=cfg.norm,
    )
    return SequentialRecommender(items, encoder)


def parameter_groups(model: SequentialRecommender, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: the SID table with cfg.sid_weight_decay where set, the rest at
    cfg.weight_decay."""
    sid_table = model.items.sid_emb
    if cfg.sid_weight_decay is None or sid_table is None:
        return [{"params": list(model.parameters())}]
    sid_params = {id(p) for p in sid_table.parameters()}
    rest = [p for p in model.parameters() if id(p) not in sid_params]
    return [
        {"params": rest},
        {"params": list(sid_table.parameters()), "weight_decay": cfg.sid_weight_decay},
    ]


def load_checkpoint(path: str | Path) -> tuple[SequentialRecommender, TrainConfig, dict]:
    """(model in eval mode on CPU, its config, the checkpoint dict: sids, trained, ...)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    # checkpoints from before TrainConfig.loss were all trained with GR's reference loss
    cfg = TrainConfig(**{"loss": "sampled-uniform", **ckpt["config"]})
    model = build_model(cfg, ckpt["num_items"], ckpt["sids"], ckpt["codes_per_layer"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg, ckpt


@dataclass
class TrainingSequences:
    """Training rows right-padded to max_len (see training_sequences)."""

    inputs: torch.Tensor  # int64[rows, max_len]
    targets: torch.Tensor  # int64[rows, max_len], 0 at padding and context-only positions
    timestamps: torch.Tensor  # int64[rows, max_len] time of each input
    next_timestamps: torch.Tensor  # int64[rows, max_len] time of the event each one predicts
    lengths: torch.Tensor  # int64[rows] items in the row (context included)


def training_sequences(split: Split, max_len: int, windows: str = "last") -> TrainingSequences:
    """One row per user with >= 2 training events, holding its max_len most recent targets.

    Users with more targets than that get more rows for the earlier ones with windows="all" or
    "overlap", so every training event is in the loss once an epoch. "all" cuts the sequence
    back from its end into rows of max_len targets (the oldest row may be shorter): a row's
    first target sees only the item before it. "overlap" gives each earlier row the max_len
    // 2 items before its targets as context only (their targets are 0, outside the loss), so
    its targets see at least that much history, at about twice the rows. On ML-1M the
    last-only rule leaves a third of the training targets unseen.

    "prefix" makes one row per training target, holding the max_len items before it with the
    loss on its last position only, as RecBole trains SASRec: every target gets its own
    dropout mask and a full window of history, at one row per event (982k rows of 200 on
    ML-1M, about 6 GB here; meant for short histories).
    """
    if windows not in WINDOWS:
        raise ValueError(f"windows must be one of {WINDOWS}, not {windows!r}")
    new_per_row = max_len - max_len // 2 if windows == "overlap" else max_len
    # (user, start, first, end): positions start..end-1 predict s[1:][start:end]; the loss
    # counts first..end-1
    rows: list[tuple[int, int, int, int]] = []
    for u, s in enumerate(split.train_sequences):
        end = len(s) - 1
        if windows == "prefix":
            rows.extend((u, max(0, e - max_len), e - 1, e) for e in range(1, end + 1))
            continue
        if end > 0:
            rows.append((u, max(0, end - max_len), max(0, end - max_len), end))
            end = rows[-1][2]
        while windows != "last" and end > 0:
            first = max(0, end - new_per_row)
            rows.append((u, max(0, end - max_len), first, end))
            end = first
    shape = (len(rows), max_len)
    inputs, targets = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    ts, next_ts = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    lengths = np.zeros(len(rows), np.int64)
    for i, (u, start, first, end) in enumerate(rows):
        s = split.train_sequences[u]
        k = end - start
        inputs[i, :k] = s[start:end]
        targets[i, first - start : k] = s[first + 1 : end + 1]
        if split.train_timestamps is not None:
            t = split.train_timestamps[u]
            ts[i, :k] = t[start:end]
            next_ts[i, :k] = t[start + 1 : end + 1]
        lengths[i] = k
    return TrainingSequences(
        *(torch.from_numpy(a) for a in (inputs, targets, ts, next_ts, lengths))
    )


def length_grouped_batches(
    order: torch.Tensor, lengths: torch.Tensor, batch_size: int, seed: int, epoch: int
) -> list[torch.Tensor]:
    """Cut shuffled users `order` into batches of similar length: sort each window of 16
    batches by length, cut, then shuffle the batches (seeded by seed and epoch)."""
    batches: list[torch.Tensor] = []
    for window in order.split(16 * batch_size):
        by_length = window[torch.argsort(lengths[window], stable=True)]
        batches.extend(by_length.split(batch_size))
    shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + epoch))
    return [batches[i] for i in shuffle]


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device(name)


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(
    data: Interactions,
    split: Split,
    sids: np.ndarray | None,
    codes_per_layer: int | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train, early-stop on validation NDCG@10, evaluate the best checkpoint on test once.

    Writes (rank 0) out_dir/train_log.jsonl (one JSON line per epoch), out_dir/checkpoint.pt
    (best epoch; see load_checkpoint) and out_dir/metrics.json. Under torchrun every rank
    calls this with the same arguments.
    """
    out_dir = Path(out_dir)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        # Required by cuBLAS for deterministic matmuls; read when its first handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    own_group = False
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    is_main = rank == 0
    if device.type == "cuda":
        torch.cuda.set_device(device)

    cfg = cfg.resolved(data.num_items, device)
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        return _train(
            data, split, sids, codes_per_layer, cfg, out_dir, log, device, rank, world, is_main
        )
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
        if own_group:
            dist.destroy_process_group()


def _train(
    data: Interactions,
    split: Split,
    sids: np.ndarray | None,
    codes_per_layer: int | None,
    cfg: TrainConfig,
    out_dir: Path,
    log: Callable[[str], None],
    device: torch.device,
    rank: int,
    world: int,
    is_main: bool,
) -> TrainResult:
    if split.num_items != data.num_items:
        raise ValueError("split and data have different catalogs")
    if cfg.use_time and data.timestamps is None:
        raise ValueError(f"{data.name} has no timestamps: train with use_time=False")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LOG_FILE).write_text("")

    # Same seed on every rank for the weights (DDP also broadcasts rank 0's), then a
    # per-rank seed so dropout and negatives differ between ranks.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_items, sids, codes_per_layer).to(device)
    if cfg.sid_gate:
        model.items.set_gate_buckets(torch.as_tensor(split.train_counts))
    torch.manual_seed(cfg.seed + 1000 * rank)
    negatives_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rank + 1)
    ddp_model: nn.Module = model
    if world > 1:
        # static_graph: the same parameters are used every step, and it tolerates ones that
        # never get a gradient (the time-bias table when use_time is False).
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
        )
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )

    plateau = None
    if cfg.lr_plateau:
        # threshold 0: any gain counts as better, as it does for best_epoch below
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.5, patience=cfg.lr_plateau - 1, threshold=0.0, eps=0.0
        )

    seqs = training_sequences(split, cfg.max_len, cfg.windows)
    if len(seqs.lengths) == 0:
        raise ValueError("no user has two training events: nothing to train on")
    negative_pool = torch.as_tensor(np.flatnonzero(split.trained), device=device)  # [M]
    trained = torch.as_tensor(split.trained, dtype=torch.bool, device=device)  # [n + 1]
    unigram = torch.as_tensor(split.train_counts / max(split.num_train_events, 1),
                              dtype=torch.float32, device=device)  # fmt: skip
    sampler = DistributedSampler(
        range(len(seqs.lengths)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    local_batch = max(1, math.ceil(cfg.batch_size / world))

    epochs: list[dict] = []
    best_ndcg, best_epoch, best_valid = -1.0, 0, {}
    best_state = _cpu_state(model)
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        order = torch.as_tensor(list(sampler))  # this rank's rows, shuffled
        batches = list(order.split(local_batch))
        if cfg.group_by_length:
            batches = length_grouped_batches(order, seqs.lengths, local_batch, cfg.seed, epoch)
        # (sum of batch losses, batches); on `device` because nccl reduces CUDA tensors only
        total_loss = torch.zeros(2, dtype=torch.float64, device=device)
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}",
            disable=not (is_main and cfg.progress),
            leave=False,
            dynamic_ncols=True,
        )
        for idx in bar:
            width = int(seqs.lengths[idx].max())  # trim padding columns past the longest row
            inputs = seqs.inputs[idx, :width].to(device)
            targets = seqs.targets[idx, :width].to(device)
            num_positions = int((targets != 0).sum())  # positions in the loss
            per_sequence = cfg.negatives == "sequence"
            candidates = trained if cfg.loss == "full" else None
            if cfg.loss == "sampled-uniform":
                shape = (len(idx) if per_sequence else num_positions, cfg.num_negatives)
            else:
                shape = (cfg.num_negatives if cfg.loss == "sampled-logq" else 0,)
            negatives = sample_negatives(negative_pool, shape, negatives_rng)
            if cfg.loss == "sampled-logq":
                candidates = log_inclusion_probability(
                    unigram, num_positions, len(negative_pool), cfg.num_negatives
                )
            loss = ddp_model(
                inputs,
                seqs.timestamps[idx, :width].to(device),
                seqs.next_timestamps[idx, :width].to(device),
                targets,
                negatives,
                cfg.temperature,
                per_sequence,
                cfg.loss,
                candidates,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss[0] += loss.detach()
            total_loss[1] += 1
            if not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if world > 1:
            dist.all_reduce(total_loss)
        train_seconds = time.perf_counter() - started

        stop = torch.zeros(1, dtype=torch.int64, device=device)
        # Every rank gets the same report, so every rank keeps the same best state (the test
        # evaluation at the end is sharded too); rank 0 alone writes.
        valid = evaluate_model(model, split, "valid", cfg, device, rank, world)
        ndcg = valid["overall"]["ndcg@10"]
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
        if plateau is not None:
            plateau.step(ndcg)
        if ndcg > best_ndcg:
            best_ndcg, best_epoch, best_valid = ndcg, epoch, valid
            best_state = _cpu_state(model)
            if is_main:
                _save_checkpoint(out_dir, model, cfg, data, split, sids, codes_per_layer, epoch)
        if is_main:
            line = {
                "epoch": epoch,
                "train_loss": float(total_loss[0] / total_loss[1]),
                "valid": valid["overall"],
                "train_seconds": round(train_seconds, 3),
                "seconds": round(time.perf_counter() - started, 3),
                "lr": lr,
            }
            epochs.append(line)
            with (out_dir / LOG_FILE).open("a") as f:
                f.write(json.dumps(line) + "\n")
            log(
                f"epoch {epoch}: loss {line['train_loss']:.4f}  valid ndcg@10 {ndcg:.4f} "
                f"hr@10 {valid['overall']['hr@10']:.4f}  ({line['seconds']:.1f}s)"
                + (f"  lr {lr:.2g}" if plateau is not None else "")
                + ("  *" if best_epoch == epoch else "")
            )
            stop[0] = int(epoch - best_epoch >= cfg.patience)
        if world > 1:
            dist.broadcast(stop, src=0)
        if stop.item():
            if is_main:
                log(f"early stop: no better validation NDCG@10 for {cfg.patience} epochs")
            break

    replica_diff = _replica_difference(model) if world > 1 else 0.0
    model.load_state_dict(best_state)
    model.eval()
    test = evaluate_model(model, split, "test", cfg, device, rank, world)
    checkpoint_path = None
    if is_main:
        checkpoint_path = out_dir / CHECKPOINT_FILE
        _write_json(
            out_dir / METRICS_FILE,
            {
                "dataset": data.name,
                "config": asdict(cfg),
                "world_size": world,
                "device": str(device),
                "best_epoch": best_epoch,
                "epochs_run": len(epochs),
                "mean_epoch_train_seconds": float(np.mean([e["train_seconds"] for e in epochs])),
                "ddp_max_param_diff": replica_diff,
                "split": split_summary(split),
                "valid": best_valid,
                "test": test,
            },
        )
        log(
            f"best epoch {best_epoch}: test ndcg@10 {test['overall']['ndcg@10']:.4f} "
            f"hr@10 {test['overall']['hr@10']:.4f}"
        )
    if world > 1:
        dist.barrier()
    return TrainResult(
        checkpoint_path=checkpoint_path,
        best_epoch=best_epoch,
        epochs=epochs,
        valid=best_valid,
        test=test,
        model=model.to("cpu"),
        best_state=best_state,
    )


def evaluate_model(
    model: SequentialRecommender,
    split: Split,
    stage: str,
    cfg: TrainConfig,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Evaluation report of `model` on `stage`; under DDP every rank ranks an interleaved
    share of the users and all of them get the whole report."""
    model.eval()
    num_users = len(split.stage(stage))
    positions = np.arange(rank, num_users, world)
    mine = rank_targets(
        hstu_scorer(model.encoder, model.items, split.trained),
        split,
        stage,
        batch_size=cfg.eval_batch_size or (512 if device.type == "cuda" else 32),
        max_history=cfg.max_len,
        device=str(device),
        subset=positions,
    )
    ranks = np.zeros(num_users, dtype=np.int64)
    if world == 1:
        ranks[positions] = mine
    else:
        parts: list[np.ndarray | None] = [None] * world
        dist.all_gather_object(parts, mine)
        for r, part in enumerate(parts):
            ranks[r::world] = part
    return summarize(ranks, split, stage)


def _replica_difference(model: nn.Module) -> float:
    """Largest absolute difference of any parameter between this rank and the others
    (all ranks get the same value). DDP should keep it at exactly 0."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    lowest, highest = flat.clone(), flat.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    return float((highest - lowest).max())


def _save_checkpoint(
    out_dir: Path,
    model: SequentialRecommender,
    cfg: TrainConfig,
    data: Interactions,
    split: Split,
    sids: np.ndarray | None,
    codes_per_layer: int | None,
    epoch: int,
) -> None:
    ckpt = {
        "config": asdict(cfg),
        "epoch": epoch,
        "dataset": data.name,
        "num_items": data.num_items,
        "codes_per_layer": codes_per_layer,
        "sids": None if sids is None else np.asarray(sids, dtype=np.int64),
        "trained": np.asarray(split.trained),
        "train_counts": np.asarray(split.train_counts),
        "state_dict": _cpu_state(model),
    }
    tmp = out_dir / (CHECKPOINT_FILE + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out_dir / CHECKPOINT_FILE)
