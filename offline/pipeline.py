"""The offline steps behind the CLI, sharing one run folder.

run/
  content_vectors.npy       MiniLM vectors of the catalog (rows 1..n)
  content.json              their precision (fp32 | int8): the encoder the bundle gets
  sids/                     sids.npy, sid_codebooks.npz, sid_report.json
  <variant>/                checkpoint.pt, train_log.jsonl, metrics.json (train.py)
  baselines.json            most-popular and content-only, validation and test
  results.json, plots/      every variant + baselines side by side; each report says its
                            candidate rule ("history_excluded") and carries the random
                            cold-start HR@10 ("cold_start" -> "random_hr@10")
  data.json                 the data as last opened (name, time source, tie order)
  bundle/                   what `sidrec serve` loads
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from sidrec.offline.data.dataset import DataError, Interactions
from sidrec.offline.split import Split
from sidrec.sid_codebook import Codebooks

if TYPE_CHECKING:
    from sidrec.offline.train import TrainConfig


def make_console() -> Console:
    """rich's Console, laid out for a log file when stdout is not a terminal (and COLUMNS is
    unset): there rich assumes 80 columns and wraps table cells and long lines mid-sentence,
    so tables get 200 columns and plain lines are not wrapped at all."""
    console = Console()
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(width=200, soft_wrap=True)


console = make_console()

# CLI name -> (ItemEmbedding variant, fusion)
VARIANTS: dict[str, tuple[str, str]] = {
    "id": ("id", "sum"),
    "sid-prefixn": ("sid-prefixn", "sum"),
    "sid-rqsum": ("sid-rqsum", "sum"),
    "hybrid-sum": ("hybrid", "sum"),
    "hybrid-alpha": ("hybrid", "alpha"),
    "hybrid-switch": ("hybrid", "switch"),
    # id rows for trained items; new and rare items from a content tower fitted to them
    # afterwards (model/content_tower.py, offline/tower.py)
    "hybrid-tower": ("id", "sum"),
}
TOWER_VARIANTS = ("hybrid-tower",)
CONTENT_FILE = "content.json"
BEST = "best"  # export the trained variant with the highest validation NDCG@10
BASELINES = ("most-popular", "content-only")


def cache_dir() -> Path:
    return Path(os.environ.get("SIDREC_CACHE", Path.home() / ".cache" / "sidrec"))


def resolve_data(data: str | Path, data_root: Path = Path("data")) -> Path:
    """A folder as given, or the name of a data set we can fetch (ml-100k)."""
    if str(data) == "ml-100k" and not Path(data).exists():
        from sidrec.offline.data.fetch import get_ml100k

        return get_ml100k(data_root / "ml-100k")
    path = Path(data)
    if not path.exists():
        raise DataError(path, "no such data folder (give a folder, or 'ml-100k' to fetch it)")
    return path


def _check_variant(name: str) -> tuple[str, str]:
    if name not in VARIANTS:
        raise DataError("--variants", f"unknown variant {name!r}; use one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


# Training settings `sidrec bench tune` chose on validation (docs/results/*-tune.md), by the
# data's shape: long histories (MovieLens: ML-1M 166 events per user) or short ones (Amazon
# 5-core: Toys 8.6, Sports 8.3). The loss is TrainConfig's "auto" either way: the exact full
# softmax wherever the catalog's logits fit, else the logQ-corrected sampled softmax.
LONG_HISTORY_EVENTS = 50
# ML-1M, validation NDCG@10: length norm 0.1607; scored by dot product 0.1636 (3 seeds); AdamW
# weight decay 0.3, 0.1678 (2 seeds, 0.0001 apart). Under dot scoring a SID variant's new items
# need their score scale (offline/new_items.py) to be recommended at all. A rate of 2e-3 and
# dropout 0.1 were not better (one seed each).
LONG_HISTORY_SETTINGS: dict[str, Any] = {
    "attn_norm": "length", "scoring": "dot", "weight_decay": 0.3,
}  # fmt: skip
# Long histories with this many events or more train four blocks at a rate that starts at 2e-3
# and halves after 3 epochs without a better validation. ML-1M (1.0M events): id-only
# validation NDCG@10 +5.2% over 3 seeds; hybrid-sum at that depth is served level with
# id-only (seed 0); depth alone, or the rate alone, was level. MovieLens-100K (0.1M) is level
# at four blocks and 6% worse at the faster rate. The line lies between the two sizes
# measured. Four blocks double the encoder each request runs (docs/results/
# losses-and-tuning.md, twenty-third and twenty-fourth sessions).
DEEP_FROM_EVENTS = 300_000
DEEP_SETTINGS: dict[str, Any] = {"num_blocks": 4, "lr": 2e-3, "lr_plateau": 3}
# Toys, validation NDCG@10 (docs/results/losses-and-tuning.md): dropout 0.5 0.0610 (bench
# tune's winner); with SASRec's width and history (d=64, 50 items) 0.0642; scored by dot
# product as SASRec scores 0.0673 (3 seeds); twice as wide, d=128, 0.0677 (3 seeds); AdamW
# weight decay 0.1, 0.0684 (3 seeds); weight decay 0.3, 0.0709 (3 seeds; Sports 0.0397 against
# 0.0373 at 0.1). hybrid-sum's SID table decayed at 1.0: Sports validation 0.0356 against
# 0.0321 at 0.3 (seed 0), hot bin within 2.2% of id-only against 9.3% below (2 seeds); Toys
# test level over 3 seeds, validation +2.1% (2 seeds; docs/results/content-tower.md,
# sixteenth session). Measured on hybrid-sum only, so only hybrid-sum takes it by default
# (Steps.train_config). The rate halved after 2 epochs without a better validation: Toys
# validation +1.8% to +3.0% id-only, +3.4% to +5.5% hybrid-sum (3 seeds each), Sports id-only
# +4.5% (3 seeds against 3); on ML-1M's two blocks it halved during the long climb and fell
# behind, so long histories halve it only with four blocks at 2e-3 (DEEP_SETTINGS; docs/results/
# losses-and-tuning.md, twenty-first and twenty-third sessions).
SHORT_HISTORY_SETTINGS: dict[str, Any] = {
    "attn_norm": "length", "dropout": 0.5, "d": 128, "dqk": 128, "dv": 128, "max_len": 50,
    "scoring": "dot", "weight_decay": 0.3, "sid_weight_decay": 1.0, "lr_plateau": 2,
}  # fmt: skip


def run_content_precision(run: Path) -> str | None:
    """The precision of `run`'s content vectors; None before any were made (a folder from
    before content.json existed holds fp32 ones)."""
    if (run / CONTENT_FILE).is_file():
        return str(json.loads((run / CONTENT_FILE).read_text())["precision"])
    if (run / "content_vectors.npy").is_file() or (run / "sids" / "sids.npy").is_file():
        return "fp32"
    return None


# Where the last-window rule leaves at least this share of the training targets out, long
# histories train on them too (windows="overlap"). ML-1M leaves 34% out: validation NDCG@10
# +1.7% (docs/results/losses-and-tuning.md, thirteenth session); ML-100K 14%: level (3 seeds),
# so it keeps the cheaper rule.
OVERLAP_FROM_UNSEEN_SHARE = 0.25
LONG_HISTORY_MAX_LEN = 200  # TrainConfig's max_len, which LONG_HISTORY_SETTINGS keeps


def unseen_target_share(data: Interactions, max_len: int) -> float:
    """Share of the training targets that lie before each user's last max_len ones (never a
    target under windows="last"). Leave-one-out holds out two events a user; the first
    training event is no target."""
    targets = np.maximum(np.array([len(s) for s in data.sequences], np.int64) - 3, 0)
    total = int(targets.sum())
    return float(np.maximum(targets - max_len, 0).sum() / total) if total else 0.0


def recommended_settings(data: Interactions) -> tuple[dict[str, Any], str]:
    """(TrainConfig fields, why) for `data`, from the mean events per user and, for long
    histories, the share of training targets beyond the last window."""
    mean = data.num_events / max(len(data.users), 1)
    if mean >= LONG_HISTORY_EVENTS:
        why = f"{mean:.0f} events per user >= {LONG_HISTORY_EVENTS}: tuned on ML-1M"
        settings = dict(LONG_HISTORY_SETTINGS)
        share = unseen_target_share(data, LONG_HISTORY_MAX_LEN)
        if share >= OVERLAP_FROM_UNSEEN_SHARE:
            settings["windows"] = "overlap"
            why += (
                f"; {share:.0%} of the training targets lie before each user's last "
                f"{LONG_HISTORY_MAX_LEN}: trained on too (windows=overlap)"
            )
        if data.num_events >= DEEP_FROM_EVENTS:
            settings.update(DEEP_SETTINGS)
            why += (
                f"; {data.num_events:,} events >= {DEEP_FROM_EVENTS:,}: four blocks, the rate "
                "from 2e-3 halved on a plateau"
            )
        return settings, why
    why = f"{mean:.1f} events per user < {LONG_HISTORY_EVENTS}: tuned on Amazon Toys"
    return dict(SHORT_HISTORY_SETTINGS), why


@dataclass
class Steps:
    data: Interactions
    run: Path
    seed: int = 0
    cold_fraction: float = 0.05
    timings: dict[str, float] = field(default_factory=dict)
    # TrainConfig fields for every variant (loss, attn_norm, dropout, lr, ...) and why:
    # use_settings() fills both from a tune report or the data's shape
    settings: dict[str, Any] = field(default_factory=dict)
    settings_source: str = "TrainConfig defaults"
    # True where the settings are recommended_settings()'s, whose SID-table decay was chosen
    # for hybrid-sum alone; settings a user gives apply to every variant as given
    settings_recommended: bool = False
    # Progress bars (training epochs, content encoding); False for plain logs: one line per
    # epoch (the CLI's --log-format)
    progress: bool = True
    # The content encoder's precision (offline/content.py PRECISIONS): fixed per run folder,
    # since the SIDs and the bundle's encoder must come from the same vectors
    content_precision: str = "fp32"

    @classmethod
    def open(
        cls,
        data: str | Path,
        run: Path,
        seed: int = 0,
        cold_fraction: float = 0.05,
        tie_order: str = "file",
        name: str | None = None,
        progress: bool = True,
        content_precision: str | None = None,
    ) -> Steps:
        """Loads the data (`tie_order`, `name`: see data.load.load_dataset) for steps on
        `run`. `content_precision`: None = the run's (content.json), else fp32; another
        than the run's is an error (its SIDs are made from the other vectors)."""
        from sidrec.offline.content import check_precision
        from sidrec.offline.data.load import load_dataset

        if content_precision is not None:
            try:
                check_precision(content_precision)
            except ValueError as e:
                raise DataError(run, str(e)) from None
        recorded = run_content_precision(run)
        if content_precision not in (None, recorded or content_precision):
            raise DataError(
                run,
                f"this run's content vectors and SIDs are {recorded}, not {content_precision}: "
                "use another run folder",
            )
        precision = recorded or content_precision or "fp32"
        started = time.perf_counter()
        interactions = load_dataset(resolve_data(data), name=name, tie_order=tie_order)
        run.mkdir(parents=True, exist_ok=True)
        console.print(
            f"[bold]{interactions.name}[/]: {len(interactions.users):,} users, "
            f"{interactions.num_items:,} items, {interactions.num_events:,} events, "
            f"time: {interactions.time_source}, ties: {interactions.tie_order} order"
        )
        for note in interactions.notes:
            console.print(f"  note: {note}")
        _record_data(interactions, run)
        steps = cls(
            interactions, run, seed, cold_fraction, progress=progress, content_precision=precision
        )
        steps.timings["load"] = time.perf_counter() - started
        return steps

    # ---- content and SIDs -------------------------------------------------------------

    @cached_property
    def content_vectors(self) -> np.ndarray:
        """float32[n, 384], row i = item row i + 1."""
        from sidrec.offline.content import encode_catalog

        path = self.run / "content_vectors.npy"
        started = time.perf_counter()
        vectors = encode_catalog(
            self.data.catalog,
            cache_dir() / "content",
            progress=self.progress,
            precision=self.content_precision,
            graphs=cache_dir(),
        )
        np.save(path, vectors)
        (self.run / CONTENT_FILE).write_text(
            json.dumps({"precision": self.content_precision}) + "\n"
        )
        self.timings["content"] = time.perf_counter() - started
        return vectors

    def build_sids(
        self,
        layers: int | None = None,
        codes: int | None = None,
        normalize_residuals: bool = False,
    ) -> tuple[Codebooks, np.ndarray]:
        from sidrec.offline.sids import build_sids, default_sid_shape, print_sid_report, sid_report

        default_layers, default_codes = default_sid_shape(self.data.num_items)
        layers, codes = layers or default_layers, codes or default_codes
        vectors = self.content_vectors
        started = time.perf_counter()
        codebooks, sids = build_sids(vectors, layers, codes, normalize_residuals, seed=self.seed)
        folder = self.run / "sids"
        folder.mkdir(exist_ok=True)
        np.save(folder / "sids.npy", sids)
        codebooks.save(folder / "sid_codebooks.npz")
        report = sid_report(sids, self.data.catalog.genres, codebooks)
        (folder / "sid_report.json").write_text(json.dumps(report, indent=2) + "\n")
        self.timings["sids"] = time.perf_counter() - started
        print_sid_report(report, console)
        return codebooks, sids

    def sids(self) -> tuple[Codebooks, np.ndarray]:
        """The run's SIDs, built with defaults when no earlier `sids build` made them."""
        folder = self.run / "sids"
        if (folder / "sids.npy").is_file():
            sids = np.load(folder / "sids.npy")
            if len(sids) == self.data.num_items + 1:
                return Codebooks.load(folder / "sid_codebooks.npz"), sids
            console.print("[yellow]SIDs in the run folder are for another catalog: rebuilding")
        return self.build_sids()

    # ---- split, training, evaluation --------------------------------------------------

    @cached_property
    def split(self) -> Split:
        from sidrec.offline.split import make_split

        return make_split(self.data, cold_fraction=self.cold_fraction, seed=self.seed)

    def use_settings(self, path: Path | None = None) -> dict[str, Any]:
        """Choose the training settings: from `path` (a `sidrec bench tune` report JSON, whose
        validation winner is taken, or a plain JSON object of TrainConfig fields), else
        recommended_settings() for this data; prints them and writes run/settings.json."""
        from sidrec.offline.train import TrainConfig

        if path is None:
            self.settings, self.settings_source = recommended_settings(self.data)
            self.settings_recommended = True
        else:
            try:
                loaded = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise DataError(path, f"cannot read settings: {e}") from e
            if isinstance(loaded, dict) and "grid" in loaded and "winner" in loaded:
                winner = loaded["winner"]
                if winner not in loaded["grid"]:
                    raise DataError(path, "the tune report has no finished grid run")
                self.settings = dict(loaded["grid"][winner]["settings"])
                self.settings_source = (
                    f"{path}: the validation winner {winner!r} of sidrec bench tune on "
                    f"{loaded.get('dataset', '?')}"
                )
            elif isinstance(loaded, dict):
                self.settings, self.settings_source = loaded, str(path)
            else:
                raise DataError(path, "settings must be a JSON object")
            self.settings_recommended = False
        known = set(TrainConfig.__dataclass_fields__)
        unknown = sorted(set(self.settings) - known)
        if unknown:
            raise DataError(path or "settings", f"not training settings: {', '.join(unknown)}")
        TrainConfig(**self.settings)  # validates the values before any training starts
        text = ", ".join(f"{k}={v}" for k, v in self.settings.items()) or "TrainConfig defaults"
        console.print(f"training settings: {text}  ({self.settings_source})")
        record = {"settings": self.settings, "source": self.settings_source}
        (self.run / "settings.json").write_text(json.dumps(record, indent=2) + "\n")
        return self.settings

    def train_config(
        self, name: str, epochs: int = 60, patience: int = 8, id_dropout: float = 0.2
    ) -> TrainConfig:
        """The TrainConfig `train` uses for variant `name`: its variant fields, then the
        chosen settings, less those that are another variant's."""
        from sidrec.offline.train import TrainConfig

        variant, fusion = _check_variant(name)
        cfg = TrainConfig(
            variant=variant,
            fusion=fusion,
            epochs=epochs,
            patience=patience,
            id_dropout=id_dropout if variant == "hybrid" else 0.0,
            use_time=self.data.timestamps is not None,
            seed=self.seed,
            threads=1,
            # Batches of users with similar history lengths (shuffled): far less padding.
            group_by_length=True,
            progress=self.progress,
        )
        cfg = replace(cfg, **self.settings)
        if (variant, fusion) != ("hybrid", "sum"):
            cfg = replace(cfg, sid_gate=False)  # the gate scales a hybrid-sum's SID part only
            if self.settings_recommended:
                cfg = replace(cfg, sid_weight_decay=None)  # measured on hybrid-sum only
        return cfg

    def train(
        self,
        name: str,
        epochs: int = 60,
        patience: int = 8,
        id_dropout: float = 0.2,
        procs: int = 1,
    ) -> dict[str, Any]:
        """Train one variant into run/<name>/; returns its metrics.json content.

        procs > 1 trains under torchrun with that many DistributedDataParallel processes of
        one thread each: on a small CPU box that beats one process with several threads
        (PyTorch's intra-op threads idle on these small matmuls).
        """
        from sidrec.offline.train import METRICS_FILE, train
        from sidrec.offline.train_ddp import launch, save_job

        cfg = self.train_config(name, epochs, patience, id_dropout)
        codebooks, sids = self.sids()
        console.rule(f"train {name}" + (f" ({procs} processes)" if procs > 1 else ""))
        started = time.perf_counter()
        out = self.run / name
        if procs > 1:
            job = save_job(out / "job.pt", self.data, self.split, sids, codebooks.codes, cfg)
            launch(job, out, nproc_per_node=procs, quiet=False)
            job.unlink()
        else:
            train(self.data, self.split, sids, codebooks.codes, cfg, out, log=console.print)
        if name in TOWER_VARIANTS:
            from sidrec.offline.tower import attach_tower

            attach_tower(out, self.split, self.content_vectors, codebooks.codes, log=console.print)
        elif cfg.variant != "id":
            from sidrec.offline.new_items import calibrate_scale

            calibrate_scale(
                out,
                self.split,
                self.content_vectors,
                log=console.print,
                codebooks=codebooks,
                item_fields=self.data.catalog.fields,
            )
        self.timings[f"train {name}"] = time.perf_counter() - started
        return json.loads((self.run / name / METRICS_FILE).read_text())

    def baselines(self, keep_history: bool = False) -> dict[str, dict[str, Any]]:
        from sidrec.offline.baselines import content_only_baseline, most_popular_scorer
        from sidrec.offline.evaluate import evaluate

        content_only, choice = content_only_baseline(self.content_vectors, self.split)
        scorers = {"most-popular": most_popular_scorer(self.split), "content-only": content_only}
        results = {
            name: {
                stage: evaluate(scorer, self.split, stage, keep_history=keep_history)
                for stage in ("valid", "test")
            }
            for name, scorer in scorers.items()
        }
        for report in results["content-only"].values():  # the history half-life it ranked with
            report["history_half_life"] = choice
        (self.run / "baselines.json").write_text(json.dumps(results, indent=2) + "\n")
        return results

    def _rerank(self, name: str, keep_history: bool) -> dict[str, Any]:
        """Validation and test reports of variant `name`'s best checkpoint, ranked again under
        the candidate rule `keep_history` (train.py ranks with the history excluded)."""
        from sidrec.offline.evaluate import rank_targets, summarize
        from sidrec.offline.new_items import load_content_term, load_new_item_scale
        from sidrec.offline.tower import load_tower, model_scorer
        from sidrec.offline.train import CHECKPOINT_FILE, load_checkpoint

        checkpoint = self.run / name / CHECKPOINT_FILE
        if not checkpoint.is_file():
            raise DataError(checkpoint, f"not found: train the {name!r} variant again")
        model, cfg, ckpt = load_checkpoint(checkpoint)
        if ckpt["num_items"] != self.data.num_items:
            raise DataError(checkpoint, f"trained on another catalog ({ckpt['num_items']} items)")
        tower = load_tower(self.run / name)
        term = load_content_term(self.run / name)
        # encoded only if read
        content = self.content_vectors if tower is not None or term.active else None
        scale = load_new_item_scale(self.run / name)
        scorer = model_scorer(
            model, ckpt["train_counts"], ckpt["sids"], tower, content, scale, term,
            self.data.catalog.fields,
        )  # fmt: skip
        batch_size = cfg.eval_batch_size or 32
        reports = {}
        for stage in ("valid", "test"):
            ranks = rank_targets(
                scorer, self.split, stage, batch_size, cfg.max_len, keep_history=keep_history
            )
            reports[stage] = summarize(ranks, self.split, stage, keep_history)
        return reports

    def evaluate(self, keep_history: bool = False) -> dict[str, dict[str, Any]]:
        """Baselines + every trained variant in the run; prints the table, writes JSON + plots.

        Variants' metrics come from their metrics.json: train.py touches the test item once,
        with the best-validation checkpoint, ranking with the user's history excluded. With
        `keep_history` (history items stay candidates) that checkpoint is ranked again under
        that rule; the epoch was still chosen under the default one.
        """
        from sidrec.offline.evaluate import random_hit_rate
        from sidrec.offline.plots import plot_all
        from sidrec.offline.train import LOG_FILE, METRICS_FILE

        results: dict[str, dict[str, Any]] = dict(self.baselines(keep_history))
        curves: dict[str, list[dict]] = {}
        for name in VARIANTS:
            metrics_path = self.run / name / METRICS_FILE
            if metrics_path.is_file():
                metrics = json.loads(metrics_path.read_text())
                if keep_history:
                    results[name] = self._rerank(name, keep_history)
                else:
                    results[name] = {"valid": metrics["valid"], "test": metrics["test"]}
                log_lines = (self.run / name / LOG_FILE).read_text().splitlines()
                curves[name] = [json.loads(line) for line in log_lines if line]
        for stages in results.values():  # metrics.json written before these fields existed
            for stage, report in stages.items():
                report.setdefault("history_excluded", not keep_history)
                cold_start = self.split.withheld[self.split.stage(stage).targets]
                random_rate = random_hit_rate(self.split, stage, 10, keep_history, cold_start)
                report["cold_start"].setdefault("random_hr@10", random_rate)
        (self.run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_all(curves, {name: r["test"] for name, r in results.items()}, self.run / "plots")
        print_results(results, self.data.name)
        return results

    def export(self, name: str, out: Path | None = None) -> Path:
        from sidrec.offline.export import export_bundle
        from sidrec.offline.new_items import load_content_term
        from sidrec.offline.train import CHECKPOINT_FILE, METRICS_FILE

        if name == BEST:
            trained = {
                v: {"valid": json.loads((self.run / v / METRICS_FILE).read_text())["valid"]}
                for v in VARIANTS
                if (self.run / v / METRICS_FILE).is_file()
            }
            if not trained:
                raise DataError(self.run, "no trained variant to export: train one first")
            name = best_variant(trained, list(trained))
        _check_variant(name)
        checkpoint = self.run / name / CHECKPOINT_FILE
        if not checkpoint.is_file():
            raise DataError(checkpoint, f"not found: train the {name!r} variant first")
        metrics = json.loads((self.run / name / METRICS_FILE).read_text())
        codebooks, _ = self.sids()
        started = time.perf_counter()
        bundle = export_bundle(
            checkpoint,
            self.data,
            codebooks,
            out or self.run / "bundle",
            cache_dir(),
            metrics={"valid": metrics["valid"]["overall"], "test": metrics["test"]["overall"]},
            variant_name=name,
            content=self.content_vectors
            if name in TOWER_VARIANTS or load_content_term(checkpoint.parent).active
            else None,
            content_precision=self.content_precision,
        )
        self.timings["export"] = time.perf_counter() - started
        console.print(f"bundle written to [bold]{bundle}[/]")
        return bundle

    def all(
        self,
        variants: list[str],
        export_variant: str = BEST,
        epochs: int = 60,
        patience: int = 8,
        id_dropout: float = 0.2,
        procs: int = 1,
        keep_history: bool = False,
    ) -> Path:
        """Train `variants`, evaluate, export `export_variant` (BEST: the trained variant
        with the highest validation NDCG@10)."""
        for name in variants if export_variant == BEST else [*variants, export_variant]:
            _check_variant(name)
        if export_variant != BEST and export_variant not in variants:
            variants = [*variants, export_variant]
        self.sids()
        for name in variants:
            self.train(name, epochs=epochs, patience=patience, id_dropout=id_dropout, procs=procs)
        results = self.evaluate(keep_history)
        if export_variant == BEST:
            export_variant = best_variant(results, variants)
        bundle = self.export(export_variant)
        console.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()))
        return bundle


def best_variant(results: dict[str, dict[str, Any]], variants: list[str]) -> str:
    """The variant of `variants` with the highest validation NDCG@10 (model selection on
    validation only: the test figures are not looked at); prints the choice."""
    scores = {name: results[name]["valid"]["overall"]["ndcg@10"] for name in variants}
    best = max(scores, key=scores.__getitem__)
    ranked = ", ".join(f"{n} {s:.4f}" for n, s in sorted(scores.items(), key=lambda x: -x[1]))
    console.print(f"export: {best}, the best validation NDCG@10 ({ranked})")
    return best


METRIC_COLUMNS = (
    "hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr",
)  # fmt: skip


def _figure(report: dict[str, Any], key: str) -> str:
    # Reports written before a metric existed (e.g. @5 in an old metrics.json) show a dash.
    return f"{report[key]:.4f}" if key in report else "-"


def _record_data(interactions: Interactions, run: Path) -> None:
    """Writes run/data.json; warns when the run's earlier steps read the data another way
    (their splits, hence their results, could differ from this one's)."""
    path = run / "data.json"
    old = path.read_text() if path.is_file() else None
    before = json.loads(old).get("tie_order", "file") if old is not None else None
    if before not in (None, interactions.tie_order):
        console.print(
            f"[yellow]warning: earlier steps in {run} read the data with tie order {before!r}, "
            f"this one with {interactions.tie_order!r}: their splits may differ"
        )
    record = {
        "name": interactions.name,
        "time_source": interactions.time_source,
        "tie_order": interactions.tie_order,
    }
    text = json.dumps(record, indent=2) + "\n"
    if old != text:
        # replaced, not rewritten in place: another command opening this run at the same
        # moment (an ablation beside a training run) must never read a half-written file
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(text)
        scratch.replace(path)


# A figure column: its header variants (the first preferred, the next narrower) and cells.
_Column = tuple[tuple[str, ...], list[str]]


def _results_groups(results: dict[str, dict[str, Any]]) -> list[list[list[_Column]]]:
    """The results table's figure columns in groups (overall; popularity bins + cold-start)
    of blocks (@5/@10; @50/@200 + MRR; bins; cold-start, whose header may wrap), the units
    the table is split into when it is too wide."""
    tests = [stages["test"] for stages in results.values()]
    overall = [((c.upper(),), [_figure(t["overall"], c) for t in tests]) for c in METRIC_COLUMNS]
    bins = [
        ((f"{b} HR@10",), [f"{t['by_popularity'][b]['hr@10']:.4f}" for t in tests])
        for b in ("hot", "mild", "cold")
    ]
    random_rate = tests[0]["cold_start"].get("random_hr@10")
    random_text = f"random {random_rate:.4f}" if random_rate is not None else "random ?"
    cold_start = (
        (f"cold-start HR@10 ({random_text})", f"cold-start HR@10\n({random_text})"),
        [f"{t['cold_start']['hr@10']:.4f}" for t in tests],
    )
    return [[overall[:4], overall[4:]], [bins, [cold_start]]]


def _variants(block: list[_Column]) -> list[list[tuple[str, list[str]]]]:
    """The block with each column's first header variant, then with the next, ..."""
    depth = max(len(headers) for headers, _ in block)
    return [
        [(headers[min(i, len(headers) - 1)], cells) for headers, cells in block]
        for i in range(depth)
    ]


def _results_table(
    names: list[str], columns: list[tuple[str, list[str]]], title: str | None = None
) -> Table:
    # no_wrap everywhere: the tables are cut to fit the console, so no cell is squeezed
    # (rich would elide the figures to "0.1…" and the names to "mos…").
    table = Table(title=title, title_justify="default")  # flush left, no padding
    table.add_column("model", no_wrap=True)
    for header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for row, name in enumerate(names):
        table.add_row(name, *(cells[row] for _, cells in columns))
    return table


def results_tables(results: dict[str, dict[str, Any]], title: str, console: Console) -> list[Table]:
    """The results as one table titled `title` where it fits `console`'s width (a log
    file's 200 columns), else as several, untitled (print the title above them), each with
    the model column: overall figures, then popularity bins + cold-start, each cut into
    whole blocks of columns where too wide (at 80 columns: @5/@10; @50/@200 + MRR; bins +
    cold-start under a wrapped header). Every figure and model name is shown in full at
    any width >= 80 (rich never has to squeeze a column)."""
    names = list(results)
    groups = _results_groups(results)
    unbounded = console.options.update_width(100_000)  # else the measure is cut to fit

    def fits(columns: list[tuple[str, list[str]]]) -> bool:
        table = _results_table(names, columns)
        return Measurement.get(console, unbounded, table).maximum <= console.width

    everything = [c for group in groups for block in group for c in _variants(block)[0]]
    if fits(everything):
        return [_results_table(names, everything, title)]
    tables: list[list[tuple[str, list[str]]]] = []
    for group in groups:
        # A block too wide for a table of its own goes column by column.
        pieces = []
        for block in group:
            if any(fits(variant) for variant in _variants(block)):
                pieces.append(block)
            else:
                pieces.extend([column] for column in block)
        current: list[tuple[str, list[str]]] = []
        for piece in pieces:
            variants = _variants(piece)
            choice = next((v for v in variants if fits(current + v)), None)
            if choice is None and current:
                tables.append(current)
                current = []
                choice = next((v for v in variants if fits(v)), None)
            current += choice if choice is not None else variants[-1]
        tables.append(current)
    return [_results_table(names, columns) for columns in tables]


def print_results(
    results: dict[str, dict[str, Any]], dataset: str, out: Console | None = None
) -> None:
    """Prints the test results: one table in a log file, split to fit a narrower terminal
    (or `out`, a console to print to instead of stdout's)."""
    first = next(iter(results.values()))["test"]
    excluded = first.get("history_excluded", True)
    rule = "history excluded" if excluded else "history kept as candidates"
    title = f"{dataset}: test metrics (leave-one-out, full ranking, {rule})"
    # Off a terminal (CI logs, pipes) rich assumes 80 columns: one table 200 columns wide.
    table_console = out or (console if console.is_terminal else Console(width=200))
    tables = results_tables(results, title, table_console)
    if len(tables) > 1:
        table_console.print(title, style="table.title", highlight=False)
    for table in tables:
        table_console.print(table)
    notes = out or console
    random_rate = first["cold_start"].get("random_hr@10")
    notes.print(
        "candidates: every catalog item except the user's history (history excluded)"
        if excluded
        else "candidates: every catalog item, the user's history included (--keep-history)"
    )
    if random_rate is not None:
        notes.print(
            f"a uniformly random ranking would get cold-start HR@10 {random_rate:.4f} on these "
            "targets"
        )
    notes.print(
        f"test users: {first['overall']['count']}, of which cold-start targets: "
        f"{first['cold_start']['count']}; bins by target popularity: "
        + ", ".join(f"{b} {first['by_popularity'][b]['count']}" for b in ("hot", "mild", "cold"))
    )
