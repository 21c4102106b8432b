"""POST /v1/admin/reload: a new bundle without a restart, taken by every worker (reload.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request

from ..deps import ERROR_RESPONSES, ApiError, KeyFirstRoute, request_id, require_api_key
from ..reload import ReloadBusy, Reloader, ReloadRefused
from ..schemas import ErrorResponse, ReloadRequest, ReloadResponse

router = APIRouter(tags=["admin"], route_class=KeyFirstRoute, responses=ERROR_RESPONSES)

RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "a reload is already under way in this worker"},
    422: {
        "model": ErrorResponse,
        "description": "a field is wrong, or the bundle cannot be served (`invalid_bundle`: "
        "missing, a file's sha256 differs from manifest.json, or not loadable; detail names "
        "the file). The old bundle keeps serving",
    },
}


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    dependencies=[Depends(require_api_key)],
    responses=RESPONSES,
)
async def reload_model(request: Request, body: ReloadRequest) -> ReloadResponse:
    """Load a bundle (every file's sha256 checked), build its engine, index and ingested items
    off the request path, then swap it in; the other workers follow through Redis. Answered
    once this worker serves it."""
    reloader: Reloader = request.app.state.reloader
    try:
        result = await reloader.reload(Path(body.bundle) if body.bundle is not None else None)
    except ReloadRefused as e:
        problem = f"cannot load the bundle: {e}"
        raise ApiError(422, "invalid_bundle", f"bundle: {problem}", [("bundle", problem)]) from None
    except ReloadBusy as e:
        raise ApiError(409, "reload_in_progress", str(e)) from None
    return ReloadResponse(
        status=result.status,
        model_version=result.model_version,
        previous_version=result.previous_version,
        bundle=result.bundle,
        seconds=round(result.seconds, 3),
        pid=os.getpid(),
        request_id=request_id(request),
    )
