"""POST /v1/recommend: history -> item vectors -> user encoder -> FAISS top-k minus seen.

The last three steps run in service/batching.py, batched with concurrent requests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from redis.asyncio.cluster import RedisCluster

from .. import metrics
from ..deps import (
    ERROR_RESPONSES,
    ApiError,
    KeyFirstRoute,
    Services,
    get_services,
    invalid,
    request_id,
    require_read_key,
)
from ..history_store import RedisHistoryStore
from ..schemas import HistoryEvent, RecommendRequest, RecommendResponse

# Recommendations for a user reveal that user's history: the read key guards them when set.
router = APIRouter(
    tags=["recommend"],
    dependencies=[Depends(require_read_key)],
    route_class=KeyFirstRoute,
    responses=ERROR_RESPONSES,
)


async def _history_and_retirements(services: Services, user_id: str) -> list[tuple[str, int]]:
    """The user's history, after applying retirements made by any worker: one Redis round
    trip for both on one Redis server. On a cluster the two keys live on different nodes, and a
    failed counter read must not fail a history that could be read: two commands there."""
    store, catalog = services.history, services.catalog
    seq_key = catalog.retired_seq_key()
    if (
        seq_key is None
        or not isinstance(store, RedisHistoryStore)
        or isinstance(store.redis, RedisCluster)
    ):
        history, _ = await asyncio.gather(store.history(user_id), catalog.sync_retired())
        return history
    history, seq = await store.history_and_get(user_id, seq_key)
    await catalog.sync_retired(int(seq or 0))
    return history


@router.post("/v1/recommend", response_model=RecommendResponse)
async def recommend(
    body: RecommendRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    settings = services.settings
    if body.k > settings.max_k:
        raise invalid("k", f"must be at most {settings.max_k} (SIDREC_MAX_K), got {body.k}")
    catalog = services.catalog
    accept = None
    if body.filter is not None:
        unknown_fields = catalog.unknown_fields(list(body.filter))
        if unknown_fields:
            known = ", ".join(catalog.known_fields()[:50]) or "none"
            errors = [
                (f"filter.{name}", f"no item has the field {name!r} (fields: {known})")
                for name in unknown_fields
            ]
            raise ApiError(
                422, "invalid_request", "; ".join(f"{f}: {p}" for f, p in errors), errors
            )
        accept = catalog.matcher(body.filter)
    now = int(time.time())
    query_time = body.query_time if body.query_time is not None else now
    if body.history is not None:
        # The model reads at most max_len items; a longer override is refused rather than cut,
        # since which items a cut drops (and so recommends again) would be a silent choice.
        max_len = services.runtime.max_len
        if len(body.history) > max_len:
            raise invalid(
                "history",
                f"at most {max_len} items (the model's max_len), got {len(body.history)}; "
                "send the newest ones",
            )
        # Retirements first (one GET when there are none): retired items must not come back.
        await catalog.sync_retired()
        events = [
            e if isinstance(e, HistoryEvent) else HistoryEvent(item_id=e) for e in body.history
        ]
        history = sorted(
            ((e.item_id, e.ts if e.ts is not None else query_time) for e in events),
            key=lambda e: e[1],
        )
        unknown = [
            i
            for i in await catalog.ensure_known([item_id for item_id, _ in history])
            if i not in catalog.retired  # a retired item is ignored, like a stored one
        ]
        if unknown:
            positions: dict[str, int] = {}
            for i, e in enumerate(events):
                positions.setdefault(e.item_id, i)
            raise ApiError(
                422,
                "unknown_items",
                f"history: {len(unknown)} unknown item id(s): {', '.join(map(repr, unknown[:20]))}",
                [(f"history[{positions[i]}]", f"unknown item {i!r}") for i in unknown],
            )
    else:
        assert body.user_id is not None
        with metrics.stage("history"):
            history = await _history_and_retirements(services, body.user_id)
        # Items ingested by another worker that this one has not seen yet: ask the store;
        # items stored under an older catalog may be gone for good and cannot be encoded.
        row_of = catalog.table.row_of
        missing = [i for i, _ in history if i not in row_of and i not in catalog.retired]
        if missing:
            await catalog.ensure_known(missing)
    # Retired (and lost) items are left out of the history the model reads: the user is
    # encoded as if those events had not happened. The stored history keeps them.
    row_of = catalog.table.row_of
    history = [e for e in history if e[0] in row_of]
    exclude = set(body.exclude_items)
    if body.exclude_seen:
        exclude.update(item_id for item_id, _ in history)
    items: list[dict[str, Any]]
    if history:
        hits = await services.ranker.rank(
            [item_id for item_id, _ in history],
            np.array([ts for _, ts in history], np.int64),
            query_time,
            body.k,
            exclude,
            accept,
        )
        items = [{"item_id": i, "score": score, "sid": sid} for i, score, sid in hits]
        fallback = None
    else:
        items = []
        for item_id in services.popular:
            if item_id in exclude or (accept is not None and not accept(item_id)):
                continue
            sid = catalog.table.sid_of(item_id)
            if sid is None:  # retired
                continue
            popularity = catalog.meta.get(item_id, {}).get("popularity", 0)
            items.append({"item_id": item_id, "score": float(popularity), "sid": sid})
            if len(items) == body.k:
                break
        fallback = "popular"
    # Serialised here rather than validated again through RecommendResponse (built from
    # trusted values; the model still documents the answer in /docs).
    answer = {
        "user_id": body.user_id,
        "items": items,
        "fallback": fallback,
        "history_len": len(history),
        "fewer_than_k": len(items) < body.k,
        "model_version": services.bundle.version,
        "request_id": request_id(request),
    }
    return Response(orjson.dumps(answer), media_type="application/json")
