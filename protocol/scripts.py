"""The Lua scripts of every Redis state transition, with typed Python wrappers.

Each wrapper takes a client or a pipeline, so callers batch many transitions in one round trip.
The scripts themselves (``protocol/lua/*.lua``) document every key and argument they touch.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any

import redis

from dio.protocol import defaults as d
from dio.protocol.keys import DISPATCHER_GROUP, WORKER_GROUP, Keys
from dio.protocol.models import Completion, JobResult

TERMINAL_FIELDS = (
    "status", "worker", "output", "output_token_ids", "prompt_tokens", "output_tokens", "error",
    "reason", "retry_after_s", "first_token_at", "finished_at", "preemptions",
)


# Job-hash fields a result notice carries (every JobResult field but the schema version and id).
NOTICE_FIELDS = ",".join(name for name in JobResult.model_fields if name not in ("v", "id"))


def _stamp(now: float | None) -> str:
    return repr(now if now is not None else time.time())


def _load(name: str) -> str:
    return resources.files("dio.protocol").joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    """Registered Lua scripts on one Redis connection."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._handoff = client.register_script(_load("handoff"))
        self._finish = client.register_script(_load("finish"))
        self._start = client.register_script(_load("start"))
        self._requeue = client.register_script(_load("requeue"))
        self._lease = client.register_script(_load("lease"))

    def lease(self, pipe: Any, name: str, ttl_ms: int) -> Any:
        return self._lease(keys=[self.keys.lease], args=[name, ttl_ms], client=pipe)

    def handoff(self, pipe: Any, entry_id: str, job_id: str, worker_id: str, request_json: str,
                kv_tokens: int, now: float | None = None) -> Any:
        k = self.keys
        return self._handoff(
            keys=[k.intake, k.queue(worker_id), k.job(job_id), k.reserved(worker_id)],
            args=[DISPATCHER_GROUP, entry_id, job_id, worker_id, request_json, kv_tokens, _stamp(now)],
            client=pipe,
        )

    def start(self, pipe: Any, job_id: str, worker_id: str, now: float | None = None) -> Any:
        return self._start(keys=[self.keys.job(job_id)], args=[worker_id, _stamp(now)], client=pipe)

    def requeue(self, pipe: Any, worker_id: str, entry_id: str, job_id: str, request_json: str) -> Any:
        k = self.keys
        return self._requeue(
            keys=[k.queue(worker_id), k.intake, k.job(job_id), k.reserved(worker_id)],
            args=[WORKER_GROUP, entry_id, job_id, request_json],
            client=pipe,
        )

    def finish(
        self,
        pipe: Any,
        result: JobResult,
        reply_to: str | None,
        *,
        ack_stream: str | None = None,
        ack_group: str = "",
        ack_entry: str = "",
        completion: Completion | None = None,
        job_ttl_s: float = d.JOB_TTL_S,
    ) -> Any:
        """Write ``result`` as the job's terminal state (once), ack an entry, notify the client."""
        k = self.keys
        fields: list[str] = []
        data = result.model_dump(mode="json", exclude_none=True)
        for name in TERMINAL_FIELDS:
            if name in data:
                value = data[name]
                fields += [name, json.dumps(value) if isinstance(value, list) else str(value)]
        worker = result.worker or "-"
        notice = NOTICE_FIELDS if reply_to else ""
        return self._finish(
            keys=[k.job(result.id), k.reserved(worker), ack_stream or k.intake, k.completions,
                  k.reply(reply_to or "-")],
            args=[ack_group, ack_entry, result.id, int(job_ttl_s), completion.to_json() if completion else "",
                  notice, d.REPLY_STREAM_MAXLEN, int(d.REPLY_STREAM_TTL_S), d.COMPLETIONS_MAXLEN, *fields],
            client=pipe,
        )
