"""Fit the content tower (model/content_tower.py) to a trained recommender's id rows.

Every trained item is an example: its SID and content vector in, its own id row (fixed) the
answer, scored as a softmax over all trained id rows by cosine / temperature, the way the
recommender scores. So a tower vector is good when it picks out its item's id among all the
others, which is what a new item needs to be found by the users its content suits. A random
share of the items is held out of fitting, as new items would be, and alone decides when to
stop. Each example sees its SID prefixes cut at a random depth (half the time), since a new
item often matches the catalog's prefixes only part of the way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sidrec.model.content_tower import ContentTower
from sidrec.model.weights import content_tower_args
from sidrec.offline.split import Split

TOWER_FILE = "tower.pt"
# Candidates for the rare-item blend (model/content_tower.py), chosen on validation NDCG@10;
# 0 keeps every trained id row as it is.
HALF_WEIGHT_COUNTS = (0.0, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class TowerConfig:
    hidden: int = 256
    epochs: int = 200
    patience: int = 10
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    depth_drop: float = 0.5  # share of examples whose prefixes are cut at a random depth
    holdout: float = 0.1
    seed: int = 0
    # what the tower reads, for ablations: "sid+content", "sid" (content ignored) or
    # "content" (no prefix rows)
    parts: str = "sid+content"


def _holdout_loss(
    tower: ContentTower, codes: torch.Tensor, content: torch.Tensor, ids: torch.Tensor,
    targets: torch.Tensor, temperature: float,
) -> tuple[float, float]:  # fmt: skip
    # (mean softmax loss, hit rate of the own id in the top 10) of examples over `targets`
    with torch.no_grad():
        logits = F.normalize(tower(codes, content), dim=-1) @ targets.T / temperature
        loss = F.cross_entropy(logits, ids).item()
        own = logits.gather(1, ids[:, None])
        hits = ((logits > own).sum(1) < 10).float().mean().item()
    return loss, hits


def fit_tower(
    id_table: torch.Tensor,
    sids: np.ndarray | torch.Tensor,
    content: np.ndarray | torch.Tensor,
    trained: np.ndarray | torch.Tensor,
    codes_per_layer: int,
    sid_layers: int | None = None,
    cfg: TowerConfig = TowerConfig(),
    log: Callable[[str], None] | None = None,
) -> tuple[ContentTower, dict]:
    """A ContentTower fitted to `id_table` [n + 1, d] (row 0 padding) over the `trained` rows
    (bool [n + 1]). sids int64 [n + 1, L + 1]; content float [n, C] (rows 1..n). Returns the
    tower (eval mode, the best holdout epoch's weights) and its fitting record."""
    if cfg.parts not in ("sid+content", "sid", "content"):
        raise ValueError(f"parts must be sid+content, sid or content, got {cfg.parts!r}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sids_t = torch.as_tensor(np.asarray(sids), dtype=torch.int64)
    layers = sid_layers or sids_t.shape[1] - 1
    content_t = torch.as_tensor(np.asarray(content), dtype=torch.float32)
    content_t = torch.cat([torch.zeros(1, content_t.shape[1]), content_t])  # row 0 padding
    table = id_table.detach().float().cpu()
    rows = np.flatnonzero(np.asarray(trained, dtype=bool))
    rows = rows[rows > 0]
    if len(rows) < 20:
        raise ValueError(f"a content tower needs at least 20 trained items, got {len(rows)}")
    order = rng.permutation(len(rows))
    num_held = max(1, round(cfg.holdout * len(rows)))
    held, fit = np.sort(rows[order[:num_held]]), np.sort(rows[order[num_held:]])

    # Candidates: every trained id row; an example's answer is its own row among them.
    targets = F.normalize(table[rows], dim=-1)  # [T, d]
    position = np.zeros(len(table), dtype=np.int64)
    position[rows] = np.arange(len(rows))

    # Prefix rows only for the fitted items: a held-out item must manage as a new one would.
    tower = ContentTower.for_catalog(sids_t[fit, :layers], codes_per_layer, content_t.shape[1],
                                     table.shape[1], cfg.hidden)  # fmt: skip
    tower.scale.fill_(float(table[rows].norm(dim=-1).median()))
    optimizer = torch.optim.AdamW(tower.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    held_t = torch.as_tensor(held)
    held_args = (sids_t[held_t], content_t[held_t], torch.as_tensor(position[held]), targets)

    best = (float("inf"), 0, {k: v.clone() for k, v in tower.state_dict().items()})
    curve: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        tower.train()
        perm = torch.as_tensor(rng.permutation(fit))
        total = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            batch = perm[start : start + cfg.batch_size]
            cut = torch.as_tensor(rng.integers(0, layers + 1, size=len(batch)))  # depths kept
            cut_some = torch.as_tensor(rng.random(len(batch)) < cfg.depth_drop)
            depth = torch.where(cut_some, cut, torch.full_like(cut, layers))
            keep = torch.arange(layers)[None, :] < depth[:, None]  # [B, L]
            if cfg.parts == "content":
                keep = torch.zeros_like(keep)  # prefix rows stay zero: never read
            batch_content = content_t[batch]
            if cfg.parts == "sid":
                batch_content = torch.zeros_like(batch_content)
            v = F.normalize(tower(sids_t[batch], batch_content, keep), dim=-1)
            loss = F.cross_entropy(
                v @ targets.T / cfg.temperature, torch.as_tensor(position[batch.numpy()])
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        tower.eval()
        if cfg.parts == "sid":  # the content's weights never saw an input: make that exact
            with torch.no_grad():
                tower.content[0].weight.zero_()
        held_loss, held_hr = _holdout_loss(tower, *held_args, cfg.temperature)
        curve.append({"epoch": epoch, "loss": total / len(fit), "holdout_loss": held_loss,
                      "holdout_hr@10": held_hr})  # fmt: skip
        if held_loss < best[0]:
            best = (held_loss, epoch, {k: v.clone() for k, v in tower.state_dict().items()})
        if log:
            mark = "  *" if best[1] == epoch else ""
            log(f"tower epoch {epoch}: loss {total / len(fit):.4f}  holdout loss {held_loss:.4f}"
                f"  own id in top 10 {held_hr:.3f}{mark}")  # fmt: skip
        if epoch - best[1] >= cfg.patience:
            break
    tower.load_state_dict(best[2])
    tower.eval()
    record = {"config": asdict(cfg), "best_epoch": best[1], "fit_items": len(fit),
              "holdout_items": len(held), "curve": curve}  # fmt: skip
    return tower, record


@torch.no_grad()
def item_table(
    id_table: torch.Tensor,
    tower: ContentTower,
    sids: np.ndarray | torch.Tensor,
    content: np.ndarray | torch.Tensor,
    train_counts: np.ndarray,
) -> torch.Tensor:
    """The served item table [n + 1, d]: trained rows keep their id row (blended with the
    tower by training events, tower.blend_weight), untrained rows get the tower's vector."""
    sids_t = torch.as_tensor(np.asarray(sids), dtype=torch.int64)
    content_t = torch.as_tensor(np.asarray(content), dtype=torch.float32)
    content_t = torch.cat([torch.zeros(1, content_t.shape[1]), content_t])
    table = id_table.detach().float().cpu().clone()
    counts = torch.as_tensor(train_counts)
    vectors = tower(sids_t, content_t)  # [n + 1, d]
    w = tower.blend_weight(counts)[:, None]
    w = torch.where(counts[:, None] > 0, w, torch.zeros_like(w))
    table = w * table + (1 - w) * vectors
    table[0] = 0.0
    return table


def save_tower(tower: ContentTower, path: Path, record: dict[str, Any]) -> None:
    torch.save({"args": content_tower_args(tower),
                "state": {k: v.cpu() for k, v in tower.state_dict().items()},
                "record": record}, path)  # fmt: skip


def load_tower(run_dir: Path) -> ContentTower | None:
    """The tower attach_tower saved in run_dir, or None (a model without one)."""
    path = Path(run_dir) / TOWER_FILE
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tower = ContentTower.empty(**saved["args"])
    tower.load_state_dict(saved["state"])
    return tower.eval()


def attach_tower(
    run_dir: Path,
    split: Split,
    content: np.ndarray,
    codes_per_layer: int,
    cfg: TowerConfig = TowerConfig(),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit a content tower to run_dir's trained model (offline/train.py's checkpoint), choose
    its rare-item blend on validation NDCG@10, save it as run_dir/TOWER_FILE and rewrite
    metrics.json with the figures of the table the service will hold (the trained model's
    own figures move to "id_rows"). Returns the new metrics.json content."""
    from sidrec.offline.evaluate import rank_targets, summarize, table_scorer
    from sidrec.offline.train import CHECKPOINT_FILE, METRICS_FILE, load_checkpoint

    started = time.perf_counter()
    model, train_cfg, ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    model.eval()
    sids = ckpt["sids"]
    if sids is None:
        raise ValueError(f"{run_dir}: the checkpoint has no SIDs; a content tower needs them")
    trained = torch.as_tensor(ckpt["trained"], dtype=torch.bool)
    with torch.no_grad():
        id_table = model.items.table(trained)
    tower, record = fit_tower(id_table, sids, content, trained, codes_per_layer, cfg=cfg)
    fit_seconds = time.perf_counter() - started

    def report(stage: str) -> dict[str, Any]:
        table = item_table(id_table, tower, sids, content, split.train_counts)
        scorer = table_scorer(model.encoder, table)
        batch_size = train_cfg.eval_batch_size or 32
        return summarize(rank_targets(scorer, split, stage, batch_size, train_cfg.max_len),
                         split, stage)  # fmt: skip

    by_count: dict[str, float] = {}
    for count in HALF_WEIGHT_COUNTS:
        tower.half_weight_count.fill_(count)
        by_count[str(count)] = report("valid")["overall"]["ndcg@10"]
    chosen = float(max(by_count, key=lambda c: (by_count[c], -float(c))))
    tower.half_weight_count.fill_(chosen)
    valid, test = report("valid"), report("test")
    record |= {"half_weight_count": chosen, "valid_ndcg@10_by_half_weight_count": by_count,
               "fit_seconds": round(fit_seconds, 1),
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    save_tower(tower, run_dir / TOWER_FILE, record)

    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    metrics["id_rows"] = {"valid": metrics["valid"], "test": metrics["test"]}
    metrics |= {"valid": valid, "test": test, "tower": {k: v for k, v in record.items()
                                                          if k != "curve"}}  # fmt: skip
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"content tower: fitted in {fit_seconds:.0f}s (best epoch {record['best_epoch']}), "
        f"rare-item blend half weight at {chosen:g} events; test ndcg@10 "
        f"{test['overall']['ndcg@10']:.4f} hr@10 {test['overall']['hr@10']:.4f}, cold-start "
        f"hr@10 {test['cold_start']['hr@10']:.4f}")  # fmt: skip
    return metrics
