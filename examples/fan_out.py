"""Fan out many requests from asyncio with AsyncClient, and take the answers as they finish.

    dio up &
    python examples/fan_out.py
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from dio import AsyncClient

QUESTIONS = [f"Give me fact number {i} about the ocean." for i in range(50)]


async def main() -> None:
    async with AsyncClient() as dio:
        started = time.monotonic()
        handles = await dio.submit_many([{"prompt": q, "max_tokens": 32} for q in QUESTIONS])
        by_worker: Counter[str] = Counter()
        async for handle in dio.as_completed(handles, timeout=120):  # as they finish, not in order
            result = await handle.result(raise_on_error=False)
            by_worker[result.worker if result.status.value == "completed" else result.status.value] += 1
        elapsed = time.monotonic() - started
        print(f"{len(handles)} answers in {elapsed:.1f} s; by worker: {dict(sorted(by_worker.items()))}")


if __name__ == "__main__":
    asyncio.run(main())
