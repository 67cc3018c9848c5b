"""``dio up`` runs a gateway and prints its URL; the ``openai`` package streams a chat through it."""

from __future__ import annotations

import os
import re
import uuid

import openai
import pytest
import redis

from dio.protocol.connection import delete_keys
from dio.protocol.keys import Keys
from tests.dio_up import running_dio_up
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GATEWAY_LINE = re.compile(r"gateway: (http://127\.0\.0\.1:\d+) \(OpenAI base_url (\S+)\)")


def test_dio_up_prints_the_gateway_url_and_openai_streams_a_chat_with_usage(redis_url: str):
    prefix = f"{{up{uuid.uuid4().hex[:8]}}}:"
    env = {**os.environ, "DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
    args = ["--workers", "H100:1,L4:1", "--time-scale", "50", "--gateway-port", "0", "--no-metrics"]
    try:
        with running_dio_up(args, env) as (up, output):
            wait_for(lambda: any(GATEWAY_LINE.search(line) for line in output) or up.poll() is not None, 60,
                     "dio up to print the gateway's URL")
            found = next((m for m in map(GATEWAY_LINE.search, output) if m), None)
            assert found is not None, "".join(output)
            url, base_url = found.groups()
            assert base_url == f"{url}/v1"
            client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
            model = client.models.list().data[0].id
            stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                                    max_tokens=10, stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
            assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    finally:
        conn = redis.Redis.from_url(redis_url)
        delete_keys(conn, Keys(prefix))
        conn.close()
