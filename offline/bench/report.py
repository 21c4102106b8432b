"""The quality benchmark's report: <name>.md (tables), <name>.json (every figure), PNG plots.

Everything comes from the files the other stages wrote (prepared/, runs/*/metrics.json,
train_log.jsonl, run.json, commands.jsonl); a run of the plan that has not finished shows up
as missing, never as a number. Headline rows are mean +- sample standard deviation over the
seeds that finished; the published reference numbers are model-anchors.md section 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from sidrec.offline.bench.plan import SID_SETS, Run, plan_runs
from sidrec.offline.bench.runner import PREPARED, RUN_FILE, RUNS, SPLIT_SEED, Budget, run_dir

# GR README, "verified as of 04/15/2024" (HR@10, NDCG@10, HR@50, NDCG@50, HR@200, NDCG@200).
PUBLISHED: dict[str, dict[str, float]] = {
    "SASRec (published)": dict(
        zip(("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200"),
            (0.2853, 0.1603, 0.5474, 0.2185, 0.7528, 0.2498), strict=True)
    ),
    "HSTU (published)": dict(
        zip(("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200"),
            (0.3097, 0.1720, 0.5754, 0.2307, 0.7716, 0.2606), strict=True)
    ),
    "HSTU-large (published)": dict(
        zip(("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200"),
            (0.3294, 0.1893, 0.5935, 0.2481, 0.7839, 0.2771), strict=True)
    ),
}  # fmt: skip
REFERENCE_OF = {"ref-id": "HSTU (published)", "ref-large-id": "HSTU-large (published)"}
METRICS = (
    "hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr",
)  # fmt: skip
BINS = ("hot", "mild", "cold")


def _load_runs(out: Path, runs: list[Run]) -> dict[str, dict[str, Any]]:
    """name -> {run, info, metrics, curve} for every finished run of the plan."""
    found = {}
    for run in runs:
        folder = run_dir(out, run)
        if not (folder / RUN_FILE).is_file():
            continue
        log = (folder / "train_log.jsonl").read_text().splitlines()
        found[run.name] = {
            "run": run,
            "info": json.loads((folder / RUN_FILE).read_text()),
            "metrics": json.loads((folder / "metrics.json").read_text()),
            "curve": [json.loads(line) for line in log if line],
        }
    return found


def _flat(report: dict) -> dict[str, float]:
    """One evaluation report -> the figures the tables use. A metric the report lacks (@5 in
    a metrics.json written before it existed) is left out, and shows as a dash."""
    flat = {m: report["overall"][m] for m in METRICS if m in report["overall"]}
    for b in BINS:
        flat[f"{b} hr@10"] = report["by_popularity"][b]["hr@10"]
    flat["cold-start hr@10"] = report["cold_start"]["hr@10"]
    flat["cold-start hr@50"] = report["cold_start"]["hr@50"]
    flat["warm hr@10"] = report["warm"]["hr@10"]
    return flat


def _aggregate(reports: list[dict]) -> dict[str, dict[str, float]]:
    """Per figure: mean, sample std (0 for one value), n (the reports that have it)."""
    flats = [_flat(r) for r in reports]
    out = {}
    for key in dict.fromkeys(k for f in flats for k in f):
        values = [f[key] for f in flats if key in f]
        out[key] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values),
        }
    return out


def random_hr10(data_dir: Path, cold_fraction: float = 0.05) -> float:
    """HR@10 of a uniformly random ranking on the cold-start test targets: the mean over
    those users of min(10, C) / C, C = the catalog minus the user's history (the target
    itself stays a candidate); evaluate.random_hit_rate."""
    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.evaluate import random_hit_rate
    from sidrec.offline.split import make_split

    data = load_dataset(data_dir)
    split = make_split(data, cold_fraction=cold_fraction, seed=SPLIT_SEED)
    return random_hit_rate(split, "test", 10, users=split.withheld[split.test.targets])


def _cell(agg: dict[str, dict[str, float]], key: str) -> str:
    if key not in agg:
        return "-"
    a = agg[key]
    return f"{a['mean']:.4f} ± {a['std']:.4f}" if a["n"] > 1 else f"{a['mean']:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def stage_lines(commands: Path, command: str) -> list[str]:
    """Markdown list of the stages in commands.jsonl (machine, wall time, command line),
    then this report's own command."""
    md: list[str] = []
    if commands.is_file():
        for line in commands.read_text().splitlines():
            c = json.loads(line)
            if c["stage"] == "report":  # earlier reports; this one is listed below
                continue
            where = c.get("gpu") or f"CPU, {c.get('cpus')} cores"
            extra = f" ({c['note']})" if c.get("note") else ""
            md.append(f"- {c['stage']} on {where}, {c['seconds']:.0f} s{extra}:")
            md.append(f"  `{c['command']}`")
    if command:
        md += ["- report (this file):", f"  `{command}`"]
    return md


def write_report(
    data_dir: Path,
    out: Path,
    report_dir: Path,
    budget: Budget,
    notes: Path | None = None,
    command: str = "",
) -> Path:
    """Write report_dir/<data name>.md, .json and report_dir/<data name>/*.png; returns the .md."""
    from sidrec.offline.plots import plot_cold_vs_warm, plot_popularity_bins, plot_validation_curves

    plan = plan_runs(budget.seeds)
    done = _load_runs(out, plan)
    missing = [r.name for r in plan if r.name not in done]
    if not done:
        raise ValueError(f"no finished run in {out / RUNS}: train first")
    name = next(iter(done.values()))["metrics"]["dataset"]
    baselines = json.loads((out / PREPARED / "baselines.json").read_text())
    groups: dict[str, list[dict]] = {}
    for entry in done.values():
        groups.setdefault(entry["run"].group, []).append(entry)
    agg = {g: _aggregate([e["metrics"]["test"] for e in es]) for g, es in groups.items()}
    agg_valid = {g: _aggregate([e["metrics"]["valid"] for e in es]) for g, es in groups.items()}
    for b, result in baselines.items():
        agg[b] = _aggregate([result["test"]])
    # The baselines' report carries it (same split); older prepared/ folders do not.
    random_rate = baselines["most-popular"]["test"]["cold_start"].get("random_hr@10")
    if random_rate is None:
        random_rate = random_hr10(data_dir)
    headline_order = [
        "id", "sid-prefixn", "sid-rqsum", "hybrid-sum", "hybrid-alpha", "hybrid-switch",
        "hybrid-tower", "large-id", "large-hybrid",
    ]  # fmt: skip
    headline = [g for g in headline_order if g in agg]

    md: list[str] = [f"# {name}: quality benchmark", ""]
    commands = out / "commands.jsonl"
    md += [
        "Generated by `sidrec bench quality` from the stages below (stage, machine, wall time):",
        "",
    ]
    md += stage_lines(commands, command)
    md += [
        "",
        "Protocol: leave-one-out (last event = test, second to last = validation, which alone "
        "selects the epoch; the test item is evaluated once per run, with the best-validation "
        "weights); full ranking over every catalog item with the user's history excluded; ties "
        "count against the target; HR/NDCG@{5,10,50,200} and MRR. Headline runs withhold 5% of "
        "items from training (cold-start split, the same items for every run); 'ref-' runs "
        "withhold none, the published protocol. Popularity bins by training interactions: hot = "
        "items covering the top 25% of interactions, mild = the next 50%, cold = the rest.",
        "",
    ]

    # ---- reference ------------------------------------------------------------------
    md += ["## Is our HSTU as good as the published one?", ""]
    rows = [
        [ref, "published", *(f"{v:.4f}" for v in values.values()), "", ""]
        for ref, values in PUBLISHED.items()
    ]
    for group, ref in REFERENCE_OF.items():
        if group in agg:
            n = agg[group]["hr@10"]["n"]
            diff = [
                f"{100 * (agg[group][m]['mean'] / PUBLISHED[ref][m] - 1):+.1f}%"
                for m in ("hr@10", "ndcg@10")
            ]
            rows.append(
                [
                    f"{group} (ours)",
                    f"{n} seed{'s' if n > 1 else ''}",
                    *(_cell(agg[group], m) for m in PUBLISHED[ref]),
                    *diff,
                ]
            )
    md += _table(
        ["model", "runs", "HR@10", "NDCG@10", "HR@50", "NDCG@50", "HR@200", "NDCG@200",
         "HR@10 vs published", "NDCG@10 vs published"],
        rows,
    )  # fmt: skip
    md.append("")

    # ---- headline -------------------------------------------------------------------
    md += ["## Do Semantic IDs help? (5% of items withheld for cold start)", ""]
    rows = []
    for g in [*baselines, *headline]:
        rows.append([g, str(agg[g]["hr@10"]["n"]), *(_cell(agg[g], m) for m in METRICS)])
    md += _table(["model", "seeds", *(m.upper() for m in METRICS)], rows)
    md += ["", "### Where: popularity bins and cold start (test HR@10)", ""]
    rows = []
    for g in [*baselines, *headline]:
        cs = agg[g]["cold-start hr@10"]["mean"]
        rows.append(
            [
                g,
                *(_cell(agg[g], f"{b} hr@10") for b in BINS),
                _cell(agg[g], "warm hr@10"),
                _cell(agg[g], "cold-start hr@10"),
                _cell(agg[g], "cold-start hr@50"),
                f"{cs / random_rate:.1f}x" if random_rate else "",
            ]
        )
    first = next(iter(done.values()))["metrics"]["test"]
    counts = {b: first["by_popularity"][b]["count"] for b in BINS}
    md += _table(
        [
            "model",
            *(f"{b} (n={counts[b]})" for b in BINS),
            f"warm (n={first['warm']['count']})",
            f"cold start (n={first['cold_start']['count']}; random {random_rate:.4f})",
            "cold start HR@50",
            "cold start vs random",
        ],
        rows,
    )
    md += ["", f"A random ranking's cold-start HR@10 here is {random_rate:.4f}.", ""]

    # ---- ablations ------------------------------------------------------------------
    ablations = [e for e in done.values() if e["run"].kind == "ablation"]
    if ablations:
        md += ["## Ablations (seed 0, one knob changed from the seed-0 headline run)", ""]
        rows = []
        for base in dict.fromkeys(e["run"].base for e in ablations):
            base_entry = done.get(f"{base}.s0")
            entries = ([("(as in headline)", base_entry)] if base_entry else []) + [
                (e["run"].knob, e) for e in ablations if e["run"].base == base
            ]
            for knob, e in entries:
                f = _flat(e["metrics"]["test"])
                rows.append(
                    [
                        str(base),
                        knob,
                        f"{e['metrics']['valid']['overall']['ndcg@10']:.4f}",
                        *(f"{f[k]:.4f}" for k in ("hr@10", "ndcg@10", "cold hr@10")),
                        f"{f['cold-start hr@10']:.4f}",
                        f"{e['info']['best_epoch']}/{e['info']['epochs_run']}",
                    ]
                )
        md += _table(
            ["base", "change", "valid NDCG@10", "test HR@10", "test NDCG@10", "cold-bin HR@10",
             f"cold-start HR@10 (random {random_rate:.4f})", "best epoch / run"],
            rows,
        )  # fmt: skip
        md.append("")

    # ---- SID sets -------------------------------------------------------------------
    md += ["## Semantic ID sets", ""]
    rows = []
    texts_path = out / PREPARED / "texts.json"
    texts = json.loads(texts_path.read_text()) if texts_path.is_file() else {}
    for set_name, (text, layers) in SID_SETS.items():
        path = out / PREPARED / f"sid-report-{set_name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        coherence = r.get("genre_coherence") or {}
        # No lift without genres (e.g. a product catalog): a dash, not a crash.
        lifts = [
            (coherence.get(f"prefix_{d}") or {}).get("lift") for d in range(1, r["layers"] + 1)
        ]
        rows.append(
            [
                set_name,
                f"{text} (all fields: see note)" if texts.get(text, {}).get("note") else text,
                f"{layers} x {r['codes']}",
                " / ".join(str(p["distinct_prefixes"]) for p in r["per_layer"]),
                f"{100 * r['collision_rate']:.1f}%",
                " / ".join("-" if x is None else f"{x:.2f}x" for x in lifts),
            ]
        )
    md += _table(
        ["set", "text", "layers x codes", "distinct prefixes per depth", "collide before dedup",
         "genre-sharing lift per depth"],
        rows,
    )  # fmt: skip
    md += [f"\nNote: {t['note']}." for t in texts.values() if t.get("note")]
    md.append("")

    # ---- targets --------------------------------------------------------------------
    md += ["## Targets", ""]
    targets: list[list[str]] = []
    if "ref-id" in agg:
        for m in ("hr@10", "ndcg@10"):
            ours, ref = agg["ref-id"][m]["mean"], PUBLISHED["HSTU (published)"][m]
            gap = 100 * (ours / ref - 1)
            targets.append(
                [f"id-only {m.upper()} within 3% of {ref}", f"{ours:.4f} ({gap:+.1f}%)",
                 "met" if gap >= -3 else f"missed by {-gap - 3:.1f} points"]
            )  # fmt: skip
    sid_groups = [g for g in headline if g.startswith(("sid-", "hybrid-"))]
    if "id" in agg and sid_groups:
        best = max(sid_groups, key=lambda g: agg_valid[g]["ndcg@10"]["mean"])
        for key, label in (("ndcg@10", "overall NDCG@10"), ("cold hr@10", "cold-bin HR@10")):
            ours, base = agg[best][key]["mean"], agg["id"][key]["mean"]
            targets.append(
                [f"best SID variant by validation ({best}) {label} >= id-only",
                 f"{ours:.4f} vs {base:.4f} ({100 * (ours / base - 1):+.1f}%)" if base else
                 f"{ours:.4f} vs {base:.4f}",
                 "met" if ours >= base else "missed"]
            )  # fmt: skip
    hybrids = [g for g in headline if "hybrid" in g]
    if hybrids:
        best = max(hybrids, key=lambda g: agg_valid[g]["ndcg@10"]["mean"])
        cs = agg[best]["cold-start hr@10"]["mean"]
        content = agg["content-only"]["cold-start hr@10"]["mean"]
        ok = random_rate and cs >= 10 * random_rate and cs > content
        targets.append(
            [f"best hybrid ({best}) cold-start HR@10 >= 10x random and > content-only",
             f"{cs:.4f} = {cs / random_rate:.1f}x random; content-only {content:.4f}" if random_rate
             else f"{cs:.4f} (no cold-start targets); content-only {content:.4f}",
             "met" if ok else "missed"]
        )  # fmt: skip
    md += _table(["target", "measured", "verdict"], targets)
    md.append("")

    if notes is not None and notes.is_file():
        md += ["## Findings (written by hand from the tables above)", "", notes.read_text(), ""]

    # ---- runs -----------------------------------------------------------------------
    md += ["## Runs", ""]
    rows = []
    for e in done.values():
        cfg = e["metrics"]["config"]
        rows.append(
            [
                e["run"].name,
                e["info"]["resolved_variant"],
                e["run"].shape,
                f"{cfg['epochs']}/{cfg['patience']}",
                f"{e['info']['best_epoch']}/{e['info']['epochs_run']}",
                f"{e['metrics']['valid']['overall']['ndcg@10']:.4f}",
                f"{e['info']['wall_seconds']:.0f}",
                e["info"]["device"],
            ]
        )
    md += _table(
        ["run", "variant", "shape", "epoch cap/patience", "best epoch/run", "valid NDCG@10",
         "wall s", "device"],
        rows,
    )  # fmt: skip
    if missing:
        md += ["", f"Not run yet ({len(missing)} of {len(plan)}): " + ", ".join(missing) + "."]

    # ---- figures + JSON -------------------------------------------------------------
    figures = report_dir / name
    seed0 = {e["run"].group: e for e in done.values() if e["run"].seed == 0}
    curves = {g: seed0[g]["curve"] for g in headline if g in seed0}
    reports = {g: done_report for g in headline if (done_report := _mean_report(groups[g]))}
    reports = {**{b: baselines[b]["test"] for b in baselines}, **reports}
    paths = [
        plot_validation_curves(curves, figures),
        plot_popularity_bins(reports, figures),
        plot_cold_vs_warm(reports, figures),
    ]
    md += ["", "## Figures", ""]
    md += [f"![{p.stem}]({name}/{p.name})" for p in paths]
    md += ["", f"_Written {time.strftime('%Y-%m-%d %H:%M %Z')}._", ""]

    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"{name}.json").write_text(
        json.dumps(
            {
                "dataset": name,
                "published": PUBLISHED,
                "random_cold_start_hr@10": random_rate,
                "groups": agg,
                "groups_valid": agg_valid,
                "runs": {
                    n: {
                        "info": e["info"],
                        "valid": e["metrics"]["valid"],
                        "test": e["metrics"]["test"],
                    }
                    for n, e in done.items()
                },
                "missing": missing,
            },
            indent=1,
        )
        + "\n"
    )
    path = report_dir / f"{name}.md"
    path.write_text("\n".join(md))
    return path


def _mean_report(entries: list[dict]) -> dict | None:
    """The test report averaged over seeds, in evaluate()'s layout (for the plots)."""
    reports = [e["metrics"]["test"] for e in entries]
    if not reports:
        return None

    def mean(path: tuple[str, ...]) -> dict:
        parts = []
        for r in reports:
            for key in path:
                r = r[key]
            parts.append(r)
        keys = [k for k in parts[0] if all(k in p for p in parts)]  # older reports lack some
        return {k: float(np.mean([p[k] for p in parts])) for k in keys}

    return {
        "overall": mean(("overall",)),
        "by_popularity": {b: mean(("by_popularity", b)) for b in BINS},
        "cold_start": mean(("cold_start",)),
        "warm": mean(("warm",)),
    }
