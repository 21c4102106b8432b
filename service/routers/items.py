"""POST /v1/items (ingest new or changed items), GET /v1/items/{item_id}, its similar items,
and DELETE /v1/items/{item_id} (retire)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Body, Depends, Query, Request, Response
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

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
from ..schemas import (
    ErrorResponse,
    IngestedItem,
    ItemIn,
    ItemsResponse,
    RetiredResponse,
    SimilarResponse,
    one_or_batch,
)
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


# Before GET /v1/items/{item_id:idpath}, whose path pattern would also take ".../similar". An
# item whose id itself ends in "/similar" cannot be read through that route for the same reason.
# Similar items come from item vectors only, nothing personal: open like GET /v1/items/{id}.
@router.get(
    "/v1/items/{item_id:idpath}/similar",
    response_model=SimilarResponse,
    responses={404: {"model": ErrorResponse, "description": "no live item with this id"}},
)
async def similar_items(
    request: Request,
    item_id: PathId,
    k: Annotated[int, Query(ge=1, description="how many items (at most SIDREC_MAX_K)")] = 10,
    services: Services = Depends(get_services),
) -> Response:
    max_k = services.settings.max_k
    if k > max_k:
        raise invalid("k", f"must be at most {max_k} (SIDREC_MAX_K), got {k}")
    catalog = services.catalog
    await catalog.sync_retired()
    await catalog.ensure_known([item_id])  # e.g. ingested a moment ago through another worker
    hits = await run_in_threadpool(catalog.table.similar, item_id, k)
    if hits is None:
        raise _not_found(item_id)
    answer = {
        "item_id": item_id,
        "items": [{"item_id": i, "score": score, "sid": sid} for i, score, sid in hits],
        "fewer_than_k": len(hits) < k,
        "model_version": services.bundle.version,
        "request_id": request_id(request),
    }
    return Response(orjson.dumps(answer), media_type="application/json")


@router.get(
    "/v1/items/{item_id:idpath}",
    responses={404: {"model": ErrorResponse, "description": "no item with this id"}},
)
async def get_item(item_id: PathId, services: Services = Depends(get_services)) -> dict[str, Any]:
    await services.catalog.sync_retired()
    await services.catalog.ensure_known([item_id])
    record = services.catalog.record(item_id)
    if record is None:
        raise _not_found(item_id)
    return record


@router.delete(
    "/v1/items/{item_id:idpath}",
    response_model=RetiredResponse,
    dependencies=[Depends(require_api_key)],
    responses={404: {"model": ErrorResponse, "description": "no live item with this id"}},
)
async def retire_item(
    request: Request, item_id: PathId, services: Services = Depends(get_services)
) -> RetiredResponse:
    """Retire an item: no worker returns it from the next request on, it stays retired after
    a restart (bundle items too), and users' history entries of it are ignored. POST
    /v1/items with the same id brings it back."""
    if not await services.catalog.retire(item_id):
        raise _not_found(item_id)
    return RetiredResponse(item_id=item_id, status="retired", request_id=request_id(request))


def _not_found(item_id: str) -> ApiError:
    return ApiError(
        404, "not_found", f"item_id: unknown item {item_id!r}", [("item_id", "unknown")]
    )
