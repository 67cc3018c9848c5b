"""Warn about ``DIO_*`` environment variables that no DIO setting reads (a typo is otherwise silent).

Every settings class (``CommonSettings`` and its subclasses, ``LogSettings``, ...) reads
``DIO_<FIELD>``; a variable that matches none of those fields, nor one of the few read by hand
(``OTHER_VARIABLES``), is most likely misspelled: ``dio`` prints one warning line for it, with the
closest known name.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Mapping

from pydantic_settings import BaseSettings

PREFIX = "DIO_"
# The modules whose settings classes the check knows; one that is not installed is skipped.
SETTINGS_MODULES = (
    "dio.protocol.settings",
    "dio.protocol.logs",
    "dio.dispatcher.config",
    "dio.gpu_worker.config",
    "dio.client.settings",
    "dio.ops.gateway.settings",
)
# Variables read by hand, not through a settings class.
OTHER_VARIABLES = frozenset({
    "DIO_REDIS_SERVER_BIN",  # dio.ops.redis_server: the redis-server binary to start
    "DIO_VLLM_STANDIN",  # dio.gpu_worker.engine_factory: vLLM's CPU stand-in (dry runs)
    "DIO_TEST_REDIS_URL",  # the test suite's Redis
    "DIO_FUZZ_EXAMPLES",  # the test suite's fuzzing budget
})


def settings_classes() -> list[type[BaseSettings]]:
    """Return every ``BaseSettings`` subclass that the settings modules define (and their subclasses)."""
    for name in SETTINGS_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    found: list[type[BaseSettings]] = []
    todo = list(BaseSettings.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def known_variables(classes: Iterable[type[BaseSettings]]) -> set[str]:
    """Return the ``DIO_*`` names the classes read (those with the ``DIO_`` prefix), and ``OTHER_VARIABLES``."""
    names = set(OTHER_VARIABLES)
    for cls in classes:
        if cls.model_config.get("env_prefix", "").upper() == PREFIX:
            names.update(f"{PREFIX}{field.upper()}" for field in cls.model_fields)
    return names


def unknown_variables(environ: Mapping[str, str], known: set[str]) -> list[tuple[str, str | None]]:
    """Return (name, closest known name or None) for each ``DIO_*`` variable of ``environ`` not in ``known``."""
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(PREFIX) and upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
            out.append((name, close[0] if close else None))
    return out


def warnings(environ: Mapping[str, str]) -> list[str]:
    """Return one warning line per ``DIO_*`` variable that no setting reads."""
    lines = []
    for name, close in unknown_variables(environ, known_variables(settings_classes())):
        hint = f"; did you mean {close}?" if close else ""
        lines.append(f"warning: {name} is not a DIO setting, so it has no effect{hint}")
    return lines
