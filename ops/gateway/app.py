"""The gateway's ASGI app: routes, API keys, body limits, OpenAI-shaped errors, and its DIO clients.

    app = create_app(GatewaySettings())   # then: uvicorn.run(app, ...), or dio.ops.gateway.server.run

The app opens its DIO clients when it starts (ASGI lifespan) and closes them when it stops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import Response

from dio.client.aio import AsyncClient
from dio.client.client import Client
from dio.client.pools import AsyncClientPools
from dio.client.settings import ClientSettings
from dio.ops.gateway import batch_routes, completions, health
from dio.ops.gateway.auth import check_api_key
from dio.ops.gateway.catalog import ModelCatalog
from dio.ops.gateway.errors import ApiError, bad_request
from dio.ops.gateway.hooks import GatewayHooks
from dio.ops.gateway.limits import BodyLimit
from dio.ops.gateway.settings import FILE_BODY_OVERHEAD_BYTES, GatewaySettings
from dio.ops.gateway.state import Gateway, gateway_of

log = logging.getLogger("dio.gateway")

FILES_PATH = "/v1/files"


def create_app(settings: GatewaySettings | None = None, hooks: GatewayHooks | None = None) -> Any:
    """Build the gateway's ASGI app (FastAPI, wrapped in the body-size limit)."""
    settings = settings or GatewaySettings()
    hooks = hooks or GatewayHooks()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pools = AsyncClientPools(settings, make=_bounded(AsyncClient, settings.gateway_redis_connections))
        client = pools.home
        sync_client = Client(settings)
        catalog = ModelCatalog(client.redis, client.base_keys, settings.gateway_models_cache_s, settings.shard_by_model)
        app.state.gateway = Gateway(settings, pools, sync_client, catalog, hooks, settings.key_set())
        try:
            yield
        finally:
            await pools.close()
            sync_client.close()

    app = FastAPI(title="DIO gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.include_router(health.router)
    _serve_metrics(app, hooks)
    for router in (health.models_router, completions.router, batch_routes.router):
        app.include_router(router, dependencies=[Depends(_require_key)])
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(404, _no_route)
    app.add_exception_handler(405, _no_route)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit, limit_for=lambda path: _body_limit(settings, path))
    app.add_middleware(Observed, hooks=hooks)
    return app


Factory = Callable[[ClientSettings], AsyncClient]


def _bounded(make: Factory, connections: int) -> Factory:
    """Wrap a client factory so that each client's connection pool holds at most ``connections``."""

    def made(settings: ClientSettings) -> AsyncClient:
        client = make(settings)
        pool = getattr(client.redis, "connection_pool", None)  # a Redis Cluster client has one per node
        if pool is not None:
            pool.max_connections = connections
        return client

    return made


def _serve_metrics(app: FastAPI, hooks: GatewayHooks) -> None:
    """Serve Prometheus's ``GET /metrics`` (no API key, like /health) when the hooks keep metrics."""
    registry = getattr(hooks, "registry", None)  # dio.ops.gateway.metrics.GatewayMetrics
    if registry is None:
        return
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _body_limit(settings: GatewaySettings, path: str) -> int:
    if path == FILES_PATH:
        return settings.max_batch_file_bytes + FILE_BODY_OVERHEAD_BYTES
    return settings.gateway_max_body_bytes


async def _require_key(request: Request) -> None:
    check_api_key(request.url.path, request.headers.get("authorization"), gateway_of(request).api_keys)


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    err = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
    return bad_request(f"{param}: {err.get('msg', 'invalid')}" if param else "invalid request", param).response()


async def _no_route(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    what = "no such route" if status == 404 else "method not allowed"
    return ApiError(status, f"{what}: {request.method} {request.url.path}", "invalid_request_error",
                    "unknown_url" if status == 404 else "method_not_allowed").response()


async def _internal_error(_request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in the gateway", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error").response()


class Observed:
    """ASGI middleware: report each HTTP request's start and end (status, seconds) to the hooks."""

    def __init__(self, app: Any, hooks: GatewayHooks) -> None:
        self.app = app
        self.hooks = hooks

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500
        self.hooks.request_started(scope["path"])

        async def observed_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", scope["path"])  # the template: /v1/batches/{batch_id}
            self.hooks.request_finished(route, status, time.monotonic() - started)
