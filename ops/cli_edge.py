"""What surrounds every ``dio`` command: the options they all take, and one line for an operator's mistake.

Every command takes ``--redis-url``, ``--log-level`` and ``--log-format``; each sets its ``DIO_*``
variable, so the command's settings, and every process it starts, read it. An operator's mistake
(Redis unreachable, a bad setting, an engine that is not installed) ends the command with one
``error:`` line and exit code 2, never a traceback; a bug keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import urlsplit

import redis
from pydantic import ValidationError
from pydantic_settings import SettingsError

from dio.protocol.connection import connection_options, redact_url
from dio.protocol.settings import DEFAULT_REDIS_URL, CommonSettings

EXIT_OPERATOR_ERROR = 2
PING_TIMEOUT_S = 1.0  # a daemon's start-up check of Redis gives up after this long
# Options every command takes (dio --help lists them), and the variable each sets.
COMMON_OPTIONS = {"--redis-url": "DIO_REDIS_URL", "--log-level": "DIO_LOG_LEVEL", "--log-format": "DIO_LOG_FORMAT"}
VLLM_MISSING = "--engine vllm needs vLLM, which is not installed here: pip install 'dio[vllm]' (on a GPU machine)"
SECRET_FIELDS = frozenset({"redis_password"})


def take_common_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split the ``COMMON_OPTIONS`` (``--flag VALUE`` or ``--flag=VALUE``, anywhere before ``--``) off ``argv``.

    Returns the arguments left for the command and the variables the options set. Taken off
    before the command line is parsed, they work on every command, before or after its name.
    """
    rest: list[str] = []
    found: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
            break
        flag, eq, value = arg.partition("=")
        if flag not in COMMON_OPTIONS:
            rest.append(arg)
            continue
        given = value if eq else next(args, None)
        if given is None:
            raise UsageError(f"{flag} needs a value")
        found[COMMON_OPTIONS[flag]] = given
    return rest, found


class UsageError(ValueError):
    """A common option given without its value."""


def error_line(exc: BaseException) -> str | None:
    """Return the one line that explains an operator's mistake, or None for anything else (a bug)."""
    if isinstance(exc, redis.AuthenticationError):
        return (f"the Redis at {configured_url()} refused DIO's credentials ({_scrub(exc)}): check the password "
                "in the URL or DIO_REDIS_PASSWORD, and DIO_REDIS_USERNAME for an ACL user")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return (f"cannot reach Redis at {configured_url()} ({_scrub(exc)}): check that redis-server runs there, "
                "the host, port and database in DIO_REDIS_URL (or --redis-url), any firewall in between, "
                "and rediss:// for a TLS server")
    if isinstance(exc, ValidationError):
        return bad_settings_line(exc)
    if isinstance(exc, SettingsError):
        return unparsable_setting_line(exc)
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "vllm":
        return VLLM_MISSING
    return None


def bad_settings_line(exc: ValidationError) -> str:
    """Name each bad setting, its value (a password masked) and what is allowed, on one line."""
    if not exc.title.endswith("Settings"):  # a model other than a settings object: its own words
        return f"invalid {exc.title}: " + "; ".join(f"{_loc(e)}: {e['msg']}" for e in exc.errors())
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        parts.append(f"DIO_{field.upper()} = {_shown(field, error.get('input'))}: {error['msg']}")
    return "bad setting " + "; ".join(parts)


def unparsable_setting_line(exc: SettingsError) -> str:
    """Name a setting whose variable is not valid JSON (a dict or list field), with its value."""
    match = re.search(r'field "(\w+)"', str(exc))
    if match is None:
        return f"bad setting: {exc}"
    field = match.group(1)
    variable = f"DIO_{field.upper()}"
    value = next((v for k, v in os.environ.items() if k.upper() == variable), None)
    cause = f" ({exc.__cause__})" if exc.__cause__ else ""
    return f"bad setting {variable} = {_shown(field, value)}: not valid JSON{cause}"


def warn_if_unreachable(settings: CommonSettings, log: logging.Logger) -> None:
    """Log one warning, with the URL and what to check, when no Redis answers a daemon at its start.

    A daemon does not exit over it (it waits for Redis, as in any outage): under Compose or
    systemd, Redis may come up after it.
    """
    if "+cluster" in urlsplit(settings.redis_url).scheme:
        return  # a cluster's seed node is checked by its own client
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=PING_TIMEOUT_S,
                                  socket_timeout=PING_TIMEOUT_S, **connection_options(settings))
    try:
        client.ping()
    except redis.RedisError as exc:
        log.warning("%s; waiting for it", error_line(exc) or exc)
    finally:
        client.close()


def configured_url() -> str:
    """Return the Redis URL the settings read (``DIO_REDIS_URL`` or the default), its password masked."""
    return redact_url(os.environ.get("DIO_REDIS_URL") or DEFAULT_REDIS_URL)


def _shown(field: str, value: Any) -> str:
    if field in SECRET_FIELDS:
        return "'***'"
    if field == "redis_url" and isinstance(value, str):
        return repr(redact_url(value))
    return repr(value)


def _loc(error: Any) -> str:
    return ".".join(str(part) for part in error["loc"]) or "value"


def _scrub(exc: BaseException) -> str:
    """Return the exception's text without any password the environment holds."""
    text = str(exc)
    password = os.environ.get("DIO_REDIS_PASSWORD")
    return text.replace(password, "***") if password else text
