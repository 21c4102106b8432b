"""Prometheus metrics (names, labels and buckets from docs/architecture: base units, histograms).

Several uvicorn workers: `serve()` points PROMETHEUS_MULTIPROC_DIR at an empty folder before
the workers start, prometheus-client then keeps every worker's values in files there, and
/metrics (answered by any one worker) merges them all. With one worker the ordinary
in-process registry is used. Labels never carry user or item ids: `route` is the route
template ("/v1/items/{item_id}"), not the path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

# The *_created series double the exposition and no dashboard reads them.
disable_created_metrics()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# 1 ms .. 2.5 s, the figures a millisecond API is judged on.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGES = ("history", "gather", "encode", "retrieve", "content_encode", "sid_assign", "persist")

HTTP_REQUESTS = Counter(
    "sidrec_http_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "sidrec_http_request_duration_seconds",
    "Time from request received to response sent",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "sidrec_stage_duration_seconds",
    "Time spent in one stage of a request",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
ITEMS_INGESTED = Counter(
    "sidrec_items_ingested_total",
    "Items written through POST /v1/items; collided = its code tuple was already taken",
    ["collided"],
)
STORE_OVERLOADED = Counter(
    "sidrec_store_overloaded_total",
    "Requests answered 503 overloaded: no Redis connection came free within "
    "SIDREC_REDIS_POOL_TIMEOUT_S (the worker is saturated; Redis answers)",
)
CATALOG_RESTORED = Counter(
    "sidrec_catalog_restored_items_total",
    "Ingested items this worker wrote back to Redis after finding that Redis had lost them "
    "(restarted empty, FLUSHALL)",
)
MODEL_RELOADS = Counter(
    "sidrec_model_reloads_total",
    "Hot model reloads tried by this worker (POST /v1/admin/reload, or following another "
    "worker's through Redis): reloaded, unchanged (already serving that bundle), refused (the "
    "bundle failed its sha256 check or could not be loaded; the old one keeps serving)",
    ["outcome"],
)
for _outcome in ("reloaded", "unchanged", "refused"):
    MODEL_RELOADS.labels(outcome=_outcome)  # exported at 0 before the first reload
USER_CACHE = Counter(
    "sidrec_user_vector_cache_total",
    "User vectors looked up in the exact cache (service/user_cache.py): hit = the user "
    "encoder did not run for that request",
    ["result"],
)
for _result in ("hit", "miss"):
    USER_CACHE.labels(result=_result)
# Gauges: every worker holds the same catalog and model, so the merged value is the max.
INDEX_ITEMS = Gauge(
    "sidrec_index_items", "Live items in the retrieval index", multiprocess_mode="max"
)
# Rows held, dead ones (retired or replaced items) included: compaction brings it back near
# sidrec_index_items.
INDEX_ROWS = Gauge(
    "sidrec_index_rows",
    "Rows in the retrieval index and item table, dead ones included",
    multiprocess_mode="max",
)
MODEL_INFO = Gauge(
    "sidrec_model_info",
    "1 for the bundle being served (its version and the ONNX Runtime provider label it); 0 "
    "for one a hot reload replaced",
    ["version", "provider"],
    multiprocess_mode="max",
)
CODEBOOK_USAGE = Gauge(
    "sidrec_sid_codebook_usage_ratio",
    "Share of a SID layer's codes used by at least one item",
    ["layer"],
    multiprocess_mode="max",
)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a block into sidrec_stage_duration_seconds{stage=name}."""
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_LATENCY.labels(stage=name).observe(time.perf_counter() - start)


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def render() -> tuple[bytes, str]:
    """The text exposition of every worker's metrics, and its content type."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live-gauge files (multiprocess mode only)."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)
