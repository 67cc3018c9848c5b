"""The official ``openai`` package against ``dio gateway``: a completion, a chat, a stream, DIO's extra fields.

    dio up &                  # prints the gateway's URL (http://127.0.0.1:8000 by default)
    python examples/openai_chat.py

OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (one of DIO_API_KEYS, when
the gateway has them) are read by the ``openai`` package itself.
"""

from __future__ import annotations

import os

import openai

client = openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                       api_key=os.environ.get("OPENAI_API_KEY", "none"))
model = client.models.list().data[0].id  # the models DIO's live workers serve

# A plain completion.
done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16)
print("completion:", repr(done.choices[0].text), done.usage)

# A chat, with DIO's own fields: its tier, a deadline (504 past it), and permission to shed it (429).
chat = client.chat.completions.create(
    model=model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
    max_tokens=32, extra_body={"tier": "interactive", "deadline_ms": 30_000, "sheddable": True})
print("chat:", repr(chat.choices[0].message.content))

# A stream, with the usage in a last chunk.
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to ten."}],
                                        max_tokens=32, stream=True, stream_options={"include_usage": True})
print("stream: ", end="")
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage is not None:
        print(f"\nusage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens")

# Errors are the package's usual exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as exc:
    print("unknown model:", exc.status_code, exc.code)
