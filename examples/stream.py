"""Stream an answer as it is generated, with the SDK (sync, then asyncio).

    dio up &
    python examples/stream.py
"""

from __future__ import annotations

import asyncio

from dio import AsyncClient, Client


def sync_stream() -> None:
    with Client() as dio:
        handle = dio.submit("Write a haiku about Redis.", max_tokens=40, stream=True)
        stream = handle.stream(timeout=60)
        for event in stream:
            print(event.text, end="", flush=True)
            if event.result is not None:  # the last event: the job's final result
                print(f"\n[{event.result.status.value}, {event.output_tokens} tokens, first token after "
                      f"{stream.ttft_s * 1000:.0f} ms]")


async def async_stream() -> None:
    async with AsyncClient() as dio:
        handle = await dio.submit("Write a haiku about GPUs.", max_tokens=40, stream=True)
        async for event in handle.stream(timeout=60):
            print(event.text, end="", flush=True)
        print()


if __name__ == "__main__":
    sync_stream()
    asyncio.run(async_stream())
