"""Every knob of the online service, read once from the environment (prefix SIDREC_).

Example: SIDREC_BUNDLE=bundles/ml-100k SIDREC_REDIS_URL=redis://localhost:6379/0 sidrec serve
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIDREC_", extra="ignore")

    bundle: Path = Field(Path("bundle"), description="bundle folder written by `sidrec export`")
    # Unset = histories and ingested items live in this process only and die with it. Fine for
    # a demo; start-up says so loudly. Several workers or replicas need Redis.
    redis_url: str | None = None
    # A histories file (JSON lines, sidrec/histories_file.py; `sidrec histories load --out`
    # writes one from a data set) that fills the in-process store at start, newest history_len
    # per user: how `make demo` serves the users it trained on (`sidrec serve --histories DIR`
    # writes the file from the data folder itself). Redis is filled once with
    # `sidrec histories load` instead.
    histories: Path | None = None
    # Every Redis key starts with this, so several deployments can share one Redis.
    key_prefix: str = "sidrec:"
    history_len: int = Field(200, ge=1, le=100_000, description="events kept per user")
    max_k: int = Field(1000, ge=1, le=100_000)
    max_batch: int = Field(1000, ge=1, description="events or items in one write request")
    api_key: str | None = Field(None, description="if set, write routes need X-API-Key")
    # Reads of one user's data (recommend, history) are personal data. If set, they need
    # X-API-Key with this key or the write key (a writer may read what it writes).
    read_api_key: str | None = Field(
        None, description="if set, per-user reads need X-API-Key (this key or the write key)"
    )
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # How long an event_id is remembered for idempotent retries.
    event_id_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    workers: int = Field(1, ge=1, le=256)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Retrieval index. "flat" = exact inner product, what the offline evaluator computes.
    # "hnsw" = approximate (FAISS HNSW graph, inner product): for catalogs too large to scan
    # per request; recall below 1 (loadtests/serving_bench.py measures it against flat).
    # "torch" = exact like flat, torch.topk over rows on the torch device (the GPU where
    # PyTorch sees one; needs the torch extra).
    index: Literal["flat", "hnsw", "torch"] = "flat"
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW links per node")
    hnsw_ef_construction: int = Field(100, ge=8, le=4096, description="HNSW build breadth")
    # The recall / latency knob of "hnsw": candidates kept while searching.
    hnsw_ef_search: int = Field(128, ge=1, le=65536, description="HNSW search breadth")
    # What runs the user encoder and SID -> vector. "onnx" = the bundle's ONNX graphs under
    # ONNX Runtime. "torch" = the bundle's PyTorch weights (model.pt) under PyTorch, for a GPU
    # where onnxruntime-gpu cannot be installed (needs the torch extra; same vectors).
    engine: Literal["onnx", "torch"] = "onnx"
    # "auto" = CUDA when the engine can use a GPU (onnxruntime-gpu, or PyTorch's CUDA build
    # for the torch engine and index), else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # ONNX Runtime threads per session; 0 = ORT's default (all cores). With several workers
    # on one machine, set about cores / workers.
    ort_threads: int = Field(0, ge=0)
    # Threads that run batched /v1/recommend work (ORT user encoding + FAISS search; both
    # release the GIL, so each thread can hold a core). 0 = the cores this process may use,
    # divided by workers, at least 1. Pair with ort_threads=1 so threads do not oversubscribe.
    rank_threads: int = Field(0, ge=0, le=256)
    # OpenMP threads FAISS may use for one rank thread's batched search; 0 = FAISS's default
    # (every core). The rank threads already hold a core each, so more would oversubscribe.
    faiss_threads: int = Field(1, ge=0, le=256)
    # User vectors kept for requests whose encoder inputs repeat (same history, query time in
    # the same time buckets: service/user_cache.py), a few hundred bytes each; 0 = off.
    user_cache_size: int = Field(100_000, ge=0)
    # ORT threads of the content encoder (MiniLM, POST /v1/items); 0 = as ort_threads. One
    # item's text is ~6 GFLOP at 256 tokens: with ort_threads=1 (what suits /v1/recommend on
    # 2 cores), 2 here lets one ingest use both cores (docs/serving-benchmark.md, "Ingest").
    content_threads: int = Field(0, ge=0)
    # PyTorch intra-op threads for the torch engine on the CPU; 0 = PyTorch's default.
    torch_threads: int = Field(0, ge=0)
    redis_timeout_s: float = Field(2.0, gt=0)
    # SIDREC_REDIS_URL names one node of a Redis Cluster (the client finds the others).
    redis_cluster: bool = False
    # Redis connections per worker. A request that finds them all busy waits up to
    # redis_pool_timeout_s for one, then gets 503 `overloaded` (Retry-After): the worker is
    # saturated, Redis is not down. Each request holds a connection only for its Redis calls.
    redis_max_connections: int = Field(100, ge=2, le=10_000)
    redis_pool_timeout_s: float = Field(2.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def rank_thread_count(self) -> int:
        """rank_threads, or the cores this process may use shared among the workers."""
        if self.rank_threads:
            return self.rank_threads
        return max(1, len(os.sched_getaffinity(0)) // self.workers)

    @model_validator(mode="after")
    def _workers_need_redis(self) -> Settings:
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                "workers > 1 needs SIDREC_REDIS_URL: the in-process store is per process, "
                "so workers would see different histories and catalogs"
            )
        if self.histories is not None and self.redis_url:
            raise ValueError(
                "histories (SIDREC_HISTORIES) fills the in-process store only; with "
                "SIDREC_REDIS_URL load Redis once with `sidrec histories load --data DIR`"
            )
        return self
