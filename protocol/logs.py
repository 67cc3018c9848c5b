"""One logging setup for every DIO process: a level and a format, text or JSON lines.

``setup_logging()`` reads ``DIO_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) and ``DIO_LOG_FORMAT``
(``text``, or ``json``: one JSON object a line, for a log pipeline); the ``dio`` command's
``--log-level`` and ``--log-format`` set the same variables, so the processes ``dio up`` starts
log alike.

Lifecycle events are one line each with a stable wording, logged through ``event()``: the
``event`` name and its fields ride along in ``extra``, and the JSON format prints them as keys
(``{"event": "worker_dead", "worker": "L4-1", ...}``), so a pipeline matches on them, not on the
text. The names are the constants below.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Lifecycle events (the ``event`` key of a JSON line).
WORKER_JOINED = "worker_joined"  # the dispatcher sees a new worker
WORKER_REJOINED = "worker_rejoined"  # a worker declared dead (or that left) registered again
WORKER_LEFT = "worker_left"  # a worker deregistered after draining (SIGTERM)
WORKER_DEAD = "worker_dead"  # a worker's heartbeat expired: the dispatcher takes its jobs back
JOBS_REQUEUED = "jobs_requeued"  # jobs of a dead worker put back on the intake
WORKER_DRAINED = "worker_drained"  # a stopping worker's in-flight jobs finished (or the drain timed out)
LEASE_GAINED = "lease_gained"  # this dispatcher became the active one
LEASE_LOST = "lease_lost"  # another dispatcher holds the lease now: this one stands by
LEASE_RELEASED = "lease_released"  # a stopping dispatcher handed the lease over

EVENT_ATTR = "dio_event"  # the LogRecord attribute that carries an event's name and fields
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
Format = Literal["text", "json"]


class LogSettings(BaseSettings):
    """``DIO_LOG_LEVEL`` and ``DIO_LOG_FORMAT``."""

    model_config = SettingsConfigDict(env_prefix="DIO_", extra="ignore")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Format = "text"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: ts, level, logger, message, then an event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, EVENT_ATTR, None) or {})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str | None = None, fmt: str | None = None) -> LogSettings:
    """Send every logger's records to stderr at ``level`` in ``fmt`` (None: from ``DIO_LOG_*``).

    Raises pydantic.ValidationError for a level or format that does not exist.
    """
    given: dict[str, Any] = {name: value for name, value in (("log_level", level), ("log_format", fmt)) if value}
    settings = LogSettings(**given)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    return settings


def event(logger: logging.Logger, level: int, name: str, message: str, *args: object, **fields: Any) -> None:
    """Log a lifecycle event: ``message % args`` as the text, ``name`` and ``fields`` as JSON keys."""
    logger.log(level, message, *args, extra={EVENT_ATTR: {"event": name, **fields}})
