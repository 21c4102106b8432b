"""GET /v1/users/{user_id}/history: what the store holds for a user, oldest first."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..deps import ERROR_RESPONSES, KeyFirstRoute, PathId, Services, get_services, require_read_key

# A user's history is personal data: SIDREC_READ_API_KEY guards it when set.
router = APIRouter(
    tags=["users"],
    dependencies=[Depends(require_read_key)],
    route_class=KeyFirstRoute,
    responses=ERROR_RESPONSES,
)


@router.get("/v1/users/{user_id:path}/history")
async def user_history(
    user_id: PathId, services: Services = Depends(get_services)
) -> dict[str, Any]:
    events = await services.history.history(user_id)
    return {"user_id": user_id, "events": [{"item_id": i, "ts": ts} for i, ts in events]}
