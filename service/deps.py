"""What routes get by dependency: the objects the lifespan built, and the API key checks."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Path, Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator
from starlette.convertors import Convertor, register_url_convertor

from sidrec.bundle import Bundle

from .batching import RankBatcher
from .catalog import Catalog
from .history_store import HistoryStore
from .runtime import Engine
from .schemas import ID_MAX_LENGTH, ID_PATTERN, ErrorResponse
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
    # sha256 of the bundle's manifest.json: with bundle.path (resolved), which bundle this is
    # (a hot reload compares them; service/reload.py).
    manifest_sha256: str = ""


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


# Every error of the v1 routes has one shape; listed on their routers so /docs shows it (the
# health routes answer none of these).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "body is not valid JSON, or the path is not valid UTF-8"),
        (401, "X-API-Key missing or wrong (only where SIDREC_API_KEY / _READ_API_KEY is set)"),
        (413, "body larger than SIDREC_MAX_BODY_BYTES"),
        (422, "a field is wrong: errors[] names it"),
        (
            503,
            "`store_unavailable`: Redis did not answer; `overloaded` (with Retry-After): no "
            "Redis connection of this worker came free in time. Nothing was stored",
        ),
    )
}


# One header for both keys; the OpenAPI names it so /docs offers a field for it.
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    scheme_name="apiKey",
    auto_error=False,
    description="SIDREC_API_KEY (writes, and reads too) or SIDREC_READ_API_KEY (reads only)",
)


def check_key(request: Request, access: Literal["read", "write"]) -> None:
    """401 unless X-API-Key holds a key that grants `access`; nothing to check if unset.

    The write key grants reads too: whoever may write a user's events may read them back."""
    settings = request.app.state.services.settings
    accepted = [settings.api_key] if access == "write" else [settings.read_api_key]
    if access == "read" and settings.read_api_key:
        accepted.append(settings.api_key)
    accepted = [k for k in accepted if k]
    if not accepted:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        raise ApiError(401, "unauthorized", "X-API-Key: header missing; this route needs the key")
    # Compare against every accepted key (no early exit): the time taken says nothing.
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in accepted]
    if not any(matches):
        raise ApiError(401, "unauthorized", "X-API-Key: wrong key")


async def require_api_key(request: Request, _: str | None = Security(API_KEY_HEADER)) -> None:
    """Write routes: the write key (SIDREC_API_KEY)."""
    check_key(request, "write")


async def require_read_key(request: Request, _: str | None = Security(API_KEY_HEADER)) -> None:
    """Reads of one user's data: the read key or the write key (SIDREC_READ_API_KEY)."""
    check_key(request, "read")


_ACCESS: dict[Callable[..., Any], Literal["read", "write"]] = {
    require_api_key: "write",
    require_read_key: "read",
}


def route_access(route: Any) -> Literal["read", "write"] | None:
    """Which key a route needs, from its dependencies (None: open)."""
    needs = {_ACCESS.get(d.dependency) for d in getattr(route, "dependencies", ())}
    return "write" if "write" in needs else "read" if "read" in needs else None


class KeyFirstRoute(APIRoute):
    """An APIRoute that checks its key before FastAPI reads and parses the body.

    FastAPI reads the whole body (and answers 400 for bad JSON) before it runs any dependency,
    so a client without the key could still make the service read and parse up to
    SIDREC_MAX_BODY_BYTES, and would learn 400/422 instead of 401. The dependencies above stay
    on the routes (they document the key in the OpenAPI and check again); this runs the same
    check first. get_route_handler is FastAPI's documented hook for a custom route class."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        access = route_access(self)
        if access is None:
            return handler

        async def key_first(request: Request) -> Response:
            check_key(request, access)
            return await handler(request)

        return key_first


class IdPathConvertor(Convertor[str]):
    """`{name:idpath}`: Starlette's `path` convertor (an id may hold "/"), but matching a line
    break too. With `path`'s `.*` the route regex stopped at "\n": `/v1/users/a%0Ab/history`
    was an undocumented 404 instead of the control-character 422, and, as `$` also matches
    before a final "\n", `DELETE /v1/users/a%0A` erased user "a" (two raw ids, one user)."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return str(value)

    def to_string(self, value: str) -> str:
        return str(value)


# Registered on import, before the routers (which import this module) declare their paths.
register_url_convertor("idpath", IdPathConvertor())


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# A user or item id in a URL path: the rule body ids follow (1..256 characters, no control
# characters). The raw path must also be valid UTF-8 (checked in service/app.py), so two
# different byte strings never decode to one id.
PathId = Annotated[
    str,
    Path(min_length=1, max_length=ID_MAX_LENGTH, json_schema_extra={"pattern": ID_PATTERN}),
    AfterValidator(_no_control),
]


# Names pydantic puts in an error's location for the branch of a union it tried.
UNION_BRANCHES = {"str", "int", "HistoryEvent", "EventIn", "ItemIn"}


def field_path(loc: tuple[int | str, ...]) -> str:
    """("body", "history", 3, "item_id") -> "history[3].item_id"."""
    path = ""
    for part in loc:
        if part in ("body", "path", "query") and not path:
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
