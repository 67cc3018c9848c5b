"""OpenAI request bodies: a completions ``prompt`` or a chat ``messages`` list, validated into prompts.

DIO routes requests without the served model's chat template (a worker may serve any model), so
chat messages become one text prompt through a fallback template: one line per message, in order,
``<role>: <text>``, joined by newlines, with nothing added (no generation prompt). For example
``[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]`` becomes
``"system: Be brief.\\nuser: Hi"``.

Every function raises ValueError with a message naming the offending field (``prompt``,
``messages[1].content``), fit to answer a client with.
"""

from __future__ import annotations

from typing import Any

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


def messages_to_prompt(messages: Any) -> str:
    """Validate chat ``messages`` and render them with the fallback template (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    return "\n".join(_message_line(i, message) for i, message in enumerate(messages))


def _message_line(i: int, message: Any) -> str:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] must be an object with a 'role' and a 'content'")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {role!r}")
    return f"{role}: {_content_text(i, role, message.get('content'))}"


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
