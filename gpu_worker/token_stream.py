"""Publish streaming jobs' text deltas on their token streams, many jobs in one pipeline per flush.

Only jobs submitted with ``stream=True`` come here; the others cost nothing. Each run of a job
(one attempt on this worker) gets a fresh run id; its deltas wait in memory, merged per run, until
the daemon's next flush queues them (one ``XADD ... MAXLEN ~`` and one ``EXPIRE`` per job) ahead of
the finish scripts of the same pipeline, so a client that reads the job's result finds every delta
before it. The end marker follows the finish script. Memory stays bounded: a stream holds at most
about ``maxlen`` entries, lives ``ttl_s`` after its last write while the job runs (a worker that
dies leaves nothing forever) and ``end_ttl_s`` after its end (the client deletes it once read).

Entry layout and the reader's side: ``dio.client.stream``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from dio.gpu_worker.engine import EngineOutput
from dio.protocol.keys import (
    TOKEN_COUNT_FIELD,
    TOKEN_END_FIELD,
    TOKEN_OFFSET_FIELD,
    TOKEN_RUN_FIELD,
    TOKEN_TEXT_FIELD,
    Keys,
)

RUN_ID_CHARS = 12


@dataclass
class _Run:
    """One run of a streaming job: what it has published (or queued) so far."""

    job_id: str
    run_id: str
    length: int = 0  # characters of text handed to the publisher
    tokens: int = 0


@dataclass
class Delta:
    """Text of one run waiting for the next flush (merged from any number of engine outputs)."""

    job_id: str
    run_id: str
    offset: int  # characters of the run's text before ``pieces``
    tokens: int
    pieces: list[str] = field(default_factory=list)

    def fields(self) -> dict[str, str]:
        return {TOKEN_RUN_FIELD: self.run_id, TOKEN_OFFSET_FIELD: str(self.offset),
                TOKEN_TEXT_FIELD: "".join(self.pieces), TOKEN_COUNT_FIELD: str(self.tokens)}


class TokenPublisher:
    """Keep the runs of one worker's streaming jobs and queue their deltas on a pipeline."""

    def __init__(self, keys: Keys, *, maxlen: int, ttl_s: float, end_ttl_s: float) -> None:
        self.keys = keys
        self.maxlen = maxlen
        self.ttl_s = max(1, int(ttl_s))
        self.end_ttl_s = max(1, int(end_ttl_s))
        self._runs: dict[str, _Run] = {}  # job id -> its run on this worker
        self._pending: dict[str, Delta] = {}  # run id -> its text not yet queued

    def begin(self, job_id: str) -> None:
        """Start a run of ``job_id`` (a fresh run id: a reader tells a restart by it)."""
        self._runs[job_id] = _Run(job_id, uuid.uuid4().hex[:RUN_ID_CHARS])

    def add(self, job_id: str, out: EngineOutput) -> bool:
        """Take an engine output's new text; return True when something waits for the next flush."""
        run = self._runs.get(job_id)
        if run is None:
            return False
        if out.text_delta is not None:
            piece = out.text_delta
        elif out.text is not None:
            piece = out.text[run.length:]  # an engine that gives cumulative text only
        else:
            piece = ""
        if not piece and out.output_tokens <= run.tokens:
            return False
        delta = self._pending.get(run.run_id)
        if delta is None:
            delta = self._pending[run.run_id] = Delta(job_id, run.run_id, run.length, out.output_tokens)
        delta.pieces.append(piece)
        delta.tokens = run.tokens = max(run.tokens, out.output_tokens)
        run.length += len(piece)
        return True

    def close(self, job_id: str) -> str | None:
        """End the job's run here; return its run id (for the end marker), None if it had none."""
        run = self._runs.pop(job_id, None)
        return None if run is None else run.run_id

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> list[Delta]:
        """Return the deltas waiting for a flush (``restore`` them if it fails)."""
        taken, self._pending = list(self._pending.values()), {}
        return taken

    def restore(self, deltas: list[Delta]) -> None:
        """Put back deltas a failed flush did not write, in front of what came since.

        A flush whose reply was lost may have written some: a reader takes a delta sent twice once.
        """
        for delta in deltas:
            newer = self._pending.get(delta.run_id)
            if newer is not None:
                delta.pieces += newer.pieces
                delta.tokens = max(delta.tokens, newer.tokens)
            self._pending[delta.run_id] = delta

    def queue_deltas(self, pipe: Any, deltas: list[Delta]) -> int:
        """Queue the deltas on ``pipe``; return how many commands that made."""
        for delta in deltas:
            key = self.keys.tokens(delta.job_id)
            pipe.xadd(key, delta.fields(), maxlen=self.maxlen, approximate=True)
            pipe.expire(key, self.ttl_s)
        return 2 * len(deltas)

    def queue_end(self, pipe: Any, job_id: str, run_id: str, status: str) -> int:
        """Queue a run's end marker; return how many commands that made.

        NOMKSTREAM: a stream its reader already deleted (it had the result first) is not made again.
        """
        key = self.keys.tokens(job_id)
        pipe.xadd(key, {TOKEN_RUN_FIELD: run_id, TOKEN_END_FIELD: status}, maxlen=self.maxlen, approximate=True,
                  nomkstream=True)
        pipe.expire(key, self.end_ttl_s)
        return 2
