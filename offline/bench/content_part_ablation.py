"""hybrid-sum's new-item pieces (content part, nearest trained paths), ablated on a run.

The same calibrated model's table with and without its content part, and with its untrained
items on their nearest trained paths or on their own (model/item_embedding.py,
offline/new_items.py), at each listed new-item scale, ranked like `sidrec eval` (valid and
test). Prints one line per cell and writes RUN/<variant>/content_part_ablation.json.

    python -m sidrec.offline.bench.content_part_ablation --data ../shared/data/amazon-toys \\
        --run runs/toys-hs --scales 0.9,1.0  # RUN/hybrid-sum/ from `sidrec train`

--seed and --cold-fraction must be the run's, so the split is the one it was trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidrec.offline.evaluate import rank_targets, summarize, table_scorer
from sidrec.offline.new_items import nearest_trained_paths, scales_for
from sidrec.offline.split import Split
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


def main(argv: list[str] | None = None) -> None:
    from sidrec.offline.pipeline import Steps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--variant", default="hybrid-sum")
    parser.add_argument("--scales", default="1.0", help="comma-separated new-item scales")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold-fraction", type=float, default=0.05)
    args = parser.parse_args(argv)
    steps = Steps.open(
        args.data, args.run, seed=args.seed, cold_fraction=args.cold_fraction, progress=False
    )
    folder = args.run / args.variant
    codebooks, sids = steps.sids()
    split = steps.split
    nearest = nearest_trained_paths(codebooks, sids, split.trained, steps.content_vectors)
    cells = ablate(folder, split, [float(s) for s in args.scales.split(",")], nearest)
    for key, report in cells.items():
        bins = report["by_popularity"]
        print(f"{key:28s} hr@10 {report['overall']['hr@10']:.4f} "
              f"ndcg@10 {report['overall']['ndcg@10']:.4f} "
              f"hot ndcg@10 {bins['hot']['ndcg@10']:.4f} "
              f"cold-bin hr@10 {bins['cold']['hr@10']:.4f} "
              f"cold-start hr@10 {report['cold_start']['hr@10']:.4f}")  # fmt: skip
    (folder / "content_part_ablation.json").write_text(json.dumps(cells, indent=2) + "\n")


if __name__ == "__main__":
    main()
