"""The chat template a worker registers: its tokenizer's, read from the model folder.

A Hugging Face tokenizer's ``chat_template`` is the file ``chat_template.jinja`` in the model folder,
else the ``chat_template`` entry of ``tokenizer_config.json`` (a string, or a list of named
templates: the one named ``default``). The gateway renders chat messages with it
(``dio.protocol.openai``). A template longer than ``MAX_CHAT_TEMPLATE_CHARS`` is not registered
(the gateway then uses its fallback) rather than make every read of the worker's hash heavy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dio.protocol.defaults import MAX_CHAT_TEMPLATE_CHARS, MAX_SPECIAL_TOKEN_CHARS

log = logging.getLogger("dio.worker")

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def read_chat_template(model_dir: str | Path) -> tuple[str | None, str | None]:
    """Return (chat template, eos token text) of a local model folder; None for what it lacks."""
    folder = Path(model_dir)
    config = _tokenizer_config(folder / TOKENIZER_CONFIG)
    template = _read_text(folder / TEMPLATE_FILE) or _named_template(config.get("chat_template"))
    if template is not None and len(template) > MAX_CHAT_TEMPLATE_CHARS:
        log.warning("the chat template of %s has %d characters (over %d): not registered; the gateway renders "
                    "chat messages with its fallback", folder, len(template), MAX_CHAT_TEMPLATE_CHARS)
        template = None
    eos = _token_text(config.get("eos_token"))
    return template, eos if eos is not None and len(eos) <= MAX_SPECIAL_TOKEN_CHARS else None


def _tokenizer_config(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    try:
        config = json.loads(text) if text else {}
    except ValueError:
        log.warning("%s is not valid JSON: no chat template registered", path)
        return {}
    return config if isinstance(config, dict) else {}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _named_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return entry["template"]
    return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None
