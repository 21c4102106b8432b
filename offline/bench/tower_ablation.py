"""Content-tower ablations on a trained id-only run: what the tower reads, what it is fitted
to, and the new-item score scale and offset, each ranked like `sidrec eval` (valid and test,
overall, warm, cold-start with its random rate, per popularity bin), beside id rows alone and
the content-only baseline. Prints one line per cell and writes RUN/tower_ablation.json.

    python -m sidrec.offline.bench.tower_ablation --data ../shared/data/amazon-toys \\
        --run runs/toys  # RUN/id/ from `sidrec train --variants id` (or --variant hybrid-tower)

Cells: parts (sid+content | sid | content) x objective (ids | users) x norm (fixed |
learned) at the listed new-item score scales and offsets. For each fitted tower, two more
cells separate its two roles: new items' tower vectors in histories only (never ranked), and
ranked only (zero in histories). Two candidate additions, each at every offset listed:
`--content-weights` adds weight * cos(mean content of the history, the new item's content) to
new items' scores (a dense content path beside the tower, as LIGER has; `--profile tower`
takes every item's tower vector in place of its content vector), and `--rare-gates
K:A` moves trained items with at most K training events a share A of the way from their id
row to their tower vector (offset A times the new-item offset).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from sidrec.offline.baselines import content_only_baseline
from sidrec.offline.evaluate import Scorer, rank_targets, summarize, table_scorer
from sidrec.offline.new_items import with_content_term
from sidrec.offline.pipeline import Steps
from sidrec.offline.tower import TowerConfig, fit_tower, item_table, user_states
from sidrec.offline.train import CHECKPOINT_FILE, load_checkpoint


def _reports(scorer: Scorer, steps: Steps, max_len: int) -> dict[str, Any]:
    return {
        stage: summarize(rank_targets(scorer, steps.split, stage, 64, max_len), steps.split, stage)
        for stage in ("valid", "test")
    }


def _line(name: str, r: dict[str, Any]) -> str:
    v, t = r["valid"], r["test"]
    cold = t["cold_start"]
    times = cold["hr@10"] / cold["random_hr@10"] if cold.get("random_hr@10") else 0.0
    bins = t["by_popularity"]
    return (
        f"{name:34s} valid ndcg@10 {v['overall']['ndcg@10']:.4f} | test hr@10 "
        f"{t['overall']['hr@10']:.4f} ndcg@10 {t['overall']['ndcg@10']:.4f} warm ndcg@10 "
        f"{t['warm']['ndcg@10']:.4f} cold-start hr@10 {cold['hr@10']:.4f} ({times:.0f}x random)"
        " | bin hr@10 "
        + " ".join(f"{b} {bins[b]['hr@10']:.4f}" for b in bins)
        + " | bin ndcg@10 "
        + " ".join(f"{b} {bins[b]['ndcg@10']:.4f}" for b in bins)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--run", type=Path, required=True, help="run folder with VARIANT/checkpoint.pt")
    p.add_argument("--variant", default="id", help="an id-only variant: id or hybrid-tower")
    p.add_argument("--parts", default="sid+content,sid,content")
    p.add_argument("--objectives", default="ids,users")
    p.add_argument("--norms", default="fixed", help="fixed,learned: the new items' norm")
    p.add_argument("--scales", default="1.0", help="new-item score scales, no offset")
    p.add_argument("--offsets", default="", help="new-item score offsets in logits, at scale 1")
    p.add_argument("--content-weights", default="", help="content-term weights in logits")
    p.add_argument(
        "--profile",
        default="content",
        help="content,tower: the term's space: content vectors, or every item's tower vector",
    )
    p.add_argument("--rare-gates", default="", help="K:A pairs, e.g. 3:0.5,5:0.25")
    p.add_argument(
        "--roles",
        action="store_true",
        help="also rank each tower at its first cell in one role at a time",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = Steps.open(args.data, args.run)
    codebooks, sids = steps.sids()
    model, cfg, ckpt = load_checkpoint(args.run / args.variant / CHECKPOINT_FILE)
    if cfg.variant != "id":
        raise SystemExit(f"{args.run / args.variant}: a {cfg.variant} model, not id-only")
    model.eval()
    trained = torch.as_tensor(ckpt["trained"], dtype=torch.bool)
    with torch.no_grad():
        id_table = model.items.table(trained)
    out: dict[str, Any] = {}

    def cell(name: str, scorer: Scorer) -> None:
        out[name] = _reports(scorer, steps, cfg.max_len)
        print(_line(name, out[name]), flush=True)

    cell("id rows only", table_scorer(model.encoder, id_table))
    cell("content-only", content_only_baseline(steps.content_vectors, steps.split, cfg.max_len)[0])
    states = None
    for objective in args.objectives.split(","):
        if objective == "users" and states is None:
            states = user_states(model, id_table, steps.split, cfg.max_len)
        for parts, norm in ((p, n) for p in args.parts.split(",") for n in args.norms.split(",")):
            name = f"tower {parts}/{objective}" + ("/learned-norm" if norm == "learned" else "")
            started = time.perf_counter()
            tower, record = fit_tower(
                id_table, sids, steps.content_vectors, trained, codebooks.codes,
                states if objective == "users" else None,
                TowerConfig(parts=parts, objective=objective, learned_norm=norm == "learned"),
                scoring=model.encoder.scoring,
            )  # fmt: skip
            print(f"{name}: fitted in {time.perf_counter() - started:.0f}s,"
                  f" best epoch {record['best_epoch']}", flush=True)  # fmt: skip
            # (scale, offset in logits) cells: each scale without an offset, each offset at 1
            unit = cfg.temperature if model.encoder.scoring == "cosine" else 1.0
            new = (~trained).float() * unit  # content-term weights in logits, like the offsets
            tower_rows = item_table(
                id_table, tower, sids, steps.content_vectors, torch.zeros_like(trained)
            ).table  # [n + 1, d]: every item's tower vector
            spaces = {"content": torch.as_tensor(steps.content_vectors),
                      "tower": tower_rows[1:]}  # fmt: skip
            grid = [(float(x), 0.0) for x in args.scales.split(",") if x] + [
                (1.0, float(x)) for x in args.offsets.split(",") if x
            ]
            for i, (scale, offset) in enumerate(grid):
                tower.new_item_scale.fill_(scale)
                tower.new_item_offset.fill_(offset * unit)
                table, scales, offsets = item_table(
                    id_table, tower, sids, steps.content_vectors, trained
                )
                label = f"scale {scale:g}" if offset == 0 else f"offset {offset:g}"
                base = table_scorer(model.encoder, table, scales, offsets)
                cell(f"{name} {label}", base)
                for space in args.profile.split(","):
                    for w in (float(x) for x in args.content_weights.split(",") if x):
                        term = with_content_term(base, spaces[space], new * w)
                        tag = "content" if space == "content" else "tower-profile"
                        cell(f"{name} {label} {tag} {w:g}", term)
                for gate in (g for g in args.rare_gates.split(",") if g):
                    k, share = int(gate.split(":")[0]), float(gate.split(":")[1])
                    rare = trained & (torch.as_tensor(steps.split.train_counts) <= k)
                    gated = torch.where(
                        rare[:, None], (1 - share) * table + share * tower_rows, table
                    )
                    gated_offsets = torch.where(rare, share * offset * unit, offsets)
                    cell(f"{name} {label} rare<={k} x{share:g}",
                         table_scorer(model.encoder, gated, scales, gated_offsets))  # fmt: skip
                if args.roles and i == 0:
                    # an infinite offset: new items read in histories, never recommended
                    never = offsets.masked_fill(~trained, float("inf"))
                    cell(
                        f"{name} in histories only",
                        table_scorer(model.encoder, table, scales, never),
                    )
                    cell(
                        f"{name} {label} ranked only",
                        table_scorer(model.encoder, table, scales, offsets, history_table=id_table),
                    )
    (args.run / "tower_ablation.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
