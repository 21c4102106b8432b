"""`python -m loadtests.run_loadtest` end to end: real service, real Redis, real Locust.

One full run (it starts Redis and the service itself) must pass and leave its reports; a run
with an impossible p99 threshold must fail; a run during which Redis goes away (requests
answered 503) must fail on the failed requests.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUTES = {"/v1/recommend", "/v1/events", "/v1/items", "/v1/users/[user_id]/history"}
# The small shares (about 1-2% each; a retirement needs 10 ingested items first): a short run
# may make none of them, but what it makes must not fail.
RARE_ROUTES = {
    "/v1/recommend (filtered)",
    "/v1/items/[item_id]/similar",
    "/v1/items/[item_id]",
    "/v1/users/[user_id]",
}

pytestmark = pytest.mark.slow


def loadtest_cmd(bundle: Path, out: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "loadtests.run_loadtest",
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        *args,
    ]


def run_loadtest(bundle: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        loadtest_cmd(bundle, out, *args), cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def stats_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "locust_stats.csv").open(newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_loadtest_run_passes_and_writes_reports(bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "loadtest"
    started = time.monotonic()
    result = run_loadtest(
        bundle_dir, out, "--store", "redis", "--users", "10", "--run-time", "10s",
        "--user-pool", "200", "--p99-ms", "5000",
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr + (out / "service.log").read_text()
    assert "p99 threshold: 5000 ms" in result.stdout and result.stdout.rstrip().endswith("PASS")
    assert took < 90

    for name in (
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust_failures.csv",
        "report.html",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "<html" in (out / "report.html").read_text().lower()

    rows = stats_rows(out)
    assert ROUTES | {"Aggregated"} <= set(rows) <= ROUTES | RARE_ROUTES | {"Aggregated"}
    counts = {name: int(row["Request Count"]) for name, row in rows.items()}
    assert all(int(row["Failure Count"]) == 0 for row in rows.values())
    assert all(counts[r] > 0 for r in ROUTES - {"/v1/users/[user_id]/history"}), counts
    # The mix: recommend ~76%, events ~14% (loose bounds: a 10 s run is a small sample).
    share = {r: counts[r] / counts["Aggregated"] for r in ROUTES}
    assert 0.65 < share["/v1/recommend"] < 0.92, share
    assert 0.07 < share["/v1/events"] < 0.25, share

    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is True and summary["problems"] == []
    assert {r["name"] for r in summary["routes"]} == set(rows)
    # Users had histories: recommendations ran the model, and the ingested items are real.
    assert "seeded" in (out / "locust.log").read_text()


def test_loadtest_fails_over_p99_threshold(
    start_service: Any, bundle_dir: Path, tmp_path: Path
) -> None:
    service = start_service()
    out = tmp_path / "loadtest"
    result = run_loadtest(
        bundle_dir, out, "--url", service.url, "--users", "5", "--run-time", "3s",
        "--user-pool", "50", "--p99-ms", "0.001",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "p99 threshold: 0.001 ms" in result.stdout
    assert "POST /v1/recommend: p99" in result.stdout and "> threshold 0.001 ms" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is False
    # Nothing failed: the threshold alone made it fail.
    assert all(int(r["Failure Count"]) == 0 for r in stats_rows(out).values())


def test_loadtest_fails_on_failed_requests(
    start_service: Any, redis_server: Any, bundle_dir: Path, tmp_path: Path
) -> None:
    service = start_service(redis_url=redis_server.url)
    out = tmp_path / "loadtest"
    cmd = loadtest_cmd(
        bundle_dir, out, "--url", service.url, "--users", "5", "--run-time", "6s",
        "--user-pool", "50", "--p99-ms", "60000",
    )  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Once the histories are seeded and traffic flows, Redis goes away: every request that
        # needs it is now a 503.
        log = out / "locust.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and "All users spawned" in log.read_text()):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "Locust did not start"
            time.sleep(0.1)
        time.sleep(1.0)
        redis_server.stop()
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stdout
    assert "requests failed" in stdout and "FAIL" in stdout
    rows = stats_rows(out)
    assert int(rows["Aggregated"]["Failure Count"]) > 0
    assert int(rows["Aggregated"]["Request Count"]) > int(rows["Aggregated"]["Failure Count"])
    with (out / "locust_failures.csv").open(newline="") as f:
        errors = " ".join(row["Error"] for row in csv.DictReader(f))
    assert "503" in errors, errors


def test_sequential_latency_reports_both_routes(bundle_dir: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.sequential_latency",
            "--bundle",
            str(bundle_dir),
            "--requests",
            "20",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("command: python -m loadtests.sequential_latency")
    for route in ("POST /v1/recommend", "POST /v1/items"):
        row = next(line for line in lines if line.startswith(route))
        p50, p99 = (float(row.split(key)[1].split("ms")[0]) for key in ("p50", "p99"))
        assert 0 < p50 <= p99
