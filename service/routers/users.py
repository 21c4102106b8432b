"""GET /v1/users/{user_id}/history: what the store holds for a user, oldest first."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..deps import Services, get_services

router = APIRouter(tags=["users"])


@router.get("/v1/users/{user_id:path}/history")
async def user_history(user_id: str, services: Services = Depends(get_services)) -> dict[str, Any]:
    events = await services.history.history(user_id)
    return {"user_id": user_id, "events": [{"item_id": i, "ts": ts} for i, ts in events]}
