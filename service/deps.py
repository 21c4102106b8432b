"""What routes get by dependency: the objects the lifespan built, and the API key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import Header, Request

from sidrec.bundle import Bundle

from .batching import RankBatcher
from .catalog import Catalog
from .history_store import HistoryStore
from .runtime import Engine
from .settings import Settings
from .store import StoreClient


@dataclass
class Services:
    settings: Settings
    bundle: Bundle
    runtime: Engine
    catalog: Catalog
    history: HistoryStore
    redis: StoreClient | None
    popular: list[str]  # the bundle's item ids, most popular first
    ranker: RankBatcher  # history -> top-k, concurrent requests batched
    rebuilt: bool = False  # ingested items loaded from the store
    rebuild_error: str | None = None
    # /readyz pings through this client's own two connections, so a worker whose request
    # pool is saturated still reports Redis as it is (single server; None = use `redis`).
    probe: StoreClient | None = None


class ApiError(Exception):
    """An answer other than 2xx, with the field and problem spelled out."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        errors: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.errors = errors or []


def invalid(field_path: str, problem: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field_path}: {problem}", [(field_path, problem)])


# Dependencies are `async def` although they never await: FastAPI runs a plain `def`
# dependency in the thread pool, a thread hop per request for a dictionary lookup.
async def get_services(request: Request) -> Services:
    return request.app.state.services


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


async def require_api_key(request: Request, x_api_key: str | None = Header(None)) -> None:
    expected = request.app.state.services.settings.api_key
    if not expected:
        return
    if x_api_key is None:
        raise ApiError(401, "unauthorized", "X-API-Key: header missing; this route needs the key")
    if not hmac.compare_digest(x_api_key.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "X-API-Key: wrong key")


# Names pydantic puts in an error's location for the branch of a union it tried.
UNION_BRANCHES = {"str", "int", "HistoryEvent", "EventIn", "ItemIn"}


def field_path(loc: tuple[int | str, ...]) -> str:
    """("body", "history", 3, "item_id") -> "history[3].item_id"."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def error_list(errors: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """pydantic errors -> (field, problem) pairs a person can act on."""
    out = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        # A union (id or {item_id, ts}) reports each branch; the branch name is noise.
        loc = tuple(
            p for p in loc if not (isinstance(p, str) and ("[" in p or p in UNION_BRANCHES))
        )
        problem = str(e.get("msg", "invalid"))
        if e.get("type") == "missing":
            problem = "required field missing"
        elif e.get("type") == "extra_forbidden":
            problem = "unknown field"
        out.append((field_path(loc), problem))
    return out
