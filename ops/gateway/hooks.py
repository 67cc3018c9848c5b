"""Observer hooks of the gateway: every hook is a no-op here; a subclass overrides what it needs.

This is where metrics plug in (a Prometheus exporter subclasses ``GatewayHooks`` and serves its
registry on its own port, ``dio.ops.gateway.server.run``'s ``extra_servers``). Hooks are called on
the event loop and must not block.
"""

from __future__ import annotations


class GatewayHooks:
    """What the gateway reports as it serves; override any subset."""

    def request_started(self, route: str) -> None:
        """A request reached ``route`` (e.g. "/v1/chat/completions")."""

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        """A request's answer went out (for a stream: its last event), ``seconds`` after it arrived."""

    def jobs_submitted(self, route: str, model: str, count: int) -> None:
        """``count`` DIO jobs were submitted for one request (``n`` choices × prompts)."""

    def first_token(self, route: str, model: str, seconds: float) -> None:
        """A stream's first text went out, ``seconds`` after the request arrived."""

    def tokens(self, route: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """A request ended with this usage."""

    def client_disconnected(self, route: str, jobs_cancelled: int) -> None:
        """The client went away before its answer; its unfinished jobs were cancelled."""
