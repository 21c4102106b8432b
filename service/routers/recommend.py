"""POST /v1/recommend: history -> item vectors -> user encoder -> FAISS top-k minus seen.

The last three steps run in service/batching.py, batched with concurrent requests."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response

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
from ..schemas import HistoryEvent, RecommendRequest, RecommendResponse

# Recommendations for a user reveal that user's history: the read key guards them when set.
router = APIRouter(
    tags=["recommend"],
    dependencies=[Depends(require_read_key)],
    route_class=KeyFirstRoute,
    responses=ERROR_RESPONSES,
)


@router.post("/v1/recommend", response_model=RecommendResponse)
async def recommend(
    body: RecommendRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    settings = services.settings
    if body.k > settings.max_k:
        raise invalid("k", f"must be at most {settings.max_k} (SIDREC_MAX_K), got {body.k}")
    now = int(time.time())
    query_time = body.query_time if body.query_time is not None else now
    catalog = services.catalog
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
        events = [
            e if isinstance(e, HistoryEvent) else HistoryEvent(item_id=e) for e in body.history
        ]
        history = sorted(
            ((e.item_id, e.ts if e.ts is not None else query_time) for e in events),
            key=lambda e: e[1],
        )
        unknown = await catalog.ensure_known([item_id for item_id, _ in history])
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
            history = await services.history.history(body.user_id)

    table = catalog.table
    # One dict lookup per history item (the hot path: 200 items), done once.
    history_rows = [table.row_of.get(item_id) for item_id, _ in history]
    if body.history is None and None in history_rows:
        # Items ingested by another worker that this one has not seen yet: ask the store; items
        # stored under an older catalog may be gone for good and cannot be encoded: skipped.
        await catalog.ensure_known(
            [i for (i, _), r in zip(history, history_rows, strict=True) if r is None]
        )
        history_rows = [table.row_of.get(item_id) for item_id, _ in history]
        history = [e for e, r in zip(history, history_rows, strict=True) if r is not None]
        history_rows = [r for r in history_rows if r is not None]
    exclude = set(history_rows) if body.exclude_seen else set()
    items: list[dict[str, Any]]
    if history:
        rows = np.array(history_rows, np.int64)
        timestamps = np.array([ts for _, ts in history], np.int64)
        hits = await services.ranker.rank(rows, timestamps, query_time, body.k, exclude)
        hit_rows = [row for row, _ in hits]
        sids = table.sids[hit_rows].tolist()
        items = [
            {"item_id": table.item_ids[row], "score": score, "sid": sid}
            for (row, score), sid in zip(hits, sids, strict=True)
        ]
        fallback = None
    else:
        items = []
        for item_id in services.popular:
            row = table.row(item_id)
            if row is None or row in exclude or not table.alive[row]:
                continue
            popularity = catalog.meta.get(item_id, {}).get("popularity", 0)
            items.append(
                {"item_id": item_id, "score": float(popularity), "sid": table.sids[row].tolist()}
            )
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
        "model_version": services.bundle.version,
        "request_id": request_id(request),
    }
    return Response(orjson.dumps(answer), media_type="application/json")
