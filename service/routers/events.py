"""POST /v1/events: one event or a batch, appended to the users' capped histories."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import TypeAdapter, ValidationError

from ..deps import (
    ERROR_RESPONSES,
    ApiError,
    KeyFirstRoute,
    Services,
    error_list,
    get_services,
    request_id,
    require_api_key,
)
from ..history_store import Event
from ..schemas import EventIn, EventsResponse, one_or_batch

router = APIRouter(
    tags=["events"],
    dependencies=[Depends(require_api_key)],
    route_class=KeyFirstRoute,
    responses=ERROR_RESPONSES,
)

# Validated by parse_batch, not FastAPI: the batch size is checked before the items are.
EventsBody = Annotated[Any, Body(json_schema_extra=one_or_batch(EventIn))]

_one = TypeAdapter(EventIn)
_many = TypeAdapter(list[EventIn])


def parse_batch(
    body: Any, max_batch: int, adapter_one: TypeAdapter, adapter_many: TypeAdapter, what: str
) -> tuple[list[Any], bool]:
    """A JSON object (one) or array (a batch) -> validated models, and whether it was a batch."""
    is_batch = isinstance(body, list)
    if is_batch and not body:
        raise ApiError(
            422,
            "invalid_request",
            f"body: empty list, send at least one {what}",
            [("body", "empty list")],
        )
    if is_batch and len(body) > max_batch:
        problem = f"batch of {len(body)} {what}s, at most {max_batch} (SIDREC_MAX_BATCH)"
        raise ApiError(422, "invalid_request", f"body: {problem}", [("body", problem)])
    if not is_batch and not isinstance(body, dict):
        problem = f"must be a JSON object (one {what}) or an array of them"
        raise ApiError(422, "invalid_request", f"body: {problem}", [("body", problem)])
    try:
        parsed = (
            adapter_many.validate_python(body) if is_batch else [adapter_one.validate_python(body)]
        )
    except ValidationError as e:
        errors = error_list(e.errors())
        detail = "; ".join(f"{f}: {p}" for f, p in errors[:10])
        raise ApiError(422, "invalid_request", detail, errors) from None
    return parsed, is_batch


@router.post("/v1/events", response_model=EventsResponse)
async def add_events(
    request: Request, body: EventsBody, services: Services = Depends(get_services)
) -> EventsResponse:
    events, is_batch = parse_batch(body, services.settings.max_batch, _one, _many, "event")
    unknown = set(await services.catalog.ensure_known([e.item_id for e in events]))
    if unknown:
        errors = [
            (f"[{i}].item_id" if is_batch else "item_id", f"unknown item {e.item_id!r}")
            for i, e in enumerate(events)
            if e.item_id in unknown
        ]
        names = ", ".join(repr(i) for i in sorted(unknown)[:20])
        raise ApiError(422, "unknown_items", f"item_id: unknown item id(s): {names}", errors)
    now = int(time.time())
    stored = await services.history.append(
        [Event(e.user_id, e.item_id, e.ts if e.ts is not None else now, e.event_id) for e in events]
    )
    return EventsResponse(
        accepted=len(events), duplicates=len(events) - stored, request_id=request_id(request)
    )
