"""GET /v1/users/{user_id}/history: what the store holds for a user, oldest first.
DELETE /v1/users/{user_id}: forget a user (history and remembered event ids)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from ..deps import (
    ERROR_RESPONSES,
    KeyFirstRoute,
    PathId,
    Services,
    get_services,
    request_id,
    require_api_key,
    require_read_key,
)
from ..schemas import UserErased

router = APIRouter(tags=["users"], route_class=KeyFirstRoute, responses=ERROR_RESPONSES)


# A user's history is personal data: SIDREC_READ_API_KEY guards it when set. Declared before
# the DELETE route, whose path also matches ".../history": routing tries them in order.
@router.get("/v1/users/{user_id:idpath}/history", dependencies=[Depends(require_read_key)])
async def user_history(
    user_id: PathId, services: Services = Depends(get_services)
) -> dict[str, Any]:
    events = await services.history.history(user_id)
    return {"user_id": user_id, "events": [{"item_id": i, "ts": ts} for i, ts in events]}


# Erasing is a write (the write key). 200 with what was removed rather than 204, like the
# other write answers (a request_id to quote). An unknown user is no error, only zeros, so a
# retried erase succeeds.
@router.delete(
    "/v1/users/{user_id:idpath}",
    response_model=UserErased,
    dependencies=[Depends(require_api_key)],
)
async def erase_user(
    user_id: PathId, request: Request, services: Services = Depends(get_services)
) -> UserErased:
    erased = await services.history.erase(user_id)
    return UserErased(
        user_id=user_id,
        history_events=erased.history_events,
        event_ids=erased.event_ids,
        request_id=request_id(request),
    )
