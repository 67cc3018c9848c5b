"""The dispatcher process: the loop and the lease, with the Redis I/O around the routing core.

One loop, each turn:
1. read new intake entries and completions in one blocking XREADGROUP;
2. give requests to the router (``dio.dispatcher.router``) and tell it which jobs ended;
3. refresh the worker registry (``dio.dispatcher.registry``) and, now and then, save the predictors
   (``dio.dispatcher.predictor_store``);
4. ask the router what to do and carry it out: hand each dispatched request to its worker's queue
   with ``handoff.lua`` and end rejected ones with ``finish.lua``, all in one pipeline;
5. now and then, read the job statuses of the waiting requests (one pipeline) and take those that
   ended meanwhile (cancelled by their client) off the intake and out of the backlog;
6. once a second, set the metrics' gauges (``dio.dispatcher.metrics``; a scrape reads only memory)
   and write the counters ``dio top`` shows (``{dio}:dispatcher:stats``).

Memory stays bounded: the backlog holds at most ``max_backlog`` requests and ``max_backlog_bytes``
of request JSON (the router sheds the rest at once), one read takes about ``MAX_READ_BYTES`` of
intake entries at most, and an item's JSON is dropped as soon as it left.

Only the dispatcher holding the lease is active; others wait as standbys. A request is
acknowledged on the intake only by the script that forwards or ends it, so a crash anywhere
leaves it pending in Redis, and the next active dispatcher routes it.

A Redis error anywhere in the loop never stops the dispatcher (``dio.protocol.retry``): it is
logged once, retried with backoff, and once Redis answers the dispatcher starts over from what
Redis holds (consumer groups recreated, lease taken again, its pending entries read back).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from pydantic import ValidationError

from dio.dispatcher.backlog import Backlog, Pending
from dio.dispatcher.cluster import Cluster
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.intake import DEADLETTER_MAXLEN, InvalidEntry, parse_entry
from dio.dispatcher.metrics import DispatcherMetrics
from dio.dispatcher.policy import Policy
from dio.dispatcher.predictor_store import PredictorStore
from dio.dispatcher.registry import WorkerRegistry
from dio.dispatcher.router import Dispatch, Reject, Router
from dio.protocol import logs
from dio.protocol.connection import connect, ensure_group
from dio.protocol.keys import COMPLETION_FIELD, DISPATCHER_GROUP, STATUS_FIELD
from dio.protocol.models import TERMINAL_STATUSES, Completion, JobResult, JobStatus
from dio.protocol.retry import Outage
from dio.protocol.scripts import HANDOFF_WORKER_GONE, Scripts

log = logging.getLogger("dio.dispatcher")

EXPIRE_CHECK_S = 0.1  # how often the backlog is routed (and expired) when nothing else changed
ENDED_CHECK_S = 0.5  # how often the statuses of waiting requests are read (a cancelled one leaves then)
ENDED_CHECK_BATCH = 5_000  # statuses read per check; a longer backlog is covered over several checks
MAX_READ_BYTES = 32 * 1024 * 1024  # about this much intake JSON per read, whatever the entries' size
ENTRY_BYTES_GUESS = 1024  # the size of an intake entry before any was seen
STATS_INTERVAL_S = 1.0  # how often the metrics' gauges and the stats hash (``dio top``) are refreshed
STATS_TTL_S = 30  # the stats hash of a dispatcher that stopped publishing expires after this long
TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)  # as job hashes spell them

Entries = list[tuple[str, dict[str, str]]]


class Dispatcher:
    def __init__(self, settings: DispatcherSettings, client: redis.Redis | None = None,
                 metrics: DispatcherMetrics | None = None) -> None:
        self.settings = settings
        self.keys = settings.pool_keys  # sharded by model: its pool's lease, intake, workers, predictors, stats
        self.redis = client or connect(settings)
        self.scripts = Scripts(self.redis, self.keys)
        self.name = settings.dispatcher_name
        self.router = Router(settings)
        self.predictors = PredictorStore(self.redis, self.keys)
        self.registry = WorkerRegistry(self.redis, self.keys, self.scripts, self.router.cluster, self.predictors,
                                       job_ttl_s=settings.job_ttl_s)
        self.stats = {"dispatched": 0, "rejected": 0, "deadlettered": 0, "completions": 0}
        self.outage = Outage(log, f"dispatcher {self.name}")
        self.metrics = metrics or DispatcherMetrics()
        self.metrics.watch(self.outage)
        self.metrics.time_decisions(self.router.policy)
        self._stop = threading.Event()
        self._dirty = True  # something changed since the backlog was last routed
        self._next = {"refresh": 0.0, "persist": 0.0, "sync": 0.0, "lease": 0.0, "expire": 0.0, "ended": 0.0,
                      "stats": 0.0}
        self._entry_bytes = float(ENTRY_BYTES_GUESS)  # recent mean size of an intake entry
        self._ended_cursor = 0  # where the next check of waiting requests' statuses starts

    @property
    def cluster(self) -> Cluster:
        return self.router.cluster

    @property
    def policy(self) -> Policy:
        return self.router.policy

    @property
    def backlog(self) -> Backlog:
        return self.router.backlog

    # --- life cycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Serve until ``stop()``: wait for the lease, then route; ride out any Redis outage."""
        while not self._stop.is_set():
            try:
                self._serve()
            except redis.RedisError as exc:
                # What this dispatcher held is in Redis (its unfinished intake entries stay pending,
                # reservations are in hashes), or went with it: it forgets its own copy and, once
                # Redis answers, starts over from what Redis holds.
                self.router.forget_backlog()
                self._stop.wait(self.outage.failed(exc))

    def _serve(self) -> None:
        """Take the lease (or stand by a while), then route until stopped or the lease is lost."""
        # Recreated each time: a Redis that came back empty has no consumer groups.
        ensure_group(self.redis, self.keys.intake, DISPATCHER_GROUP)
        ensure_group(self.redis, self.keys.completions, DISPATCHER_GROUP)
        active = self._acquire_lease()
        self.outage.ok()
        self.metrics.active.set(1 if active else 0)
        if not active:
            self._stop.wait(self.settings.lease_ttl_ms / 3000)
            return
        logs.event(log, logging.INFO, logs.LEASE_GAINED, "dispatcher %s gained the lease: active (policy %s, "
                   "predictor %s)", self.name, self.policy.name, self.settings.predictor, dispatcher=self.name)
        self._take_over()
        try:
            while not self._stop.is_set() and self._renew_lease():
                self.step()
        except redis.RedisError:
            raise  # Redis is away: nothing can be saved to it now (run() retries, then takes over again)
        except BaseException:
            self._stand_down()  # a bug: save what was learned before the process exits
            raise
        self._stand_down()

    def _stand_down(self) -> None:
        """Save the predictors; when stopping, hand the lease to a standby at once (not after its TTL)."""
        self.persist_predictors()
        if self._stop.is_set():
            if self.scripts.release(self.redis, self.keys.lease, self.name) == 1:  # only if it is still ours
                logs.event(log, logging.INFO, logs.LEASE_RELEASED, "dispatcher %s released the lease", self.name,
                           dispatcher=self.name)

    def _acquire_lease(self) -> bool:
        return self.scripts.lease(self.redis, self.name, self.settings.lease_ttl_ms) == 1

    def _renew_lease(self) -> bool:
        now = time.monotonic()
        if now < self._next["lease"]:
            return True
        self._next["lease"] = now + self.settings.lease_ttl_ms / 3000
        if self._acquire_lease():
            return True
        logs.event(log, logging.WARNING, logs.LEASE_LOST, "dispatcher %s lost the lease; standing by", self.name,
                   dispatcher=self.name)
        self.metrics.active.set(0)
        self.router.forget_backlog()  # still pending on the intake: the new active dispatcher claims them
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
        self.refresh_workers()
        self.sync_reservations()
        self._read_own_pending()

    def _autoclaim(self, stream: str, cursor: str) -> str:
        """Claim up to 1,000 entries from ``cursor``; return the next cursor ("0-0" when done)."""
        # justid=False on purpose: redis-py's justid=True drops the cursor.
        reply = self.redis.xautoclaim(stream, DISPATCHER_GROUP, self.name, min_idle_time=0, start_id=cursor,
                                      count=1000, justid=False)
        return reply[0]

    # --- one turn -------------------------------------------------------------------------------

    def step(self) -> None:
        """Read, learn, refresh, route: one turn of the loop (a Redis error leaves it for run() to handle)."""
        block = self.settings.block_ms if not (self._dirty and len(self.backlog)) else 1
        reply = self.redis.xreadgroup(DISPATCHER_GROUP, self.name, {self.keys.intake: ">", self.keys.completions: ">"},
                                      count=self.read_count(), block=block)
        for stream, entries in reply or []:
            self._handle(stream, entries)
        mono = time.monotonic()
        if mono >= self._next["refresh"]:
            self.refresh_workers()
        if mono >= self._next["sync"]:
            self.sync_reservations()
        if mono >= self._next["persist"]:
            self.persist_predictors()
        if self._dirty or mono >= self._next["expire"]:
            self._next["expire"] = mono + EXPIRE_CHECK_S
            self.route(time.time())
        if mono >= self._next["ended"]:
            self._next["ended"] = mono + ENDED_CHECK_S
            self.drop_ended()  # after routing: what could go was handed off (handoff.lua drops ended jobs)
        if mono >= self._next["stats"]:
            self._next["stats"] = mono + STATS_INTERVAL_S
            self.publish_stats()

    def read_count(self) -> int:
        """Entries to read at once: ``read_count``, fewer when entries are large (about MAX_READ_BYTES a read)."""
        return max(1, min(self.settings.read_count, int(MAX_READ_BYTES / self._entry_bytes)))

    def _read_own_pending(self) -> None:
        """Read back the entries delivered to this dispatcher and not finished: its pending list.

        They were claimed from another dispatcher, or left by a restart or an outage; read from id
        "0" on, a page at a time (each read returns the pending entries after the cursor).
        """
        for stream in (self.keys.intake, self.keys.completions):
            cursor = "0"
            while True:
                reply = self.redis.xreadgroup(DISPATCHER_GROUP, self.name, {stream: cursor},
                                              count=self.read_count())
                entries = reply[0][1] if reply else []
                if not entries:
                    break
                self._handle(stream, entries)
                cursor = entries[-1][0]

    def _handle(self, stream: str, entries: Entries) -> None:
        # A pending entry deleted meanwhile comes back without fields: nothing to route or learn.
        gone = [eid for eid, fields in entries if not fields]
        if gone:
            self.redis.xack(stream, DISPATCHER_GROUP, *gone)
        entries = [(eid, fields) for eid, fields in entries if fields]
        if stream == self.keys.intake:
            self._accept(entries)
        else:
            self._learn(entries)

    # --- intake ---------------------------------------------------------------------------------

    def _accept(self, entries: Entries) -> None:
        if not entries:
            return
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        shed_items: list[Pending] = []
        for entry_id, fields in entries:
            item = parse_entry(entry_id, fields, now)
            if isinstance(item, InvalidEntry):
                self._end_invalid(pipe, item)
                continue
            self._entry_bytes = 0.9 * self._entry_bytes + 0.1 * max(item.size_bytes, 1)
            if (shed := self.router.accept(item)) is not None:
                self._reject(pipe, shed)
                shed_items.append(item)
        pipe.execute()
        for item in shed_items:
            item.release()
        self._dirty = True

    def _end_invalid(self, pipe: redis.client.Pipeline, invalid: InvalidEntry) -> None:
        """Reject an invalid request with the validation message, or dead-letter what names no job."""
        self.metrics.invalid(deadlettered=invalid.result is None)
        if invalid.result is not None:
            self.stats["rejected"] += 1
            self.scripts.finish(pipe, invalid.result, invalid.reply_to, ack_stream=self.keys.intake,
                                ack_group=DISPATCHER_GROUP, ack_entry=invalid.entry_id,
                                job_ttl_s=self.settings.job_ttl_s)
            return
        # Nobody can read a result for it: keep it for an operator, and take it off the intake.
        self.stats["deadlettered"] += 1
        log.warning("dead-lettered intake entry %s: %s", invalid.entry_id, invalid.error)
        pipe.xadd(self.keys.deadletter, {"entry": invalid.entry_id, "raw": invalid.raw, "error": invalid.error},
                  maxlen=DEADLETTER_MAXLEN, approximate=True)
        pipe.xack(self.keys.intake, DISPATCHER_GROUP, invalid.entry_id)
        pipe.xdel(self.keys.intake, invalid.entry_id)

    def _reject(self, pipe: redis.client.Pipeline, reject: Reject) -> None:
        """End a valid request rejected: the client reads the reason and when to retry."""
        self.stats["rejected"] += 1
        self.metrics.rejected(reject.reason)
        item = reject.item
        result = JobResult(id=item.request.id, status=JobStatus.rejected, reason=reject.reason,
                           retry_after_s=reject.retry_after_s, finished_at=time.time())
        self.scripts.finish(pipe, result, item.request.reply_to, ack_stream=self.keys.intake,
                            ack_group=DISPATCHER_GROUP, ack_entry=item.entry_id, job_ttl_s=self.settings.job_ttl_s)

    # --- routing --------------------------------------------------------------------------------

    def route(self, now: float) -> None:
        """Carry out the router's decisions: hand-offs and rejections, in one pipeline."""
        self._dirty = False
        actions = self.router.route(now)
        if not actions:
            return
        pipe = self.redis.pipeline(transaction=False)
        for action in actions:
            if isinstance(action, Dispatch):
                self._handoff(pipe, action, now)
            else:
                self._reject(pipe, action)
        for action, reply in zip(actions, pipe.execute(), strict=True):  # one script call per action
            if isinstance(action, Dispatch) and reply == 1:
                self.metrics.dispatched(self.policy.name, self.cluster.infos[action.row].gpu)
            elif isinstance(action, Dispatch):
                # Not forwarded: the job had ended (cancelled meanwhile), another dispatcher had the
                # entry, or the worker is gone. It holds no KV on that worker, so this dispatcher's
                # count lets it go too.
                self.cluster.release(action.row, action.item.request.id)
                if reply == HANDOFF_WORKER_GONE:
                    self.router.backlog.add(action.item)  # still pending on the intake: route it again
                    self._next["refresh"] = 0.0  # and learn at once which workers are gone
                    continue
            action.item.release()

    def drop_ended(self) -> None:
        """Take the waiting requests whose job ended meanwhile (cancelled) off the intake and the backlog.

        Their terminal state is written already (a cancel writes it through finish.lua); what is
        left is the intake entry, acknowledged and deleted here, and this dispatcher's copy. A
        long backlog is read ``ENDED_CHECK_BATCH`` statuses at a time, round-robin.
        """
        items = list(self.backlog.in_order())
        if not items:
            return
        start = self._ended_cursor % len(items)
        batch = (items[start:] + items[:start])[:ENDED_CHECK_BATCH]
        self._ended_cursor = start + len(batch)
        pipe = self.redis.pipeline(transaction=False)
        for item in batch:
            pipe.hget(self.keys.job(item.request.id), STATUS_FIELD)
        ended = {item.entry_id for item, status in zip(batch, pipe.execute(), strict=True) if status in TERMINAL}
        if not ended:
            return
        gone = self.router.withdraw(ended)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.keys.intake, DISPATCHER_GROUP, *ended)
        pipe.xdel(self.keys.intake, *ended)
        pipe.execute()
        for item in gone:
            item.release()
        log.info("%d waiting requests had ended (cancelled by their clients); taken off the intake", len(gone))

    def _handoff(self, pipe: redis.client.Pipeline, dispatch: Dispatch, now: float) -> None:
        item, request = dispatch.item, dispatch.item.request
        self.scripts.handoff(pipe, item.entry_id, request.id, dispatch.worker_id, item.request_json,
                             dispatch.decision.kv_tokens, now)
        self.stats["dispatched"] += 1

    # --- completions ----------------------------------------------------------------------------

    def _learn(self, entries: Entries) -> None:
        if not entries:
            return
        for _, fields in entries:
            try:
                done = Completion.model_validate_json(fields.get(COMPLETION_FIELD, ""))
            except ValidationError:
                log.warning("ignored a malformed completion: %r", fields)
                continue
            self.stats["completions"] += 1
            predicted = self._predicts(done.worker)
            error = self.router.ended(done)
            if error is not None:
                self.predictors.record_error(done.worker, error)
            self._observe(done, error, predicted)
        pipe = self.redis.pipeline(transaction=False)
        ids = [eid for eid, _ in entries]
        pipe.xack(self.keys.completions, DISPATCHER_GROUP, *ids)
        pipe.xdel(self.keys.completions, *ids)
        pipe.execute()
        self._dirty = True

    def _predicts(self, worker_id: str) -> bool:
        """Whether the worker's end-to-end predictor predicted anything yet (a cold one learns its first sample)."""
        row = self.cluster.index.get(worker_id)
        return row is not None and bool(self.cluster.predictor.warm[row])

    def _observe(self, done: Completion, error_ms: float | None, predicted: bool) -> None:
        """Count a job's end in the metrics, with the errors of what was predicted for it (a completed job)."""
        row = self.cluster.index.get(done.worker)
        gpu = self.cluster.infos[row].gpu if row is not None else "unknown"
        ttft_ms, tpot_ms = self.cluster.token_errors if error_ms is not None else (None, None)
        self.metrics.completed(done, gpu, {"e2e": error_ms if predicted else None, "ttft": ttft_ms, "tpot": tpot_ms})

    # --- stats and metrics ----------------------------------------------------------------------

    def publish_stats(self) -> None:
        """Refresh the metrics' gauges, and write the counters ``dio top`` reads (one round trip).

        The scrape of ``/metrics`` reads only what this sets: it never does Redis I/O itself.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.intake)
        pipe.hset(self.keys.dispatcher_stats, mapping={
            **self.stats, "requeued": self.registry.requeued, "backlog": len(self.backlog),
            "backlog_bytes": self.backlog.bytes, "name": self.name, "policy": self.policy.name,
            "updated_at": time.time()})
        pipe.expire(self.keys.dispatcher_stats, STATS_TTL_S)
        intake = pipe.execute()[0]
        self.metrics.sample(self.cluster, len(self.backlog), self.backlog.bytes, intake, active=True,
                            requeued=self.registry.requeued)

    # --- workers and predictors -----------------------------------------------------------------

    def refresh_workers(self) -> None:
        """Reload capabilities and telemetry; take back the queues of dead workers."""
        self._next["refresh"] = time.monotonic() + self.settings.worker_refresh_s
        self.registry.refresh()
        self._dirty = True

    def sync_reservations(self) -> None:
        """Reload every worker's reservations from Redis (the truth, kept by the Lua scripts)."""
        self._next["sync"] = time.monotonic() + self.settings.reservation_sync_s
        self.registry.sync_reservations()

    def persist_predictors(self) -> None:
        """Save every worker's predictor (and recent error) so a restart starts warm."""
        self._next["persist"] = time.monotonic() + self.settings.persist_interval_s
        self.predictors.save(self.cluster)
