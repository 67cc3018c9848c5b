"""``dio batch-runner``: the daemon that runs the Batch API's batches (``dio.client.stored_batch``).

Every ``scan_interval_s`` it reads the batches not ended (``Keys.active_batches``), oldest first,
and takes the lease of each it can run (up to ``max_batches`` at once, one thread each). A batch
held by a live runner is left to it; one whose holder is gone (this runner restarted under its
name, or a process of this host that exited) is taken over at once; ``force`` takes every held
batch over on the first scan. A Redis error never stops the daemon: it is logged once, the scan
is retried with the shared backoff, and a batch whose run it broke is taken up again by the next
scan. SIGTERM: each batch's jobs in flight are cancelled and its lease given up, for the next
runner to resume at once.
"""

from __future__ import annotations

import logging
import threading

import redis

from dio.client.batch_lease import BatchBusy, BatchLease, Holder, LeaseLost
from dio.client.batch_pacing import MIN_IN_FLIGHT
from dio.client.pools import ClientPools
from dio.client.settings import BATCH_CONCURRENCY, ClientSettings
from dio.client.stored_batch import StoredBatch, runnable
from dio.protocol.keys import STATUS_FIELD
from dio.protocol.retry import Outage

log = logging.getLogger("dio.batch")

SCAN_INTERVAL_S = 1.0  # new batches start within about this long
MAX_BATCHES = 4  # batches one runner runs at once
MAX_SCANNED = 10_000  # active batches read per scan (the oldest first)


class BatchRunnerDaemon:
    """Run stored batches until ``stop()``."""

    def __init__(self, settings: ClientSettings, name: str, *, max_batches: int = MAX_BATCHES,
                 concurrency: int = BATCH_CONCURRENCY, rate_limit: float | None = None, force: bool = False,
                 scan_interval_s: float = SCAN_INTERVAL_S, adaptive: bool = True,
                 min_in_flight: int = MIN_IN_FLIGHT) -> None:
        self.adaptive = adaptive
        self.min_in_flight = min_in_flight
        # Sharded by model: a client per pool its batches' lines name (the home one also reads the batches).
        self.pools = ClientPools(settings)
        self.client = self.pools.home
        self.name = name
        self.max_batches = max_batches
        self.concurrency = concurrency
        self.rate_limit = rate_limit
        self.force = force
        self.scan_interval_s = scan_interval_s
        self.lease = BatchLease(self.client.redis, Holder.me(name))
        self.stopping = threading.Event()
        self.running: dict[str, threading.Thread] = {}
        self.outage = Outage(log, f"batch runner {name}")

    def run(self) -> None:
        """Scan and run batches until stopped; then wait for the running ones to let go."""
        log.info("batch runner %s started (up to %d batches at once, %d requests in flight each)",
                 self.name, self.max_batches, self.concurrency)
        pause = self.scan_interval_s
        while not self.stopping.wait(pause):
            try:
                self.scan()
            except (redis.RedisError, OSError) as exc:
                pause = self.outage.failed(exc)
                continue
            self.outage.ok()
            pause = self.scan_interval_s
        for thread in list(self.running.values()):
            thread.join()
        self.pools.close()
        log.info("batch runner %s stopped", self.name)

    def stop(self) -> None:
        self.stopping.set()

    def scan(self) -> list[str]:
        """Start a thread for each batch this runner can take now; return their ids."""
        self._forget_finished()
        started: list[str] = []
        for batch_id in self._waiting():
            if len(self.running) >= self.max_batches or self.stopping.is_set():
                break
            if batch_id in self.running:
                continue
            try:
                taken_from = self.lease.acquire(self.client.base_keys.batch_lease(batch_id), force=self.force)
            except BatchBusy:
                continue  # a live runner has it
            if taken_from is not None:
                log.warning("batch %s: took it over from %s", batch_id, taken_from.describe())
            thread = threading.Thread(target=self._run_one, args=(batch_id,), name=f"batch-{batch_id}", daemon=True)
            self.running[batch_id] = thread
            thread.start()
            started.append(batch_id)
        self.force = False  # --force applies to the batches held when the runner started
        return started

    def _waiting(self) -> list[str]:
        """The active batches in a runnable status, oldest first (the ended ones leave the set)."""
        keys = self.client.base_keys
        ids = list(self.client.redis.srandmember(keys.active_batches, MAX_SCANNED) or [])
        pipe = self.client.redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hmget(keys.batch(batch_id), [STATUS_FIELD, "created_at"])
        rows = pipe.execute()
        gone = [batch_id for batch_id, (status, _) in zip(ids, rows, strict=True) if status is None]
        if gone:
            self.client.redis.srem(keys.active_batches, *gone)
        ready = [(float(created or 0), batch_id) for batch_id, (status, created) in zip(ids, rows, strict=True)
                 if runnable(status)]
        return [batch_id for _, batch_id in sorted(ready)]

    def _forget_finished(self) -> None:
        for batch_id, thread in list(self.running.items()):
            if not thread.is_alive():
                del self.running[batch_id]

    def _run_one(self, batch_id: str) -> None:
        """Run one batch under the lease just taken; whatever happens, let the lease go at the end."""
        batch = StoredBatch(self.client, batch_id, self.lease, stopping=self.stopping, concurrency=self.concurrency,
                            rate_limit=self.rate_limit, adaptive=self.adaptive, min_in_flight=self.min_in_flight,
                            pools=self.pools)
        try:
            status = batch.run()
            log.info("batch %s: %s", batch_id, status.value if status else "left for the next runner")
        except LeaseLost as exc:
            log.warning("%s; the runner holding it now carries on", exc)
            return
        except (redis.RedisError, OSError) as exc:  # its jobs were cancelled; the next scan resumes it
            log.warning("batch %s: stopped by a Redis error (%s: %s); resumed at the next scan",
                        batch_id, type(exc).__name__, exc)
        except Exception:  # a bug must not take the daemon down: logged, retried at the next scan
            log.exception("batch %s: the run failed; it is retried at the next scan", batch_id)
        try:
            self.lease.release(self.client.base_keys.batch_lease(batch_id))
        except redis.RedisError as exc:
            log.warning("batch %s: could not give its lease up (%s); it runs out on its own", batch_id, exc)
