"""The tune plan's report: <name>-tune.md, <name>-tune.json and validation-curve plots.

Everything comes from the files the train stage wrote (runs/*/metrics.json, run.json,
train_log.jsonl, commands.jsonl). The grid is judged on validation NDCG@10 alone; its winner
(seed 0) and the `tuned` runs (seeds 1..) make the tuned row, the test item is read only to
print it. A run of the plan that has not finished is listed as missing, never a number.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from sidrec.offline.bench.plan import PEER, REFERENCE_SETTINGS, TUNE_GRID, Run, tune_runs
from sidrec.offline.bench.quality import COMMANDS_FILE
from sidrec.offline.bench.report import _load_runs, _table, stage_lines
from sidrec.offline.bench.runner import RUN_FILE, Budget, run_dir

# Published figures per data set name (model-anchors.md sections 2 and 8): leave-one-out,
# full ranking. The HSTU rows are ML-1M under GR's protocol; the Amazon rows are the TIGER
# paper's Table 2 (history kept as candidates, as generative retrieval scores).
_ML1M = ("hr@10", "ndcg@10", "hr@50", "hr@200")
_AMAZON = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "ml-1m": {
        "HSTU (GR README)": dict(zip(_ML1M, (0.3097, 0.1720, 0.5754, 0.7716), strict=True)),
        "HSTU-large (GR README)": dict(zip(_ML1M, (0.3294, 0.1893, 0.5935, 0.7839), strict=True)),
        "HSTU, full softmax (NetEase TF port)": {"hr@10": 0.3419, "ndcg@10": 0.1944},
        "HSTU-large + MoL (RAILS)": {"hr@10": 0.3412, "ndcg@10": 0.1979},
    },
    "amazon-toys": {
        "TIGER (paper)": dict(zip(_AMAZON, (0.0521, 0.0371, 0.0712, 0.0432), strict=True)),
        "SASRec (as TIGER reports)": dict(
            zip(_AMAZON, (0.0463, 0.0306, 0.0675, 0.0374), strict=True)
        ),
    },
    "amazon-sports": {
        "TIGER (paper)": dict(zip(_AMAZON, (0.0264, 0.0181, 0.0400, 0.0225), strict=True)),
        "SASRec (as TIGER reports)": dict(
            zip(_AMAZON, (0.0233, 0.0154, 0.0350, 0.0192), strict=True)
        ),
    },
}
METRICS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@50", "hr@200", "ndcg@200", "mrr")


def _history_kept_from_checkpoint(data_dir: Path, folder: Path, run: Run) -> dict:
    """The history-kept test report of a run trained before the runner wrote one: ranked
    again from its best-validation checkpoint and saved into its run.json."""
    from sidrec.offline.bench.runner import SPLIT_SEED, history_kept_test
    from sidrec.offline.data.load import load_dataset
    from sidrec.offline.split import make_split
    from sidrec.offline.train import CHECKPOINT_FILE, load_checkpoint

    model, cfg, _ = load_checkpoint(folder / CHECKPOINT_FILE)
    split = make_split(load_dataset(data_dir), cold_fraction=run.cold_fraction, seed=SPLIT_SEED)
    report = history_kept_test(model, split, cfg.max_len)
    info = json.loads((folder / RUN_FILE).read_text())
    info["test_history_kept"] = report
    (folder / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return report


def _load(out: Path, runs: list[Run], data_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """report._load_runs, after filling in the history-kept test report of runs trained
    before the runner wrote one."""
    for run in runs:
        folder = run_dir(out, run)
        if data_dir is None or not (folder / RUN_FILE).is_file():
            continue
        info = json.loads((folder / RUN_FILE).read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        if "test_history_kept" not in {**info, **metrics}:
            _history_kept_from_checkpoint(data_dir, folder, run)
    return _load_runs(out, runs)


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _row(entries: list[dict], key: str = "test") -> dict[str, dict[str, float]]:
    reports = [_report(e, key) for e in entries]
    reports = [r for r in reports if r is not None]
    if not reports:
        return {}
    return {m: _stats([r["overall"][m] for r in reports]) for m in METRICS}


def _report(entry: dict, key: str) -> dict | None:
    if key == "test_history_kept":
        return entry["metrics"].get(key) or entry["info"].get(key)
    return entry["metrics"][key]


def _cell(stats: dict[str, dict[str, float]], metric: str) -> str:
    if metric not in stats:
        return "-"
    s = stats[metric]
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if s["n"] > 1 else f"{s['mean']:.4f}"


def _settings_text(settings: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def _epoch_seconds(entry: dict) -> float:
    return float(entry["metrics"].get("mean_epoch_train_seconds", float("nan")))


def grid_winner(done: dict[str, dict[str, Any]]) -> str | None:
    """The grid group with the best validation NDCG@10 (seed 0), among finished ones."""
    scores = {
        e["run"].group: e["metrics"]["valid"]["overall"]["ndcg@10"]
        for e in done.values()
        if e["run"].kind == "grid"
    }
    return max(scores, key=scores.__getitem__) if scores else None


def write_tune_report(
    data_dir: Path,
    out: Path,
    report_dir: Path,
    budget: Budget,
    notes: Path | None = None,
    command: str = "",
) -> Path:
    """Write report_dir/<data>-tune.md, .json and report_dir/<data>-tune/*.png; returns the .md."""
    from sidrec.offline.plots import plot_validation_curves

    plan = tune_runs(budget.seeds)
    done = _load(out, plan, data_dir)
    if not done:
        raise ValueError(f"no finished run in {out}: train first")
    missing = [r.name for r in plan if r.name not in done]
    name = next(iter(done.values()))["metrics"]["dataset"]
    winner = grid_winner(done)
    by_group: dict[str, list[dict]] = {}
    for entry in done.values():
        by_group.setdefault(entry["run"].group, []).append(entry)
    tuned = (by_group.get(winner, []) if winner else []) + by_group.get("tuned", [])
    ran = sum(group in by_group for group in TUNE_GRID)
    rows_of = {
        "ref-id": ("HSTU, GR's reference settings", by_group.get("ref-id", [])),
        "tuned": (
            f"HSTU, tuned ({winner or 'no grid run yet'}; best of {ran} of "
            f"{len(TUNE_GRID)} grid cells)",
            tuned,
        ),
        PEER: ("RecBole SASRec (peer)", by_group.get(PEER, [])),
    }

    md = [f"# {name}: id-only HSTU, tuned on validation, against GR's settings and a peer", ""]
    md += [
        "Generated by `sidrec bench tune` from the stages below (stage, machine, wall time):",
        "",
    ]
    md += stage_lines(out / COMMANDS_FILE, command)
    md += [
        "",
        "Protocol: leave-one-out, no item withheld (the published protocol); the second-to-last "
        "event is the validation target, which alone selects the epoch (early stopping on "
        f"validation NDCG@10, patience {budget.patience}, at most {budget.epochs} epochs) and "
        "the grid's winner; the test target is ranked once per run with the best-validation "
        "weights, over the whole catalog with the user's history excluded (ties count against "
        "the target). Mean ± sample std over the seeds that finished.",
        "",
        "## Test figures",
        "",
    ]
    rows = []
    results: dict[str, Any] = {"dataset": name, "winner": winner, "rows": {}, "grid": {}}
    for key, (label, entries) in rows_of.items():
        stats = _row(entries)
        if not stats:
            rows.append([label, "0", *("-" for _ in METRICS), "-", "-"])
            continue
        epochs = [f"{e['info']['best_epoch']}{' (stopped)' if e['info'].get('stopped') else ''}"
                  for e in entries]  # fmt: skip
        seconds = [_epoch_seconds(e) for e in entries]
        wall = [e["info"]["wall_seconds"] for e in entries]
        rows.append(
            [
                label,
                str(len(entries)),
                *(_cell(stats, m) for m in METRICS),
                "/".join(str(x) for x in epochs),
                f"{np.nanmean(seconds):.0f} s/epoch, {np.mean(wall) / 60:.0f} min",
            ]
        )
        results["rows"][key] = {
            "label": label,
            "runs": [e["run"].name for e in entries],
            "test": stats,
            "test_history_kept": _row(entries, "test_history_kept"),
            "valid": _row(entries, "valid"),
            "best_epochs": [e["info"]["best_epoch"] for e in entries],
            "stopped": [e["info"].get("stopped") for e in entries],
            "epoch_train_seconds": seconds,
            "wall_seconds": wall,
        }
    for label, figures in PUBLISHED.get(name, {}).items():
        cells = [f"{figures[m]:.4f}" if m in figures else "-" for m in METRICS]
        rows.append([label, "published", *cells, "", ""])
    md += _table(
        ["model", "runs", *(m.upper() for m in METRICS), "best epochs", "time per run"], rows
    )
    md += [
        "",
        "Training time: mean seconds per training epoch and wall minutes per run (training, "
        "per-epoch validation and the test), one single-threaded process per run, "
        f"{next(iter(done.values()))['info'].get('device', '?')}.",
        "",
        "## With history items left in as candidates (--keep-history)",
        "",
        "Generative-retrieval papers (TIGER and its successors) rank without removing the "
        "user's history; on data where a user never repeats an item this can only lower the "
        "figures, since history items become distractors.",
        "",
    ]
    rows = []
    for label, entries in rows_of.values():
        stats = _row(entries, "test_history_kept")
        if stats:
            rows.append([label, str(len(entries)), *(_cell(stats, m) for m in METRICS)])
    md += _table(["model", "runs", *(m.upper() for m in METRICS)], rows) if rows else ["(none yet)"]

    md += ["", "## The grid (seed 0; chosen on validation NDCG@10)", ""]
    md += [
        f"Every row changes GR's reference ({_settings_text(REFERENCE_SETTINGS)}, dropout 0.2, "
        "lr 1e-3, weight decay 0) as listed; the reference row is `ref-id.s0`.",
        "",
    ]
    rows = []
    grid_groups = ["ref-id", *TUNE_GRID]
    for group in grid_groups:
        entry = done.get(f"{group}.s0")
        settings = REFERENCE_SETTINGS if group == "ref-id" else TUNE_GRID[group]
        if entry is None:
            rows.append([group, _settings_text(settings), "missing", "", "", "", "", ""])
            continue
        valid = entry["metrics"]["valid"]["overall"]
        test = entry["metrics"]["test"]["overall"]
        rows.append(
            [
                group + (" **(winner)**" if group == winner else ""),
                _settings_text(settings),
                f"{valid['ndcg@10']:.4f}",
                f"{valid['hr@10']:.4f}",
                f"{test['ndcg@10']:.4f}",
                f"{test['hr@10']:.4f}",
                f"{entry['info']['best_epoch']} / {entry['info']['epochs_run']}"
                + (" (stopped)" if entry["info"].get("stopped") else ""),
                f"{_epoch_seconds(entry):.0f}",
            ]
        )
        results["grid"][group] = {
            "settings": settings,
            "valid": valid,
            "test": test,
            "best_epoch": entry["info"]["best_epoch"],
            "epochs_run": entry["info"]["epochs_run"],
            "epoch_train_seconds": _epoch_seconds(entry),
        }
    md += _table(
        ["group", "settings", "valid NDCG@10", "valid HR@10", "test NDCG@10", "test HR@10",
         "best / run epochs", "s/epoch"],
        rows,
    )  # fmt: skip
    if missing:
        md += ["", f"Missing (not trained yet): {', '.join(missing)}."]
    if notes is not None and notes.is_file():
        md += ["", "## Findings (written by hand)", "", notes.read_text().strip()]

    report_dir.mkdir(parents=True, exist_ok=True)
    plots = report_dir / f"{name}-tune"
    curves = {e["run"].name: e["curve"] for e in done.values() if e["curve"]}
    if curves:
        path = plot_validation_curves(curves, plots)
        md += ["", f"![validation curves]({plots.name}/{path.name})"]
    results["missing"] = missing
    results["generated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (report_dir / f"{name}-tune.json").write_text(json.dumps(results, indent=2) + "\n")
    path = report_dir / f"{name}-tune.md"
    path.write_text("\n".join(md) + "\n")
    return path
