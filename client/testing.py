"""EchoBackend: a stand-in for the dispatcher and the workers, for tests of code using the SDK.

It reads the intake stream in a thread and ends every request through the real finish script,
so a client sees exactly the job hashes and reply notices the real system writes. What each
request gets is decided by ``decide`` (default: ``echo_decide``, driven by the prompt text).
Not for production: it reads the intake without a consumer group and does no inference.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from dio.protocol.connection import connect
from dio.protocol.keys import REQUEST_FIELD
from dio.protocol.models import JobResult, JobStatus, Request
from dio.protocol.scripts import Scripts
from dio.protocol.settings import CommonSettings

# decide(request) -> the terminal result to write, or None to leave the job running forever.
Decide = Callable[[Request], JobResult | None]

WORKER_ID = "echo-worker"


def echo_decide(req: Request) -> JobResult | None:
    """Complete with the prompt echoed; prompts starting with a keyword get other outcomes.

    ``reject...``: rejected with a reason and a retry-after hint; ``fail...``: failed;
    ``hang...``: never finished. Token-id prompts complete with their ids reversed.
    """
    text = req.prompt or ""
    now = time.time()
    base = {"id": req.id, "worker": WORKER_ID, "submitted_at": req.submitted_at, "finished_at": now}
    if text.startswith("hang"):
        return None
    if text.startswith("reject"):
        return JobResult(status=JobStatus.rejected, reason="overloaded: no worker has room", retry_after_s=2.5,
                         **base)
    if text.startswith("fail"):
        return JobResult(status=JobStatus.failed, error="CUDA out of memory", **base)
    ids = list(reversed(req.prompt_token_ids or []))
    output = f"echo: {text}" if req.prompt is not None else None
    return JobResult(status=JobStatus.completed, output=output, output_token_ids=ids or None,
                     prompt_tokens=req.prompt_tokens, output_tokens=max(1, len(ids)), first_token_at=now,
                     **base)


class EchoBackend:
    """Answer every request on the intake stream in a background thread (use as a context manager).

    Args:
        notify: when False, no reply notice is sent (the job hash alone is written), as if every
            notice had been lost.
        delay_s: seconds to wait before answering each batch of requests.
    """

    def __init__(self, settings: CommonSettings, decide: Decide = echo_decide, *, notify: bool = True,
                 delay_s: float = 0.0) -> None:
        self.keys = settings.keys
        self.decide = decide
        self.notify = notify
        self.delay_s = delay_s
        self.seen: list[Request] = []
        self._redis = connect(settings)
        self._scripts = Scripts(self._redis, self.keys)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dio-echo-backend", daemon=True)

    def __enter__(self) -> EchoBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._redis.close()

    def _run(self) -> None:
        last_id = "0-0"
        while not self._stopping.is_set():
            try:
                replies = self._redis.xread({self.keys.intake: last_id}, count=500, block=100)
                for _stream, entries in replies or []:
                    last_id = entries[-1][0]
                    self._answer([Request.model_validate_json(fields[REQUEST_FIELD]) for _id, fields in entries])
            except redis.RedisError:
                return  # the test is over (its keys were deleted, or Redis went away)

    def _answer(self, reqs: list[Request]) -> None:
        if self.delay_s:
            self._stopping.wait(self.delay_s)
        pipe = self._redis.pipeline(transaction=False)
        for req in reqs:
            self.seen.append(req)
            result = self.decide(req)
            if result is not None:
                self._scripts.finish(pipe, result, req.reply_to if self.notify else None)
        pipe.execute()
