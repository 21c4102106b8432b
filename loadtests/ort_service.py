"""The straightforward ONNX Runtime + FAISS peer of sidrec for the serving benchmark.

    python -m loadtests.ort_service --bundle runs/ml-1m-bench/bundle --redis-url URL --port P

The service a competent engineer writes in a day from the bundle's documentation
(docs/bundle.md), without sidrec's serving code: FastAPI + uvicorn, the bundle's
`user_encoder.onnx` under ONNX Runtime, its `item_vectors.npy` in a FAISS IndexFlatIP built
the way the manifest says the model scores (`model.scoring`: "cosine" L2-normalises the rows,
"dot" keeps them raw; items training never saw score times `model.new_item_score_scale`
minus `model.new_item_score_offset`), and the user's history read from Redis as a list.
Written the plain way: a sync `def` route (FastAPI runs it in its thread pool), one Redis
LRANGE, one ORT run and one FAISS search per request, no batching, no pipelining, no caching
beyond what loads at start.

It reads the histories sidrec's history store writes (service/history_store.py: list
`{prefix}hist:{{user}}`, newest first, entries "ts item_id"), answers
`POST /v1/recommend {user_id, k, query_time?}` with sidrec's fields (`items: [{item_id,
score}]`, `history_len`, `model_version`; a user without history gets the manifest's popular
items, as sidrec does), leaves the user's history items out of the results, and serves
`GET /readyz`. It imports neither sidrec nor PyTorch: numpy, onnxruntime, faiss, redis,
FastAPI.

ONNX Runtime gets `--ort-threads` intra-op threads and, like sidrec, no spinning pool threads:
the benchmark passes sidrec's own thread setting, so the comparison measures how the two
serve, not a thread knob.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import redis
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field


class RecommendIn(BaseModel):
    user_id: str
    k: int = Field(10, ge=1, le=1000)
    query_time: int | None = None  # unix s; default now (as sidrec)


class OrtRecommender:
    """The bundle's user encoder under ONNX Runtime and its item table in a flat FAISS index."""

    def __init__(self, bundle_dir: Path, ort_threads: int = 1) -> None:
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        self.version: str = manifest["version"]
        model = manifest["model"]
        self.max_len = int(model["max_len"])
        self.vectors = np.load(bundle_dir / "item_vectors.npy").astype(np.float32)  # [n + 1, d]
        records = [
            json.loads(line)
            for line in (bundle_dir / "items.jsonl").read_text().splitlines()
            if line.strip()
        ]
        self.item_ids: list[str] = ["", *(str(r["item_id"]) for r in records)]  # by row
        self.row_of = {item_id: row for row, item_id in enumerate(self.item_ids) if row}
        self.popularity = {str(r["item_id"]): float(r.get("popularity", 0)) for r in records}
        self.popular: list[str] = [str(i) for i in manifest.get("popular", [])]

        # What the index ranks by inner product with the (unit) user vector.
        if model.get("scoring", "cosine") == "cosine":
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            indexed = self.vectors / np.maximum(norms, 1e-12)
        else:
            indexed = self.vectors.copy()
        scales = np.ones(len(self.vectors), np.float32)  # [n + 1]
        offsets = np.zeros(len(self.vectors), np.float32)  # [n + 1]
        new_scale = float(model.get("new_item_score_scale", 1.0))
        new_offset = float(model.get("new_item_score_offset", 0.0))
        for r in records:
            if r.get("popularity", 0) == 0:  # never in training: the vector is a content guess
                scales[int(r["row"])] = new_scale
                offsets[int(r["row"])] = new_offset
        # score = row . user * scale - offset: the offset as an extra column, the query's is 1
        self.index = faiss.IndexFlatIP(self.vectors.shape[1] + 1)
        rows = np.hstack([indexed * scales[:, None], -offsets[:, None]])
        self.index.add(np.ascontiguousarray(rows, dtype=np.float32))

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if ort_threads:
            options.intra_op_num_threads = ort_threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(bundle_dir / "user_encoder.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.recommend([(self.item_ids[1], 0)], 1, 0)  # the first ORT run is slow: not a user's

    def recommend(
        self, history: list[tuple[str, int]], k: int, query_time: int
    ) -> list[tuple[str, float]]:
        """history (item_id, ts) oldest first -> top-k (item_id, score), history excluded."""
        known = [(self.row_of[i], ts) for i, ts in history if i in self.row_of]
        if not known:
            return []
        rows = np.array([r for r, _ in known[-self.max_len :]], np.int64)  # [N]
        stamps = np.array([ts for _, ts in known[-self.max_len :]], np.int64)  # [N]
        (user,) = self.session.run(
            ["user_vectors"],
            {
                "item_vectors": self.vectors[rows][None],  # [1, N, d]
                "timestamps": stamps[None],  # [1, N]
                "mask": np.ones((1, len(rows)), np.bool_),  # [1, N]
                "query_time": np.array([query_time], np.int64),  # [1]
            },
        )  # [1, d]
        seen = {r for r, _ in known}  # the whole history, also past max_len
        fetch = min(self.index.ntotal, k + len(seen) + 1)  # + row 0 (padding)
        query = np.hstack([user, np.ones((1, 1), np.float32)])  # [1, d + 1]
        scores, found = self.index.search(query, fetch)  # [1, fetch] each
        hits = []
        for row, score in zip(found[0].tolist(), scores[0].tolist(), strict=True):
            if row <= 0 or row in seen:
                continue
            hits.append((self.item_ids[row], score))
            if len(hits) == k:
                break
        return hits


def read_history(client: redis.Redis, key: str, history_len: int) -> list[tuple[str, int]]:
    """sidrec's history list (newest first, "ts item_id") -> (item_id, ts) oldest first."""
    entries = []
    for raw in client.lrange(key, 0, history_len - 1):
        ts, item_id = raw.decode().split(" ", 1)
        entries.append((item_id, int(ts)))
    entries.reverse()
    entries.sort(key=lambda e: e[1])  # stable: same-second events keep their arrival order
    return entries


def create_app(
    bundle_dir: Path, redis_url: str, key_prefix: str, history_len: int, ort_threads: int
) -> FastAPI:
    recommender = OrtRecommender(bundle_dir, ort_threads)
    client = redis.Redis.from_url(redis_url)  # thread-safe: a connection pool
    app = FastAPI(title="ORT + FAISS recommender (benchmark peer)")

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        client.ping()
        return {"status": "ready", "model_version": recommender.version}

    @app.post("/v1/recommend")
    def recommend(body: RecommendIn) -> dict[str, Any]:
        history = read_history(client, f"{key_prefix}hist:{{{body.user_id}}}", history_len)
        query_time = body.query_time if body.query_time is not None else int(time.time())
        hits = recommender.recommend(history, body.k, query_time)
        if not hits and not history:
            popular = recommender.popular[: body.k]
            hits = [(i, recommender.popularity.get(i, 0.0)) for i in popular]
        if not hits:
            raise HTTPException(404, f"nothing to recommend to {body.user_id!r}")
        return {
            "user_id": body.user_id,
            "items": [{"item_id": i, "score": s} for i, s in hits],
            "history_len": len(history),
            "model_version": recommender.version,
        }

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--key-prefix", default="sidrec:")
    p.add_argument("--history-len", type=int, default=200)
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--ort-threads", type=int, default=1, help="0 = ONNX Runtime's default")
    args = p.parse_args(argv)
    app = create_app(
        args.bundle, args.redis_url, args.key_prefix, args.history_len, args.ort_threads
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
