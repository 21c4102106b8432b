"""Fit the content tower (model/content_tower.py) to a trained recommender's id rows.

An example is a query vector and the item that answers it; the loss is a softmax over every
trained id row, scored as the recommender scores (cosine / temperature, or the raw dot product
for a model trained with scoring "dot"), with the rows of a
few items per step (the answer's among them half the time) replaced by their tower vectors: the
table as the service holds it when those items are new. So a tower vector learns to win for its
item's queries without crowding out other items. The default query is the item's own id row
("ids": the tower lands where the recommender put the item); "users" takes the user vectors
at training positions that chose it (user_states), which finds new items more often but, fitted
on states the recommender has memorised, crowds out warm items more
(docs/results/content-tower.md). A random share of the items is held out, as new items would
be, and alone decides when to stop. A new item's SID prefixes are cut at a random depth half
the time, since a new item often matches the catalog's prefixes only part of the way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sidrec.content_term import ContentTerm
from sidrec.model.content_tower import ContentTower
from sidrec.model.weights import content_tower_args
from sidrec.offline.new_items import (
    HOT_TOLERANCE,
    choose_by_warm_rule,
    load_content_term,
    load_new_item_scale,
    scales_for,
    warm_figures,
    with_content_term,
)
from sidrec.offline.split import Split

TOWER_FILE = "tower.pt"
# Candidates for the new-item score offset (model/content_tower.py) in logits (nats: the
# model's scores over its temperature), 0 to 6 in steps of 0.25; attach_tower takes the
# smallest whose validation NDCG@10 is within one standard error of the best one's: new items
# found as often as warm quality allows. An offset, not a scale: the fitting over-rates new
# items by about a constant number of logits, which a scale corrects only unevenly across
# users (docs/results/content-tower.md measures both).
NEW_ITEM_OFFSETS = tuple(0.25 * i for i in range(25))


def choose_offset(
    by_offset: dict[str, dict[str, float]], hot_reference: float, tolerance: float = HOT_TOLERANCE
) -> float:
    """The smallest offset (keys: logits) that passes the warm rule (choose_by_warm_rule);
    the largest where none does."""
    return choose_by_warm_rule(by_offset, hot_reference, min, max, tolerance)


@dataclass(frozen=True)
class TowerConfig:
    hidden: int = 256
    epochs: int = 200
    patience: int = 3
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    depth_drop: float = 0.5  # share of new items whose prefixes are cut at a random depth
    cold_share: float = 0.05  # share of the fitted items that are new in each step
    holdout: float = 0.1
    seed: int = 0
    # what the tower reads, for ablations: "sid+content", "sid" (content ignored) or
    # "content" (no prefix rows)
    parts: str = "sid+content"
    objective: str = "ids"  # the queries: "ids" (each item's own id row) or "users"
    # a per-item norm for new items (model/content_tower.py), regressed on the log norms of
    # the trained id rows beside the softmax; matters under dot scoring only
    learned_norm: bool = False
    # the new-item offset's hot-bin rule (choose_offset); 1.0 leaves only the overall rule
    hot_tolerance: float = HOT_TOLERANCE


def _mixed_logits(
    tower: ContentTower, queries: torch.Tensor, candidates: torch.Tensor, cold: torch.Tensor,
    sids: torch.Tensor, content: torch.Tensor, temperature: float | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    # queries [B, d] -> logits [B, n + 1] over the candidates' id rows ([n + 1, d]; zero rows
    # never win) with the `cold` rows [S] replaced by their tower vectors: the table as the
    # service holds it when those items are new, so a tower vector learns to win for its
    # item's users and not to crowd out other items. Cosine scoring (a temperature): queries
    # and candidates L2-normalised; dot scoring (None): both raw, the tower vector at its norm.
    direction = tower.direction(sids[cold], content[cold], keep)  # [S, d]
    # the norm as fixed data: the softmax would grow every norm (an item is the answer far
    # more often in fitting than a new item is in service); fit_tower regresses it instead
    v = direction * (tower.scale * torch.exp(tower.log_norm(direction.detach())).detach())
    if temperature is not None:
        v = F.normalize(v, dim=-1)
    table = candidates.index_copy(0, cold, v)
    logits = queries @ table.T / (temperature or 1.0)
    return logits.masked_fill(table.norm(dim=-1)[None, :] == 0, float("-inf"))


@torch.no_grad()
def user_states(
    model: torch.nn.Module, id_table: torch.Tensor, split: Split, max_len: int,
    max_examples: int = 200_000, batch_size: int = 256, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(user vectors [P, d] as the model scores them (L2-normalised under cosine scoring),
    the item each chose next [P]) at every training position of the trained `model` (a
    SequentialRecommender), at most max_examples of them (a seeded sample): what the tower is
    fitted on."""
    from sidrec.offline.train import training_sequences

    seqs = training_sequences(split, max_len)
    states, answers = [], []
    for start in range(0, len(seqs.lengths), batch_size):
        idx = slice(start, start + batch_size)
        width = int(seqs.lengths[idx].max())
        inputs = seqs.inputs[idx, :width]
        mask = inputs != 0
        out = model.encoder(id_table[inputs], seqs.timestamps[idx, :width],
                            seqs.next_timestamps[idx, :width], mask)  # fmt: skip
        cosine = model.encoder.scoring == "cosine"
        states.append(F.normalize(out[mask], dim=-1, eps=1e-6) if cosine else out[mask])
        answers.append(seqs.targets[idx, :width][mask])
    all_states, all_answers = torch.cat(states), torch.cat(answers)
    if len(all_answers) > max_examples:
        pick = torch.as_tensor(np.random.default_rng(seed).choice(len(all_answers), max_examples,
                                                                   replace=False))  # fmt: skip
        all_states, all_answers = all_states[pick], all_answers[pick]
    return all_states, all_answers


def fit_tower(
    id_table: torch.Tensor,
    sids: np.ndarray | torch.Tensor,
    content: np.ndarray | torch.Tensor,
    trained: np.ndarray | torch.Tensor,
    codes_per_layer: int,
    examples: tuple[torch.Tensor, torch.Tensor] | None = None,
    cfg: TowerConfig = TowerConfig(),
    log: Callable[[str], None] | None = None,
    scoring: str = "cosine",
) -> tuple[ContentTower, dict]:
    """A ContentTower fitted to `id_table` [n + 1, d] (row 0 padding) over the `trained` rows
    (bool [n + 1]). sids int64 [n + 1, L + 1]; content float [n, C] (rows 1..n).

    examples = (queries [P, d], answers [P] item rows), usually user_states(): each answer's
    tower vector should beat every other trained id row for its query, scored as the model
    scores (`scoring`: "cosine" or "dot", model/hstu.py). Without them every trained item is
    its own query (its id row; cosine scoring only). Returns the tower (eval mode, the best
    holdout epoch's weights) and its fitting record."""
    if cfg.parts not in ("sid+content", "sid", "content"):
        raise ValueError(f"parts must be sid+content, sid or content, got {cfg.parts!r}")
    if cfg.objective not in ("ids", "users"):
        raise ValueError(f"objective must be ids or users, got {cfg.objective!r}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sids_t = torch.as_tensor(np.asarray(sids), dtype=torch.int64)
    layers = sids_t.shape[1] - 1
    content_t = torch.as_tensor(np.asarray(content), dtype=torch.float32)
    content_t = torch.cat([torch.zeros(1, content_t.shape[1]), content_t])  # row 0 padding
    if cfg.parts == "sid":
        content_t = torch.zeros_like(content_t)
    table = id_table.detach().float().cpu()
    trained_t = torch.as_tensor(np.asarray(trained), dtype=torch.bool).clone()
    trained_t[0] = False
    rows = np.flatnonzero(trained_t.numpy())
    if len(rows) < 20:
        raise ValueError(f"a content tower needs at least 20 trained items, got {len(rows)}")
    if scoring not in ("cosine", "dot"):
        raise ValueError(f"scoring must be cosine or dot, got {scoring!r}")
    if scoring == "dot" and examples is None:
        # a raw id row is no stand-in for a user: dot scores grow with the query's norm
        raise ValueError("a tower for dot scoring is fitted on user states (examples)")
    rows_scored = F.normalize(table, dim=-1, eps=1e-6) if scoring == "cosine" else table
    candidates = rows_scored * trained_t[:, None]  # [n + 1, d]
    if examples is None:
        examples = (candidates[rows], torch.as_tensor(rows))
    queries, answers = examples[0].float(), examples[1].long()
    queries, answers = queries[trained_t[answers]], answers[trained_t[answers]]

    # A share of the items is held out, as new items: examples answered by them decide when
    # to stop, and their prefixes get no rows.
    held_items = rng.choice(rows, max(1, round(cfg.holdout * len(rows))), replace=False)
    is_held = torch.zeros(len(table), dtype=torch.bool)
    is_held[torch.as_tensor(held_items)] = True
    fit_rows = rows[~is_held[rows].numpy()]
    held_ex = torch.nonzero(is_held[answers]).squeeze(1)
    fit_ex = torch.nonzero(~is_held[answers]).squeeze(1)
    if len(held_ex) == 0 or len(fit_ex) == 0:
        raise ValueError("too few examples to hold some out: give the tower more data")

    tower = ContentTower.for_catalog(sids_t[fit_rows, :layers], codes_per_layer,
                                     content_t.shape[1], table.shape[1], cfg.hidden,
                                     cfg.learned_norm)  # fmt: skip
    tower.scale.fill_(float(table[rows].norm(dim=-1).median()))
    optimizer = torch.optim.AdamW(tower.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    shared = (sids_t, content_t, cfg.temperature if scoring == "cosine" else None)
    num_cold = max(1, round(cfg.cold_share * len(fit_rows)))
    # Held-out check: every held-out item new at once; its examples and as many others.
    others = fit_ex[torch.as_tensor(rng.permutation(len(fit_ex))[: len(held_ex)])]
    check_ex = torch.cat([held_ex, others])
    held_rows = torch.as_tensor(np.sort(held_items))

    def holdout() -> tuple[float, float]:
        # (mean loss over the check examples, share of held-out answers in the top 10)
        tower.eval()
        losses, hits = [], 0
        with torch.no_grad():
            for start in range(0, len(check_ex), 4096):
                ex = check_ex[start : start + 4096]
                logits = _mixed_logits(tower, queries[ex], candidates, held_rows, *shared)
                losses.append(F.cross_entropy(logits, answers[ex], reduction="sum").item())
                own = logits.gather(1, answers[ex][:, None])
                new = is_held[answers[ex]]
                hits += ((logits[new] > own[new]).sum(1) < 10).sum().item()
        return sum(losses) / len(check_ex), hits / len(held_ex)

    best = (float("inf"), 0, {k: v.clone() for k, v in tower.state_dict().items()})
    curve: list[dict] = []
    fit_rows_t = torch.as_tensor(fit_rows)
    for epoch in range(1, cfg.epochs + 1):
        tower.train()
        perm = fit_ex[torch.as_tensor(rng.permutation(len(fit_ex)))]
        total = 0.0
        for start in range(0, len(perm), cfg.batch_size):
            ex = perm[start : start + cfg.batch_size]
            # this step's new items: half the batch's answers and a random share of the rest
            coin = torch.as_tensor(rng.random(len(ex)) < 0.5)
            extra = fit_rows_t[torch.as_tensor(rng.choice(len(fit_rows), num_cold))]
            cold = torch.unique(torch.cat([answers[ex][coin], extra]))
            cut = torch.as_tensor(rng.integers(0, layers + 1, size=len(cold)))  # depths kept
            cut_some = torch.as_tensor(rng.random(len(cold)) < cfg.depth_drop)
            depth = torch.where(cut_some, cut, torch.full_like(cut, layers))
            keep = torch.arange(layers)[None, :] < depth[:, None]  # [S, L]
            if cfg.parts == "content":
                keep = torch.zeros_like(keep)  # prefix rows stay zero: never read
            logits = _mixed_logits(tower, queries[ex], candidates, cold, *shared, keep=keep)
            loss = F.cross_entropy(logits, answers[ex])
            if cfg.learned_norm:
                with torch.no_grad():
                    direction = tower.direction(sids_t[cold], content_t[cold], keep)
                    target = torch.log(table[cold].norm(dim=-1, keepdim=True) / tower.scale)
                loss = loss + F.mse_loss(tower.log_norm(direction), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(ex)
        held_loss, held_hr = holdout()
        curve.append({"epoch": epoch, "loss": total / len(fit_ex), "holdout_loss": held_loss,
                      "holdout_hr@10": held_hr})  # fmt: skip
        if held_loss < best[0]:
            best = (held_loss, epoch, {k: v.clone() for k, v in tower.state_dict().items()})
        if log:
            mark = "  *" if best[1] == epoch else ""
            log(f"tower epoch {epoch}: loss {total / len(fit_ex):.4f}  holdout loss "
                f"{held_loss:.4f}  held-out items in top 10 {held_hr:.3f}{mark}")  # fmt: skip
        if epoch - best[1] >= cfg.patience:
            break
    tower.load_state_dict(best[2])
    tower.eval()
    if cfg.parts == "sid":  # the content layer never saw an input: make serving ignore it too
        with torch.no_grad():
            tower.content[0].weight.zero_()
    record = {"config": asdict(cfg), "best_epoch": best[1], "fit_items": len(fit_rows),
              "holdout_items": len(held_items), "examples": len(answers),
              "curve": curve}  # fmt: skip
    return tower, record


class ServedTable(NamedTuple):
    table: torch.Tensor  # [n + 1, d] raw rows
    scales: torch.Tensor  # [n + 1] score scale per row
    offsets: torch.Tensor  # [n + 1] subtracted from the row's (scaled) score


@torch.no_grad()
def item_table(
    id_table: torch.Tensor,
    tower: ContentTower,
    sids: np.ndarray | torch.Tensor,
    content: np.ndarray | torch.Tensor,
    trained: np.ndarray | torch.Tensor,
) -> ServedTable:
    """The table as the service holds it: trained rows keep their id row at scale 1 and offset
    0, untrained rows (bool `trained` False) get the tower's vector, tower.new_item_scale and
    tower.new_item_offset; row 0 stays zero."""
    sids_t = torch.as_tensor(np.asarray(sids), dtype=torch.int64)
    content_t = torch.as_tensor(np.asarray(content), dtype=torch.float32)
    content_t = torch.cat([torch.zeros(1, content_t.shape[1]), content_t])
    known = torch.as_tensor(np.asarray(trained), dtype=torch.bool)
    table = torch.where(known[:, None], id_table.detach().float().cpu(), tower(sids_t, content_t))
    table[0] = 0.0
    scales = torch.where(known, 1.0, float(tower.new_item_scale))
    offsets = torch.where(known, 0.0, float(tower.new_item_offset))
    return ServedTable(table, scales, offsets)


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
    its new-item score offset on validation, save it as run_dir/TOWER_FILE and rewrite
    metrics.json with the figures of the table the service will hold (the trained model's
    own figures, new items without a vector, move to "id_rows"). Returns metrics.json."""
    from sidrec.offline.evaluate import rank_targets, summarize, table_scorer
    from sidrec.offline.metrics import metrics_from_ranks
    from sidrec.offline.split import BIN_NAMES
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
    examples = None
    if model.encoder.scoring == "dot" and cfg.objective != "users":
        log("content tower: dot scoring, so fitted on user states (objective users)")
        cfg = replace(cfg, objective="users")
    if cfg.objective == "users":
        examples = user_states(model, id_table, split, train_cfg.max_len, seed=cfg.seed)
    tower, record = fit_tower(id_table, sids, content, trained, codes_per_layer, examples, cfg,
                              scoring=model.encoder.scoring)  # fmt: skip
    fit_seconds = time.perf_counter() - started
    batch_size = train_cfg.eval_batch_size or 32

    def ranks(stage: str) -> np.ndarray:
        scorer = table_scorer(model.encoder, *item_table(id_table, tower, sids, content, trained))
        return rank_targets(scorer, split, stage, batch_size, train_cfg.max_len)

    # Issue 11's warm rule on validation: the smallest offset (new items found as often as
    # warm quality allows) whose NDCG@10 is within one standard error of the best offset's,
    # and whose hot-bin NDCG@10 is within HOT_TOLERANCE of the table's with new items never
    # recommended. Offsets are in logits; a cosine model's scores are logits times its
    # temperature.
    unit = train_cfg.temperature if model.encoder.scoring == "cosine" else 1.0
    hot = split.popularity_bin[split.valid.targets] == BIN_NAMES.index("hot")
    tower.new_item_offset.fill_(float("inf"))
    hot_reference = metrics_from_ranks(ranks("valid")[hot])["ndcg@10"]
    by_offset: dict[str, dict[str, float]] = {}
    for nats in NEW_ITEM_OFFSETS:
        tower.new_item_offset.fill_(nats * unit)
        by_offset[str(nats)] = warm_figures(ranks("valid"), hot)
    chosen = choose_offset(by_offset, hot_reference, cfg.hot_tolerance)
    tower.new_item_offset.fill_(chosen * unit)
    valid = summarize(ranks("valid"), split, "valid")
    test = summarize(ranks("test"), split, "test")
    record |= {"new_item_scale": float(tower.new_item_scale),
               "new_item_offset": float(tower.new_item_offset), "new_item_offset_logits": chosen,
               "valid_hot_ndcg@10_never_recommended": hot_reference,
               "valid_by_new_item_offset": by_offset, "fit_seconds": round(fit_seconds, 1),
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    save_tower(tower, run_dir / TOWER_FILE, record)

    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    metrics["id_rows"] = {"valid": metrics["valid"], "test": metrics["test"]}
    metrics |= {"valid": valid, "test": test, "tower": {k: v for k, v in record.items()
                                                          if k != "curve"}}  # fmt: skip
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"content tower: fitted in {fit_seconds:.0f}s (best epoch {record['best_epoch']}), "
        f"new-item score offset {chosen:g} logits; test ndcg@10 {test['overall']['ndcg@10']:.4f} "
        f"hr@10 {test['overall']['hr@10']:.4f}, cold-start hr@10 "
        f"{test['cold_start']['hr@10']:.4f}")  # fmt: skip
    return metrics


def model_scorer(
    model: torch.nn.Module,
    train_counts: np.ndarray | torch.Tensor,
    sids: np.ndarray | None = None,
    tower: ContentTower | None = None,
    content: np.ndarray | None = None,
    new_item_scale: float = 1.0,
    content_term: ContentTerm | None = None,
    item_fields: Sequence[dict[str, str]] | None = None,
) -> Callable:
    """offline/evaluate.py's scorer for the table the service holds for a trained `model` (a
    SequentialRecommender; training events per row `train_counts` [n + 1], 0 for untrained
    rows): with a content tower, the tower's vectors and score scale and offset for untrained
    rows (which need the SIDs and content vectors [n, C]); without, the model's own rows and
    `new_item_scale` for untrained ones, plus the rows' `content_term` (which needs the
    content vectors, and the catalog's `item_fields` where it reads genres and years;
    offline/new_items.py)."""
    from sidrec.offline.evaluate import table_scorer

    counts = np.asarray(train_counts)
    trained = torch.as_tensor(counts > 0)
    if tower is None:
        device = next(model.items.parameters()).device
        known = trained.to(device)
        with torch.no_grad():
            table = model.items.table(known)  # [n + 1, d]
        scorer = table_scorer(model.encoder, table, scales_for(known, new_item_scale))
        if content_term is None or not content_term.active:
            return scorer
        if content is None:
            raise ValueError("a content term is scored with the content vectors")
        weights = torch.from_numpy(content_term.row_weights(counts))
        vectors = torch.from_numpy(content_term.vectors(content, item_fields))
        return with_content_term(scorer, vectors, weights, content_term.half_life)
    if sids is None or content is None:
        raise ValueError("a model with a content tower is scored with its SIDs and content")
    with torch.no_grad():
        served = item_table(model.items.table(trained), tower, sids, content, trained)
    return table_scorer(model.encoder, *served)


def served_scorer(
    checkpoint: Path,
    content: np.ndarray | None = None,
    item_fields: Sequence[dict[str, str]] | None = None,
) -> Callable:
    """model_scorer for `checkpoint` (offline/train.py) and the content tower or new-item
    scale and content term beside it, if any (a tower or a term needs the catalog's content
    vectors [n, C], a term that reads genres and years its items' fields too)."""
    from sidrec.offline.train import load_checkpoint

    model, _, ckpt = load_checkpoint(checkpoint)
    model.eval()
    folder = Path(checkpoint).parent
    return model_scorer(model, ckpt["train_counts"], ckpt["sids"], load_tower(folder), content,
                        load_new_item_scale(folder), load_content_term(folder),
                        item_fields)  # fmt: skip
