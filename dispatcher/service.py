"""The dispatcher process: intake → policy → per-worker queues, completions → predictors.

One loop, each turn:
1. read new intake entries and completions in one blocking XREADGROUP;
2. learn from completions (predictor, reservations) and refresh worker telemetry;
3. route the backlog with the policy; hand each chosen request to its worker's queue with
   ``handoff.lua`` and end refused ones with ``finish.lua`` — all in one pipeline.

Only the dispatcher holding the lease is active; others wait as standbys. A request is
acknowledged on the intake only by the script that forwards or ends it, so a crash anywhere
leaves it pending in Redis, and the next active dispatcher routes it.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis
from pydantic import ValidationError

from dio.dispatcher.backlog import MAX_WAITS_PER_ROUTE, Backlog, Pending, expired
from dio.dispatcher.cluster import Cluster
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.intake import Refusal, parse_entry
from dio.dispatcher.policies import make_policy
from dio.dispatcher.predictor_store import PredictorStore
from dio.dispatcher.scheduling import Decision
from dio.protocol import defaults as d
from dio.protocol.connection import connect, ensure_group
from dio.protocol.keys import DISPATCHER_GROUP
from dio.protocol.models import Completion, JobResult, JobStatus, WorkerInfo, WorkerTelemetry, from_hash
from dio.protocol.scripts import Scripts

log = logging.getLogger("dio.dispatcher")

class Dispatcher:
    def __init__(self, settings: DispatcherSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client or connect(settings)
        self.scripts = Scripts(self.redis, self.keys)
        self.name = settings.dispatcher_name
        self.cluster = Cluster(predictor_kind=settings.predictor)
        self.policy = make_policy(settings.policy, prefetch=settings.prefetch, seed=settings.seed,
                                  shed_late=settings.shed_late, shed_margin=settings.shed_margin)
        self.backlog = Backlog(settings.batch_age_s)
        self.predictors = PredictorStore(self.redis, self.keys)
        self.stats = {"dispatched": 0, "rejected": 0, "deadlettered": 0, "completions": 0, "requeued": 0}
        self._stop = threading.Event()
        self._dirty = True  # something changed since the backlog was last routed
        self._next = {"refresh": 0.0, "persist": 0.0, "sync": 0.0, "lease": 0.0, "expire": 0.0}

    # --- life cycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Serve until ``stop()``: wait for the lease, then route."""
        ensure_group(self.redis, self.keys.intake, DISPATCHER_GROUP)
        ensure_group(self.redis, self.keys.completions, DISPATCHER_GROUP)
        while not self._stop.is_set():
            if not self._acquire_lease():
                self._stop.wait(self.settings.lease_ttl_ms / 3000)
                continue
            log.info("%s is the active dispatcher (policy %s, predictor %s)", self.name, self.policy.name,
                     self.settings.predictor)
            self._take_over()
            try:
                while not self._stop.is_set() and self._renew_lease():
                    self.step()
            finally:
                self.persist_predictors()
                if self._stop.is_set() and self.redis.get(self.keys.lease) == self.name:
                    self.redis.delete(self.keys.lease)  # a standby takes over at once, not after the TTL

    def _acquire_lease(self) -> bool:
        return self.scripts.lease(self.redis, self.name, self.settings.lease_ttl_ms) == 1

    def _renew_lease(self) -> bool:
        now = time.monotonic()
        if now < self._next["lease"]:
            return True
        self._next["lease"] = now + self.settings.lease_ttl_ms / 3000
        if self._acquire_lease():
            return True
        log.warning("%s lost the lease; standing by", self.name)
        self.backlog = Backlog(self.settings.batch_age_s)
        return False

    def _take_over(self) -> None:
        """Claim every entry other dispatchers read but did not finish, then reload state."""
        for stream in (self.keys.intake, self.keys.completions):
            cursor = "0-0"
            while True:
                cursor = self._autoclaim(stream, cursor)
                if cursor == "0-0":
                    break
        self.predictors.load()
        self.refresh_workers(force=True)
        self.sync_reservations()
        # Our own pending entries (claimed or left from before a restart) come back with id "0".
        self._read({self.keys.intake: "0", self.keys.completions: "0"}, block=None)

    def _autoclaim(self, stream: str, cursor: str) -> str:
        """Claim up to 1,000 entries from ``cursor``; return the next cursor ("0-0" when done)."""
        # justid=False on purpose: redis-py's justid=True drops the cursor.
        reply = self.redis.xautoclaim(stream, DISPATCHER_GROUP, self.name, min_idle_time=0, start_id=cursor,
                                      count=1000, justid=False)
        return reply[0]

    # --- one turn -------------------------------------------------------------------------------

    def step(self) -> None:
        """Read, learn, refresh, route: one turn of the loop."""
        block = self.settings.block_ms if not (self._dirty and len(self.backlog)) else 1
        self._read({self.keys.intake: ">", self.keys.completions: ">"}, block=block)
        now = time.time()
        mono = time.monotonic()
        if mono >= self._next["refresh"]:
            self.refresh_workers()
        if mono >= self._next["sync"]:
            self.sync_reservations()
        if mono >= self._next["persist"]:
            self.persist_predictors()
        if self._dirty or mono >= self._next["expire"]:
            self._next["expire"] = mono + 0.1
            self.route(now)

    def _read(self, streams: dict[str, str], block: int | None) -> None:
        try:
            reply = self.redis.xreadgroup(DISPATCHER_GROUP, self.name, streams, count=self.settings.read_count,
                                          block=block)
        except redis.ConnectionError:
            log.warning("redis unreachable; retrying", exc_info=True)
            time.sleep(0.5)
            return
        for stream, entries in reply or []:
            entries = [(eid, f) for eid, f in entries if f]
            if stream == self.keys.intake:
                self._accept(entries)
            else:
                self._learn(entries)
            if streams[stream] == "0" and len(entries) == self.settings.read_count:
                self._read({stream: entries[-1][0]}, block=None)  # more of our own pending list

    # --- intake ---------------------------------------------------------------------------------

    def _accept(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        if not entries:
            return
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, fields in entries:
            item = parse_entry(entry_id, fields, now)
            if isinstance(item, Refusal):
                self._refuse(pipe, item)
            elif len(self.backlog) >= self.settings.max_backlog:
                self._reject(pipe, item, f"overloaded: {len(self.backlog)} requests already waiting",
                             retry_after_s=self._retry_after())
            else:
                self.backlog.add(item)
        pipe.execute()
        self._dirty = True

    def _refuse(self, pipe: redis.client.Pipeline, refusal: Refusal) -> None:
        if refusal.result is not None:
            self.stats["rejected"] += 1
            self.scripts.finish(pipe, refusal.result, refusal.reply_to, ack_stream=self.keys.intake,
                                ack_group=DISPATCHER_GROUP, ack_entry=refusal.entry_id,
                                job_ttl_s=self.settings.job_ttl_s)
            return
        # Nobody can read a result for it: keep it for an operator, and take it off the intake.
        self.stats["deadlettered"] += 1
        log.warning("dead-lettered intake entry %s: %s", refusal.entry_id, refusal.error)
        pipe.xadd(self.keys.deadletter, {"entry": refusal.entry_id, "raw": refusal.raw, "error": refusal.error},
                  maxlen=10_000, approximate=True)
        pipe.xack(self.keys.intake, DISPATCHER_GROUP, refusal.entry_id)
        pipe.xdel(self.keys.intake, refusal.entry_id)

    def _reject(self, pipe: redis.client.Pipeline, item: Pending, reason: str, retry_after_s: float | None) -> None:
        self.stats["rejected"] += 1
        result = JobResult(id=item.request.id, status=JobStatus.rejected, reason=reason, retry_after_s=retry_after_s,
                           finished_at=time.time())
        self.scripts.finish(pipe, result, item.request.reply_to, ack_stream=self.keys.intake,
                            ack_group=DISPATCHER_GROUP,
                            ack_entry=item.entry_id, job_ttl_s=self.settings.job_ttl_s)

    def _retry_after(self) -> float:
        """A hint for shed requests: about one mean service time of the cluster."""
        alive = self.cluster.service_ms[self.cluster.alive & (self.cluster.service_ms > 0)]
        return round(float(alive.mean()) / 1000.0, 3) if len(alive) else d.REJECT_RETRY_AFTER_S

    # --- routing --------------------------------------------------------------------------------

    def route(self, now: float) -> None:
        """Route every backlog item that can go now; expire or reject the rest as due."""
        self._dirty = False
        if not len(self.backlog):
            return
        self.backlog.promote_aged(now)
        done: set[str] = set()
        pipe = self.redis.pipeline(transaction=False)
        waits_in_a_row = 0
        for item in self.backlog.in_order():
            if waits_in_a_row >= MAX_WAITS_PER_ROUTE:
                # The cluster is full: skip routing the rest, only expire what is overdue.
                if self._expired(item, now):
                    self._reject(pipe, item, f"no capacity before its deadline: {item.wait_reason}",
                                 retry_after_s=self._retry_after())
                    done.add(item.entry_id)
                continue
            decision = self.policy.decide(item.request, self.cluster, now)
            waits_in_a_row = waits_in_a_row + 1 if decision.wait else 0
            if decision.row is not None:
                self._handoff(pipe, item, decision, now)
                done.add(item.entry_id)
            elif decision.reject:
                self._reject(pipe, item, decision.reason or "no worker can serve it",
                             retry_after_s=decision.retry_after_s)
                done.add(item.entry_id)
            elif self._expired(item, now):
                reason = f"no capacity before its deadline: {decision.reason}"
                self._reject(pipe, item, reason, retry_after_s=self._retry_after())
                done.add(item.entry_id)
            else:
                item.wait_reason = decision.reason
        if done:
            pipe.execute()
            self.backlog.remove(done)

    def _expired(self, item: Pending, now: float) -> bool:
        return expired(item.request, item.received_at, now, self.settings.max_wait_s)

    def _handoff(self, pipe: redis.client.Pipeline, item: Pending, decision: Decision, now: float) -> None:
        row = decision.row
        assert row is not None
        worker_id = self.cluster.ids[row]
        request = item.request
        self.cluster.reserve(row, request.id, request.kv_tokens, decision.ceiling, decision.prompt_tokens)
        self.cluster.prefix.record(request.prefix_hashes, worker_id)
        self.scripts.handoff(pipe, item.entry_id, request.id, worker_id, item.request_json, request.kv_tokens, now)
        self.stats["dispatched"] += 1

    # --- completions ----------------------------------------------------------------------------

    def _learn(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        if not entries:
            return
        for _, fields in entries:
            try:
                done = Completion.model_validate_json(fields.get("c", ""))
            except ValidationError:
                log.warning("ignored a malformed completion: %r", fields)
                continue
            self.stats["completions"] += 1
            row = self.cluster.index.get(done.worker)
            if row is None:
                continue
            if done.status != JobStatus.completed:
                self.cluster.release(row, done.job)
                continue
            error = self.cluster.complete(row, done.job, done.prompt_tokens, done.cached_tokens, done.output_tokens,
                                          done.service_ms)
            self.predictors.record_error(done.worker, error)
        pipe = self.redis.pipeline(transaction=False)
        ids = [eid for eid, _ in entries]
        pipe.xack(self.keys.completions, DISPATCHER_GROUP, *ids)
        pipe.xdel(self.keys.completions, *ids)
        pipe.execute()
        self._dirty = True

    # --- workers --------------------------------------------------------------------------------

    def refresh_workers(self, force: bool = False) -> None:
        """Reload capabilities and telemetry; take back the queues of dead workers."""
        self._next["refresh"] = time.monotonic() + self.settings.worker_refresh_s
        ids = sorted(self.redis.smembers(self.keys.workers))
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self.keys.worker(worker_id))
            pipe.exists(self.keys.alive(worker_id))
        replies = pipe.execute()
        for i, worker_id in enumerate(ids):
            fields, alive = replies[2 * i], bool(replies[2 * i + 1])
            if not alive:
                self._take_back(worker_id)
                continue
            try:
                info = from_hash(WorkerInfo, fields)
                telemetry = from_hash(WorkerTelemetry, fields)
            except (ValidationError, ValueError):
                log.warning("worker %s has an unreadable hash; ignored", worker_id)
                continue
            row = self.cluster.index.get(worker_id)
            if row is None:
                row = self.cluster.upsert(info)
                self.predictors.restore(self.cluster, row)
                self._sync_one(row)
                log.info("worker %s joined: %s %s, %d KV tokens", worker_id, info.gpu, info.model,
                         info.kv_capacity_tokens)
            elif self.cluster.infos[row] != info:
                self.cluster.upsert(info)
            self.cluster.set_telemetry(row, telemetry, alive=True)
        self._dirty = True

    def _take_back(self, worker_id: str) -> None:
        """A worker's heartbeat expired: requeue everything left in its queue, then forget it."""
        queue = self.keys.queue(worker_id)
        entries = self.redis.xrange(queue, count=10_000)
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, fields in entries:
            job_id = fields.get("job", "")
            self.scripts.requeue(pipe, worker_id, entry_id, job_id, fields.get("req", ""))
        results = pipe.execute() if entries else []
        requeued = sum(1 for r in results if r == 1)
        self.stats["requeued"] += requeued
        if len(entries) == 10_000:
            return  # more to take back on the next refresh
        if requeued:
            log.warning("worker %s died; %d jobs requeued", worker_id, requeued)
        self._fail_exhausted(entries)
        self.redis.srem(self.keys.workers, worker_id)
        if worker_id in self.cluster.index:
            self.cluster.remove(worker_id)

    def _fail_exhausted(self, entries: list) -> None:
        """Jobs requeued MAX_ATTEMPTS times are not retried again: their workers keep dying."""
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        job_ids = [f.get("job", "") for _, f in entries]
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "attempts")
        attempts = pipe.execute()
        for job_id, (_, fields), count in zip(job_ids, entries, attempts, strict=True):
            if count is not None and int(count) >= d.MAX_ATTEMPTS:
                self._mark_poison(job_id, fields, int(count))

    def _mark_poison(self, job_id: str, fields: dict[str, str], attempts: int) -> None:
        # The requeued intake entry is still there; it is ended when routed, since the job is now
        # terminal and handoff.lua drops terminal jobs.
        try:
            reply_to = json.loads(fields.get("req", "{}")).get("reply_to")
        except json.JSONDecodeError:
            reply_to = None
        result = JobResult(id=job_id, status=JobStatus.failed, attempts=attempts, finished_at=time.time(),
                           error=f"its worker died {attempts} times while running it; not retried")
        self.scripts.finish(self.redis, result, reply_to, job_ttl_s=self.settings.job_ttl_s)

    def sync_reservations(self) -> None:
        """Reload every worker's reservations from Redis (the truth, kept by the Lua scripts)."""
        self._next["sync"] = time.monotonic() + self.settings.reservation_sync_s
        for row in range(len(self.cluster)):
            self._sync_one(row)

    def _sync_one(self, row: int) -> None:
        held = self.redis.hgetall(self.keys.reserved(self.cluster.ids[row]))
        self.cluster.sync_reservations(row, {job: int(tokens) for job, tokens in held.items()})

    # --- predictor state ------------------------------------------------------------------------

    def persist_predictors(self) -> None:
        """Save every worker's predictor (and recent error) so a restart starts warm."""
        self._next["persist"] = time.monotonic() + self.settings.persist_interval_s
        self.predictors.save(self.cluster)
