"""loadtests/ingest_ab.py end to end on the test bundle: two real services, a real Redis, B
with another content_encoder.onnx (a copy of the bundle's, hashed into a new manifest) and
SIDREC_CONTENT_THREADS=2; every row and stage column filled, no errors. And
loadtests/content_encoder_bench.py on the fp32 and int8 test bundles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ingest_ab_prints_both_sides_with_their_stages(bundle_dir: Path, tmp_path: Path) -> None:
    encoder = tmp_path / "content_encoder.onnx"
    encoder.write_bytes((bundle_dir / "content_encoder.onnx").read_bytes())
    args = ["--bundle-a", str(bundle_dir), "--content-encoder-b", str(encoder)]
    args += ["--env-b", "SIDREC_CONTENT_THREADS=2", "--requests", "6", "--warmup", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.ingest_ab", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "$ python -m loadtests.ingest_ab " + " ".join(args)
    table = [line for line in lines if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[-3:] == ["content_encode ms", "sid_assign ms", "persist ms"]
    rows = [
        dict(zip(header, (c.strip() for c in t.strip("|").split("|")), strict=True))
        for t in table[2:]  # [1] is the --- row
    ]
    assert [r["side"] for r in rows] == ["A", "B"]
    for r in rows:
        assert r["n"] == "6" and r["errors"] == "0"
        p50, p99 = float(r["p50 ms"]), float(r["p99 ms"])
        assert 0 < p50 <= p99
        # each request went through each stage
        assert all(float(r[c]) > 0 for c in header[-3:])


def test_content_encoder_bench_times_each_bundles_encoder_at_its_precision(
    bundle_dir: Path, int8_bundle_dir: Path
) -> None:
    args = ["--bundle", str(bundle_dir), "--bundle", str(int8_bundle_dir)]
    args += ["--threads", "1,2", "--texts", "4", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.content_encoder_bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines()[3:]]
    cells = [[c.strip() for c in row] for row in rows]
    assert [(c[0], c[1], c[2]) for c in cells] == [
        (str(bundle_dir), "fp32", "1"),
        (str(bundle_dir), "fp32", "2"),
        (str(int8_bundle_dir), "int8", "1"),
        (str(int8_bundle_dir), "int8", "2"),
    ]
    for c in cells:
        p50, p99, cpu = float(c[3]), float(c[4]), float(c[5])
        assert 0 < p50 <= p99 and cpu > 0
