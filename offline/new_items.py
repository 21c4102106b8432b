"""How much a new item's score counts against the trained items', chosen on validation.

A new item (no trained id: withheld, never rated, or ingested by the service) is scored
through a vector guessed from its SIDs (and content): the SID rows alone under the SID and
hybrid variants, a content tower's output under hybrid-tower. Such a vector is not on the
trained rows' scale. Under dot scoring a SID-only vector is shorter than the id + SID rows it
competes with, so new items are never recommended; a tower fitted on user states over-rates
its item. The service therefore scores a new item as scale * score - offset (its index rows),
and issue 11's warm rule picks the knob on validation: of the candidate values, the one that
shows new items most whose NDCG@10 is within one standard error of the best value's and whose
hot-bin NDCG@10 is within HOT_TOLERANCE of the table's with new items never recommended.
The tower's offset is chosen in offline/tower.py; the SID variants' scale here.

Before the scale, a hybrid-sum model gets its content part (model/item_embedding.py): a ridge
regression from the content vector to the id row, fitted on the trained items with the
penalty chosen by cross-validation on them (held-out warm items stand in for new ones). A new
item's id part is then the regression's guess instead of zero, so items with one code tuple
and different texts get different vectors. The other candidate is the id rows of the item's
content neighbours among the trained items (CONTENT_NEIGHBOURS, NEIGHBOUR_TEMPERATURE): the
regression shrinks every guess towards the average id row, the neighbours keep a sequel's or
a near-duplicate's. Where the catalog's fields name genres or years, both parts are also
fitted on the content vector extended with them (sidrec/item_features.py): MiniLM's vector of
a movie's whole text says little of its genres and year, which say more of its audience.
The neighbours may also be found by the cosine about the catalog's mean vector, as the
content term's is (model/item_embedding.py). Validation keeps the part that finds most new
items at its warm-rule scale.

And a SID variant's untrained items read the SID rows of either their own code paths or the
nearest paths that trained items have (nearest_trained_paths): an item's own path often
leaves the trained catalog below its first code or two, and an untrained row adds nothing.
Validation keeps whichever finds more new items at its warm-rule scale (docs/results/
content-tower.md: the nearest paths helped the demo's MovieLens-100K model, not Toys or Sports).

Last, hybrid-sum's new items may get a dense content term (sidrec/content_term.py): weight *
cos(the history's mean content vector, the item's content vector), both taken about the
catalog's mean vector and the history's recent events weighing more (the content-only
baseline's half-life on validation, offline/baselines.py), added to their score. The warm
rule picks a scale per weight (0 and CONTENT_WEIGHTS), and of the picks that pass it the
one that finds most new items on validation (choose_scale_and_weight); where the catalog's
fields give genres or years, the cosine on the extended vector is offered too and the kind
whose pick finds more new items kept (sidrec/content_term.py). Then the rarely trained
items (at most K training events) may get a term too, for the long tail: of the (K, weight)
cells that pass the warm rule, the one whose cold popularity bin does best on validation
(choose_rare_term). The service adds the same terms (service/retrieval.py).

Before all of these, hybrid-sum's every other trained item may get the term too, the warm
term (choose_warm_term): where the next item is often like the last one, content adds to
every score what the id rows miss (Amazon Toys, docs/results/content-tower.md, thirtieth
session). It is chosen first, on the table with new items never recommended, because it moves
every score: the new items' scale, content part and paths are then chosen with new items at
the warm weight, and the new and rare items' weights over it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sidrec.content_term import ContentTerm
from sidrec.item_features import ItemFeatures
from sidrec.offline.split import Split
from sidrec.sid_codebook import Codebooks, CodePaths, normalize_rows

if TYPE_CHECKING:
    from sidrec.offline.evaluate import EvalBatch, Scorer

HOT_TOLERANCE = 0.02  # issue 11: the hot bin's NDCG@10 within 2% of the table without new items
# Candidate scales for a SID variant's new items, 0.5 to 2 in steps of 0.05: below 1 where SID
# vectors out-score the warm rows they resemble, above where they are too short to compete.
# Fine steps: on ML-100K under dot scoring 1.15 keeps the hot bin within 2% and 1.2 does not.
NEW_ITEM_SCALES = tuple(round(0.5 + 0.05 * i, 2) for i in range(31))
NEW_ITEMS_FILE = "new_items.json"  # beside a SID variant's checkpoint: the chosen scale
# Content-term weights tried (in logits, on dot-scored models): the rule picked 1 on Toys seed
# 0 and Sports seed 2 and 2 on Toys seed 1 (docs/results/content-tower.md, seventeenth
# session), each 0-0.2 below the scale chosen without the term; a term lifts new items, so
# their scales are tried at and below that scale (CONTENT_SCALE_STEPS x 0.05: down to 0.4).
CONTENT_WEIGHTS = (0.5, 1.0, 2.0)
CONTENT_SCALE_STEPS = (-8, -4, -2, 0)
# The rarely trained items' term, (most training events, weight) cells: on Toys at most 2
# events and weight 2 kept the hot bin on three seeds and at most 5 and weight 1 did not
# (docs/results/content-tower.md, eighteenth session); the grid spans both.
RARE_MAX_COUNTS = (1, 2, 3, 5)
# The warm term's weights (every other trained item: ContentTerm.warm_weight), in logits. On
# Amazon Toys (seed 1, a history half-life of 1) validation NDCG@10 rose up to 6-8 and the hot
# bin fell past 2% from 4 (docs/results/content-tower.md, thirtieth session).
WARM_WEIGHTS = (1.0, 2.0, 3.0, 4.0, 6.0)
RARE_WEIGHTS = (0.5, 1.0, 2.0)
# The content neighbours' part: the k trained items nearest by content cosine, weighted by
# softmax(cosine / temperature). The best of 1-20 neighbours on Toys validation cold-start
# HR@10 (docs/results/content-tower.md, twenty-sixth session).
CONTENT_NEIGHBOURS = 20
NEIGHBOUR_TEMPERATURE = 0.05
# Ridge penalties tried, as multiples of the mean eigenvalue of the centred content Gram matrix
RIDGE_PENALTIES = tuple(10.0 ** (e / 2) for e in range(-8, 5))
RIDGE_FOLDS = 5


def fit_ridge(
    x: np.ndarray, y: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Ridge regression y ~ x @ weight + bias, x [m, C], y [m, d]: the penalty of
    RIDGE_PENALTIES with the least squared error over RIDGE_FOLDS held-out folds, then refitted
    on all rows. Returns (weight [C, d], bias [d], record: penalty, held-out R^2 per penalty)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    folds = np.random.default_rng(seed).permutation(len(x)) % RIDGE_FOLDS

    def solve(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, ...]:
        # centred Gram eigenvectors: every penalty's weights from one decomposition
        x_mean, y_mean = xs.mean(0), ys.mean(0)
        xc = xs - x_mean
        eig, vec = np.linalg.eigh(xc.T @ xc)
        return x_mean, y_mean, eig, vec, vec.T @ (xc.T @ (ys - y_mean))

    def weights(parts: tuple[np.ndarray, ...], penalty: float) -> np.ndarray:
        _, _, eig, vec, projected = parts
        return vec @ (projected / (eig + penalty * max(eig.mean(), 1e-12))[:, None])

    errors = np.zeros(len(RIDGE_PENALTIES))
    for fold in range(RIDGE_FOLDS):
        fit, held = folds != fold, folds == fold
        parts = solve(x[fit], y[fit])
        for i, penalty in enumerate(RIDGE_PENALTIES):
            guess = (x[held] - parts[0]) @ weights(parts, penalty) + parts[1]
            errors[i] += float(((guess - y[held]) ** 2).sum())
    total = float(((y - y.mean(0)) ** 2).sum())
    best = int(errors.argmin())
    parts = solve(x, y)
    weight = weights(parts, RIDGE_PENALTIES[best])
    bias = parts[1] - parts[0] @ weight
    record = {
        "penalty": RIDGE_PENALTIES[best],
        "heldout_r2_by_penalty": {f"{p:g}": round(1.0 - e / total, 4)
                                  for p, e in zip(RIDGE_PENALTIES, errors, strict=True)},
    }  # fmt: skip
    return weight.astype(np.float32), bias.astype(np.float32), record


def fit_content_part(
    model: torch.nn.Module, trained: torch.Tensor, content: np.ndarray
) -> dict[str, Any]:
    """Fit and attach the content part of `model`'s item embedding (hybrid-sum): content
    vectors [n, C] of rows 1..n, bool `trained` [n + 1]. Returns the fit's record."""
    items = model.items
    rows = torch.nonzero(trained).flatten()
    rows = rows[rows > 0]
    id_rows = items.id_emb.weight.detach().cpu()[rows].numpy()
    weight, bias, record = fit_ridge(content[rows.numpy() - 1], id_rows)
    items.attach_content_map(torch.from_numpy(weight), torch.from_numpy(bias),
                             torch.as_tensor(content))  # fmt: skip
    return {"fitted_on_items": len(rows), **record}


def attach_neighbour_part(
    model: torch.nn.Module,
    trained: torch.Tensor,
    content: np.ndarray,
    k: int = CONTENT_NEIGHBOURS,
    temperature: float = NEIGHBOUR_TEMPERATURE,
    centred: bool = False,
) -> dict[str, Any]:
    """Attach the content neighbours' part to `model`'s item embedding (hybrid-sum) in place
    of any other: content vectors [n, C] of rows 1..n, bool `trained` [n + 1]; `centred`:
    the cosine about the catalog's mean unit vector. Returns its record."""
    items = model.items
    rows = torch.nonzero(trained).flatten()
    rows = rows[rows > 0]
    keys = torch.as_tensor(content[rows.numpy() - 1])
    values = items.id_emb.weight.detach()[rows]
    k = min(k, len(rows))
    centre = None
    if centred:
        centre = torch.from_numpy(normalize_rows(content).mean(0, dtype=np.float64)).float()
    items.attach_content_neighbours(keys, values, k, temperature, torch.as_tensor(content), centre)
    return {"neighbours": k, "temperature": temperature, "fitted_on_items": len(rows),
            "centred": centred}  # fmt: skip


def attach_content_part(
    model: torch.nn.Module,
    trained: torch.Tensor,
    content: np.ndarray,
    kind: str,
    centred: bool = False,
) -> dict[str, Any]:
    """Attach the content part of `kind` ("ridge" or "neighbours", at the defaults; the
    neighbours' `centred` or not) fitted on content [n, C]; returns its record."""
    if kind == "ridge":
        return fit_content_part(model, trained, content)
    return attach_neighbour_part(model, trained, content, centred=centred)


def load_item_features(run_dir: Path) -> ItemFeatures | None:
    """The genres and years run_dir's content part reads beside the content vector (its
    calibration's record), None where it reads the content vector alone."""
    path = run_dir / NEW_ITEMS_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text()).get("content_part", {}).get("item_features")
    return ItemFeatures.from_record(record) if record else None


def content_part_kind(items: torch.nn.Module) -> str | None:
    """Which content part an item embedding carries: "ridge", "neighbours" or None."""
    if not items.has_content_part:
        return None
    return "neighbours" if items.content_keys is not None else "ridge"


def gets_content_part(variant: str, fusion: str) -> bool:
    """Whether a trained model of this variant and fusion gets a content part."""
    return variant == "hybrid" and fusion == "sum"


def warm_figures(ranks: np.ndarray, hot: np.ndarray) -> dict[str, float]:
    """The warm rule's figures of 1-based validation `ranks`: NDCG@10, its standard error and
    the NDCG@10 of the targets in the hot bin (bool `hot`, per target)."""
    from sidrec.offline.metrics import metrics_from_ranks

    gains = np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)
    return {
        "ndcg@10": metrics_from_ranks(ranks)["ndcg@10"],
        "se": float(gains.std(ddof=1) / np.sqrt(len(gains))),
        "hot_ndcg@10": metrics_from_ranks(ranks[hot])["ndcg@10"],
    }


def passing_warm_rule(
    by_value: dict[str, dict[str, float]], hot_reference: float, tolerance: float = HOT_TOLERANCE
) -> list[float]:
    """The values (keys) whose "ndcg@10" is within one standard error ("se") of the best
    value's and whose "hot_ndcg@10" is within `tolerance` of hot_reference."""
    best = max(by_value.values(), key=lambda v: v["ndcg@10"])
    return [float(k) for k, v in by_value.items()
            if v["ndcg@10"] >= best["ndcg@10"] - best["se"]
            and v["hot_ndcg@10"] >= (1.0 - tolerance) * hot_reference]  # fmt: skip


def choose_by_warm_rule(
    by_value: dict[str, dict[str, float]],
    hot_reference: float,
    boldest: Callable[[Iterable[float]], float],
    safest: Callable[[Iterable[float]], float],
    tolerance: float = HOT_TOLERANCE,
) -> float:
    """The `boldest` value that passes the warm rule (passing_warm_rule); the `safest` value
    where none does. boldest/safest: min or max, as the knob shows new items more."""
    fine = passing_warm_rule(by_value, hot_reference, tolerance)
    return boldest(fine) if fine else safest(float(k) for k in by_value)


def choose_scale(
    by_scale: dict[str, dict[str, float]], hot_reference: float, tolerance: float = HOT_TOLERANCE
) -> float:
    """The largest scale that passes the warm rule (choose_by_warm_rule); the smallest where
    none does."""
    return choose_by_warm_rule(by_scale, hot_reference, max, min, tolerance)


def scale_by_warm_rule(
    valid_ranks: Callable[[float], np.ndarray],
    hot: np.ndarray,
    hot_reference: float,
    tolerance: float = HOT_TOLERANCE,
) -> tuple[float, dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Rank validation at every NEW_ITEM_SCALES (valid_ranks(scale) -> 1-based ranks) and
    choose the scale by the warm rule (choose_scale). Returns (the scale, {scale: ranks},
    {scale: warm_figures}), keyed by str(scale)."""
    ranks = {str(s): valid_ranks(s) for s in NEW_ITEM_SCALES}
    by_scale = {s: warm_figures(r, hot) for s, r in ranks.items()}
    return choose_scale(by_scale, hot_reference, tolerance), ranks, by_scale


def choose_scale_and_weight(
    cells: dict[str, dict[str, Any]],
    weights: list[float],
    hot_reference: float,
    tolerance: float = HOT_TOLERANCE,
) -> tuple[dict[str, float], str | None]:
    """The warm rule over (scale, weight) cells ("scale S weight W": {"scale", "weight",
    "warm": warm_figures, "valid": summarize's report}): per weight, the scale choose_scale
    picks; across weights, of the picks that pass the rule (not choose_scale's fallback where
    no scale does), the one that finds most new items on validation (the smaller weight on a
    tie). Returns ({weight: scale}, the chosen cell's key, or None where no pick passes).
    Only the picked cells' "valid" is read."""
    picked: dict[str, float] = {}
    passing = []
    for weight in weights:
        by_scale = {str(c["scale"]): c["warm"] for c in cells.values() if c["weight"] == weight}
        scale = choose_scale(by_scale, hot_reference, tolerance)
        picked[f"{weight:g}"] = scale
        if scale in passing_warm_rule(by_scale, hot_reference, tolerance):
            passing.append(cells[f"scale {scale:g} weight {weight:g}"])
    best = max(passing, key=lambda c: (c["valid"]["cold_start"]["hr@10"], -c["weight"]),
               default=None)  # fmt: skip
    return picked, None if best is None else f"scale {best['scale']:g} weight {best['weight']:g}"


def with_content_term(
    base: Scorer, content: torch.Tensor, weights: torch.Tensor, half_life: float | None = None
) -> Scorer:
    """Scorer `base` plus weights[row] * the content-only baseline's score of the row (the
    cosine of the history's mean content vector, its events weighted by `half_life`, and the
    row's): content [n, C] float (rows 1..n), weights [n + 1] (0 for rows without the term).
    What the service's term index adds."""
    from sidrec.offline.baselines import content_scorer

    content_scores = content_scorer(content, half_life)

    def score(batch: EvalBatch) -> torch.Tensor:
        return base(batch) + content_scores(batch) * weights[None, :].to(torch.float32)

    return score


def choose_content_term(
    by_scale: dict[str, dict[str, float]],
    scale: float,
    valid: dict[str, Any],
    valid_ranks: Callable[[float, float], np.ndarray],
    hot: np.ndarray,
    hot_reference: float,
    split: Split,
    tolerance: float = HOT_TOLERANCE,
) -> dict[str, Any]:
    """The content term's weight and scale for a table whose scale without the term is
    `scale` (warm figures by_scale, its validation report `valid`): each CONTENT_WEIGHTS
    weight at that scale and below it (CONTENT_SCALE_STEPS), ranked by valid_ranks(scale, weight),
    then choose_scale_and_weight over those and weight 0. Returns {"picked", "chosen",
    "valid_by_cell": warm figures and cold-start HR@10 per cell, "chosen_cell"}."""
    from sidrec.offline.evaluate import summarize

    cells: dict[str, dict[str, Any]] = {
        f"scale {float(s):g} weight 0": {"scale": float(s), "weight": 0.0, "warm": w,
                                         "valid": valid if float(s) == scale else {}}
        for s, w in by_scale.items()
    }  # fmt: skip
    scales = sorted({round(scale + 0.05 * step, 2) for step in CONTENT_SCALE_STEPS} - {0.0})
    for weight in CONTENT_WEIGHTS:
        for s in (s for s in scales if s > 0):
            r = valid_ranks(s, weight)
            cells[f"scale {s:g} weight {weight:g}"] = {
                "scale": s, "weight": weight, "warm": warm_figures(r, hot),
                "valid": summarize(r, split, "valid"),
            }  # fmt: skip
    picked, key = choose_scale_and_weight(cells, [0.0, *CONTENT_WEIGHTS], hot_reference, tolerance)
    return {
        "picked": picked,
        "chosen": key,
        "valid_by_cell": {
            k: {**c["warm"], "cold_start_hr@10": c["valid"]["cold_start"]["hr@10"]}
            for k, c in cells.items()
            if c["weight"]
        },
        "chosen_cell": None if key is None else cells[key],
    }


def choose_warm_term(
    reference: dict[str, float],
    valid_ranks: dict[str, Callable[[float], np.ndarray]],
    hot: np.ndarray,
    hot_reference: float,
    tolerance: float = HOT_TOLERANCE,
) -> dict[str, Any]:
    """The warm term's weight and kind: each WARM_WEIGHTS weight of each kind, ranked by
    valid_ranks[kind](weight) on validation (new items never recommended), against the table
    without it (its warm_figures `reference`). A cell passes where its NDCG@10 beats the
    reference's by more than one standard error and its hot-bin NDCG@10 (bool `hot` per
    target) is within `tolerance` of hot_reference; of those, the one with the best NDCG@10
    (the first on a tie), else none. Returns {"weight" (0: none), "reads" (its kind or None),
    "hot_ndcg@10" (the chosen table's), "valid_by_cell": warm figures per cell, "passes",
    "valid_ndcg@10_by_cell"}."""
    cells: dict[str, dict[str, Any]] = {"weight 0": {**reference, "reads": None, "weight": 0.0}}
    for kind, ranks in valid_ranks.items():
        for weight in WARM_WEIGHTS:
            figures = warm_figures(ranks(weight), hot)
            cells[f"{kind} weight {weight:g}"] = {**figures, "reads": kind, "weight": weight}
    passing = [
        key for key, c in cells.items()
        if c["weight"] and c["ndcg@10"] > reference["ndcg@10"] + reference["se"]
        and c["hot_ndcg@10"] >= (1.0 - tolerance) * hot_reference
    ]  # fmt: skip
    key = max(passing, key=lambda k: cells[k]["ndcg@10"]) if passing else "weight 0"
    return {
        "weight": cells[key]["weight"],
        "reads": cells[key]["reads"],
        "hot_ndcg@10": cells[key]["hot_ndcg@10"],
        "passes": passing,
        "valid_by_cell": cells,
        "valid_ndcg@10_by_cell": {k: round(c["ndcg@10"], 4) for k, c in cells.items()},
    }


def choose_rare_term(
    served: dict[str, Any],
    valid_cell: Callable[[int, float], dict[str, Any]],
    hot_reference: float,
    tolerance: float = HOT_TOLERANCE,
) -> dict[str, Any]:
    """The rarely trained items' term for the served table (its validation cell `served`:
    {"warm": warm_figures, "valid": summarize's report}): each (RARE_MAX_COUNTS, RARE_WEIGHTS)
    cell from valid_cell(count, weight); of the cells that pass the warm rule, the served one
    (count 0) included, the one with the best cold-popularity-bin HR@10 on validation (fewer
    rare items, then the smaller weight, on a tie). Returns {"chosen": (count, weight),
    "valid_by_cell": warm figures, cold-bin and cold-start HR@10 and "passes" per cell,
    "chosen_cell"}."""
    cells: dict[str, dict[str, Any]] = {"count 0 weight 0": {"count": 0, "weight": 0.0, **served}}
    for count in RARE_MAX_COUNTS:
        for weight in RARE_WEIGHTS:
            cell = valid_cell(count, weight)
            cells[f"count {count} weight {weight:g}"] = {"count": count, "weight": weight, **cell}
    keys = list(cells)
    # the rule's values are numbers: the cells by position
    passing = passing_warm_rule({str(i): cells[k]["warm"] for i, k in enumerate(keys)},
                                hot_reference, tolerance)  # fmt: skip
    fine = [keys[int(i)] for i in passing] or ["count 0 weight 0"]
    key = max(fine, key=lambda k: (cells[k]["valid"]["by_popularity"]["cold"]["hr@10"],
                                   -cells[k]["count"], -cells[k]["weight"]))  # fmt: skip
    by_cell = {
        k: {**c["warm"], "passes": k in fine,
            "cold_bin_hr@10": c["valid"]["by_popularity"]["cold"]["hr@10"],
            "cold_start_hr@10": c["valid"]["cold_start"]["hr@10"]}
        for k, c in cells.items()
    }  # fmt: skip
    chosen = (cells[key]["count"], cells[key]["weight"])
    return {"chosen": chosen, "valid_by_cell": by_cell, "chosen_cell": cells[key]}


def load_content_term(run_dir: Path) -> ContentTerm:
    """The content term calibrate_scale saved in run_dir; none where it chose none (or the
    run has no new_items.json)."""
    path = Path(run_dir) / NEW_ITEMS_FILE
    if not path.is_file():
        return ContentTerm()
    record = json.loads(path.read_text())
    # runs calibrated before the rarely trained items' term named the new items' weight so
    record.setdefault("new_item_content_weight", record.get("content_weight", 0.0))
    return ContentTerm.from_record(record)


def load_new_item_scale(run_dir: Path) -> float:
    """The new-item scale calibrate_scale saved in run_dir; 1.0 where none was chosen."""
    path = Path(run_dir) / NEW_ITEMS_FILE
    return float(json.loads(path.read_text())["new_item_scale"]) if path.is_file() else 1.0


def scales_for(trained: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 [n + 1]: 1 for trained rows (bool `trained`), `scale` for the others."""
    return torch.where(trained, 1.0, scale).float()


def nearest_trained_paths(
    codebooks: Codebooks, sids: np.ndarray, trained: np.ndarray, content: np.ndarray
) -> np.ndarray:
    """int64 [n + 1, L]: each item's own codes where it was trained; elsewhere the nearest
    path that trained items have (Codebooks.assign within their paths) for its content
    vector (content [n, C], row i = item row i + 1). What the service computes for an item it
    ingests, from the bundle's trained items (service/catalog.py)."""
    layers = codebooks.layers
    codes = np.array(sids[:, :layers], dtype=np.int64)
    untrained = np.flatnonzero(~trained[1:]) + 1
    if len(untrained):
        paths = CodePaths(codes[trained])
        codes[untrained] = codebooks.assign(content[untrained - 1], within=paths)
    return codes


def attach_nearest_trained_paths(
    model: torch.nn.Module,
    codebooks: Codebooks,
    sids: np.ndarray,
    trained: torch.Tensor,
    content: np.ndarray,
) -> dict[str, Any]:
    """Give the untrained items of a SID model the rows of their nearest trained path
    (ItemEmbedding.attach_untrained_codes); returns how many read another path than their
    own and how many trained SID rows an untrained item reads on average, before and after."""
    items = model.items
    sids = np.asarray(sids)
    codes = nearest_trained_paths(codebooks, sids, trained.numpy(), content)
    untrained = np.flatnonzero(~trained.numpy()[1:]) + 1
    items.mark_trained(trained)
    own_rows = items.sid_rows[untrained]
    items.attach_untrained_codes(torch.as_tensor(codes))
    new_rows = items.untrained_sid_rows[untrained]

    def trained_rows(rows: torch.Tensor) -> float:
        return round(float(items.sid_row_trained[rows].sum(1).float().mean()), 3)

    moved = (codes[untrained] != sids[untrained, : codebooks.layers]).any(1)
    return {
        "untrained_items": len(untrained),
        "on_another_path": int(moved.sum()),
        "trained_rows_read_own_path": trained_rows(own_rows),
        "trained_rows_read": trained_rows(new_rows),
    }


def calibrate_scale(
    run_dir: Path,
    split: Split,
    content: np.ndarray | None = None,
    tolerance: float = HOT_TOLERANCE,
    log: Callable[[str], None] = print,
    codebooks: Codebooks | None = None,
    item_fields: Sequence[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Give run_dir's trained SID model its untrained items' nearest trained paths (when
    `codebooks` and `content`, the catalog's vectors [n, C], are given) and, for hybrid-sum,
    fit its content part (when `content` is given); both are saved into its checkpoint. Then
    choose the new-item score scale on validation, save it as run_dir/NEW_ITEMS_FILE and
    rewrite metrics.json with the figures of the table the service will hold (the trained
    model's own, no content part, own paths and scale 1, move to "unscaled"). For hybrid-sum
    the new items' content-term weight is chosen with the scale (0: none;
    choose_scale_and_weight), then the rarely trained items' (choose_rare_term). A model with
    no untrained item keeps scale 1 and none of these. `item_fields`, the catalog items'
    fields, offer the content part the items' genres and years too (sidrec/item_features.py).
    Returns metrics.json."""
    from sidrec.offline.baselines import choose_content_half_life
    from sidrec.offline.evaluate import rank_targets, summarize, table_scorer
    from sidrec.offline.metrics import metrics_from_ranks
    from sidrec.offline.split import BIN_NAMES
    from sidrec.offline.train import CHECKPOINT_FILE, METRICS_FILE, load_checkpoint

    started = time.perf_counter()
    model, cfg, ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    model.eval()
    trained = torch.as_tensor(ckpt["trained"], dtype=torch.bool)
    record: dict[str, Any] = {"new_item_scale": 1.0}
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    if bool(trained[1:].all()):
        log("new-item scale: every item was trained, so scale 1")
        (run_dir / NEW_ITEMS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return metrics
    items = model.items
    # Which rows untrained items read: their own paths, and (given codebooks) the nearest
    # trained paths; validation chooses between the two below.
    paths: dict[str, torch.Tensor | None] = {"own": None}
    if content is not None and codebooks is not None and items.uses_sid:
        record["nearest_trained_paths"] = attach_nearest_trained_paths(
            model, codebooks, ckpt["sids"], trained, content
        )
        paths["nearest"] = items.untrained_sid_rows
    if content is not None and gets_content_part(cfg.variant, cfg.fusion):
        record["content_part"] = fit_content_part(model, trained, content)
        log(f"content part: ridge penalty {record['content_part']['penalty']:g}, held-out "
            f"R^2 {max(record['content_part']['heldout_r2_by_penalty'].values()):.3f}")  # fmt: skip
    batch_size = cfg.eval_batch_size or 32

    def item_table() -> torch.Tensor:
        with torch.no_grad():
            return items.table(trained)  # [n + 1, d], with the paths set on items

    counts = np.asarray(ckpt["train_counts"])  # [n + 1]: which rows a content term reaches
    features = ItemFeatures.fit(item_fields) if item_fields is not None else None
    vectors_by_kind: dict[tuple[ItemFeatures | None, tuple[float, ...] | None], torch.Tensor] = {}

    def term_vectors(term: ContentTerm) -> torch.Tensor:
        # [n, C'] the term's cosines read, made once per kind
        kind = (term.features, term.centre)
        if kind not in vectors_by_kind:
            assert content is not None
            vectors_by_kind[kind] = torch.from_numpy(term.vectors(content, item_fields))
        return vectors_by_kind[kind]

    def ranks(
        table: torch.Tensor,
        stage: str,
        scales: torch.Tensor | None,
        offsets: torch.Tensor | None = None,
        term: ContentTerm | None = None,
    ) -> np.ndarray:
        scorer = table_scorer(model.encoder, table, scales, offsets)
        if term is not None and term.active:
            weights = torch.from_numpy(term.row_weights(counts))
            scorer = with_content_term(scorer, term_vectors(term), weights, term.half_life)
        return rank_targets(scorer, split, stage, batch_size, cfg.max_len)

    hot = split.popularity_bin[split.valid.targets] == BIN_NAMES.index("hot")
    # new items never recommended (so the paths they would read do not matter)
    never = torch.where(trained, 0.0, float("inf"))
    never_ranks = ranks(item_table(), "valid", None, never)
    hot_reference = metrics_from_ranks(never_ranks[hot])["ndcg@10"]
    # The content term's kinds: its cosine on the content vector, and where the catalog's
    # fields give genres or years on the vector extended with them; each about the catalog's
    # mean vector (ContentTerm.centre), the history's events weighted by the content-only
    # baseline's half-life on validation.
    term_kinds: dict[str, ContentTerm] = {}
    warm = ContentTerm()  # the warm term, or none; the new and rare items' terms weigh over it
    if content is not None and gets_content_part(cfg.variant, cfg.fusion):
        half_life, by_half_life = choose_content_half_life(content, split, cfg.max_len)
        log(f"content term: history half-life {half_life} (content-only validation NDCG@10 "
            + ", ".join(f"{h} {v:.4f}" for h, v in by_half_life.items()) + ")")  # fmt: skip
        kind_features = {"content": None} | ({"content_features": features} if features else {})
        term_kinds = {
            kind: ContentTerm(features=f, half_life=half_life).centred_on(content, item_fields)
            for kind, f in kind_features.items()
        }
        # First the warm term, on every trained item: it moves every score, so the new items'
        # scale and terms are chosen on the table with it, and its hot bin is the reference.
        warm_table = item_table()
        warm_choice = choose_warm_term(
            warm_figures(never_ranks, hot),
            {kind: (lambda w, base=base: ranks(warm_table, "valid", None, never,
                                               term=replace(base, warm_weight=w)))
             for kind, base in term_kinds.items()},
            hot, hot_reference, tolerance,
        )  # fmt: skip
        record["warm_term"] = {k: v for k, v in warm_choice.items() if k != "valid_by_cell"}
        if warm_choice["weight"]:
            kind = warm_choice["reads"]
            warm = replace(term_kinds[kind], warm_weight=warm_choice["weight"])
            term_kinds = {kind: replace(warm, new_weight=warm.warm_weight)}
            hot_reference = warm_choice["hot_ndcg@10"]
        by_cell = warm_choice["valid_ndcg@10_by_cell"]
        log(f"warm items' term: weight {warm.warm_weight:g}"
            + (f" on the {warm_choice['reads']} vector" if warm.warm_weight else "")
            + f" (validation NDCG@10 by cell {by_cell})")  # fmt: skip
    # new items weigh as the warm ones until their own term is chosen
    neutral = term_kinds[next(iter(term_kinds))] if warm.warm_weight else None

    def by_new_item_scale() -> dict[str, Any]:
        # the table as the item embedding now stands, with the warm rule's scale
        table = item_table()
        chosen, valid_ranks, by_scale = scale_by_warm_rule(
            lambda s: ranks(table, "valid", scales_for(trained, s), term=neutral),
            hot, hot_reference, tolerance,
        )  # fmt: skip
        valid = summarize(valid_ranks[str(chosen)], split, "valid")
        return {"new_item_scale": chosen, "valid": valid, "table": table,
                "valid_by_new_item_scale": by_scale}  # fmt: skip

    def finds(entry: dict[str, Any]) -> float:
        return entry["valid"]["cold_start"]["hr@10"]

    by_paths: dict[str, dict[str, Any]] = {}
    for name, rows in paths.items():
        items.untrained_sid_rows = rows
        by_paths[name] = by_new_item_scale()
    # Both tables pass the warm rule at their scales: keep the one that finds more new items
    # on validation (own paths on a tie).
    pick = max(by_paths, key=lambda n: (finds(by_paths[n]), n == "own"))
    items.untrained_sid_rows = paths[pick]
    best = by_paths[pick]
    if "content_part" in record:
        assert content is not None
        # The other content parts on the chosen paths: the content neighbours', and where the
        # catalog's fields give genres or years (item_features) both parts on the content
        # vector extended with them. One is kept where it finds more new items on
        # validation than the ridge part and the parts before it (the earlier on a tie).
        ridge_record = dict(record["content_part"])
        # name -> (kind, the vectors [n, C'] the part is fitted on); the neighbours' part
        # also with its cosine about the catalog's mean ("_centred")
        parts = {"ridge": ("ridge", content), "neighbours": ("neighbours", content),
                 "neighbours_centred": ("neighbours", content)}  # fmt: skip
        if features is not None:
            assert item_fields is not None
            extended = features.extend(content, item_fields)
            parts |= {"ridge_features": ("ridge", extended),
                      "neighbours_features": ("neighbours", extended),
                      "neighbours_features_centred": ("neighbours", extended)}  # fmt: skip
        found = {"ridge": best}  # the part fitted above
        for name, (kind, x) in parts.items():
            if name not in found:
                attach_content_part(model, trained, x, kind, name.endswith("_centred"))
                found[name] = by_new_item_scale()
        kept = max(found, key=lambda name: finds(found[name]))  # the first of the best
        kind, x = parts[kept]
        read = features if "_features" in kept else None
        record["content_part"] = {
            **ridge_record,  # the ridge part's fit on the content vector
            "kind": kind,
            # the genres and years the kept part reads beside the content vector; null: none
            "item_features": read.record() if read is not None else None,
            "fit": attach_content_part(model, trained, x, kind, kept.endswith("_centred")),
            **{f"valid_cold_start_hr@10_{n}": finds(e) for n, e in found.items()},
            **{f"new_item_scale_{n}": e["new_item_scale"] for n, e in found.items()},
        }
        best = found[kept]
        figures = ", ".join(f"{n} {finds(e):.4f}" for n, e in found.items())
        log(f"content part: validation cold-start HR@10 {figures}: {kept} kept")
    chosen, valid = best["new_item_scale"], best["valid"]
    table, term = best["table"], ContentTerm()
    if term_kinds:
        # The new items' term on each kind (the warm term's alone where it has one): each
        # kind's weight over the warm one and scale by the warm rule, then the kind whose pick
        # finds more new items on validation (the content vector alone on a tie).
        by_kind = {
            kind: choose_content_term(
                best["valid_by_new_item_scale"], chosen, valid,
                lambda s, w, base=base: ranks(table, "valid", scales_for(trained, s),
                                              term=replace(base, new_weight=warm.warm_weight + w)),
                hot, hot_reference, split, tolerance,
            )
            for kind, base in term_kinds.items()
        }  # fmt: skip

        def term_finds(kind: str) -> float:
            cell = by_kind[kind]["chosen_cell"]
            return -1.0 if cell is None else float(cell["valid"]["cold_start"]["hr@10"])

        kind = max(term_kinds, key=term_finds)  # the first of the best
        by_weight = by_kind[kind]
        record["content_term"] = {k: v for k, v in by_weight.items() if k != "chosen_cell"}
        record["content_term"] |= {
            "reads": kind,
            "content_only_valid_ndcg@10_by_half_life": by_half_life,
            **{f"valid_cold_start_hr@10_{k}": max(term_finds(k), 0.0) for k in term_kinds},
        }
        cell = by_weight["chosen_cell"]
        served_warm = best["valid_by_new_item_scale"][str(chosen)]
        weight = 0.0  # over the warm one
        if cell is not None:
            chosen, valid = cell["scale"], cell["valid"]
            weight, served_warm = cell["weight"], cell["warm"]
        # the new items' term; the rarely trained items' term reads the vectors it picked
        # (the centred content vector where it picked none)
        term = replace(term_kinds[kind], new_weight=warm.warm_weight + weight)
        reads = "centred content vector" + (" + genres/years" if term.features else "")
        reads += f", history half-life {half_life}"
        log(f"content term: weight {term.new_weight:g} at scale {chosen:g} on the {reads} "
            f"(validation cold-start HR@10 {valid['cold_start']['hr@10']:.4f}; per weight the "
            f"warm rule's scale {by_weight['picked']})")  # fmt: skip
        scales = scales_for(trained, chosen)

        def rare_cell(count: int, weight: float) -> dict[str, Any]:
            rare_term = replace(term, rare_weight=warm.warm_weight + weight, rare_max_count=count)
            r = ranks(table, "valid", scales, term=rare_term)
            return {"warm": warm_figures(r, hot), "valid": summarize(r, split, "valid")}

        rare = choose_rare_term(
            {"warm": served_warm, "valid": valid}, rare_cell, hot_reference, tolerance
        )
        record["rare_term"] = {k: v for k, v in rare.items() if k != "chosen_cell"}
        count, weight = rare["chosen"]
        term = replace(term, rare_weight=warm.warm_weight + weight if count else 0.0,
                       rare_max_count=count)  # fmt: skip
        if not term.active:
            term = ContentTerm()
        valid = rare["chosen_cell"]["valid"]
        cold_bin = valid["by_popularity"]["cold"]["hr@10"]
        log(f"rarely trained items' term: weight {weight:g} on items with at most {count} "
            f"training events (validation cold-bin HR@10 {cold_bin:.4f})"
            if count else f"rarely trained items' term: none (no cell passing the warm rule "
            f"does better on the validation cold bin, {cold_bin:.4f})")  # fmt: skip
    test = summarize(ranks(table, "test", scales_for(trained, chosen), term=term), split, "test")
    if len(record) > 1:  # a content part or nearest paths: the checkpoint keeps the choice
        ckpt["state_dict"] = {k: v.cpu() for k, v in model.state_dict().items()}
        tmp = run_dir / (CHECKPOINT_FILE + ".tmp")
        torch.save(ckpt, tmp)
        tmp.replace(run_dir / CHECKPOINT_FILE)
    if "nearest" in paths:
        record["nearest_trained_paths"] |= {
            "chosen": pick == "nearest",
            **{f"valid_cold_start_hr@10_{n}": v["valid"]["cold_start"]["hr@10"]
               for n, v in by_paths.items()},
            **{f"new_item_scale_{n}": v["new_item_scale"] for n, v in by_paths.items()},
        }  # fmt: skip
        paths_record = record["nearest_trained_paths"]
        log(f"untrained items: {paths_record['on_another_path']} of "
            f"{paths_record['untrained_items']} have a nearest trained path not their own; "
            f"validation cold-start HR@10 own paths "
            f"{paths_record['valid_cold_start_hr@10_own']:.4f}, nearest trained paths "
            f"{paths_record['valid_cold_start_hr@10_nearest']:.4f}: {pick} kept")  # fmt: skip
    record |= {"new_item_scale": chosen, **term.record(),
               "valid_hot_ndcg@10_never_recommended": hot_reference,
               "valid_by_new_item_scale": best["valid_by_new_item_scale"],
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    (run_dir / NEW_ITEMS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    # the model as trained (kept from a first calibration when run again)
    metrics.setdefault("unscaled", {"valid": metrics["valid"], "test": metrics["test"]})
    metrics |= {"valid": valid, "test": test, "new_items": record}
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"new-item scale {chosen:g} (validation, warm rule; {record['seconds']:.0f}s): test "
        f"ndcg@10 {test['overall']['ndcg@10']:.4f} hr@10 {test['overall']['hr@10']:.4f}, "
        f"cold-start hr@10 {test['cold_start']['hr@10']:.4f}")  # fmt: skip
    return metrics
