"""Interleaved A/B of `POST /v1/items` at concurrency 1: two services side by side, one run.

Two sidrec services (each `python -m sidrec.service`, one worker) run at once on one private
Redis, each under its own key prefix: A with `--bundle-a` and `--env-a`, B with `--bundle-b`
and `--env-b`. Requests alternate between them one at a time (A B B A A B ...: who goes first
flips every round), each a new item from a real item's text under a new id, so both sides see
the same texts in the same minutes and a busy neighbour on a shared machine slows both alike.

Per side it prints latency percentiles, the service's CPU per request (from /proc, the service
process only) and the mean of each ingest stage from the service's own
`sidrec_stage_duration_seconds{stage}` (content_encode, sid_assign, persist), so the table says
where the time goes, not only how much there is.

    python -m loadtests.ingest_ab --bundle-a runs/ml-1m-bench/bundle \\
        --content-encoder-a runs/old-export/content_encoder.onnx \\
        --env-b SIDREC_CONTENT_THREADS=2

`--content-encoder-a` / `-b` give that side a copy of its bundle with another
content_encoder.onnx (e.g. one written by an older `export_content_encoder`) and a manifest
hashed anew.

`--texts FILE` (JSON list of strings) sends those texts instead of the bundle's item texts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from loadtests.run_loadtest import free_port, redis_server
from loadtests.serving_bench import Served, subprocess_service
from sidrec.bundle import MANIFEST, load_bundle, write_manifest

STAGES = ("content_encode", "sid_assign", "persist")


def stage_sums(url: str) -> dict[str, tuple[float, float]]:
    """stage -> (seconds, count) from the service's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, list[float]] = {s: [0.0, 0.0] for s in STAGES}
    for line in text.splitlines():
        for stage in STAGES:
            label = f'stage="{stage}"'
            if label not in line:
                continue
            if line.startswith("sidrec_stage_duration_seconds_sum"):
                out[stage][0] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("sidrec_stage_duration_seconds_count"):
                out[stage][1] += float(line.rsplit(" ", 1)[1])
    return {s: (v[0], v[1]) for s, v in out.items()}


def with_content_encoder(bundle: Path, onnx_path: Path, out: Path) -> Path:
    """A copy of `bundle` in `out` whose content_encoder.onnx is `onnx_path`."""
    out.mkdir(parents=True)
    for f in bundle.iterdir():
        if f.is_file() and f.name not in (MANIFEST, "content_encoder.onnx"):
            (out / f.name).symlink_to(f.resolve())
    shutil.copyfile(onnx_path, out / "content_encoder.onnx")
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest.pop("files", None)
    write_manifest(out, manifest)
    return out


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not name.startswith("SIDREC_") or not value:
            raise SystemExit(f"{pair!r}: expected SIDREC_NAME=VALUE")
        env[name] = value
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle-a", type=Path, required=True)
    p.add_argument("--bundle-b", type=Path, help="default: --bundle-a")
    for side in ("a", "b"):
        p.add_argument(
            f"--content-encoder-{side}",
            type=Path,
            help=f"{side.upper()}'s bundle with this content_encoder.onnx",
        )
    p.add_argument("--env-a", nargs="*", default=[], help="SIDREC_NAME=VALUE for A")
    p.add_argument("--env-b", nargs="*", default=[], help="SIDREC_NAME=VALUE for B")
    p.add_argument("--ort-threads", type=int, default=1, help="SIDREC_ORT_THREADS of both")
    p.add_argument("--requests", type=int, default=300, help="requests per side")
    p.add_argument("--warmup", type=int, default=10, help="requests per side, not counted")
    p.add_argument("--texts", type=Path, help="JSON list of item texts to send")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw_argv = argv if argv is not None else sys.argv[1:]
    bundles = {"A": args.bundle_a, "B": args.bundle_b or args.bundle_a}
    envs = {"A": parse_env(args.env_a), "B": parse_env(args.env_b)}
    if args.texts:
        texts: list[tuple[str, str]] = [("", t) for t in json.loads(args.texts.read_text())]
    else:
        texts = [(f"{r.title} (bench)", r.text) for r in load_bundle(bundles["A"]).items()]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    latencies: dict[str, list[float]] = {"A": [], "B": []}
    errors: dict[str, list[str]] = {"A": [], "B": []}
    started = time.perf_counter()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-ab-")))
        for side, onnx_path in (("A", args.content_encoder_a), ("B", args.content_encoder_b)):
            if onnx_path:
                bundles[side] = with_content_encoder(bundles[side], onnx_path, tmp / side)
        redis_url = stack.enter_context(redis_server(tmp / "redis"))
        served: dict[str, Served] = {}
        for side in ("A", "B"):
            port = free_port()
            env = {
                "SIDREC_BUNDLE": str(bundles[side]),
                "SIDREC_REDIS_URL": redis_url,
                "SIDREC_KEY_PREFIX": f"ab{side}:",
                "SIDREC_ORT_THREADS": str(args.ort_threads),
                "SIDREC_DEVICE": "cpu",
                "SIDREC_LOG_LEVEL": "warning",
                "SIDREC_HOST": "127.0.0.1",
                "SIDREC_PORT": str(port),
                **envs[side],
            }
            served[side] = stack.enter_context(
                subprocess_service(
                    side,
                    [sys.executable, "-m", "sidrec.service"],
                    env,
                    port,
                    tmp,
                    args.ready_timeout,
                )
            )
        clients = {s: httpx.Client(base_url=served[s].url, timeout=60) for s in served}

        def post(side: str, i: int) -> tuple[float, str]:
            title, text = texts[order[i % len(texts)]]
            body: dict[str, Any] = {"item_id": f"ab-{i}", "text": text}
            if title:
                body["title"] = title
            t0 = time.perf_counter()
            r = clients[side].post(
                "/v1/items",
                content=orjson.dumps(body),
                headers={"content-type": "application/json"},
            )
            ms = (time.perf_counter() - t0) * 1000
            return ms, "" if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"

        for i in range(args.warmup):
            for side in ("A", "B"):
                post(side, i)
        before = {s: (stage_sums(served[s].url), served[s].cpu_s()) for s in served}
        for i in range(args.warmup, args.warmup + args.requests):
            for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                ms, error = post(side, i)
                if error:
                    errors[side].append(error)
                else:
                    latencies[side].append(ms)
        after = {s: (stage_sums(served[s].url), served[s].cpu_s()) for s in served}
        for c in clients.values():
            c.close()
    took = time.perf_counter() - started

    command = "python -m loadtests.ingest_ab " + shlex.join(raw_argv)
    print(f"$ {command}")
    print(f"{args.requests} requests per side, interleaved, concurrency 1; took {took:.0f} s")
    print()
    head = ["side", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "cpu ms/req", "errors"]
    head += [f"{s} ms" for s in STAGES]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for side in ("A", "B"):
        ms = np.array(latencies[side])
        p50, p90, p99 = np.percentile(ms, [50, 90, 99]) if len(ms) else (np.nan,) * 3
        answered = max(1, len(ms))
        cpu = (after[side][1] - before[side][1]) * 1000 / answered
        cells = [side, str(len(ms)), f"{p50:.2f}", f"{p90:.2f}", f"{p99:.2f}"]
        cells += [f"{ms.mean():.2f}" if len(ms) else "", f"{cpu:.2f}", str(len(errors[side]))]
        for stage in STAGES:
            s0, n0 = before[side][0][stage]
            s1, n1 = after[side][0][stage]
            cells.append(f"{(s1 - s0) * 1000 / (n1 - n0):.2f}" if n1 > n0 else "")
        print("| " + " | ".join(cells) + " |")
    for side in ("A", "B"):
        if errors[side]:
            print(f"{side}: first error {errors[side][0]}")
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
