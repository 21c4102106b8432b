"""PNG figures of training runs and evaluation reports (matplotlib, Agg backend).

Inputs are the plain dicts the trainer and evaluator write: per-epoch log lines
(train_log.jsonl / TrainResult.epochs) and evaluation reports (evaluate() /
metrics.json["test"]), keyed by a run name such as the variant or a baseline.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

from sidrec.offline.split import BIN_NAMES


def plot_validation_curves(curves: dict[str, list[dict]], out_dir: str | Path) -> Path:
    """NDCG@10 and HR@10 on validation per epoch, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, epochs in curves.items():
        x = [e["epoch"] for e in epochs]
        for ax, metric in zip(axes, ("ndcg@10", "hr@10"), strict=True):
            ax.plot(x, [e["valid"][metric] for e in epochs], marker=".", label=name)
    for ax, metric in zip(axes, ("NDCG@10", "HR@10"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out_dir, "validation_curves.png")


def _grouped_bars(
    ax: plt.Axes, groups: list[str], series: dict[str, list[float]], counts: list[int]
) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, [f"{g}\n(n={c})" for g, c in zip(groups, counts, strict=True)])
    ax.set_ylabel("HR@10")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def plot_popularity_bins(
    reports: dict[str, dict], out_dir: str | Path, stage: str = "test"
) -> Path:
    """HR@10 per popularity bin of the target (hot / mild / cold), one bar per run."""
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    series = {
        name: [r["by_popularity"][b]["hr@10"] for b in BIN_NAMES] for name, r in reports.items()
    }
    first = next(iter(reports.values()))
    counts = [first["by_popularity"][b]["count"] for b in BIN_NAMES]
    _grouped_bars(ax, list(BIN_NAMES), series, counts)
    ax.set_title(f"{stage}: HR@10 by target popularity")
    return _save(fig, out_dir, "popularity_bins.png")


def plot_cold_vs_warm(reports: dict[str, dict], out_dir: str | Path, stage: str = "test") -> Path:
    """HR@10 on cold-start targets (withheld items) vs warm targets, one bar per run."""
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    groups = ["cold_start", "warm"]
    series = {name: [r[g]["hr@10"] for g in groups] for name, r in reports.items()}
    first = next(iter(reports.values()))
    _grouped_bars(ax, ["cold start", "warm"], series, [first[g]["count"] for g in groups])
    ax.set_title(f"{stage}: HR@10, cold-start vs warm targets")
    return _save(fig, out_dir, "cold_vs_warm.png")


def plot_all(
    curves: dict[str, list[dict]], reports: dict[str, dict], out_dir: str | Path
) -> list[Path]:
    """All three figures; `curves` may omit runs without epochs (baselines)."""
    return [
        plot_validation_curves(curves, out_dir),
        plot_popularity_bins(reports, out_dir),
        plot_cold_vs_warm(reports, out_dir),
    ]


def _save(fig: plt.Figure, out_dir: str | Path, name: str) -> Path:
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
