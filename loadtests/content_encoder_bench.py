"""The content encoder alone (what `POST /v1/items` spends most of its time in), per bundle
and thread count, one configuration per process so one's ORT thread pool cannot slow another.

Each bundle's encoder runs as the service runs it (`service.runtime.session_options`, the
bundle's precision: int8 graphs one text per run on the CPU) over the same texts, drawn from
the first bundle's items, one text per call. Prints p50 / p99 wall time and the process's
CPU time per text, so a team can see on its own CPUs whether int8 pays (it needs VNNI).

    python -m loadtests.content_encoder_bench --bundle runs/fp32/bundle \\
        --bundle runs/int8/bundle --threads 1,2 --texts 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sidrec.bundle import load_bundle
from sidrec.content_encoder import ContentEncoder


def measure(bundle_path: Path, threads: int, texts: list[str], repeats: int, spin: bool) -> dict:
    from service.runtime import session_options

    bundle = load_bundle(bundle_path)
    options = session_options(threads)
    if spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    encoder = ContentEncoder.of_bundle(bundle, ["CPUExecutionProvider"], options)
    for text in texts[:3]:  # warm up
        encoder.encode([text])
    wall, cpu = [], []
    for _ in range(repeats):
        for text in texts:
            started, started_cpu = time.perf_counter(), time.process_time()
            encoder.encode([text])
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    return {
        "precision": "int8" if bundle.content_quantized else "fp32",
        "p50_ms": float(np.median(wall)) * 1e3,
        "p99_ms": float(np.percentile(wall, 99)) * 1e3,
        "cpu_ms": float(np.mean(cpu)) * 1e3,
    }


def pick_texts(bundle: Path, n: int) -> list[str]:
    items = load_bundle(bundle).items()
    picked = np.random.default_rng(0).choice(len(items), min(n, len(items)), replace=False)
    return [items[i].text for i in picked]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--threads", default="1,2", help="comma-separated ORT thread counts")
    p.add_argument("--texts", type=int, default=60, help="texts drawn from the first bundle")
    p.add_argument("--repeats", type=int, default=3, help="passes over the texts")
    p.add_argument("--spin", action="store_true", help="let ORT's pool threads spin")
    # internal: measure the last --bundle alone at --threads, texts from the first
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    texts = pick_texts(args.bundle[0], args.texts)
    if args.one:
        result = measure(args.bundle[-1], int(args.threads), texts, args.repeats, args.spin)
        print(json.dumps(result))
        return 0
    print(f"{len(texts)} texts x {args.repeats}, one text per call, spin={args.spin}")
    print("| bundle | precision | threads | p50 ms | p99 ms | CPU ms per text |")
    print("| --- | --- | --- | --- | --- | --- |")
    for bundle in args.bundle:
        for threads in args.threads.split(","):
            cmd = [sys.executable, "-m", "loadtests.content_encoder_bench", "--one"]
            cmd += ["--bundle", str(args.bundle[0]), "--bundle", str(bundle)]
            cmd += ["--threads", threads, "--texts", str(args.texts)]
            cmd += ["--repeats", str(args.repeats)] + (["--spin"] if args.spin else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {bundle} | {r['precision']} | {threads} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['cpu_ms']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
