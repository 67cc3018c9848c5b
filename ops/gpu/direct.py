"""One vLLM engine driven straight (no Redis), in a child process of ``dio.ops.gpu.measure``.

    python -m dio.ops.gpu.direct JOB.json RESULT.json

Each engine runs in its own child process: when the child exits, every byte of GPU memory the
engine took is free again (the next engine's memory profiling must not see it go), and no vLLM
state outlives one engine. The job (JSON) names a task:

- ``overhead``: a burst of requests sent at once (``loaded``), then the same engine's latency for
  requests sent one at a time (``unloaded``); per-request records, times relative to the burst.
- ``calibration``: time to first token of one request alone per prompt length (``max_tokens`` 1),
  and the decode step time per batch size (prompts of ``decode_prompt`` tokens, ``decode_tokens``
  new tokens, all at once; step = (latency - TTFT) / (new tokens - 1)).

Prompts are token ids from ``dio.ops.gpu.scenarios.prompt_ids``: the same (tag, index) gives the same
ids here and in a request sent through DIO.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dio.gpu_worker.engine import EngineRequest
from dio.gpu_worker.engine_factory import standin_backend
from dio.gpu_worker.vllm_engine import VllmEngine, read_model_config, resolve_model
from dio.ops.gpu.scenarios import eager_from_env, prompt_ids

WARMUP = (8, 64, 16)  # requests, prompt tokens, new tokens


def make_engine(job: dict[str, Any]) -> VllmEngine:
    """Build the job's engine: the real vLLM, or the CPU stand-in for dry runs."""
    options = dict(job["engine"])
    options.setdefault("enforce_eager", eager_from_env())
    backend = None
    if job.get("standin_step_s"):
        backend = standin_backend(job["standin_step_s"], options["gpu_memory_utilization"])
    return VllmEngine(options.pop("model"), backend=backend, **options)


def vocab_size(model: str) -> int:
    return int(read_model_config(resolve_model(model)).get("vocab_size") or 32000)


class Driver:
    """Send requests of fresh token ids to one started engine and time them (wall clock)."""

    def __init__(self, engine: VllmEngine, vocab: int) -> None:
        self.engine = engine
        self.vocab = vocab

    def request(self, tag: str, index: int, prompt_tokens: int, max_tokens: int) -> EngineRequest:
        ids = prompt_ids(tag, index, prompt_tokens, self.vocab)
        return EngineRequest(id=f"{tag}-{index}", prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                             prompt_token_ids=ids, ignore_eos=True)

    async def timed(self, request: EngineRequest, t0: float) -> dict[str, Any]:
        """Run one request; return its TTFT and latency in ms from ``t0`` (its own start if t0 is 0)."""
        start = time.time()
        t0 = t0 or start
        out = await self.engine.generate(request)
        done = time.time()
        first = out.first_token_at
        return {
            "prompt_tokens": request.prompt_tokens,
            "output_tokens": out.output_tokens,
            "ttft_ms": None if first is None else round((first - t0) * 1000.0, 2),
            "latency_ms": round((done - t0) * 1000.0, 2),
            "decode_ms": None if first is None else round((done - first) * 1000.0, 2),
            "finish_reason": out.finish_reason,
        }

    async def burst(self, tag: str, lengths: list[tuple[int, int]]) -> tuple[list[dict[str, Any]], float]:
        """Send every request at once; return the records (times from the burst's start) and its wall."""
        requests = [self.request(tag, i, p, o) for i, (p, o) in enumerate(lengths)]
        t0 = time.time()
        records = await asyncio.gather(*(self.timed(r, t0) for r in requests))
        return list(records), time.time() - t0

    async def one_by_one(self, tag: str, lengths: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """Send the requests one at a time, each after the previous ended."""
        return [await self.timed(self.request(tag, i, p, o), 0.0) for i, (p, o) in enumerate(lengths)]


async def with_engine(job: dict[str, Any], task) -> dict[str, Any]:
    """Start the job's engine, warm it up, run ``task(driver)``, shut the engine down."""
    model = job["engine"]["model"]
    engine = make_engine(job)
    start = time.perf_counter()
    await engine.start()
    result: dict[str, Any] = {"engine_start_s": round(time.perf_counter() - start, 1),
                              "engine_args": engine.engine_args(), "capacity": asdict(engine.capacity())}
    print(f"[direct] {model}: engine started in {result['engine_start_s']} s", flush=True)
    try:
        driver = Driver(engine, vocab_size(model))
        n, prompt, new = WARMUP
        await driver.burst("warmup", [(prompt, new)] * n)
        preempted = engine.stats().preemptions
        result.update(await task(driver))
        result["preemptions"] = engine.stats().preemptions - preempted
    finally:
        await engine.shutdown()
    return result


async def overhead(job: dict[str, Any]) -> dict[str, Any]:
    """The direct half of the overhead measurement: a burst, then requests one at a time."""

    async def task(driver: Driver) -> dict[str, Any]:
        loaded = [tuple(x) for x in job["loaded"]]
        records, wall = await driver.burst(job["tag"], loaded)
        print(f"[direct] burst of {len(loaded)}: {wall:.2f} s", flush=True)
        unloaded = await driver.one_by_one(job["tag"] + "-u", [tuple(x) for x in job["unloaded"]])
        print(f"[direct] {len(unloaded)} requests one at a time done", flush=True)
        return {"loaded": records, "loaded_wall_s": round(wall, 4), "unloaded": unloaded}

    return await with_engine(job, task)


async def calibration(job: dict[str, Any]) -> dict[str, Any]:
    """Prefill time per prompt length and decode step time per batch size of one model."""

    async def task(driver: Driver) -> dict[str, Any]:
        prefill = []
        for prompt in job["prefill_tokens"]:
            runs = [await driver.timed(driver.request(f"pf{prompt}", r, prompt, 1), 0.0)
                    for r in range(job["repeats"])]
            ttfts = [r["ttft_ms"] for r in runs if r["ttft_ms"] is not None]
            prefill.append({"prompt_tokens": prompt, "ttft_ms": ttfts,
                            "ttft_median_ms": round(statistics.median(ttfts), 3) if ttfts else None})
            print(f"[direct] prefill {prompt}: {prefill[-1]['ttft_median_ms']} ms", flush=True)
        decode = []
        prompt, new = job["decode_prompt"], job["decode_tokens"]
        for batch in job["decode_batches"]:
            records, wall = await driver.burst(f"dec{batch}", [(prompt, new)] * batch)
            steps = [r["decode_ms"] / (r["output_tokens"] - 1) for r in records
                     if r["decode_ms"] is not None and r["output_tokens"] > 1]
            decode.append({"batch": batch, "prompt_tokens": prompt, "new_tokens": new, "wall_s": round(wall, 4),
                           "step_median_ms": round(statistics.median(steps), 4) if steps else None,
                           "step_min_ms": round(min(steps), 4) if steps else None,
                           "ttft_median_ms": round(statistics.median(r["ttft_ms"] for r in records), 3)})
            print(f"[direct] decode batch {batch}: {decode[-1]['step_median_ms']} ms/step", flush=True)
        return {"prefill": prefill, "decode": decode}

    return await with_engine(job, task)


TASKS = {"overhead": overhead, "calibration": calibration}


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    job = json.loads(Path(job_path).read_text())
    result = asyncio.run(TASKS[job["task"]](job))
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
