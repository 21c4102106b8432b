"""Load-test sidrec with Locust on this machine and judge the result.

    python -m loadtests.run_loadtest --bundle runs/ml-100k/bundle            (or `make loadtest`)
    python -m loadtests.run_loadtest --bundle B --store redis --workers 2 --users 50 -t 60s
    python -m loadtests.run_loadtest --bundle B --url http://127.0.0.1:8000  (a running service)

Unless --url is given it starts what it needs on free loopback ports: a private redis-server
(--store redis) and the service (`python -m sidrec.service`) on the bundle. It then runs Locust
headless (loadtests/locustfile.py: recommend/events/ingest/history mix) for a bounded time and
writes to --out:
    locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv,
    report.html, locust.log, summary.json, service.log (when it started the service)
It prints a per-route table and exits 0 when no request failed and every route's p99 (and the
aggregate's) is within --p99-ms; 1 when a request failed or a p99 is over; 2 when the test could
not run (service not ready, Locust crashed).
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"
AGGREGATED = "Aggregated"


class SetupError(Exception):
    """The test could not run: nothing to judge."""


@dataclass
class RouteStats:
    method: str
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_loopback(url: str) -> None:
    """This tool only ever sends load to this machine."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SetupError(
        f"--url {url}: only loopback addresses (127.0.0.0/8, ::1, localhost) are allowed"
    )


def wait_ready(
    url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None, log: Path | None
) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise SetupError(
                f"service exited with code {proc.returncode} before it was ready:\n{tail}"
            )
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:  # 503 while loading, with the reasons
            last = f"{e.code} {e.read()[:300].decode(errors='replace')}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.25)
    raise SetupError(f"{url}/readyz not ready after {timeout_s:.0f} s: {last}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A throw-away redis-server on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SetupError(
            "--store redis needs the redis-server binary (apt-get install redis-server)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*args, "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


@contextmanager
def service(args: argparse.Namespace, redis_url: str | None, out: Path) -> Iterator[str]:
    """`python -m sidrec.service` on the bundle at a free loopback port; yields its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDREC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        HF_HUB_OFFLINE="1",
        SIDREC_BUNDLE=str(args.bundle),
        SIDREC_HOST="127.0.0.1",
        SIDREC_PORT=str(port),
        SIDREC_WORKERS=str(args.workers),
        SIDREC_ORT_THREADS=str(args.ort_threads),
        SIDREC_LOG_LEVEL="warning",
    )
    if redis_url:
        env["SIDREC_REDIS_URL"] = redis_url
    if args.api_key:
        env["SIDREC_API_KEY"] = args.api_key
    log_path = out / "service.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidrec.service"], env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, args.ready_timeout, proc, log_path)
        yield url
    finally:
        stop(proc)


def run_locust(args: argparse.Namespace, url: str, out: Path) -> int:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url]
    cmd += [
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
    ]
    cmd += ["--csv", str(out / CSV_PREFIX), "--html", str(out / "report.html"), "--only-summary"]
    cmd += ["--stop-timeout", "5", "--logfile", str(out / "locust.log"), "--loglevel", "INFO"]
    cmd += ["--bundle", str(args.bundle), "--user-pool", str(args.user_pool)]
    cmd += ["--think-ms", str(args.think_ms)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Locust's own summary goes to our stdout; the bounded run time also bounds this call.
    with (out / "locust.out").open("wb") as sink:
        proc = subprocess.run(
            cmd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=_seconds(args.run_time) + 120,
        )
    return proc.returncode


def _seconds(run_time: str) -> float:
    """Locust's run-time syntax ("90", "30s", "2m", "1h30m") in seconds."""
    total, number = 0.0, ""
    for ch in run_time.strip():
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number or 0) * {"s": 1, "m": 60, "h": 3600}[ch]
            number = ""
    return total + float(number or 0)


def _ms(value: str) -> float | None:
    return None if value in ("", "N/A") else float(value)


def read_stats(path: Path) -> list[RouteStats]:
    """Locust's *_stats.csv: one row per request name plus the Aggregated row."""
    if not path.exists():
        raise SetupError(f"Locust wrote no {path.name}; see locust.log and locust.out beside it")
    with path.open(newline="") as f:
        return [
            RouteStats(
                method=row["Type"],
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                rps=float(row["Requests/s"]),
                p50_ms=_ms(row["50%"]),
                p95_ms=_ms(row["95%"]),
                p99_ms=_ms(row["99%"]),
                max_ms=_ms(row["Max Response Time"]),
            )
            for row in csv.DictReader(f)
        ]


def judge(stats: list[RouteStats], p99_ms: float) -> list[str]:
    """Why the run failed (empty = passed): any failed request, any p99 over the threshold."""
    problems = []
    total = next((s for s in stats if s.name == AGGREGATED), None)
    if total is None or total.requests == 0:
        return ["no request was made"]
    for s in stats:
        label = "all requests" if s.name == AGGREGATED else f"{s.method} {s.name}"
        if s.name != AGGREGATED and s.failures:
            problems.append(f"{label}: {s.failures} of {s.requests} requests failed")
        if s.p99_ms is not None and s.p99_ms > p99_ms:
            problems.append(f"{label}: p99 {s.p99_ms:g} ms > threshold {p99_ms:g} ms")
    return problems


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def summary_table(stats: list[RouteStats]) -> str:
    columns = ("requests", "failed", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms")
    header = f"{'route':<36} " + " ".join(f"{c:>{max(len(c), 7)}}" for c in columns)
    lines = [header, "-" * len(header)]
    for s in stats:
        name = "all" if s.name == AGGREGATED else f"{s.method} {s.name}"
        lines.append(
            f"{name:<36} {s.requests:>8} {s.failures:>7} {s.rps:>7.1f} {_cell(s.p50_ms):>7} "
            f"{_cell(s.p95_ms):>7} {_cell(s.p99_ms):>7} {_cell(s.max_ms):>7}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.run_loadtest", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--bundle",
        type=Path,
        required=True,
        help="bundle folder (items for the traffic; served unless --url)",
    )
    p.add_argument(
        "--url", help="load an already running service on this machine instead of starting one"
    )
    p.add_argument(
        "--store",
        choices=("memory", "redis"),
        default="memory",
        help="histories in the service process, or in a private redis-server this script starts",
    )
    p.add_argument(
        "--redis-url", help="use this Redis instead of starting one (implies --store redis)"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="uvicorn workers (more than 1 needs Redis)"
    )
    p.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime threads per worker")
    p.add_argument(
        "--api-key",
        default="",
        help="X-API-Key: set on the service started here and sent by Locust",
    )
    p.add_argument("-u", "--users", type=int, default=20, help="concurrent Locust users")
    p.add_argument("-r", "--spawn-rate", type=float, default=20, help="users started per second")
    p.add_argument(
        "-t", "--run-time", default="30s", help="how long the load runs (Locust syntax: 30s, 2m)"
    )
    p.add_argument(
        "--think-ms", type=float, default=50.0, help="mean pause of each user between requests"
    )
    p.add_argument(
        "--user-pool", type=int, default=500, help="users given a history before the load starts"
    )
    p.add_argument(
        "--p99-ms", type=float, default=500.0, help="fail when any route's p99 (ms) is above this"
    )
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    p.add_argument("--out", type=Path, default=Path("runs/loadtest"), help="folder for the reports")
    args = p.parse_args(argv)
    if args.redis_url:
        args.store = "redis"
    if args.workers > 1 and args.store != "redis" and not args.url:
        p.error("--workers > 1 needs --store redis (the in-process store is per worker)")
    if _seconds(args.run_time) <= 0:
        p.error(f"--run-time {args.run_time!r}: must be a positive duration")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{CSV_PREFIX}_*.csv"):
        old.unlink()
    command = " ".join(
        ["python -m loadtests.run_loadtest", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"$ {command}", flush=True)
    try:
        with ExitStack() as stack:
            if args.url:
                require_loopback(args.url)
                url = args.url.rstrip("/")
                wait_ready(url, args.ready_timeout, None, None)
                where = f"service at {url}"
            else:
                redis_url = args.redis_url
                if args.store == "redis" and not redis_url:
                    redis_url = stack.enter_context(redis_server(out / "redis"))
                url = stack.enter_context(service(args, redis_url, out))
                where = (
                    f"service started here ({args.workers} worker(s), store {args.store}) at {url}"
                )
            print(
                f"load: {args.users} users, {args.run_time}, think {args.think_ms:g} ms -> {where}",
                flush=True,
            )
            started = time.perf_counter()
            locust_rc = run_locust(args, url, out)
            took = time.perf_counter() - started
        stats = read_stats(out / f"{CSV_PREFIX}_stats.csv")
    except SetupError as e:
        print(f"loadtest could not run: {e}", file=sys.stderr)
        return 2

    problems = judge(stats, args.p99_ms)
    failed_requests = sum(s.failures for s in stats if s.name != AGGREGATED)
    if locust_rc != 0 and not failed_requests:
        # Locust exits 1 on failed requests (judged above); anything else is a broken run.
        problems.append(f"locust exited with code {locust_rc} (see {out / 'locust.log'})")
    print(summary_table(stats))
    print(f"Locust ran {took:.0f} s; reports: {out}/{CSV_PREFIX}_stats.csv, {out}/report.html")
    print(f"p99 threshold: {args.p99_ms:g} ms, every route and all requests; failures allowed: 0")
    summary = {
        "command": command,
        "url": url,
        "users": args.users,
        "run_time": args.run_time,
        "p99_threshold_ms": args.p99_ms,
        "passed": not problems,
        "problems": problems,
        "routes": [asdict(s) for s in stats],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if problems:
        print("FAIL:\n  " + "\n  ".join(problems))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
