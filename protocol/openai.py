"""OpenAI request bodies: a completions ``prompt`` or a chat ``messages`` list, validated into prompts.

Chat messages become one text prompt (``messages_to_prompt``). When the workers serving the model
registered their tokenizer's chat template (``WorkerInfo.chat_template``: vLLM workers whose model
folder has one), it is rendered as Hugging Face's ``apply_chat_template`` does, in a sandboxed
jinja2 environment, with ``add_generation_prompt=True``; ``bos_token`` renders empty because the
worker's tokenizer adds it to a text prompt. Without a template (simulated engines, models without a
tokenizer) the fallback applies: one line per message, in order, ``<role>: <text>``, joined by
newlines, with nothing added (no generation prompt). For example
``[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]`` becomes
``"system: Be brief.\\nuser: Hi"``.

Every function raises ValueError with a message naming the offending field (``prompt``,
``messages[1].content``), fit to answer a client with.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from dio.protocol import defaults as d

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# One completions prompt: text, or token ids.
Prompt = str | list[int]


def parse_prompts(value: Any) -> list[Prompt]:
    """Validate a completions ``prompt``: text, token ids, or a non-empty list of either."""
    if isinstance(value, str) or _is_token_list(value):
        return [_checked(value)]
    if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_list(p) for p in value):
        return [_checked(p) for p in value]
    raise ValueError("'prompt' must be a string, a list of token ids, or a non-empty list of either")


def parse_prompt(value: Any) -> Prompt:
    """Validate a completions ``prompt`` that must be one prompt: text, token ids, or a list of one."""
    prompts = parse_prompts(value)
    if len(prompts) != 1:
        raise ValueError(f"'prompt' must be one prompt, not a list of {len(prompts)}")
    return prompts[0]


def _is_token_list(value: Any) -> bool:
    # bool is an int subclass, but True is no token id.
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _checked(prompt: Prompt) -> Prompt:
    if prompt == "":
        raise ValueError("'prompt' must not be empty")
    if isinstance(prompt, list) and min(prompt) < 0:
        raise ValueError("'prompt' token ids must not be negative")
    return prompt


def messages_to_prompt(messages: Any, chat_template: str | None = None, eos_token: str | None = None) -> str:
    """Validate chat ``messages`` and render them as one prompt (see the module docstring).

    Args:
        chat_template: the served model's jinja2 chat template; None renders the fallback.
        eos_token: the tokenizer's end-of-sequence text, for templates that close turns with it.

    Raises ValueError naming the bad message, or saying why the template could not render them.
    """
    turns = _turns(messages)
    if chat_template is None:
        return "\n".join(f"{role}: {text}" for role, text in turns)
    return _render(chat_template, turns, eos_token or "")


def _turns(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    return [_turn(i, message) for i, message in enumerate(messages)]


def _turn(i: int, message: Any) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] must be an object with a 'role' and a 'content'")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {role!r}")
    return role, _content_text(i, role, message.get("content"))


def _content_text(i: int, role: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":  # an assistant turn that only called tools
        return ""
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        return "".join(part["text"] for part in content)
    raise ValueError(f"messages[{i}].content must be a string or a list of text parts "
                     "({'type': 'text', 'text': ...})")


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


# --- the model's chat template -------------------------------------------------------------------


def _render(template: str, turns: list[tuple[str, str]], eos_token: str) -> str:
    """Render ``turns`` with a chat template, as ``apply_chat_template(add_generation_prompt=True)``."""
    import jinja2  # only a model with a template needs it

    messages = [{"role": role, "content": text} for role, text in turns]
    try:
        prompt = _compiled(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                            eos_token=eos_token)
    except jinja2.TemplateError as exc:  # raise_exception() in the template, or a template bug
        raise ValueError(f"the model's chat template cannot render these messages: {exc}") from None
    if len(prompt) > d.MAX_PROMPT_CHARS:
        raise ValueError(f"the rendered chat prompt is longer than {d.MAX_PROMPT_CHARS} characters")
    return prompt


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """Compile a template once, in a sandbox: a template reaches no Python object it was not given."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # transformers' environment: its whitespace settings, loop controls, its globals and tojson.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_tag()])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except Exception as exc:  # jinja2.TemplateSyntaxError: the worker registered a broken template
        raise ValueError(f"the model's chat template does not compile: {exc}") from None


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_tag() -> type:
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): renders its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return list(parser.parse_statements(("name:endgeneration",), drop_needle=True))

    return GenerationTag


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)
