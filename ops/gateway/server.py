"""Run the gateway on uvicorn: ``dio gateway`` (and ``dio up``) call ``run``.

``run`` serves the app and any ``extra_servers`` (e.g. a metrics endpoint on its own port) in one
event loop, and stops them all on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

from dio.ops.gateway.hooks import GatewayHooks
from dio.ops.gateway.settings import GatewaySettings

MISSING = "the gateway needs FastAPI, uvicorn, python-multipart and jinja2: pip install 'dio[server]'"


def missing_dependency() -> str | None:
    """Return the one-line install hint when the gateway's dependencies are missing, else None."""
    needed = ("fastapi", "uvicorn", "multipart", "jinja2")  # multipart: python-multipart, for file uploads
    return MISSING if any(importlib.util.find_spec(name) is None for name in needed) else None


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def make_server(settings: GatewaySettings, hooks: GatewayHooks | None = None) -> Any:
    """Return a uvicorn Server for the gateway app (not started)."""
    import uvicorn

    from dio.ops.gateway.app import create_app

    config = uvicorn.Config(create_app(settings, hooks), host=settings.gateway_host, port=settings.gateway_port,
                            log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def bound_port(server: Any) -> int:
    """Return the port a started uvicorn Server listens on (the one the OS chose for port 0)."""
    return int(server.servers[0].sockets[0].getsockname()[1])


def run(settings: GatewaySettings, hooks: GatewayHooks | None = None, extra_servers: Sequence[Any] = (),
        on_started: Callable[[str], None] = lambda url: None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers stop the first server; the others follow).

    ``on_started`` gets the gateway's URL once it listens.
    """
    servers = [make_server(settings, hooks), *extra_servers]

    async def serve_all() -> None:
        main = asyncio.ensure_future(servers[0].serve())
        others = [asyncio.ensure_future(s.serve()) for s in servers[1:]]
        while not servers[0].started and not main.done():
            await asyncio.sleep(0.02)
        if servers[0].started:
            on_started(url_of(settings.gateway_host, bound_port(servers[0])))
        await main
        for server in servers[1:]:
            server.should_exit = True
        await asyncio.gather(*others)

    asyncio.run(serve_all())


def run_cli(host: str | None, port: int | None) -> None:
    """``dio gateway``: serve with the DIO_* settings (``host`` and ``port`` win), print the URL when up."""
    overrides: dict[str, Any] = {k: v for k, v in (("gateway_host", host), ("gateway_port", port)) if v is not None}
    settings = GatewaySettings(**overrides)
    from dio.ops.gateway.metrics import GatewayMetrics

    run(settings, GatewayMetrics(),
        on_started=lambda url: print(f"DIO gateway at {url} (OpenAI base_url {url}/v1)", flush=True))
