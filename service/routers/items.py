"""POST /v1/items (ingest new or changed items), GET /v1/items/{item_id}."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, Depends, Request
from pydantic import TypeAdapter

from ..catalog import ClientError, ItemInput
from ..deps import (
    ERROR_RESPONSES,
    ApiError,
    KeyFirstRoute,
    PathId,
    Services,
    get_services,
    invalid,
    request_id,
    require_api_key,
)
from ..schemas import ErrorResponse, IngestedItem, ItemIn, ItemsResponse, one_or_batch
from .events import parse_batch

router = APIRouter(tags=["items"], route_class=KeyFirstRoute, responses=ERROR_RESPONSES)

ItemsBody = Annotated[Any, Body(json_schema_extra=one_or_batch(ItemIn))]

_one = TypeAdapter(ItemIn)
_many = TypeAdapter(list[ItemIn])


@router.post("/v1/items", response_model=ItemsResponse, dependencies=[Depends(require_api_key)])
async def add_items(
    request: Request, body: ItemsBody, services: Services = Depends(get_services)
) -> ItemsResponse:
    items, is_batch = parse_batch(body, services.settings.max_batch, _one, _many, "item")
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.item_id in seen:
            raise invalid(f"[{i}].item_id", f"{item.item_id!r} appears twice in one batch")
        seen[item.item_id] = i
    inputs = [
        ItemInput(
            item_id=item.item_id,
            title=item.title,
            text=item.text,
            fields=dict(item.fields),
            content_vector=(
                np.asarray(item.content_vector, np.float32)
                if item.content_vector is not None
                else None
            ),
        )
        for item in items
    ]
    try:
        results = await services.catalog.ingest(inputs)
    except ClientError as e:
        where = f"[{e.index}]" if is_batch else ""
        if e.field:
            where = f"{where}.{e.field}" if where else e.field
        raise invalid(where or "body", e.problem) from None
    return ItemsResponse(
        items=[
            IngestedItem(
                item_id=r.item_id,
                sid=r.sid,
                collided=r.collided,
                status="created" if r.created else "updated",
            )
            for r in results
        ],
        model_version=services.bundle.version,
        request_id=request_id(request),
    )


@router.get(
    "/v1/items/{item_id:path}",
    responses={404: {"model": ErrorResponse, "description": "no item with this id"}},
)
async def get_item(item_id: PathId, services: Services = Depends(get_services)) -> dict[str, Any]:
    await services.catalog.ensure_known([item_id])
    record = services.catalog.record(item_id)
    if record is None:
        raise ApiError(
            404, "not_found", f"item_id: unknown item {item_id!r}", [("item_id", "unknown")]
        )
    return record
