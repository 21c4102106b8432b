"""`sidrec bench quality` (prepare -> train every run of the plan -> report) and `sidrec bench
tune` (the tune plan: train -> report; id-only runs need no prepare stage).

Each stage skips what an earlier call already wrote into `out`, and appends its command line
and wall time to out/commands.jsonl, so the report can say exactly what produced it even
when the stages ran on different machines.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

from rich.console import Console

from sidrec.offline.bench.plan import Run, plan_of
from sidrec.offline.bench.runner import Budget, train_all
from sidrec.offline.data.dataset import DataError

STAGES = ("prepare", "train", "report")
# tune plan: close runs a time limit stopped, from their best-validation checkpoint
FINISH = "finish"
COMMANDS_FILE = "commands.jsonl"
console = Console()


def default_jobs(device: str) -> int:
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    # GPU (H100, ML-1M, base shape): 1 run alone 1.3 s/epoch, 6 side by side 3.4 s/epoch
    # each (2.3x the throughput), 14 side by side 11 s/epoch each (time slicing between
    # processes eats the gain). CPU: one single-threaded run per core beats one run with
    # several threads.
    return 6 if on_gpu else max(1, os.cpu_count() or 1)


def run_benchmark(
    data: Path,
    out: Path,
    stage: str = "all",
    device: str = "auto",
    jobs: int = 0,
    seeds: int = 3,
    epochs: int = 100,
    patience: int = 10,
    only: list[str] | None = None,
    report_dir: Path | None = None,
    notes: Path | None = None,
    start_for: float | None = None,
    plan: str = "quality",
) -> None:
    stages = STAGES if plan == "quality" else (*STAGES[1:2], FINISH, *STAGES[2:])
    if stage not in (*stages, "all"):
        raise DataError("--stage", f"unknown stage {stage!r}; use all, {', '.join(stages)}")
    if not Path(data).is_dir():
        raise DataError(data, "no such data folder")
    runs = plan_of(plan, seeds)
    if only:
        unknown = set(only) - {r.group for r in runs}
        if unknown:
            raise DataError("--only", f"no run group named {', '.join(sorted(unknown))}")
        runs = [r for r in runs if r.group in only]
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(epochs=epochs, patience=patience, seeds=seeds)
    # A time limit's SIGTERM stops the runs cleanly, like Ctrl-C (for this call only).
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _run_stages(data, out, stage, device, jobs, seeds, epochs, patience, only, runs,
                    budget, report_dir, notes, start_for, plan, stages)  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_stages(
    data: Path,
    out: Path,
    stage: str,
    device: str,
    jobs: int,
    seeds: int,
    epochs: int,
    patience: int,
    only: list[str] | None,
    runs: list[Run],
    budget: Budget,
    report_dir: Path | None,
    notes: Path | None,
    start_for: float | None,
    plan: str,
    stages: tuple[str, ...],
) -> None:
    for name in stages if stage == "all" else (stage,):
        # The command that reproduces this stage alone, whatever the caller typed.
        command = ["sidrec", "bench", plan, "--data", str(data), "--out", str(out)]
        command += ["--stage", name]
        if name == "train":
            command += ["--device", device, "--jobs", str(jobs or default_jobs(device))]
            command += ["--epochs", str(epochs), "--patience", str(patience)]
        command += ["--seeds", str(seeds)]
        if only and name == "train":
            command += ["--only", ",".join(only)]
        if start_for is not None and name == "train":
            command += ["--start-for", f"{start_for:g}"]
        if name == "report":
            command += ["--report-dir", str(report_dir)] if report_dir else []
            command += ["--notes", str(notes)] if notes else []
        started = time.perf_counter()
        try:
            _stage(name, data, out, runs, budget, device, jobs, report_dir, notes, start_for,
                   command, plan)  # fmt: skip
        except KeyboardInterrupt:
            _record(out, command, name, time.perf_counter() - started, "stopped before the end")
            raise
        _record(out, command, name, time.perf_counter() - started)


def _stage(
    name: str,
    data: Path,
    out: Path,
    runs: list[Run],
    budget: Budget,
    device: str,
    jobs: int,
    report_dir: Path | None,
    notes: Path | None,
    start_for: float | None,
    command: list[str],
    plan: str = "quality",
) -> None:
    if name == "prepare":
        from sidrec.offline.bench.prepare import prepare
        from sidrec.offline.pipeline import cache_dir

        prepare(data, out, cache_dir() / "content", log=console.print)
    elif name == "train":
        jobs = jobs or default_jobs(device)
        console.print(f"training {len(runs)} runs, {jobs} at a time, device {device}")
        failed = train_all(data, out, runs, budget, device, jobs, console.print, start_for)
        if failed:
            raise DataError(out, f"{len(failed)} runs failed: {', '.join(failed)}")
    elif name == FINISH:
        from sidrec.offline.bench.runner import finish_stopped

        for run in runs:
            info = finish_stopped(data, out, run)
            if info is not None:
                console.print(f"{run.name}: {info['stopped']}")
    elif plan == "tune":
        from sidrec.offline.bench.tune_report import write_tune_report

        path = write_tune_report(data, out, report_dir or out / "report", budget,
                                 notes, shlex.join(command))  # fmt: skip
        console.print(f"report written to [bold]{path}[/]")
    else:
        from sidrec.offline.bench.report import write_report

        report = report_dir or out / "report"
        path = write_report(data, out, report, budget, notes, shlex.join(command))
        console.print(f"report written to [bold]{path}[/]")


def _record(out: Path, command: list[str], stage: str, seconds: float, note: str = "") -> None:
    import torch

    line = {
        "stage": stage,
        "command": shlex.join(command),
        "seconds": round(seconds, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **({"note": note} if note else {}),
    }
    with (out / COMMANDS_FILE).open("a") as f:
        f.write(json.dumps(line) + "\n")
