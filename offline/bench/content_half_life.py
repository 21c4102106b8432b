"""The content-only baseline at each history half-life, model-free: valid and test.

Ranks like `sidrec eval` (leave-one-out, full ranking, history excluded) with the catalog's
content vectors taken about their mean (ContentTerm.centre), the history's event j of n
weighing 0.5 ** ((n - 1 - j) / H) for each H of CONTENT_HALF_LIVES (None: the plain mean).
Validation's best H is the one `sidrec eval` and calibration use (offline/baselines.py).
Prints one line per H and writes RUN/content_half_life.json.

    python -m sidrec.offline.bench.content_half_life --data ../shared/data/amazon-toys \\
        --run runs/toys-hs-s0 --seed 0  # the run's folder: its content vectors are reused
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from sidrec.offline.baselines import CONTENT_HALF_LIVES, content_only_scorer
from sidrec.offline.evaluate import rank_targets, summarize
from sidrec.offline.split import Split


def half_life_cells(
    content: np.ndarray, split: Split, max_history: int = 200
) -> dict[str, dict[str, Any]]:
    """{str(H): {"valid", "test": summarize's report}} per H of CONTENT_HALF_LIVES."""
    out: dict[str, dict[str, Any]] = {}
    for half_life in CONTENT_HALF_LIVES:
        scorer = content_only_scorer(content, half_life)
        out[str(half_life)] = {
            stage: summarize(rank_targets(scorer, split, stage, 256, max_history), split, stage)
            for stage in ("valid", "test")
        }
    return out


def main(argv: list[str] | None = None) -> None:
    from sidrec.offline.pipeline import Steps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold-fraction", type=float, default=0.05)
    parser.add_argument("--max-history", type=int, default=200)
    args = parser.parse_args(argv)
    steps = Steps.open(
        args.data, args.run, seed=args.seed, cold_fraction=args.cold_fraction, progress=False
    )
    cells = half_life_cells(steps.content_vectors, steps.split, args.max_history)
    for name, cell in cells.items():
        print(
            f"half-life {name:5s} | "
            + " | ".join(
                f"{stage} hr@10 {r['overall']['hr@10']:.4f} ndcg@10 {r['overall']['ndcg@10']:.4f}"
                f" cold-start hr@10 {r['cold_start']['hr@10']:.4f}"
                for stage, r in cell.items()
            ),
            flush=True,
        )
    (args.run / "content_half_life.json").write_text(json.dumps(cells, indent=2) + "\n")


if __name__ == "__main__":
    main()
