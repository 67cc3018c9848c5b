"""The worker registry: who serves, with what capacity, and taking work back from the dead.

Workers register themselves (``{dio}:workers``, ``{dio}:worker:<id>``) and heartbeat
(``{dio}:alive:<id>``). The active dispatcher reloads their capabilities and telemetry into the
routing core's ``Cluster``, reloads the KV reservations that the Lua scripts keep in Redis (the
truth; those of jobs that ended are freed on the way), and, when a heartbeat expires, requeues
the worker's unstarted and unfinished jobs onto the intake (``requeue.lua``) so another worker
runs them. A job whose workers died ``MAX_ATTEMPTS`` times is failed instead: it is probably
what kills them (the poison rule). A worker whose heartbeat lapsed only in a stall registers
itself again (``heartbeat.lua``) and is picked up on the next refresh.
"""

from __future__ import annotations

import json
import logging
import time

import redis
from pydantic import ValidationError

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.intake import DEADLETTER_MAXLEN, MAX_DEADLETTER_RAW_CHARS
from dio.dispatcher.predictor_store import PredictorStore
from dio.protocol import defaults as d
from dio.protocol import logs
from dio.protocol.keys import ATTEMPTS_FIELD, DIED_ON_FIELD, JOB_FIELD, REQUEST_FIELD, STATUS_FIELD, Keys
from dio.protocol.models import TERMINAL_STATUSES, JobResult, JobStatus, WorkerInfo, WorkerTelemetry, from_hash
from dio.protocol.scripts import Scripts

log = logging.getLogger("dio.dispatcher")

TAKE_BACK_BATCH = 10_000  # queue entries requeued per refresh; the rest on the next one
TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)  # as job hashes spell them


class WorkerRegistry:
    """Keep ``cluster``'s rows in step with the workers registered in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, scripts: Scripts, cluster: Cluster,
                 predictors: PredictorStore, job_ttl_s: float = d.JOB_TTL_S) -> None:
        self.redis = client
        self.keys = keys
        self.scripts = scripts
        self.cluster = cluster
        self.predictors = predictors
        self.job_ttl_s = job_ttl_s
        self.requeued = 0  # jobs taken back from dead workers, since start
        self.gone: set[str] = set()  # workers that left or were declared dead (one seen again has rejoined)

    def refresh(self) -> None:
        """Reload capabilities and telemetry; take back the queues of dead workers."""
        ids = sorted(self.redis.smembers(self.keys.workers))
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self.keys.worker(worker_id))
            pipe.exists(self.keys.alive(worker_id))
        replies = pipe.execute()
        for i, worker_id in enumerate(ids):
            fields, alive = replies[2 * i], bool(replies[2 * i + 1])
            if alive:
                self._update(worker_id, fields)
            else:
                self.take_back(worker_id, left=_was_draining(fields))

    def _update(self, worker_id: str, fields: dict[str, str]) -> None:
        try:
            info = from_hash(WorkerInfo, fields)
            telemetry = from_hash(WorkerTelemetry, fields)
        except (ValidationError, ValueError):
            log.warning("worker %s has an unreadable hash; ignored", worker_id)
            return
        cluster = self.cluster
        row = cluster.index.get(worker_id)
        if row is None:
            row = cluster.upsert(info)
            self.predictors.restore(cluster, row)
            self.sync_one(row)
            self._log_joined(info)
        elif cluster.infos[row] != info:
            cluster.upsert(info)
        cluster.set_telemetry(row, telemetry, alive=True)

    def take_back(self, worker_id: str, left: bool = False) -> None:
        """A worker's heartbeat expired: requeue everything left in its queue, then forget it.

        Args:
            left: its last heartbeat said it was draining (SIGTERM): it left, it did not die.
        """
        entries = self.redis.xrange(self.keys.queue(worker_id), count=TAKE_BACK_BATCH)
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, fields in entries:
            self.scripts.requeue(pipe, worker_id, entry_id, fields.get(JOB_FIELD, ""), fields.get(REQUEST_FIELD, ""))
        results = pipe.execute() if entries else []
        requeued = sum(1 for r in results if r == 1)
        self.requeued += requeued
        if requeued:
            logs.event(log, logging.WARNING, logs.JOBS_REQUEUED, "%d jobs of worker %s requeued", requeued, worker_id,
                       worker=worker_id, jobs=requeued)
        if len(entries) == TAKE_BACK_BATCH:
            return  # more to take back on the next refresh
        self._log_gone(worker_id, left)
        self._fail_exhausted(entries)
        self.redis.srem(self.keys.workers, worker_id)
        if worker_id in self.cluster.index:
            self.cluster.remove(worker_id)

    def _log_joined(self, info: WorkerInfo) -> None:
        """Log a worker seen for the first time, or again after it left or was declared dead."""
        rejoined = info.id in self.gone
        self.gone.discard(info.id)
        logs.event(log, logging.INFO, logs.WORKER_REJOINED if rejoined else logs.WORKER_JOINED,
                   "worker %s %s: %s %s, %d KV tokens", info.id, "rejoined" if rejoined else "joined", info.gpu,
                   info.model, info.kv_capacity_tokens, worker=info.id, gpu=info.gpu, model=info.model,
                   kv_capacity_tokens=info.kv_capacity_tokens)

    def _log_gone(self, worker_id: str, left: bool) -> None:
        """Log that a worker left (its last heartbeat said it was draining) or was declared dead."""
        self.gone.add(worker_id)
        if left:
            logs.event(log, logging.INFO, logs.WORKER_LEFT, "worker %s left: it drained and deregistered", worker_id,
                       worker=worker_id)
        else:
            logs.event(log, logging.WARNING, logs.WORKER_DEAD, "worker %s declared dead: its heartbeat expired",
                       worker_id, worker=worker_id)

    def _fail_exhausted(self, entries: list) -> None:
        """Jobs requeued MAX_ATTEMPTS times are not retried again: their workers keep dying."""
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        job_ids = [f.get(JOB_FIELD, "") for _, f in entries]
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), [ATTEMPTS_FIELD, DIED_ON_FIELD])
        replies = pipe.execute()
        for job_id, (_, fields), (count, died_on) in zip(job_ids, entries, replies, strict=True):
            if count is not None and int(count) >= d.MAX_ATTEMPTS:
                self._fail_poison(job_id, fields, int(count), died_on)

    def _fail_poison(self, job_id: str, fields: dict[str, str], attempts: int, died_on: str | None = None) -> None:
        """Fail the job, and keep it with its history in the dead-letter stream for an operator."""
        # The requeued intake entry is still there; it is ended when routed, since the job is now
        # terminal and handoff.lua drops terminal jobs.
        raw = fields.get(REQUEST_FIELD, "")
        try:
            request = json.loads(raw or "{}")
            reply_to = request.get("reply_to") if isinstance(request, dict) else None
        except json.JSONDecodeError:
            reply_to = None
        error = f"its worker died {attempts} times while running it; not retried"
        result = JobResult(id=job_id, status=JobStatus.failed, attempts=attempts, finished_at=time.time(), error=error)
        if self.scripts.finish(self.redis, result, reply_to, job_ttl_s=self.job_ttl_s) != 1:
            return  # it ended meanwhile (or another dispatcher failed it): nothing to dead-letter
        log.warning("job %s failed and dead-lettered: its workers died %d times (%s)", job_id, attempts, died_on)
        self.redis.xadd(self.keys.deadletter, {"job": job_id, "attempts": attempts, "workers": died_on or "[]",
                                               "raw": raw[:MAX_DEADLETTER_RAW_CHARS], "error": error},
                        maxlen=DEADLETTER_MAXLEN, approximate=True)

    def sync_reservations(self) -> None:
        """Reload every worker's reservations from Redis (the truth, kept by the Lua scripts)."""
        self._sync(list(range(len(self.cluster))))

    def sync_one(self, row: int) -> None:
        self._sync([row])

    def _sync(self, rows: list[int]) -> None:
        """Free the reservations of jobs that ended, then load the rest into the cluster's rows."""
        worker_ids = [self.cluster.ids[row] for row in rows]
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in worker_ids:
            pipe.hgetall(self.keys.reserved(worker_id))
        held: list[dict[str, str]] = pipe.execute()
        ended = self._ended_jobs({job for jobs in held for job in jobs})
        if ended:
            # A job that ended holds no KV anywhere. The scripts release a reservation when its job
            # ends or moves; this frees what a path they do not cover left behind, which would
            # otherwise shrink that worker's usable KV for good.
            pipe = self.redis.pipeline(transaction=False)
            for worker_id, jobs in zip(worker_ids, held, strict=True):
                if stale := [job for job in jobs if job in ended]:
                    log.warning("freed %d reservations of ended jobs on %s", len(stale), worker_id)
                    pipe.hdel(self.keys.reserved(worker_id), *stale)
            pipe.execute()
        for row, jobs in zip(rows, held, strict=True):
            self.cluster.sync_reservations(row, {job: int(kv) for job, kv in jobs.items() if job not in ended})

    def _ended_jobs(self, job_ids: set[str]) -> set[str]:
        """Return the jobs that are terminal, or whose hash is gone (expired after they ended)."""
        if not job_ids:
            return set()
        ordered = sorted(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ordered:
            pipe.hget(self.keys.job(job_id), STATUS_FIELD)
        statuses = pipe.execute()
        return {job for job, status in zip(ordered, statuses, strict=True) if status is None or status in TERMINAL}


def _was_draining(fields: dict[str, str]) -> bool:
    """Return True when a worker's last heartbeat said it was draining (it left on SIGTERM)."""
    try:
        return from_hash(WorkerTelemetry, fields).draining
    except (ValidationError, ValueError):
        return False
