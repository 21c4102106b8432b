"""The FastAPI application: lifespan (load everything once), middleware, error answers, routers.

`create_app()` with no argument reads Settings from the environment; that is what each uvicorn
worker calls (see server.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import MaxConnectionsError, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sidrec.bundle import MANIFEST, Bundle, load_bundle, sha256_of
from sidrec.histories_file import read_histories
from sidrec.sid_codebook import Codebooks

from . import metrics
from .batching import RankBatcher
from .catalog import (
    Catalog,
    CatalogStore,
    MemoryCatalogStore,
    RedisCatalogStore,
    bundle_content_weights,
    bundle_score_offsets,
    bundle_score_scales,
)
from .deps import ApiError, Services, error_list, route_access
from .history_load import load_histories
from .history_store import HistoryStore, MemoryHistoryStore, RedisHistoryStore
from .reload import Reloader, bundle_folder, freeze_heap
from .retrieval import IndexSpec, ItemTable
from .routers import admin, events, health, items, recommend, users
from .runtime import load_engine
from .schemas import MAX_ERRORS, MAX_HISTORY_OVERRIDE
from .settings import Settings
from .store import StoreClient, StoreOverloaded, connect
from .user_cache import UserVectorCache

log = logging.getLogger("sidrec.service")

# Probes and scrapes are not traffic: kept out of the request metrics.
UNMETERED = {"/healthz", "/readyz", "/metrics"}
_CONVERTER = re.compile(r":\w+}")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_DETAIL_CHARS = 2_000
# Seconds an `overloaded` answer asks the client to wait before retrying.
RETRY_AFTER_S = 1


@dataclass
class Stores:
    """What outlives a model reload: the Redis clients and the stores over them."""

    redis: StoreClient | None
    probe: StoreClient | None
    history: HistoryStore
    catalog: CatalogStore


def build_stores(settings: Settings) -> Stores:
    redis: StoreClient | None = None
    probe: StoreClient | None = None
    store: CatalogStore
    if settings.redis_url:
        redis = connect(settings)
        if not settings.redis_cluster:
            # Probes queue for the probe's own connections, bounded by /readyz's timeout.
            probe = connect(settings, max_connections=2, pool_timeout=settings.redis_timeout_s)
        history: HistoryStore = RedisHistoryStore(
            redis, settings.key_prefix, settings.history_len, settings.event_id_ttl_s
        )
        store = RedisCatalogStore(redis, settings.key_prefix)
    else:
        log.warning(
            "\n" + "!" * 78 + "\n"
            "!! SIDREC_REDIS_URL is not set: histories and ingested items live in THIS PROCESS\n"
            "!! only and are LOST when it stops. Set SIDREC_REDIS_URL for anything but a demo.\n"
            + "!"
            * 78
        )
        history = MemoryHistoryStore(settings.history_len, settings.event_id_ttl_s)
        store = MemoryCatalogStore()
    return Stores(redis, probe, history, store)


def build_model(settings: Settings, stores: Stores, bundle: Bundle) -> Services:
    """Everything that depends on the bundle: engine, index, catalog, ranker (blocking: ONNX
    sessions and the index are built here; a reload runs it in a thread). The catalog's
    ingested items are not loaded yet (Catalog.rebuild)."""
    runtime = load_engine(
        bundle,
        settings.engine,
        settings.device,
        settings.ort_threads,
        settings.torch_threads,
        settings.content_threads,
    )
    codebooks = Codebooks.load(bundle.file("sid_codebooks.npz"))
    records = bundle.items()
    vectors = bundle.item_vectors()  # [n + 1, d]
    sids = np.zeros((len(records) + 1, codebooks.layers + 1), np.int64)  # [n + 1, L + 1]
    for r in records:
        sids[r.row] = r.sid
    if [r.row for r in records] != list(range(1, len(records) + 1)):
        raise ValueError(f"{bundle.file('items.jsonl')}: rows are not 1..n in order")
    table = ItemTable(
        vectors,
        [r.item_id for r in records],
        sids,
        codebooks.codes,
        use_gpu=settings.device != "cpu",
        index=IndexSpec(
            settings.index,
            settings.hnsw_m,
            settings.hnsw_ef_construction,
            settings.hnsw_ef_search,
            device=settings.device,
        ),
        scales=bundle_score_scales(bundle, records),
        offsets=bundle_score_offsets(bundle, records),
        scoring=bundle.model.get("scoring", "cosine"),
        content=bundle.item_content(),
        content_weights=bundle_content_weights(bundle, records),
        content_half_life=bundle.content_term.half_life,
    )
    catalog = Catalog(bundle, runtime, codebooks, table, vectors, stores.catalog)
    popular = [str(i) for i in bundle.manifest.get("popular", [])]
    # One call each now, so the first request does not pay the engine's first-run cost.
    runtime.encode_users(
        vectors[None, 1:2],
        np.zeros((1, 1), np.int64),
        np.ones((1, 1), np.bool_),
        np.zeros(1, np.int64),
    )
    runtime.new_item_vectors(sids[1:2], np.zeros((1, runtime.content_dim), np.float32))
    runtime.content_vectors(["warm-up"])
    cache = None
    if settings.user_cache_size:
        cache = UserVectorCache(settings.user_cache_size, bool(bundle.model.get("use_time", True)))
    ranker = RankBatcher(
        runtime,
        table,
        threads=settings.rank_thread_count(),
        cache=cache,
        search_threads=settings.faiss_threads,
    )
    services = Services(
        settings, bundle, runtime, catalog, stores.history, stores.redis, popular, ranker
    )
    services.probe = stores.probe
    services.manifest_sha256 = sha256_of(bundle.file(MANIFEST))
    log.info(
        "bundle %s (%s): %d items, d=%d, provider %s, index %s, store %s, rank threads %d",
        bundle.version,
        bundle.path,
        len(records),
        runtime.d,
        runtime.provider,
        table.index_kind,
        stores.history.kind,
        ranker.threads,
    )
    return services


def announce_model(services: Services, previous: Services | None = None) -> None:
    """sidrec_model_info and the catalog gauges for the model now serving."""
    if previous is not None:
        old = metrics.MODEL_INFO.labels(
            version=previous.bundle.version, provider=previous.runtime.provider
        )
        old.set(0)  # several workers: their max, 1 while any worker still serves it
        if not metrics.multiprocess_mode() and (
            previous.bundle.version,
            previous.runtime.provider,
        ) != (services.bundle.version, services.runtime.provider):
            metrics.MODEL_INFO.remove(previous.bundle.version, previous.runtime.provider)
    metrics.MODEL_INFO.labels(
        version=services.bundle.version, provider=services.runtime.provider
    ).set(1)
    services.catalog.update_gauges()


def build_services(settings: Settings) -> Services:
    """Everything heavy, once per process: bundle (sha256-checked), engine, index, stores."""
    bundle = load_bundle(bundle_folder(settings.bundle))
    services = build_model(settings, build_stores(settings), bundle)
    announce_model(services)
    return services


async def bootstrap_histories(store: HistoryStore, settings: Settings) -> None:
    """SIDREC_HISTORIES: fill the in-process store from the histories file before the first
    request (the settings refuse it with Redis, which `sidrec histories load` fills once for
    every worker)."""
    assert settings.histories is not None
    report = await load_histories(store, read_histories(settings.histories))
    log.info(
        "histories: %d events of %d users loaded from %s into the %s store (%.1f s)",
        report.events,
        report.users,
        settings.histories,
        store.kind,
        report.seconds,
    )


async def sync_catalog(services: Services) -> None:
    """Load ingested items from the store (retrying while Redis is away), then follow it."""
    catalog = services.catalog
    delay = 0.2
    while not services.rebuilt:
        try:
            loaded = await catalog.rebuild()
            services.rebuilt = True
            services.rebuild_error = None
            log.info(
                "catalog: %d ingested items loaded from the %s store", loaded, catalog.store.kind
            )
        except (RedisError, OSError) as e:
            services.rebuild_error = f"{type(e).__name__}: {e}"
            log.warning("catalog: cannot load ingested items yet (%s); retrying", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    if isinstance(catalog.store, RedisCatalogStore):
        # XREAD BLOCK must return inside the socket timeout, or a quiet stream reads as an
        # outage; a short block also bounds how late the follower notices a lost catalog.
        block_ms = int(min(1000, 500 * services.settings.redis_timeout_s))
        await catalog.follow(block_ms=max(block_ms, 10))


@dataclass(frozen=True)
class RouteTemplate:
    pattern: re.Pattern[str]
    template: str  # "/v1/items/{item_id}": what the metrics label says
    methods: frozenset[str]


def route_templates(app: FastAPI, routers: list[APIRouter]) -> list[RouteTemplate]:
    """Every route's path template and methods, from the routes as declared.

    Read from the routers' own routes (and the app's, for /docs and /openapi.json), not from
    what Starlette leaves in the scope: a request answered before routing (413) has no route
    there, and newer FastAPI puts included routers into app.routes as objects without a path."""
    declared = [r for r in app.routes if isinstance(getattr(r, "path", None), str)]
    declared += [r for router in routers for r in router.routes]
    out: dict[str, RouteTemplate] = {}
    for route in declared:
        path = route.path  # type: ignore[attr-defined]
        methods = frozenset(getattr(route, "methods", None) or ())
        if path in out:  # one path, several routes (GET and POST): one template, all methods
            methods |= out[path].methods
        pattern, _, _ = compile_path(path)
        out[path] = RouteTemplate(pattern, _CONVERTER.sub("}", path), methods)
    return list(out.values())


def route_of(
    routes: list[RouteTemplate], path: str, method: str | None = None
) -> RouteTemplate | None:
    """The template a path (and method) is served by: the first whose pattern and method
    match, else the first whose pattern matches (a 405). With `{id:idpath}` templates one path
    can match several (DELETE /v1/users/a/history erases user "a/history")."""
    matching = [r for r in routes if r.pattern.match(path)]
    if method is not None:
        with_method = [r for r in matching if method in r.methods]
        matching = with_method or matching
    return matching[0] if matching else None


def _valid_utf8_path(raw_path: bytes) -> bool:
    # uvicorn decodes %-escapes with errors="replace": "%ff" and "%fe" would both reach the
    # routes as U+FFFD, two raw ids read as one user. Such paths are refused instead.
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class RequestContext:
    """Request id, body size limit, path check and request metrics, as plain ASGI middleware."""

    def __init__(self, app: ASGIApp, routes: list[RouteTemplate], max_body_bytes: int) -> None:
        self.app = app
        self.routes = routes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise StarletteHTTPException(413, self._too_large())
            return message

        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        route = route_of(self.routes, scope["path"], scope["method"])
        try:
            if declared > self.max_body_bytes:
                # Answered unread. The server discards the body as it arrives and the
                # connection stays open for the next request, except when the client waits
                # for "100 Continue" before sending it: then it never comes, the server would
                # read the next request as this body, so the connection is closed (cleanly:
                # nothing unread is left behind).
                answer = _error_body(413, "body_too_large", self._too_large(), [], request_id)
                if b"100-continue" in headers.get(b"expect", b"").lower():
                    answer.headers["connection"] = "close"
                await answer(scope, receive, send_with_id)
            elif not _valid_utf8_path(scope.get("raw_path") or b""):
                problem = "not valid UTF-8 once %-escapes are decoded"
                answer = _error_body(
                    400, "invalid_path", f"path: {problem}", [("path", problem)], request_id
                )
                await answer(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            template = route.template if route is not None else "unmatched"
            if template not in UNMETERED:
                elapsed = time.perf_counter() - start
                metrics.HTTP_REQUESTS.labels(
                    route=template, method=scope["method"], status=str(status)
                ).inc()
                metrics.HTTP_LATENCY.labels(route=template).observe(elapsed)

    def _too_large(self) -> str:
        return f"body: larger than {self.max_body_bytes} bytes (SIDREC_MAX_BODY_BYTES)"


def _error_body(
    status: int,
    error: str,
    detail: str,
    errors: list[tuple[str, str]],
    request_id: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    # Capped: a request with 100,000 bad ids must not get a multi-megabyte answer.
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 3] + "..."
    content: dict[str, Any] = {
        "error": error,
        "detail": detail,
        "errors": [{"field": f, "problem": p[:MAX_DETAIL_CHARS]} for f, p in errors[:MAX_ERRORS]],
        "errors_total": len(errors),
        "request_id": request_id,
    }
    return JSONResponse(content, status_code=status, headers=headers)


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error_body(exc.status, exc.error, exc.detail, exc.errors, _rid(request))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        e = next(e for e in raw if e.get("type") == "json_invalid")
        where = e.get("loc", ("body", 0))[-1]
        reason = e.get("ctx", {}).get("error", "invalid JSON")
        problem = f"not valid JSON ({reason} at character {where})"
        return _error_body(
            400, "invalid_json", f"body: {problem}", [("body", problem)], _rid(request)
        )
    errors = error_list(raw)
    detail = "; ".join(f"{f}: {p}" for f, p in errors[:10])
    return _error_body(422, "invalid_request", detail, errors, _rid(request))


def _http_error(routes: list[RouteTemplate]) -> Callable[[Request, Exception], Awaitable[Any]]:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        names = {
            404: "not_found",
            405: "method_not_allowed",
            413: "body_too_large",
            400: "bad_request",
        }
        error = names.get(exc.status_code, "http_error")
        detail = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            # FastAPI's answer to a body it could not decode (e.g. not UTF-8).
            detail = "body: could not be read as JSON text (is it UTF-8?)"
        # RFC 9110 requires Allow on a 405. Starlette's names only the first route matching
        # the path (GET /v1/items/{id}, not its DELETE): made from every route of the path.
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            route = route_of(routes, request.url.path)
            if route is not None:
                headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
                headers["Allow"] = ", ".join(sorted(route.methods))
        return _error_body(exc.status_code, error, detail, [], _rid(request), headers)

    return handler


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    request.app.state.store_failed_at = time.monotonic()
    detail = f"store unavailable: Redis did not answer ({type(exc).__name__}); nothing was stored"
    return _error_body(503, "store_unavailable", detail, [], _rid(request))


async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
    settings: Settings = request.app.state.services.settings
    # Connections stuck on a Redis that stopped answering also leave the pool empty: while
    # Redis failed moments ago, a full pool is that outage, not overload.
    recent = 2 * settings.redis_timeout_s + settings.redis_pool_timeout_s
    failed_at = getattr(request.app.state, "store_failed_at", None)
    if failed_at is not None and time.monotonic() - failed_at < recent:
        return await _redis_error(request, exc)
    metrics.STORE_OVERLOADED.inc()
    detail = (
        "overloaded: every Redis connection of this worker stayed busy for "
        f"{settings.redis_pool_timeout_s}s (SIDREC_REDIS_MAX_CONNECTIONS="
        f"{settings.redis_max_connections}); nothing was stored, retry after a moment"
    )
    response = _error_body(503, "overloaded", detail, [], _rid(request))
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
        )
    log.setLevel(settings.log_level.upper())
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # one line per CPU feature probe

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stores = build_stores(settings)
        services = build_model(settings, stores, load_bundle(bundle_folder(settings.bundle)))
        announce_model(services)
        if settings.histories is not None:
            await bootstrap_histories(services.history, settings)
        app.state.services = services

        def start_sync(services: Services) -> asyncio.Task[None]:
            return asyncio.create_task(sync_catalog(services), name="catalog-sync")

        reloader = Reloader(
            app,
            settings,
            lambda bundle: build_model(settings, stores, bundle),
            announce_model,
            start_sync,
            stores.redis,
        )
        app.state.reloader = reloader
        reloader.sync_task = start_sync(services)
        if not isinstance(services.catalog.store, RedisCatalogStore):
            await reloader.sync_task  # the in-process store has nothing to load: done at once
        watch_task = asyncio.create_task(reloader.watch(), name="model-watch")
        # This generator's frame lives as long as the app: a local reference here would keep
        # the first model alive after a reload replaced it.
        del services
        freeze_heap()
        try:
            yield
        finally:
            watch_task.cancel()
            with suppress(asyncio.CancelledError):
                await watch_task
            await reloader.close()
            app.state.services.ranker.stop()
            for client in (stores.redis, stores.probe):
                if client is not None:
                    await client.aclose()

    app = FastAPI(
        title="sidrec",
        summary="Next-item recommendations from an HSTU model with Semantic IDs",
        version="1",
        lifespan=lifespan,
        default_response_class=_OrjsonResponse,
    )
    routers = [
        recommend.router,
        events.router,
        items.router,
        users.router,
        admin.router,
        health.router,
    ]
    for router in routers:
        app.include_router(router)
    routes = route_templates(app, routers)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error(routes))
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(StoreOverloaded, _overloaded)
    app.add_exception_handler(MaxConnectionsError, _overloaded)  # a cluster node's pool
    app.add_middleware(RequestContext, routes=routes, max_body_bytes=settings.max_body_bytes)
    app.openapi = _deployment_openapi(app, settings, routers)  # type: ignore[method-assign]
    return app


def _deployment_openapi(
    app: FastAPI, settings: Settings, routers: list[APIRouter]
) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI with this deployment's limits and keys filled in.

    The models cannot know SIDREC_MAX_K, SIDREC_MAX_BATCH, the model's max_len or the content
    vector's size, nor which keys are set; a client (or schemathesis) reading the schema would
    otherwise send requests the service must refuse. Bundle figures need the loaded bundle, so
    the schema is cached only once the lifespan has built the services."""

    def openapi() -> dict[str, Any]:
        services: Services | None = getattr(app.state, "services", None)
        if app.openapi_schema is not None and services is not None:
            return app.openapi_schema
        app.openapi_schema = None
        schema = FastAPI.openapi(app)
        _fill_limits(schema, settings, services)
        _drop_unset_keys(schema, settings, routers)
        if services is None:
            app.openapi_schema = None
        return schema

    return openapi


def _fill_limits(schema: dict[str, Any], settings: Settings, services: Services | None) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for name, model in components.items():
        if not name.startswith("RecommendRequest"):
            continue
        props = model["properties"]
        props["k"]["maximum"] = settings.max_k
        if services is not None:
            for branch in props["history"].get("anyOf", []):
                if branch.get("type") == "array":
                    branch["maxItems"] = min(MAX_HISTORY_OVERRIDE, services.runtime.max_len)
    similar = schema["paths"].get("/v1/items/{item_id}/similar", {}).get("get", {})
    for param in similar.get("parameters", []):
        if param["name"] == "k":
            param["schema"]["maximum"] = settings.max_k
    dim = services.catalog.codebooks.dim if services is not None else None
    for path in ("/v1/events", "/v1/items"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        one, many = body["schema"]["oneOf"]
        many["maxItems"] = settings.max_batch
        for item in (one, many["items"]):
            vector = item["properties"].get("content_vector")
            if vector is not None and dim is not None:
                for branch in vector.get("anyOf", []):
                    if branch.get("type") == "array":
                        branch["minItems"] = branch["maxItems"] = dim


def _drop_unset_keys(schema: dict[str, Any], settings: Settings, routers: list[APIRouter]) -> None:
    # A route documents its key; where that key is not set here, nothing is checked.
    enforced = {"write": bool(settings.api_key), "read": bool(settings.read_api_key)}
    for router in routers:
        for route in router.routes:
            access = route_access(route)
            if access is None or enforced[access]:
                continue
            path = _CONVERTER.sub("}", route.path)  # type: ignore[attr-defined]
            for method in getattr(route, "methods", ()):
                schema["paths"].get(path, {}).get(method.lower(), {}).pop("security", None)


class _OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
