"""What one gateway process holds while it runs: its settings, DIO clients, model catalog and hooks.

Nothing here is request state: every job, file and batch lives in Redis, so gateways are
interchangeable behind a load balancer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from dio.client.client import Client
from dio.client.pools import AsyncClientPools
from dio.ops.gateway.catalog import ModelCatalog
from dio.ops.gateway.errors import bad_request
from dio.ops.gateway.hooks import GatewayHooks
from dio.ops.gateway.settings import GatewaySettings


@dataclass
class Gateway:
    settings: GatewaySettings
    # Completions: one client (one reply stream) for every request this process serves; sharded by
    # model, one per model pool, each made when the first request for its model comes.
    pools: AsyncClientPools
    sync_client: Client  # the Batch API functions, run in a thread pool (the deployment's keys only)
    catalog: ModelCatalog
    hooks: GatewayHooks
    api_keys: frozenset[str]


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


async def json_body(request: Request) -> Any:
    """Return the request's JSON body; ApiError 400 when it is not JSON."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


async def wait_disconnect(request: Request) -> None:
    """Return when the client has gone away (the body was read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
