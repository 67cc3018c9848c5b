"""API keys: with ``DIO_API_KEYS`` set, every ``/v1/`` route wants ``Authorization: Bearer <key>``.

``/health`` and ``/ready`` stay open (load balancers probe them). Keys are compared in constant
time and never logged or echoed.
"""

from __future__ import annotations

import hmac

from dio.ops.gateway.errors import ApiError

PROTECTED_PREFIX = "/v1/"


def check_api_key(path: str, authorization: str | None, keys: frozenset[str]) -> None:
    """Raise ApiError 401 unless ``path`` is open or ``authorization`` carries one of ``keys``."""
    if not keys or not path.startswith(PROTECTED_PREFIX):
        return
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    # Every key is compared (no early exit): the time taken does not tell which key came close.
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
    if scheme.lower() != "bearer" or not any(matches):
        raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>' with a key from "
                       "DIO_API_KEYS", "invalid_request_error", "invalid_api_key")
