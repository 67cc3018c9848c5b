"""One parser of OpenAI bodies' ``prompt`` and ``messages`` (no Redis)."""

from __future__ import annotations

import pytest

from dio.protocol.openai import messages_to_prompt, parse_prompt, parse_prompts


@pytest.mark.parametrize(
    "value, prompts",
    [
        ("hi", ["hi"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["only one"], ["only one"]),
        ([[4, 5]], [[4, 5]]),
        (["a", [1], "b"], ["a", [1], "b"]),  # several prompts (the simulated server answers each)
    ],
)
def test_prompts_are_text_or_token_ids(value, prompts):
    assert parse_prompts(value) == prompts


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "must not be empty"),
        ([], "a list of token ids"),  # neither a token list nor a list of prompts
        ([1.5], "a list of token ids"),
        ([True], "a list of token ids"),  # a bool is no token id
        ([[1], []], "a list of token ids"),  # an empty token list inside
        ({"a": 1}, "a list of token ids"),
        (None, "a list of token ids"),
        ([3, -1], "negative"),
        (["a", ""], "must not be empty"),
    ],
)
def test_bad_prompts_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match="'prompt'") as info:
        parse_prompts(value)
    assert message in str(info.value)


def test_parse_prompt_takes_exactly_one():
    assert parse_prompt(["x"]) == "x" and parse_prompt([7, 8]) == [7, 8]
    with pytest.raises(ValueError, match="one prompt, not a list of 2"):
        parse_prompt(["a", "b"])


TEXT_PARTS = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]


@pytest.mark.parametrize(
    "messages, prompt",
    [
        ([{"role": "user", "content": "hi"}], "user: hi"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT_PARTS}],
         "system: Be brief.\nuser: Hi there"),  # text parts are joined as they are
        ([{"role": "developer", "content": "d"}, {"role": "assistant", "content": None, "tool_calls": []},
          {"role": "tool", "content": "42", "tool_call_id": "t1"}],
         "developer: d\nassistant: \ntool: 42"),  # an assistant turn with only tool calls renders empty
        ([{"role": "user", "content": "", "name": "ann"}], "user: "),  # other message keys are ignored
    ],
)
def test_messages_render_one_line_each(messages, prompt):
    assert messages_to_prompt(messages) == prompt


@pytest.mark.parametrize(
    "messages, message",
    [
        (None, "'messages' must be a non-empty list"),
        ([], "'messages' must be a non-empty list"),
        ("user: hi", "'messages' must be a non-empty list"),
        (["hi"], "messages[0] must be an object"),
        ([{"content": "no role"}], "messages[0].role must be one of"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "not 'robot'"),
        ([{"role": "user", "content": None}], "messages[0].content must be a string or a list of text parts"),
        ([{"role": "user"}], "messages[0].content"),  # content missing: only an assistant may omit it
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text parts"),
        ([{"role": "user", "content": [{"type": "text"}]}], "text parts"),  # a text part without text
        ([{"role": "user", "content": 7}], "messages[0].content"),
    ],
)
def test_bad_messages_say_which_one(messages, message):
    with pytest.raises(ValueError) as info:
        messages_to_prompt(messages)
    assert message in str(info.value)
