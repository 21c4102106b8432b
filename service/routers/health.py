"""GET /healthz (the process answers), /readyz (can serve: model, index, Redis), /metrics."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from .. import metrics
from ..deps import Services, get_services

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 0.5


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        503: {
            "description": "not ready: reasons[] says why",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def readyz(request: Request, services: Services = Depends(get_services)) -> JSONResponse:
    reasons = []
    reloader = getattr(request.app.state, "reloader", None)
    model = reloader.not_ready() if reloader is not None else None
    if model is not None:
        reasons.append(model)
    if services.redis is not None:
        # Answered well inside a 1 s probe timeout (Kubernetes' default) even when Redis
        # hangs; a Redis that takes half a second for PING is not fit to serve either.
        timeout = min(services.settings.redis_timeout_s, PROBE_TIMEOUT_S)
        try:
            await asyncio.wait_for((services.probe or services.redis).ping(), timeout)
        except Exception as e:  # any failure to answer means not ready, whatever its type
            reasons.append(f"redis: not answering ({type(e).__name__}: {e})")
    if not services.rebuilt:
        # A Redis error, or (no error) the wait for a missing generation marker.
        detail = services.rebuild_error or services.catalog.waiting
        why = f" ({detail})" if detail else ""
        reasons.append(f"catalog: ingested items not yet loaded from the store{why}")
    if services.catalog.follower_error is not None:
        reasons.append(f"catalog stream: {services.catalog.follower_error}")
    body = {
        "status": "not_ready" if reasons else "ready",
        "reasons": reasons,
        "model_version": services.bundle.version,
        "bundle": str(services.bundle.path),
        "provider": services.runtime.provider,
        "index": services.catalog.table.index_kind,
        "index_items": services.catalog.table.live_items,
        "index_rows": services.catalog.table.rows_held,
        "store": services.history.kind,
        "pid": os.getpid(),  # which worker answered: several share one port
    }
    return JSONResponse(body, status_code=503 if reasons else 200)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics_text() -> Response:
    payload, content_type = metrics.render()
    return Response(payload, media_type=content_type)
