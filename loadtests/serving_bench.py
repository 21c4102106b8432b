"""Serving benchmark: component floor, end-to-end HTTP, two peers, ratios, catalog scale.

    python -m loadtests.serving_bench --bundle runs/ml-1m-bench/bundle

One run prints one table (markdown), the command at its top, then the issue's targets, met or
not. It starts its own redis-server on a free loopback port, gives --users users a
--history-len item history (distinct random bundle items, 10 minutes apart) and measures:

floor    the work one /v1/recommend must do, timed in this process on the objects the service
         builds (service.app.build_services, same settings): Redis history read, item rows +
         vector gather, ONNX user encode, FAISS search (k=10, the history excluded); p50/p99
         per stage and of their sum, --requests sequential requests.
sidrec   `python -m sidrec.service` (one worker, Redis) as a subprocess: closed-loop load at
         each --concurrency level (that many requests always in flight) on POST /v1/recommend
         and POST /v1/items (one new item from a real item's text), until --requests are done
         or --duration passes; then an open-loop run at --rate requests/s on /v1/recommend
         for --rate-duration s, latency counted from each request's scheduled send time (a
         slow answer delays nothing else, so queueing shows in the tail).
naive    loadtests/naive_service.py on the same bundle, Redis and histories: the training
         checkpoint's PyTorch model called eagerly per request + numpy brute-force scoring,
         same FastAPI + uvicorn stack; the same closed-loop /v1/recommend load.
ort      loadtests/ort_service.py on the same bundle, Redis and histories: the straightforward
         FastAPI + ONNX Runtime + FAISS service (sync route, one ORT run and one FAISS search
         per request, no batching), ORT on --ort-threads like sidrec; the same closed-loop
         /v1/recommend load, and a check that it returns sidrec's top-k ids for the first
         --agree-users users (same query_time, asked sequentially of each service).
ratio    sidrec e2e p50 at concurrency 1 / floor total p50; sidrec / peer throughput per
         level and of each one's best level; peer / sidrec service CPU per request (for each
         peer: naive, ORT).
scale    synthetic catalogs (--scales items, --vectors uniform and/or clustered unit
         vectors of the bundle's dimension) in service.retrieval.ItemTable: flat (exact) and
         SIDREC_INDEX=hnsw with --hnsw-m / --hnsw-ef-construction at each --ef-search;
         recall@10 against flat and per-query search time (k=10, or k=10 with 200 rows
         excluded as for a 200-item history); build time in the note.

The load generator is geventhttpclient (Locust's HTTP client) in this process: an asyncio
client (httpx) spends about 1 ms of CPU per request, which on a 2-core machine would measure
the client. It still shares the cores with the service: absolute figures are for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadtests.run_loadtest import free_port, redis_server, stop, wait_ready
from sidrec.bundle import Bundle, ItemRecord, load_bundle
from sidrec.service.history_store import Event, RedisHistoryStore
from sidrec.service.retrieval import IndexSpec, ItemTable
from sidrec.service.settings import Settings

KEY_PREFIX = "bench:"
K = 10
USER = "bench-user-{}"
COLUMNS = (
    "section",
    "measurement",
    "n",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "req/s",
    "cpu ms/req",
    "errors",
    "value",
    "note",
)


@dataclass
class Row:
    section: str
    measurement: str
    n: int | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    rps: float | None = None
    cpu_ms: float | None = None  # CPU the service process(es) spent per answered request
    errors: int | None = None
    value: float | None = None  # ratio rows: the ratio; scale rows: recall@10
    note: str = ""

    @classmethod
    def timed(cls, section: str, measurement: str, ms: np.ndarray, **kw: Any) -> Row:
        p50, p95, p99 = np.percentile(ms, [50, 95, 99]) if len(ms) else (np.nan,) * 3
        return cls(section, measurement, len(ms), float(p50), float(p95), float(p99), **kw)

    def cells(self) -> list[str]:
        def num(x: float | None, fmt: str) -> str:
            return "" if x is None else format(x, fmt)

        return [
            self.section,
            self.measurement,
            "" if self.n is None else str(self.n),
            num(self.p50, ".2f"),
            num(self.p95, ".2f"),
            num(self.p99, ".2f"),
            num(self.rps, ".1f"),
            num(self.cpu_ms, ".2f"),
            "" if self.errors is None else str(self.errors),
            num(self.value, ".3f"),
            self.note,
        ]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- set-up


def seed_histories(redis_url: str, records: list[ItemRecord], users: int, length: int) -> None:
    """`users` users with `length` distinct random items each, through sidrec's own store."""
    rng = np.random.default_rng(0)
    start = int(time.time()) - 600 * length

    async def write() -> None:
        from redis.asyncio import Redis

        redis = Redis.from_url(redis_url)
        store = RedisHistoryStore(redis, KEY_PREFIX, length, event_id_ttl_s=60)
        try:
            for u in range(users):
                picks = rng.choice(len(records), size=min(length, len(records)), replace=False)
                await store.append(
                    [
                        Event(USER.format(u), records[i].item_id, start + 600 * j)
                        for j, i in enumerate(picks)
                    ]
                )
        finally:
            await redis.aclose()

    asyncio.run(write())


def service_settings(args: argparse.Namespace, redis_url: str) -> dict[str, str]:
    """SIDREC_* for both the floor (in process) and the service subprocess: one source."""
    env = {
        "SIDREC_BUNDLE": str(args.bundle),
        "SIDREC_REDIS_URL": redis_url,
        "SIDREC_KEY_PREFIX": KEY_PREFIX,
        "SIDREC_HISTORY_LEN": str(args.history_len),
        "SIDREC_ORT_THREADS": str(args.ort_threads),
        "SIDREC_DEVICE": "cpu",
        "SIDREC_LOG_LEVEL": "warning",
    }
    for pair in args.service_env:
        name, _, value = pair.partition("=")
        if not name.startswith("SIDREC_") or not value:
            raise SystemExit(f"--service-env {pair!r}: expected SIDREC_NAME=VALUE")
        env[name] = value
    return env


@dataclass
class Served:
    url: str
    pid: int

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process and its children (uvicorn workers)."""
        total, todo = 0.0, [self.pid]
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue  # a process that ended meanwhile
        return total


@contextmanager
def subprocess_service(
    name: str, cmd: list[str], env_extra: dict[str, str], port: int, out: Path, timeout_s: float
) -> Iterator[Served]:
    """A service on a free loopback port until the block ends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDREC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(HF_HUB_OFFLINE="1", **env_extra)
    log_path = out / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s, proc, log_path)
        yield Served(url, proc.pid)
    finally:
        stop(proc)


# ---------------------------------------------------------------------------- floor


def measure_floor(settings: Settings, users: int, requests: int) -> list[Row]:
    """Each stage of /v1/recommend on the service's own objects, sequentially, in process."""
    from sidrec.service.app import build_services

    services = build_services(settings)
    table, runtime = services.catalog.table, services.runtime
    stages: dict[str, list[float]] = {s: [] for s in ("history", "gather", "encode", "search")}
    totals: list[float] = []

    async def run() -> None:
        warmup = min(20, requests)
        for i in range(warmup + requests):
            t0 = time.perf_counter()
            history = await services.history.history(USER.format(i % users))
            t1 = time.perf_counter()
            rows = np.array([table.row(item_id) for item_id, _ in history], np.int64)
            stamps = np.array([ts for _, ts in history], np.int64)
            rows, stamps = rows[-runtime.max_len :], stamps[-runtime.max_len :]
            vectors = table.gather(rows)[None]  # [1, N, d]
            t2 = time.perf_counter()
            user = runtime.encode_users(
                vectors,
                stamps[None],
                np.ones((1, len(rows)), np.bool_),
                np.array([int(time.time())], np.int64),
            )[0]
            t3 = time.perf_counter()
            hits = table.search(user, K, set(rows.tolist()))
            t4 = time.perf_counter()
            if len(hits) != K or len(history) == 0:
                raise SystemExit(f"floor: user {i % users} got {len(hits)} hits")
            if i >= warmup:
                for stage, (a, b) in zip(
                    stages, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)), strict=True
                ):
                    stages[stage].append((b - a) * 1000)
                totals.append((t4 - t0) * 1000)
        assert services.redis is not None
        await services.redis.aclose()

    asyncio.run(run())
    n_items = table.live_items
    names = {
        "history": "Redis history read (LRANGE + parse)",
        "gather": "item rows + vector gather",
        "encode": "ONNX user encode",
        "search": f"FAISS search ({table.index_spec.kind}, {n_items} items, k={K}, seen excluded)",
    }
    rows_out = [Row.timed("floor", names[s], np.array(ms)) for s, ms in stages.items()]
    rows_out.append(Row.timed("floor", "total (sum of the stages)", np.array(totals)))
    return rows_out


# ---------------------------------------------------------------------------- HTTP load


@dataclass
class LoadResult:
    latencies_ms: np.ndarray
    elapsed_s: float
    errors: int
    first_error: str

    @property
    def rps(self) -> float:
        return (len(self.latencies_ms) + self.errors) / self.elapsed_s

    def row(self, section: str, measurement: str, cpu_s: float) -> Row:
        answered = max(1, len(self.latencies_ms))
        return Row.timed(
            section,
            measurement,
            self.latencies_ms,
            rps=self.rps,
            cpu_ms=cpu_s * 1000 / answered,
            errors=self.errors,
            note=self.first_error,
        )


def _post(client: Any, path: str, body: bytes) -> tuple[bool, str]:
    try:
        response = client.post(path, body=body, headers={"content-type": "application/json"})
        text = response.read()
    except Exception as e:  # a refused or dropped connection is an error of the run, not a crash
        return False, f"{type(e).__name__}: {e}"
    if response.status_code != 200:
        return False, f"{response.status_code}: {text[:200]!r}"
    return True, ""


def closed_loop(
    url: str,
    path: str,
    body: Callable[[int], bytes],
    concurrency: int,
    max_requests: int,
    duration_s: float,
) -> LoadResult:
    """`concurrency` requests always in flight, until max_requests or duration_s."""
    import gevent.pool
    from geventhttpclient import HTTPClient

    client = HTTPClient.from_url(url, concurrency=concurrency, network_timeout=60)
    latencies: list[float] = []
    errors: list[str] = []
    counter = itertools.count()
    deadline = time.perf_counter() + duration_s

    def worker() -> None:
        while True:
            i = next(counter)
            if i >= max_requests or time.perf_counter() > deadline:
                return
            started = time.perf_counter()
            ok, error = _post(client, path, body(i))
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors.append(error)

    started = time.perf_counter()
    pool = gevent.pool.Pool(concurrency)
    for _ in range(concurrency):
        pool.spawn(worker)
    pool.join()
    elapsed = time.perf_counter() - started
    client.close()
    return LoadResult(np.array(latencies), elapsed, len(errors), errors[0] if errors else "")


def open_loop(
    url: str, path: str, body: Callable[[int], bytes], rate: float, duration_s: float
) -> LoadResult:
    """Requests sent at a fixed rate whatever the answers do; latency from the scheduled time."""
    import gevent
    from geventhttpclient import HTTPClient

    client = HTTPClient.from_url(url, concurrency=256, network_timeout=60)
    latencies: list[float] = []
    errors: list[str] = []
    count = max(1, int(rate * duration_s))

    def one(i: int, scheduled: float) -> None:
        ok, error = _post(client, path, body(i))
        if ok:
            latencies.append((time.perf_counter() - scheduled) * 1000)
        else:
            errors.append(error)

    # One sender spawns each request at its time. Spawning them all up front (as before) took
    # longer than the first requests' lead, so they started late and that lateness was
    # counted as the service's tail (p99 67-120 ms at 200 rps, with p95 5 ms).
    start = time.perf_counter() + 0.05
    sent = []
    for i in range(count):
        scheduled = start + i / rate
        gevent.sleep(max(0.0, scheduled - time.perf_counter()))
        sent.append(gevent.spawn(one, i, scheduled))
    gevent.joinall(sent)
    elapsed = time.perf_counter() - start
    client.close()
    return LoadResult(np.array(latencies), elapsed, len(errors), errors[0] if errors else "")


def top_ids(url: str, users: int, query_time: int) -> list[tuple[list[str], list[float]]]:
    """(item ids, scores) of /v1/recommend for the first `users` users, one request each."""
    import urllib.request

    out = []
    for u in range(users):
        body = orjson.dumps({"user_id": USER.format(u), "k": K, "query_time": query_time})
        request = urllib.request.Request(
            url + "/v1/recommend", body, {"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            items = orjson.loads(response.read())["items"]
        out.append(([i["item_id"] for i in items], [float(i["score"]) for i in items]))
    return out


def agreement_row(
    section: str,
    ours: list[tuple[list[str], list[float]]],
    theirs: list[tuple[list[str], list[float]]],
) -> Row:
    """The share of users whose top-k ids (in order) the peer returns as sidrec does."""
    pairs = list(zip(ours, theirs, strict=True))
    same = [(a, b) for a, b in pairs if a[0] == b[0]]
    # where the ids agree, how far apart the scores are (float32, two ORT sessions)
    diff = max((abs(x - y) for a, b in same for x, y in zip(a[1], b[1], strict=True)), default=0.0)
    return Row(
        section,
        f"top-{K} ids equal to sidrec's ({len(ours)} users, same query_time)",
        n=len(ours),
        value=len(same) / max(1, len(ours)),
        note=f"largest score difference {diff:.2g}",
    )


def recommend_body(users: int) -> Callable[[int], bytes]:
    bodies = [orjson.dumps({"user_id": USER.format(u), "k": K}) for u in range(users)]
    return lambda i: bodies[i % users]


def item_body(records: list[ItemRecord], tag: str) -> Callable[[int], bytes]:
    def body(i: int) -> bytes:
        r = records[i % len(records)]
        item = {"item_id": f"bench-{tag}-{i}", "title": f"{r.title} (bench)", "text": r.text}
        return orjson.dumps(item)

    return body


def load_rows(
    section: str,
    served: Served,
    path: str,
    body: Callable[[int], bytes],
    args: argparse.Namespace,
) -> list[Row]:
    out = []
    for c in args.concurrency:
        closed_loop(served.url, path, body, c, min(2 * c, 20), 5.0)  # warm connections, threads
        cpu_before = served.cpu_s()
        result = closed_loop(served.url, path, body, c, args.requests, args.duration)
        out.append(result.row(section, f"POST {path} concurrency {c}", served.cpu_s() - cpu_before))
    return out


# ---------------------------------------------------------------------------- catalog scale


def synthetic_vectors(n: int, d: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors: uniform on the sphere (no structure: the hardest case for an ANN
    index), or around 1000 random centres with noise as large as the centres (overlapping
    clusters, closer to what trained item embeddings look like)."""
    if kind == "clustered":
        centres = rng.normal(size=(1000, d))
        x = centres[rng.integers(0, 1000, n)] + rng.normal(size=(n, d))
    else:
        x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def scale_table(vectors: np.ndarray, spec: IndexSpec) -> tuple[ItemTable, float]:
    n, d = vectors.shape
    rows = np.concatenate([np.zeros((1, d), np.float32), vectors])  # row 0 = padding
    sids = np.zeros((n + 1, 2), np.int64)
    started = time.perf_counter()
    table = ItemTable(rows, [str(r) for r in range(1, n + 1)], sids, 1, use_gpu=False, index=spec)
    return table, time.perf_counter() - started


def timed_searches(
    table: ItemTable, queries: np.ndarray, exclude: list[set[int]]
) -> tuple[list[set[int]], np.ndarray]:
    found, ms = [], np.empty(len(queries))
    for i, q in enumerate(queries):
        started = time.perf_counter()
        hits = table.search(q, K, exclude[i])
        ms[i] = (time.perf_counter() - started) * 1000
        found.append({row for row, _ in hits})
    return found, ms


def catalog_scale(args: argparse.Namespace, d: int) -> list[Row]:
    out = []
    for n, kind in itertools.product(args.scales, args.vectors):
        rng = np.random.default_rng(n)
        # Queries drawn like the items (user vectors live in the item space), not among them.
        both = synthetic_vectors(n + args.scale_queries, d, kind, rng)
        vectors, queries = both[:n], both[n:]
        history = min(200, n // 2)
        no_exclusion: list[set[int]] = [set() for _ in queries]
        with_exclusion = [
            set((rng.choice(n, history, replace=False) + 1).tolist()) for _ in queries
        ]
        label = f"10^{np.log10(n):.0f}" if np.log10(n).is_integer() else f"{n:,}"
        flat, build_s = scale_table(vectors, IndexSpec("flat"))
        exact = {}
        for excluded, name in ((no_exclusion, ""), (with_exclusion, f", {history} excluded")):
            exact[name], ms = timed_searches(flat, queries, excluded)
            out.append(
                Row.timed(
                    "scale",
                    f"{label} {kind}, flat (exact), k={K}{name}",
                    ms,
                    value=1.0,
                    note=f"build {build_s:.1f} s",
                )
            )
        del flat
        spec = IndexSpec(
            "hnsw", args.hnsw_m, args.hnsw_ef_construction, max(args.ef_search, default=16)
        )
        hnsw, build_s = scale_table(vectors, spec)
        for ef in args.ef_search:
            hnsw.index_spec = dataclasses.replace(spec, hnsw_ef_search=ef)
            for excluded, name in ((no_exclusion, ""), (with_exclusion, f", {history} excluded")):
                found, ms = timed_searches(hnsw, queries, excluded)
                recall = np.mean([len(a & b) / K for a, b in zip(found, exact[name], strict=True)])
                out.append(
                    Row.timed(
                        "scale",
                        f"{label} {kind}, hnsw M={args.hnsw_m} efSearch={ef}, k={K}{name}",
                        ms,
                        value=float(recall),
                        note=f"build {build_s:.1f} s (efConstruction {args.hnsw_ef_construction})",
                    )
                )
        del hnsw
    return out


# ---------------------------------------------------------------------------- report


def targets(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """The issue's targets, each met or missed by how much."""

    def find(section: str, start: str) -> list[Row]:
        return [r for r in rows if r.section == section and r.measurement.startswith(start)]

    lines = []

    def judge(what: str, value: float | None, limit: float, lower_is_better: bool) -> None:
        if value is None or np.isnan(value):
            lines.append(f"- {what}: not measured")
            return
        met = value <= limit if lower_is_better else value >= limit
        sign = "<=" if lower_is_better else ">="
        how = "met" if met else f"MISSED by {abs(value - limit) / limit:.0%}"
        lines.append(f"- {what}: {value:.2f} (target {sign} {limit:g}): {how}")

    # issue 14's targets
    # The floor runs the encoder on every request: the uncached service is its like.
    ratio = find("ratio", "sidrec-uncached e2e p50")
    judge("e2e p50 / floor p50 (sidrec-uncached)", ratio[0].value if ratio else None, 1.3, True)
    for ours in ("sidrec", "sidrec-uncached"):
        peak = find("ratio", f"peak {ours} / peak naive")
        judge(f"{ours} / naive throughput (peaks)", peak[0].value if peak else None, 5.0, False)
    if "ort" not in {s.strip() for s in args.skip.split(",")}:
        for ours in ("sidrec", "sidrec-uncached"):
            peak = find("ratio", f"peak {ours} / peak ORT peer")
            judge(
                f"{ours} / ORT peer throughput (peaks)", peak[0].value if peak else None, 1.5, False
            )
            cpu = find("ratio", f"ORT peer / {ours} CPU")
            judge(f"ORT peer / {ours} CPU per request", cpu[0].value if cpu else None, 1.5, False)
        agree = find("ort", f"top-{K} ids equal")
        if agree:
            same = "met" if agree[0].value == 1.0 else "MISSED"
            lines.append(
                f"- ORT peer returns sidrec's top-{K} ids: {agree[0].value:.0%} of "
                f"{agree[0].n} users (target 100%): {same}"
            )
    for ours in ("sidrec", "sidrec-uncached"):
        rate = find(ours, "POST /v1/recommend open loop")
        if rate:
            judge(f"{ours} /v1/recommend p99 ms at {args.rate:g} rps", rate[0].p99, 10.0, True)
            lines.append(f"- {ours} errors at {args.rate:g} rps: {rate[0].errors} (target 0)")
    for kind in args.vectors:
        million = [
            r for r in find("scale", f"10^6 {kind}, hnsw") if "excluded" not in r.measurement
        ]
        good = [r for r in million if r.value is not None and r.value >= 0.95]
        if million:
            best = min(good, key=lambda r: r.p99 or np.inf) if good else max(million, key=_recall)
            judge(f"10^6 {kind} ANN p99 ms ({best.measurement})", best.p99, 5.0, True)
            recall_ok = "met" if good else "MISSED"
            lines.append(f"  its recall@10: {best.value:.3f} (target >= 0.95): {recall_ok}")
    return lines


def _recall(row: Row) -> float:
    return row.value or 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Settings.model_fields
    p = argparse.ArgumentParser(
        prog="python -m loadtests.serving_bench", description=__doc__.split("\n")[0]
    )

    def ints(text: str) -> list[int]:
        return [int(float(x)) for x in text.split(",") if x.strip()]

    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="the naive peer's PyTorch checkpoint (default: the matching one beside the bundle)",
    )
    p.add_argument("--users", type=int, default=1000, help="users given a history")
    p.add_argument("--history-len", type=int, default=200, help="items in each history")
    p.add_argument("--requests", type=int, default=5000, help="floor samples; cap per load level")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load level (cap)")
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32], help="load levels, e.g. 1,8,32")
    p.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s")
    p.add_argument("--rate-duration", type=float, default=20.0, help="open-loop seconds")
    p.add_argument("--ort-threads", type=int, default=1, help="SIDREC_ORT_THREADS (0 = all)")
    p.add_argument("--torch-threads", type=int, default=0, help="naive peer (0 = torch default)")
    p.add_argument("--scales", type=ints, default=[100_000, 1_000_000], help="'' = none")
    p.add_argument("--scale-queries", type=int, default=1000)
    p.add_argument(
        "--vectors",
        type=lambda text: [v for v in text.split(",") if v],
        default=["uniform", "clustered"],
        help="synthetic catalogs to measure: uniform, clustered or both (comma-separated)",
    )
    p.add_argument("--hnsw-m", type=int, default=defaults["hnsw_m"].default)
    p.add_argument(
        "--hnsw-ef-construction", type=int, default=defaults["hnsw_ef_construction"].default
    )
    p.add_argument(
        "--ef-search",
        type=ints,
        default=sorted({64, 128, defaults["hnsw_ef_search"].default, 256, 384, 512}),
        help="HNSW efSearch values to measure, e.g. 64,128,256",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="SIDREC_NAME=VALUE",
        help="another setting for the sidrec service and the floor, e.g. SIDREC_WORKERS=2",
    )
    p.add_argument(
        "--agree-users",
        type=int,
        default=20,
        help="users whose top-k the ORT peer must return as sidrec does",
    )
    p.add_argument(
        "--skip", default="", help="sections to leave out: floor,sidrec,uncached,naive,ort,scale"
    )
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--out", type=Path, help="also write table.md and results.json here")
    return p.parse_args(argv)


def recommend_rows(section: str, served: Served, users: int, args: argparse.Namespace) -> list[Row]:
    """/v1/recommend at each closed-loop concurrency, then at the open-loop rate."""
    rows = load_rows(section, served, "/v1/recommend", recommend_body(users), args)
    cpu_before = served.cpu_s()
    rate = open_loop(
        served.url, "/v1/recommend", recommend_body(users), args.rate, args.rate_duration
    )
    name = f"POST /v1/recommend open loop {args.rate:g} rps"
    return [*rows, rate.row(section, name, served.cpu_s() - cpu_before)]


def peer_command(module: str, port: int, redis_url: str, args: argparse.Namespace) -> list[str]:
    """A peer service's command line: same bundle, Redis, key prefix and history length."""
    return [
        sys.executable, "-m", module, "--bundle", str(args.bundle), "--redis-url", redis_url,
        "--key-prefix", KEY_PREFIX, "--port", str(port), "--history-len", str(args.history_len),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    raw_argv = argv if argv is not None else sys.argv[1:]
    command = "python -m loadtests.serving_bench " + shlex.join(raw_argv)
    bundle: Bundle = load_bundle(args.bundle)
    records = bundle.items()
    d, users = int(bundle.model["d"]), args.users
    rows: list[Row] = []
    started = time.perf_counter()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serving-bench-")))
        if skip >= {"floor", "sidrec", "uncached", "naive", "ort"}:
            redis_url = ""
        else:
            redis_url = stack.enter_context(redis_server(tmp / "redis"))
            seed_histories(redis_url, records, users, args.history_len)
        env = service_settings(args, redis_url)
        if "floor" not in skip:
            floor_env = {k[len("SIDREC_") :].lower(): v for k, v in env.items()}
            floor_env["workers"] = "1"  # the floor is one request at a time in this process
            rows += measure_floor(Settings(**floor_env), users, args.requests)
        agree_users = min(args.agree_users, users)
        query_time = int(time.time())
        sidrec_answers: list[tuple[list[str], list[float]]] | None = None
        if "sidrec" not in skip:
            port = free_port()
            with subprocess_service(
                "sidrec",
                [sys.executable, "-m", "sidrec.service"],
                {**env, "SIDREC_HOST": "127.0.0.1", "SIDREC_PORT": str(port)},
                port,
                tmp,
                args.ready_timeout,
            ) as served:
                sidrec_answers = top_ids(served.url, agree_users, query_time)
                rows += recommend_rows("sidrec", served, users, args)
                rows += load_rows("sidrec", served, "/v1/items", item_body(records, "item"), args)
        if "uncached" not in skip:
            # The same service without its user-vector cache: what a request costs when its
            # user's inputs are new (the load above repeats its users, so most of them hit).
            port = free_port()
            with subprocess_service(
                "sidrec-uncached",
                [sys.executable, "-m", "sidrec.service"],
                {
                    **env,
                    "SIDREC_HOST": "127.0.0.1",
                    "SIDREC_PORT": str(port),
                    "SIDREC_USER_CACHE_SIZE": "0",
                },
                port,
                tmp,
                args.ready_timeout,
            ) as served:
                rows += recommend_rows("sidrec-uncached", served, users, args)
        if "naive" not in skip:
            port = free_port()
            cmd = peer_command("loadtests.naive_service", port, redis_url, args)
            cmd += ["--torch-threads", str(args.torch_threads)]
            if args.checkpoint:
                cmd += ["--checkpoint", str(args.checkpoint)]
            with subprocess_service("naive", cmd, {}, port, tmp, args.ready_timeout) as served:
                rows += load_rows("naive", served, "/v1/recommend", recommend_body(users), args)
        if "ort" not in skip:
            port = free_port()
            cmd = peer_command("loadtests.ort_service", port, redis_url, args)
            cmd += ["--ort-threads", str(args.ort_threads)]
            with subprocess_service("ort", cmd, {}, port, tmp, args.ready_timeout) as served:
                if sidrec_answers is not None:
                    theirs = top_ids(served.url, agree_users, query_time)
                    rows.append(agreement_row("ort", sidrec_answers, theirs))
                rows += load_rows("ort", served, "/v1/recommend", recommend_body(users), args)
    rows += ratios(rows, args)
    if "scale" not in skip:
        rows += catalog_scale(args, d)
    took = time.perf_counter() - started

    header = [
        f"$ {command}",
        f"bundle {bundle.version}: {len(records):,} items, d={d}, max_len "
        f"{bundle.model['max_len']}; {users} users with {args.history_len}-item histories in "
        f"Redis; {os.cpu_count()} CPU cores; SIDREC_ORT_THREADS={args.ort_threads}, "
        f"{' '.join(args.service_env) + ', ' if args.service_env else ''}"
        f"naive torch threads {args.torch_threads or 'default'}, ORT peer threads "
        f"{args.ort_threads or 'default'}; k={K}; took {took:.0f} s",
    ]
    table = markdown(rows)
    verdict = targets(rows, args)
    print("\n".join(header))
    print()
    print(table)
    print()
    print("targets:")
    print("\n".join(verdict))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        text = "\n".join([*header, "", table, "", "targets:", *verdict]) + "\n"
        (args.out / "table.md").write_text(text)
        results = {"command": command, "rows": [dataclasses.asdict(r) for r in rows]}
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def ratios(rows: list[Row], args: argparse.Namespace) -> list[Row]:
    def one(section: str, measurement: str) -> Row | None:
        return next(
            (r for r in rows if r.section == section and r.measurement == measurement), None
        )

    out = []
    floor = one("floor", "total (sum of the stages)")
    for ours in ("sidrec", "sidrec-uncached"):
        single = one(ours, f"POST /v1/recommend concurrency {min(args.concurrency)}")
        if floor and single and floor.p50 and single.p50 is not None:
            out.append(
                Row(
                    "ratio",
                    f"{ours} e2e p50 (concurrency {min(args.concurrency)}) / floor total p50",
                    value=single.p50 / floor.p50,
                )
            )
    for ours in ("sidrec", "sidrec-uncached"):
        for peer, label in (("naive", "naive"), ("ort", "ORT peer")):
            out += peer_ratios(rows, args, peer, label, ours)
    return out


def peer_ratios(
    rows: list[Row], args: argparse.Namespace, peer: str, label: str, ours_section: str
) -> list[Row]:
    """ours / peer throughput per level and at each one's best; peer / ours CPU per
    request at each one's cheapest level."""

    def one(section: str, measurement: str) -> Row | None:
        return next(
            (r for r in rows if r.section == section and r.measurement == measurement), None
        )

    out, peaks = [], []
    for c in args.concurrency:
        ours = one(ours_section, f"POST /v1/recommend concurrency {c}")
        theirs = one(peer, f"POST /v1/recommend concurrency {c}")
        if ours and theirs and ours.rps and theirs.rps:
            out.append(
                Row(
                    "ratio",
                    f"{ours_section} / {label} throughput, concurrency {c}",
                    value=ours.rps / theirs.rps,
                )
            )
            peaks.append((ours.rps, theirs.rps))
    ours_cpu = [
        r
        for r in rows
        if r.section == ours_section and "/v1/recommend concurrency" in r.measurement
    ]
    theirs_cpu = [
        r for r in rows if r.section == peer and "/v1/recommend concurrency" in r.measurement
    ]
    if ours_cpu and theirs_cpu:
        # Less noisy than throughput on a shared machine: what each answer costs in CPU.
        ours_ms = min(r.cpu_ms or np.inf for r in ours_cpu)
        theirs_ms = min(r.cpu_ms or np.inf for r in theirs_cpu)
        out.append(
            Row(
                "ratio",
                f"{label} / {ours_section} CPU per request (best level each)",
                value=theirs_ms / ours_ms,
                note=f"{theirs_ms:.2f} vs {ours_ms:.2f} ms",
            )
        )
    if peaks:
        best_ours, best_theirs = max(p[0] for p in peaks), max(p[1] for p in peaks)
        out.append(
            Row(
                "ratio",
                f"peak {ours_section} / peak {label} throughput (best level each)",
                value=best_ours / best_theirs,
                note=f"{best_ours:.0f} vs {best_theirs:.0f} req/s",
            )
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
