"""p50/p99 of /v1/recommend and /v1/items over N sequential requests, one client, loopback.

    python -m loadtests.sequential_latency --bundle runs/ml-100k/bundle --requests 1000

Starts its own Redis (or --store memory) and one service worker on the bundle, gives 200 users
a 20-50 event history, then times N recommend calls (k=10, users in turn) and N single-item
ingestions (a real item's text under a new id). Prints the figures with the command used;
sequential requests measure latency, not throughput (loadtests/run_loadtest.py does that).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import httpx
import numpy as np

from loadtests.run_loadtest import redis_server, service


def timed(n: int, call: Callable[[int], httpx.Response]) -> np.ndarray:
    """Milliseconds of n sequential calls; any non-200 answer aborts the run."""
    out = np.empty(n)
    for i in range(n):
        started = time.perf_counter()
        response = call(i)
        out[i] = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise SystemExit(f"request {i} answered {response.status_code}: {response.text}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--store", choices=("redis", "memory"), default="redis")
    parser.add_argument("--ort-threads", type=int, default=0)
    args = parser.parse_args(argv)
    # What loadtests.run_loadtest.service reads.
    args.workers, args.api_key, args.ready_timeout = 1, None, 120.0

    records = [json.loads(line) for line in (args.bundle / "items.jsonl").open()]
    ids = [r["item_id"] for r in records]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        redis = redis_server(out / "redis") if args.store == "redis" else nullcontext(None)
        with redis as redis_url, service(args, redis_url, out) as url:
            client = httpx.Client(base_url=url, timeout=30)
            for u in range(200):
                events = [
                    {"user_id": f"seq-{u}", "item_id": rng.choice(ids), "ts": 880_000_000 + 60 * j}
                    for j in range(rng.randint(20, 50))
                ]
                client.post("/v1/events", json=events).raise_for_status()
            for _ in range(20):  # warm-up: first ORT runs allocate
                client.post("/v1/recommend", json={"user_id": "seq-0", "k": 10})
            recommend = timed(
                args.requests,
                lambda i: client.post("/v1/recommend", json={"user_id": f"seq-{i % 200}", "k": 10}),
            )
            ingest = timed(
                args.requests,
                lambda i: client.post(
                    "/v1/items",
                    json={
                        "item_id": f"seq-new-{i}",
                        "title": records[i % len(records)]["title"] + " II",
                        "text": records[i % len(records)]["text"],
                    },
                ),
            )
    print("command: python -m loadtests.sequential_latency " + " ".join(sys.argv[1:]))
    print(f"store: {args.store}, 1 worker, {args.requests} sequential requests per route")
    for name, ms in (("POST /v1/recommend (k=10)", recommend), ("POST /v1/items (1 item)", ingest)):
        p50, p99 = np.percentile(ms, [50, 99])
        print(f"{name:28s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  mean {ms.mean():6.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
