"""hybrid-sum's new-item pieces (content part, nearest trained paths), ablated on a run.

The same calibrated model's table with and without its content part, and with its untrained
items on their nearest trained paths or on their own (model/item_embedding.py,
offline/new_items.py), at each listed new-item scale, ranked like `sidrec eval` (valid and
test). Prints one line per cell and writes RUN/<variant>/content_part_ablation.json.

`--content-weights W,...` ranks the served table (as calibrated) with a dense content term
added to new items' scores at each scale: W * cos(mean content of the history, the item's
content), the content-only baseline's score, in logits (the tower ablation's term, on
hybrid-sum). For each weight the warm rule picks a scale on validation, and across weights
the pair that passes it and finds most new items on validation (offline/new_items.py).
`--term-centre centred|plain` takes the term's cosine about the catalog's mean vector or not
(ContentTerm.centre) whatever the served term does; `served` (the default) as it does.
`--term-half-life none|EVENTS` likewise weighs the history's events alike or by recency
(ContentTerm.half_life).

    python -m sidrec.offline.bench.content_part_ablation --data ../shared/data/amazon-toys \\
        --run runs/toys-hs --scales 0.9,1.0  # RUN/hybrid-sum/ from `sidrec train`

`--rare-counts K,... --rare-weights W,...` ranks the served table as calibrated (its scale and
content term on new items) plus a content term of weight W on the trained items with at most
K training events (the cold popularity bin's rarest), each pair beside the served table (K 0),
with the warm rule's figures on validation: RUN/<variant>/rare_term_ablation.json.

`--neighbours K:T,...` compares the content parts calibration chooses between: the ridge part
and the content neighbours' part with k = K and temperature T per cell, each on the paths the
run's calibration kept and at the scale the warm rule picks for it over NEW_ITEM_SCALES (no
content term): RUN/<variant>/content_neighbours_ablation.json. With `--item-features` each
part is also fitted on the content vector extended with the items' genres and year
(sidrec/item_features.py), cells named "features ...". With `--centred-neighbours` each
neighbours' part is also measured with its cosine taken about the catalog's mean unit vector,
cells named "centred ...".

--seed and --cold-fraction must be the run's, so the split is the one it was trained on.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidrec.content_term import ContentTerm
from sidrec.item_features import ItemFeatures
from sidrec.offline.evaluate import rank_targets, summarize, table_scorer
from sidrec.offline.new_items import (
    NEW_ITEMS_FILE,
    attach_neighbour_part,
    choose_scale_and_weight,
    fit_content_part,
    load_content_term,
    load_new_item_scale,
    nearest_trained_paths,
    passing_warm_rule,
    scale_by_warm_rule,
    scales_for,
    warm_figures,
    with_content_term,
)
from sidrec.offline.split import BIN_NAMES, Split
from sidrec.offline.train import CHECKPOINT_FILE, load_checkpoint

# (name, content part, nearest trained paths); the last is the model as trained
TABLES = (
    ("content part", True, True),
    ("sid only", False, True),
    ("own paths", True, False),
    ("as trained", False, False),
)


def ablate(
    run_dir: Path, split: Split, scales: list[float], nearest: np.ndarray
) -> dict[str, dict[str, Any]]:
    """{"<table> scale <s> <stage>": summarize's report} for run_dir's checkpoint, whose item
    embedding has a content part (calibrate_scale fitted it). nearest: int64 [n + 1, L], the
    untrained items' nearest trained paths (new_items.nearest_trained_paths), used whichever
    paths the run's calibration kept."""
    model, cfg, ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    items = model.items
    if not items.has_content_part:
        raise ValueError(f"{run_dir}: no content part (a hybrid-sum run after calibrate_scale)")
    trained = torch.as_tensor(ckpt["trained"], dtype=torch.bool)
    part = items.content_part
    items.attach_untrained_codes(torch.as_tensor(nearest))
    nearest_rows = items.untrained_sid_rows
    out: dict[str, dict[str, Any]] = {}
    for name, with_part, with_paths in TABLES:
        items.content_part = part if with_part else None
        items.untrained_sid_rows = nearest_rows if with_paths else None
        with torch.no_grad():
            table = items.table(trained)
        for scale in scales:
            scorer = table_scorer(model.encoder, table, scales_for(trained, scale))
            for stage in ("valid", "test"):
                ranks = rank_targets(scorer, split, stage, cfg.eval_batch_size or 32, cfg.max_len)
                out[f"{name} scale {scale:g} {stage}"] = summarize(ranks, split, stage)
    return out


def _served_table(
    run_dir: Path, split: Split
) -> tuple[Any, Any, torch.Tensor, torch.Tensor, np.ndarray, float]:
    """(model, config, trained [n + 1], the item table [n + 1, d] as the service holds it,
    which validation targets are in the hot bin, the warm rule's hot-bin reference: the
    validation NDCG@10 with new items never recommended that calibration recorded) for
    run_dir's calibrated checkpoint."""
    model, cfg, ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    model.eval()
    trained = torch.as_tensor(ckpt["trained"], dtype=torch.bool)
    with torch.no_grad():
        table = model.items.table(trained)  # [n + 1, d]
    hot = split.popularity_bin[split.valid.targets] == BIN_NAMES.index("hot")
    # Users' histories may hold new items, whose vectors calibration changed after reading its
    # reference, so the served table's reference differs from it: take calibration's.
    calibrated = json.loads((run_dir / NEW_ITEMS_FILE).read_text())
    hot_reference = calibrated.get("valid_hot_ndcg@10_never_recommended")
    if hot_reference is None:  # a model with no untrained item: read it from the table
        never = table_scorer(model.encoder, table, None, torch.where(trained, 0.0, float("inf")))
        ranks = rank_targets(never, split, "valid", cfg.eval_batch_size or 32, cfg.max_len)
        hot_reference = warm_figures(ranks, hot)["hot_ndcg@10"]
    return model, cfg, trained, table, hot, hot_reference


def with_half_life(term: ContentTerm, half_life: str) -> ContentTerm:
    """`term` with the history half-life `half_life` names: "served" (its own), "none" (the
    plain mean) or a number of events."""
    if half_life == "served":
        return term
    return replace(term, half_life=None if half_life == "none" else float(half_life))


def content_term_cells(
    run_dir: Path,
    split: Split,
    scales: list[float],
    weights: list[float],
    content: np.ndarray,
    item_fields: list[dict[str, str]],
    centre: str = "served",
    half_life: str = "served",
) -> dict[str, Any]:
    """The served table of run_dir's calibrated checkpoint (its rarely trained items' term
    included) plus weight * the content-only score on its untrained rows (on the vectors the
    served term reads; `centre` "centred" or "plain": about the catalog's mean or not), at
    each (scale, weight): {"cells": {"scale S weight W": {"valid", "test", "warm":
    warm_figures}}, "picked": per weight the warm rule's scale, "chosen": the cell passing the
    rule with the most validation cold-start HR@10}."""
    model, cfg, trained, table, hot, hot_reference = _served_table(run_dir, split)
    served = load_content_term(run_dir)
    if centre == "centred":
        served = replace(served, centre=None).centred_on(content, item_fields)
    elif centre == "plain":
        served = replace(served, centre=None)
    served = with_half_life(served, half_life)
    content_rows = torch.from_numpy(served.vectors(content, item_fields))  # [n, C']
    batch_size = cfg.eval_batch_size or 32
    cells: dict[str, dict[str, Any]] = {}
    for weight in weights:
        term = replace(served, new_weight=weight)
        row_weights = torch.from_numpy(term.row_weights(split.train_counts))
        for scale in scales:
            base = table_scorer(model.encoder, table, scales_for(trained, scale))
            scorer = with_content_term(base, content_rows, row_weights, term.half_life)
            ranks = {stage: rank_targets(scorer, split, stage, batch_size, cfg.max_len)
                     for stage in ("valid", "test")}  # fmt: skip
            cells[f"scale {scale:g} weight {weight:g}"] = {
                "scale": scale,
                "weight": weight,
                "warm": warm_figures(ranks["valid"], hot),
                **{stage: summarize(r, split, stage) for stage, r in ranks.items()},
            }
    picked, chosen = choose_scale_and_weight(cells, weights, hot_reference)
    return {"valid_hot_ndcg@10_never_recommended": hot_reference, "cells": cells,
            "picked": picked, "chosen": chosen}  # fmt: skip


def rare_term_cells(
    run_dir: Path,
    split: Split,
    counts: list[int],
    weights: list[float],
    content: np.ndarray,
    item_fields: list[dict[str, str]],
    half_life: str = "served",
) -> dict[str, Any]:
    """The served table of run_dir's calibrated checkpoint (scale and content term on its
    untrained rows) plus weight * the content-only score on the trained rows with at most
    `count` training events, per (count, weight) and for count 0 (no term on trained rows):
    {"cells": {"count K weight W": {"valid", "test", "warm", "passes"}}, "hot_reference",
    "served": the (count, weight) calibration chose}. "passes": the warm rule over the cells
    (passing_warm_rule)."""
    model, cfg, trained, table, hot, hot_reference = _served_table(run_dir, split)
    scale = load_new_item_scale(run_dir)
    served = with_half_life(load_content_term(run_dir), half_life)
    batch_size = cfg.eval_batch_size or 32
    base = table_scorer(model.encoder, table, scales_for(trained, scale))
    content_rows = torch.from_numpy(served.vectors(content, item_fields))  # [n, C']
    cells: dict[str, dict[str, Any]] = {}
    for count, weight in [(0, 0.0), *((c, w) for c in counts for w in weights)]:
        term = replace(served, rare_weight=weight, rare_max_count=count)
        rare = (split.train_counts > 0) & (split.train_counts <= count)
        row_weights = torch.from_numpy(term.row_weights(split.train_counts))
        scorer = with_content_term(base, content_rows, row_weights, term.half_life)
        ranks = {stage: rank_targets(scorer, split, stage, batch_size, cfg.max_len)
                 for stage in ("valid", "test")}  # fmt: skip
        cells[f"count {count} weight {weight:g}"] = {
            "count": count, "weight": weight, "rare_items": int(rare.sum()),
            "warm": warm_figures(ranks["valid"], hot),
            **{stage: summarize(r, split, stage) for stage, r in ranks.items()},
        }  # fmt: skip
    # the rule's values are numbers: the cells by position
    passing = passing_warm_rule({str(i): c["warm"] for i, c in enumerate(cells.values())},
                                hot_reference)  # fmt: skip
    for i, cell in enumerate(cells.values()):
        cell["passes"] = float(i) in passing
    return {"hot_reference": hot_reference, "new_item_scale": scale,
            "new_item_content_weight": served.new_weight,
            "served": [served.rare_max_count, served.rare_weight], "cells": cells}  # fmt: skip


def neighbour_cells(
    run_dir: Path,
    split: Split,
    cells: list[tuple[int, float]],
    content: np.ndarray,
    centred: bool = False,
    catalog: tuple[np.ndarray, list[dict[str, str]]] | None = None,
) -> dict[str, Any]:
    """The ridge part and the content neighbours' part per (k, temperature) in `cells` on
    run_dir's calibrated checkpoint (its paths), each at its warm-rule scale: {"ridge" or "k K
    temperature T": {"record", "scale", "warm", "valid", "test"}}. `centred`: the
    neighbours' cosine about the catalog's mean, cells named "centred k K ...", no ridge.
    Where the run serves a warm term, every item gets it as calibration measured the parts
    (new items at the warm weight): `catalog`, the content vectors and fields it reads."""
    model, cfg, trained, _, hot, hot_reference = _served_table(run_dir, split)
    batch_size = cfg.eval_batch_size or 32
    served = load_content_term(run_dir)
    term = None
    if served.warm_weight:
        if catalog is None:
            raise ValueError(f"{run_dir} serves a warm term: give the catalog's content")
        term = replace(served, new_weight=served.warm_weight, rare_weight=0.0, rare_max_count=0)
        term_rows = torch.from_numpy(term.vectors(*catalog))
        row_weights = torch.from_numpy(term.row_weights(split.train_counts))
    out: dict[str, Any] = {}
    for k, temperature in [*([] if centred else [(0, 0.0)]), *cells]:
        if k == 0:
            key, record = "ridge", fit_content_part(model, trained, content)
        else:
            key = ("centred " if centred else "") + f"k {k} temperature {temperature:g}"
            record = attach_neighbour_part(model, trained, content, k, temperature, centred)
        with torch.no_grad():
            table = model.items.table(trained)

        def ranks(stage: str, scale: float, table: torch.Tensor = table) -> np.ndarray:
            scorer = table_scorer(model.encoder, table, scales_for(trained, scale))
            if term is not None:
                scorer = with_content_term(scorer, term_rows, row_weights, term.half_life)
            return rank_targets(scorer, split, stage, batch_size, cfg.max_len)

        scale, by_scale, warm = scale_by_warm_rule(
            lambda s, ranks=ranks: ranks("valid", s), hot, hot_reference
        )
        out[key] = {
            "record": {k: v for k, v in record.items() if k != "heldout_r2_by_penalty"},
            "scale": scale,
            "warm": warm[str(scale)],
            "valid": summarize(by_scale[str(scale)], split, "valid"),
            "test": summarize(ranks("test", scale), split, "test"),
        }
    return out


def _line(key: str, report: dict[str, Any]) -> str:
    bins = report["by_popularity"]
    cold = report["cold_start"]
    times = cold["hr@10"] / cold["random_hr@10"] if cold.get("random_hr@10") else 0.0
    return (f"{key:34s} hr@10 {report['overall']['hr@10']:.4f} "
            f"ndcg@10 {report['overall']['ndcg@10']:.4f} "
            f"hot ndcg@10 {bins['hot']['ndcg@10']:.4f} "
            f"cold-bin hr@10 {bins['cold']['hr@10']:.4f} "
            f"cold-start hr@10 {cold['hr@10']:.4f} ({times:.0f}x random)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from sidrec.offline.pipeline import Steps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--variant", default="hybrid-sum")
    parser.add_argument("--scales", default="1.0", help="comma-separated new-item scales")
    parser.add_argument(
        "--content-weights", default="", help="comma-separated content-term weights (logits)"
    )
    parser.add_argument(
        "--term-centre",
        choices=("served", "centred", "plain"),
        default="served",
        help="--content-weights: the term's cosine about the catalog's mean, or not",
    )
    parser.add_argument(
        "--term-half-life",
        default="served",
        help="--content-weights, --rare-counts: the history's half-life, served|none|EVENTS",
    )
    parser.add_argument("--rare-counts", default="", help="comma-separated training counts")
    parser.add_argument("--rare-weights", default="1", help="comma-separated weights (logits)")
    parser.add_argument(
        "--neighbours", default="", help="comma-separated K:T, content neighbours' parts"
    )
    parser.add_argument(
        "--item-features",
        action="store_true",
        help="--neighbours: also each part on the content vector plus genres and year",
    )
    parser.add_argument(
        "--centred-neighbours",
        action="store_true",
        help="--neighbours: also each neighbours' part with its cosine about the catalog's mean",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold-fraction", type=float, default=0.05)
    args = parser.parse_args(argv)
    steps = Steps.open(
        args.data, args.run, seed=args.seed, cold_fraction=args.cold_fraction, progress=False
    )
    folder = args.run / args.variant
    split = steps.split
    scales = [float(s) for s in args.scales.split(",")]
    if args.rare_counts:
        counts = [int(c) for c in args.rare_counts.split(",")]
        rare_weights = [float(w) for w in args.rare_weights.split(",")]
        out = rare_term_cells(
            folder, split, counts, rare_weights, steps.content_vectors,
            steps.data.catalog.fields, args.term_half_life,
        )  # fmt: skip
        for key, cell in out["cells"].items():
            valid = cell["valid"]
            print(f"{key} ({cell['rare_items']} items) valid ndcg@10 "
                  f"{cell['warm']['ndcg@10']:.4f} hot {cell['warm']['hot_ndcg@10']:.4f} "
                  f"cold-bin {valid['by_popularity']['cold']['hr@10']:.4f} passes "
                  f"{cell['passes']} | test " + _line("", cell["test"]).strip(),
                  flush=True)  # fmt: skip
        (folder / "rare_term_ablation.json").write_text(json.dumps(out, indent=2) + "\n")
        return
    if args.neighbours:
        pairs = [(int(k), float(t)) for k, t in (c.split(":") for c in args.neighbours.split(","))]
        centring = (False, True) if args.centred_neighbours else (False,)
        out = {}
        catalog = (steps.content_vectors, steps.data.catalog.fields)
        for centred in centring:
            out |= neighbour_cells(folder, split, pairs, steps.content_vectors, centred, catalog)
        if args.item_features:
            fields = steps.data.catalog.fields
            features = ItemFeatures.fit(fields)
            if features is None:
                raise SystemExit(f"{args.data}: too few items have genres or a year")
            extended = features.extend(steps.content_vectors, fields)
            for centred in centring:
                cells = neighbour_cells(folder, split, pairs, extended, centred, catalog)
                out.update({f"features {key}": cell for key, cell in cells.items()})
        for key, cell in out.items():
            print(f"{key:28s} scale {cell['scale']:g} valid ndcg@10 "
                  f"{cell['valid']['overall']['ndcg@10']:.4f} cold-start "
                  f"{cell['valid']['cold_start']['hr@10']:.4f} | test "
                  + _line("", cell["test"]).strip(), flush=True)  # fmt: skip
        (folder / "content_neighbours_ablation.json").write_text(json.dumps(out, indent=2) + "\n")
        return
    if args.content_weights:
        weights = [float(w) for w in args.content_weights.split(",")]
        out = content_term_cells(
            folder,
            split,
            scales,
            weights,
            steps.content_vectors,
            steps.data.catalog.fields,
            args.term_centre,
            args.term_half_life,
        )
        for key, cell in out["cells"].items():
            print(f"{key} valid ndcg@10 {cell['valid']['overall']['ndcg@10']:.4f} hot "
                  f"{cell['warm']['hot_ndcg@10']:.4f} cold-start "
                  f"{cell['valid']['cold_start']['hr@10']:.4f} | test "
                  + _line("", cell["test"]).strip(), flush=True)  # fmt: skip
        print(f"served scale {load_new_item_scale(folder):g}; warm rule per weight "
              f"{out['picked']}; chosen {out['chosen']}")  # fmt: skip
        name = "" if args.term_centre == "served" else f"-{args.term_centre}"
        name += "" if args.term_half_life == "served" else f"-half-life-{args.term_half_life}"
        (folder / f"content_term_ablation{name}.json").write_text(json.dumps(out, indent=2) + "\n")
        return
    codebooks, sids = steps.sids()
    nearest = nearest_trained_paths(codebooks, sids, split.trained, steps.content_vectors)
    cells = ablate(folder, split, scales, nearest)
    for key, report in cells.items():
        print(_line(key, report))
    (folder / "content_part_ablation.json").write_text(json.dumps(cells, indent=2) + "\n")


if __name__ == "__main__":
    main()
