"""``GET /health`` (the process answers), ``GET /ready`` (it can serve), ``GET /v1/models``."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from dio.ops.gateway import bodies
from dio.ops.gateway.errors import ApiError
from dio.ops.gateway.state import gateway_of

router = APIRouter()  # open: load balancers probe it
models_router = APIRouter()  # under /v1/: behind the API keys


@router.get("/health")
async def health() -> JSONResponse:
    """Liveness: this process runs (nothing else is checked)."""
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: Redis answers, a dispatcher holds the lease, and some worker is alive; else 503 saying which.

    Sharded by model, each pool with a live worker needs its own dispatcher (``dispatchers``: by model).
    """
    gw = gateway_of(request)
    client = gw.pools.home
    try:
        await client.redis.ping()
        models = await gw.catalog.models()
        live = sorted(m.id for m in models.values() if m.available)
        leases = [gw.settings.keys_for(model).lease for model in live] if gw.pools.sharded else [client.keys.lease]
        holders = [await client.redis.get(lease) for lease in leases]
    except redis.RedisError as exc:
        raise ApiError(503, f"not ready: Redis is unreachable ({type(exc).__name__})", "service_unavailable",
                       "not_ready") from None
    missing = []
    if not (holders and all(holders)):
        idle = [m for m, h in zip(live, holders, strict=True) if not h] if gw.pools.sharded else []
        missing.append("no dispatcher holds the lease" + (f" of the pool of {', '.join(idle)}" if idle else ""))
    if not live:
        missing.append("no live worker")
    if missing:
        raise ApiError(503, f"not ready: {'; '.join(missing)}", "service_unavailable", "not_ready")
    if gw.pools.sharded:
        return JSONResponse({"status": "ready", "dispatchers": dict(zip(live, holders, strict=True)), "models": live})
    return JSONResponse({"status": "ready", "dispatcher": holders[0], "models": live})


@models_router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """The models some live worker serves now."""
    models = await gateway_of(request).catalog.models()
    data = [bodies.model_object(m.id, m.created) for m in sorted(models.values(), key=lambda m: m.id) if m.available]
    return JSONResponse({"object": "list", "data": data})


@models_router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> JSONResponse:
    served = (await gateway_of(request).catalog.models()).get(model_id)
    if served is None:
        raise ApiError(404, f"the model {model_id!r} does not exist", "invalid_request_error", "model_not_found")
    return JSONResponse(bodies.model_object(served.id, served.created))
