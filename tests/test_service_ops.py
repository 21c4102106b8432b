"""Operating the service: metrics after traffic (one and several workers), start-up refusing
a bad bundle with a message naming the file, the in-process store, settings mistakes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RedisServer, Service

from sidrec.bundle import load_bundle


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Parse `name{labels} value` lines of the Prometheus text format."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def traffic(service: Service, item_id: str, n: int) -> None:
    for i in range(n):
        assert (
            service.post("/v1/events", {"user_id": f"m{i}", "item_id": item_id}).status_code == 200
        )
        assert service.post("/v1/recommend", {"user_id": f"m{i}", "k": 5}).status_code == 200
    assert service.post("/v1/recommend", {"user_id": "m0", "k": 0}).status_code == 422
    assert service.get(f"/v1/items/{item_id}").status_code == 200
    assert (
        service.post("/v1/items", {"item_id": "metric-item", "title": "Star Voyage 77"}).status_code
        == 200
    )


ROUTES = {
    "/v1/recommend",
    "/v1/events",
    "/v1/items",
    "/v1/items/{item_id}",
    "/v1/users/{user_id}/history",
    "unmatched",
}


def check_metrics(text: str, n: int, version: str, item_id: str) -> None:
    requests = samples(text, "sidrec_http_requests_total")
    by_key = {(s["route"], s["method"], s["status"]): v for s, v in requests}
    assert by_key[("/v1/events", "POST", "200")] == n
    assert by_key[("/v1/recommend", "POST", "200")] == n
    assert by_key[("/v1/recommend", "POST", "422")] == 1
    assert by_key[("/v1/items/{item_id}", "GET", "200")] == 1  # the template, not the id
    # Only route templates, never ids; probes and scrapes are not counted.
    assert {s["route"] for s, _ in requests} <= ROUTES

    buckets = samples(text, "sidrec_http_request_duration_seconds_bucket")
    les = sorted({float(s["le"]) for s, _ in buckets if s["le"] != "+Inf"})
    assert les == [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    counts = {s["route"]: v for s, v in samples(text, "sidrec_http_request_duration_seconds_count")}
    assert counts["/v1/recommend"] == n + 1

    stages = {s["stage"]: v for s, v in samples(text, "sidrec_stage_duration_seconds_count")}
    for stage in (
        "history",
        "gather",
        "encode",
        "retrieve",
        "content_encode",
        "sid_assign",
        "persist",
    ):
        assert stages.get(stage, 0) >= 1, stage
    assert stages["history"] == n  # the 422 is refused before any history is read

    ingested = samples(text, "sidrec_items_ingested_total")
    assert sum(v for _, v in ingested) == 1 and {s["collided"] for s, _ in ingested} <= {
        "true",
        "false",
    }
    (index_items,) = samples(text, "sidrec_index_items")
    assert index_items[1] >= 1
    (info,) = samples(text, "sidrec_model_info")
    assert info == ({"version": version, "provider": "CPUExecutionProvider"}, 1.0)
    usage = {s["layer"]: v for s, v in samples(text, "sidrec_sid_codebook_usage_ratio")}
    assert usage and all(0 < v <= 1 for v in usage.values())


def test_metrics_after_traffic(
    start_service: Any, shared_redis: RedisServer, bundle_dir: Path
) -> None:
    service = start_service(redis_url=shared_redis.url, key_prefix="metrics-1:")
    bundle = load_bundle(bundle_dir)
    item_id = bundle.items()[0].item_id
    traffic(service, item_id, 5)
    r = service.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    check_metrics(r.text, 5, bundle.version, item_id)


def test_metrics_add_up_across_workers(
    start_service: Any, shared_redis: RedisServer, bundle_dir: Path
) -> None:
    """Two uvicorn workers: whichever answers /metrics reports both workers' counts."""
    service = start_service(redis_url=shared_redis.url, key_prefix="metrics-2:", workers=2)
    bundle = load_bundle(bundle_dir)
    item_id = bundle.items()[0].item_id
    # Concurrent requests on many connections, so both workers get some of them.
    pids: set[int] = set()

    def user(i: int) -> None:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            ok = client.post("/v1/events", json={"user_id": f"m{i}", "item_id": item_id})
            assert ok.status_code == 200
            ok = client.post("/v1/recommend", json={"user_id": f"m{i}", "k": 5})
            assert ok.status_code == 200
            pids.add(client.get("/readyz").json()["pid"])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(user, range(n := 24)))
    assert len(pids) == 2, "traffic never reached the second worker"
    assert service.post("/v1/recommend", {"user_id": "m0", "k": 0}).status_code == 422
    assert service.get(f"/v1/items/{item_id}").status_code == 200
    item = {"item_id": "metric-item", "title": "Star Voyage 77"}
    assert service.post("/v1/items", item).status_code == 200
    for _ in range(6):  # whichever worker answers, it reports both workers' counts
        text = httpx.get(service.url + "/metrics").text  # a new connection: any worker answers
        check_metrics(text, n, bundle.version, item_id)


def copy_bundle(bundle_dir: Path, dest: Path) -> Path:
    shutil.copytree(bundle_dir, dest)
    return dest


def run_service(bundle: Path, tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SIDREC_BUNDLE": str(bundle), "SIDREC_PORT": "0", "HF_HUB_OFFLINE": "1"}
    env.update({f"SIDREC_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run(
        [sys.executable, "-m", "sidrec.service"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_altered_file_stops_startup_naming_it(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(bundle_dir, tmp_path / "bundle")
    with (bundle / "items.jsonl").open("a") as f:
        f.write("\n")
    done = run_service(bundle, tmp_path)
    assert done.returncode == 2
    assert "items.jsonl" in done.stderr and "sha256" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_file_stops_startup_naming_it(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(bundle_dir, tmp_path / "bundle")
    graph = load_bundle(bundle).new_item_graph  # item_vector.onnx or sid_to_vector.onnx
    (bundle / graph).unlink()
    done = run_service(bundle, tmp_path)
    assert done.returncode == 2 and graph in done.stderr and "missing" in done.stderr
    nothing = run_service(tmp_path / "nope", tmp_path)
    assert nothing.returncode == 2 and "manifest.json" in nothing.stderr


def test_bad_settings_are_named(bundle_dir: Path, tmp_path: Path) -> None:
    done = run_service(bundle_dir, tmp_path, workers="2")  # several workers need Redis
    assert done.returncode == 2 and "SIDREC_REDIS_URL" in done.stderr
    done = run_service(bundle_dir, tmp_path, max_k="lots")
    assert done.returncode == 2 and "max_k" in done.stderr


def test_in_process_store_works_and_is_announced(start_service: Any, bundle_dir: Path) -> None:
    service = start_service()  # no SIDREC_REDIS_URL
    assert "SIDREC_REDIS_URL is not set" in service.log()
    ready = service.get("/readyz").json()
    assert ready["status"] == "ready" and ready["store"] == "memory"
    items = load_bundle(bundle_dir).items()
    event = {"user_id": "mem", "item_id": items[0].item_id, "event_id": "once"}
    assert service.post("/v1/events", [event, event]).json()["duplicates"] == 1
    body = service.post("/v1/recommend", {"user_id": "mem", "k": 5}).json()
    assert body["fallback"] is None and items[0].item_id not in [
        i["item_id"] for i in body["items"]
    ]
    vector = [0.0] * load_bundle(bundle_dir).manifest["content"]["dim"]
    vector[11] = 1.0
    sids = [
        service.post("/v1/items", {"item_id": f"m{n}", "content_vector": vector}).json()["items"][
            0
        ]["sid"]
        for n in range(3)
    ]
    assert len({tuple(s) for s in sids}) == 3
    assert service.get("/v1/items/m2").json()["source"] == "ingested"


def test_readyz_reports_provider_from_manifest_version(
    start_service: Any, bundle_dir: Path
) -> None:
    service = start_service()
    body = service.get("/readyz").json()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert body["model_version"] == manifest["version"]
    assert body["provider"] in {"CPUExecutionProvider", "CUDAExecutionProvider"}
    assert body["index"].startswith("faiss-")


def test_asking_for_cuda_without_it_is_a_clear_error(bundle_dir: Path, tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA: nothing to refuse")
    done = run_service(bundle_dir, tmp_path, device="cuda")
    assert done.returncode == 2 and "CUDAExecutionProvider" in done.stderr
    assert "Traceback" not in done.stderr


def test_service_imports_no_training_stack() -> None:
    code = (
        "import sys, sidrec.service.app, sidrec.service.server\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'pandas', "
        "'sentence_transformers') or m.startswith(('sidrec.offline', 'sidrec.model'))]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
