"""The naive peer of sidrec for the serving benchmark: same data, same HTTP stack, no serving work.

    python -m loadtests.naive_service --bundle runs/ml-1m-bench/bundle --redis-url URL --port P

What a first version of a recommendation endpoint usually looks like: the training checkpoint's
PyTorch model called eagerly for every request, and every item scored by a numpy matrix
product followed by a partial sort. It answers `POST /v1/recommend {user_id, k}` with the
same fields as sidrec (`items: [{item_id, score}]`), reads the same Redis histories through
sidrec's own RedisHistoryStore, and runs under FastAPI + uvicorn (uvloop, httptools) like
sidrec; the blocking model call goes to the thread pool, as in sidrec. So the benchmark's
sidrec/naive ratio measures the model runtime and the retrieval, not the HTTP layer.

The checkpoint is --checkpoint, or the one beside the bundle (`sidrec pipeline` writes
RUN/bundle and RUN/<variant>/checkpoint.pt) whose item table equals the bundle's: the bundle
does not record which checkpoint it was exported from.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from starlette.concurrency import run_in_threadpool

from sidrec.bundle import Bundle, load_bundle
from sidrec.model.hstu import UserEncoder
from sidrec.offline.train import load_checkpoint
from sidrec.service.history_store import RedisHistoryStore


class CheckpointError(Exception):
    """No checkpoint that matches the bundle."""


def checkpoint_table(path: Path) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """(the model's HSTU, its item table float32 [n + 1, d], bool [n + 1] trained rows).
    Trained rows are as the bundle exports them; a content tower (offline/tower.py) replaces
    the others in the bundle, so only trained rows identify a checkpoint."""
    model, _, ckpt = load_checkpoint(path)
    trained = torch.as_tensor(ckpt["trained"], dtype=torch.bool)
    with torch.no_grad():
        table = model.items.table(trained).numpy().astype(np.float32)
    return model.encoder, table, trained.numpy()


def find_checkpoint(bundle: Bundle, given: Path | None) -> Path:
    """--checkpoint, else a checkpoint beside the bundle whose item table is the bundle's."""
    vectors = bundle.item_vectors()
    candidates = [given] if given else sorted(bundle.path.parent.glob("*/checkpoint.pt"))
    for path in candidates:
        if not path.is_file():
            continue
        _, table, trained = checkpoint_table(path)
        if table.shape == vectors.shape and np.allclose(
            table[trained], vectors[trained], atol=1e-5
        ):
            return path
        if given:
            raise CheckpointError(f"{path}: its item table differs from {bundle.path}'s")
    raise CheckpointError(
        f"no checkpoint beside {bundle.path} matches it (looked at "
        f"{', '.join(map(str, candidates)) or 'nothing'}); pass --checkpoint"
    )


class RecommendIn(BaseModel):
    user_id: str
    k: int = Field(10, ge=1, le=1000)


class NaiveRecommender:
    """Eager PyTorch user encoder + numpy brute force over every item."""

    def __init__(self, bundle: Bundle, checkpoint: Path) -> None:
        hstu, _, trained = checkpoint_table(checkpoint)
        self.encoder = UserEncoder(hstu).eval()
        table = bundle.item_vectors()  # the checkpoint's rows, and a tower's for the rest
        self.table = torch.from_numpy(table)  # [n + 1, d] raw: the encoder's inputs
        if bundle.model.get("scoring", "cosine") == "cosine":
            table = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
        scales = np.where(trained, 1.0, float(bundle.model.get("new_item_score_scale", 1.0)))
        # [n + 1, d]: what is scored (cosine, or the raw dot product, times the bundle's score
        # scale per row, minus its offset for untrained rows)
        self.scored = table * scales[:, None].astype(np.float32)
        self.offsets = np.where(
            trained, 0.0, float(bundle.model.get("new_item_score_offset", 0.0))
        ).astype(np.float32)
        items = bundle.items()
        self.item_ids = ["", *(r.item_id for r in items)]
        self.row_of = {r.item_id: r.row for r in items}
        self.max_len = int(bundle.model["max_len"])

    def recommend(self, history: list[tuple[str, int]], k: int) -> list[tuple[str, float]]:
        rows = [self.row_of[i] for i, _ in history if i in self.row_of][-self.max_len :]
        stamps = [ts for i, ts in history if i in self.row_of][-self.max_len :]
        with torch.inference_mode():
            user = self.encoder(
                self.table[torch.tensor(rows)][None],  # [1, N, d]
                torch.tensor([stamps]),  # [1, N]
                torch.ones(1, len(rows), dtype=torch.bool),  # [1, N]
                torch.tensor([int(time.time())]),  # [1]
            )[0].numpy()  # [d]
        scores = self.scored @ user - self.offsets  # [n + 1]
        scores[0] = -np.inf  # padding
        scores[rows] = -np.inf  # seen
        top = np.argpartition(-scores, k)[:k]
        top = top[np.argsort(-scores[top])]
        return [(self.item_ids[r], float(scores[r])) for r in top]


def create_app(
    bundle_dir: Path, checkpoint: Path | None, redis_url: str, key_prefix: str, history_len: int
) -> FastAPI:
    bundle = load_bundle(bundle_dir)
    recommender = NaiveRecommender(bundle, find_checkpoint(bundle, checkpoint))
    redis = Redis.from_url(redis_url)
    store = RedisHistoryStore(redis, key_prefix, history_len, event_id_ttl_s=60)
    app = FastAPI(title="naive recommender (benchmark peer)")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        await redis.ping()
        return {"status": "ready", "model_version": bundle.version}

    @app.post("/v1/recommend")
    async def recommend(body: RecommendIn) -> dict[str, Any]:
        history = await store.history(body.user_id)
        if not history:
            raise HTTPException(404, f"user {body.user_id!r} has no history")
        hits = await run_in_threadpool(recommender.recommend, history, body.k)
        return {
            "user_id": body.user_id,
            "items": [{"item_id": i, "score": s} for i, s in hits],
            "history_len": len(history),
            "model_version": bundle.version,
        }

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="default: the matching one beside the bundle")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--key-prefix", default="sidrec:")
    p.add_argument("--history-len", type=int, default=200)
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--torch-threads", type=int, default=0, help="0 = PyTorch's default")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    app = create_app(
        args.bundle, args.checkpoint, args.redis_url, args.key_prefix, args.history_len
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
