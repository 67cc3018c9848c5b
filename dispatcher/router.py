"""The routing core: a backlog, a policy and the cluster state, driven by a clock (pure: no I/O).

Two drivers run it: the dispatcher (``dio.dispatcher.service``: Redis streams, Lua scripts, wall
time) and the virtual replay (``dio.ops.bench.virtual``: simulated GPUs, a discrete-event clock).
Each feeds it requests (``accept``), asks what to do now (``route``), carries the answers out with
its own I/O (a hand-off to a worker's queue; a simulated GPU's ``add``), and reports every job that
ended (``ended``). So every rule — tiers and the promotion of aged batch requests, the backlog
bound, expiry, the waits per route, KV reservations, prefix records, learning from completions —
is one piece of code, configured by one ``DispatcherSettings``, whichever driver runs it.

Overload: the backlog is bounded in requests (``max_backlog``) and in bytes of request JSON
(``max_backlog_bytes``); past either bound, and for an interactive request that the backlog ahead of
it would keep waiting past its deadline at the recent drain rate (``admit_by_drain``), a request is
rejected at once ("overloaded: ..."). Every load rejection carries a ``retry_after_s``: the backlog's
predicted drain time, jittered by ±``RETRY_JITTER`` (from the settings' seed) so that the clients it
turns away do not all come back in the same instant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dio.dispatcher.backlog import Backlog, DrainRate, Lateness, Pending, expired
from dio.dispatcher.cluster import Cluster
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.policies import make_policy
from dio.dispatcher.policy import Decision, Policy
from dio.protocol import defaults as d
from dio.protocol.models import Completion, JobStatus, Tier

MAX_WAITS_PER_ROUTE = 64  # after this many requests in a row found no worker, the rest wait too
DRAIN_MIN_WAITING = 64  # admit_by_drain judges only a backlog at least this long (the cluster is full)
RETRY_JITTER = 0.25  # a retry-after hint is spread over ±25% of the predicted drain time
MIN_RETRY_AFTER_S = 0.1
MAX_RETRY_AFTER_S = 600.0


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send ``item`` to the worker at ``row`` (its KV is already reserved there)."""

    item: Pending
    row: int
    worker_id: str
    decision: Decision


@dataclass(frozen=True, slots=True)
class Reject:
    """End ``item`` rejected, with the reason its client reads and when to try again."""

    item: Pending
    reason: str
    retry_after_s: float | None


Action = Dispatch | Reject


class Router:
    """Route a backlog of requests to workers with one policy, over one view of the cluster."""

    def __init__(self, settings: DispatcherSettings) -> None:
        self.settings = settings
        self.cluster = Cluster(predictor_kind=settings.predictor)
        self.policy: Policy = make_policy(settings.policy, prefetch=settings.prefetch, seed=settings.seed,
                                          shed_late=settings.shed_late, shed_margin=settings.shed_margin,
                                          weights=settings.policy_weights,
                                          ttft_penalty_s=settings.affinity_ttft_penalty_s)
        self.backlog = Backlog(settings.batch_age_s, settings.late_last)
        self.lateness = Lateness()
        self.drain = DrainRate()
        self.rng = random.Random(settings.seed)

    def accept(self, item: Pending) -> Reject | None:
        """Queue a request for routing, or shed it at once (a rejection) when the backlog is overloaded."""
        reason = self._overloaded(item)
        if reason is not None:
            return Reject(item, f"overloaded: {reason}", self.retry_after_s(len(self.backlog)))
        self.backlog.add(item)
        return None

    def _overloaded(self, item: Pending) -> str | None:
        """Why the backlog cannot take ``item`` (None: it can), at the clock of its arrival."""
        backlog, settings = self.backlog, self.settings
        if len(backlog) >= settings.max_backlog:
            return f"{len(backlog)} requests already waiting (DIO_MAX_BACKLOG={settings.max_backlog})"
        if backlog.bytes + item.size_bytes > settings.max_backlog_bytes:
            return (f"{len(backlog)} requests already waiting hold {backlog.bytes:,} bytes; this one's "
                    f"{item.size_bytes:,} would pass DIO_MAX_BACKLOG_BYTES={settings.max_backlog_bytes:,}")
        return self._undrainable(item, len(backlog.interactive), item.received_at)

    def _undrainable(self, item: Pending, ahead: int, now: float) -> str | None:
        """With ``admit_by_drain``: why ``item`` cannot start before its deadline behind ``ahead`` requests.

        Judged only for interactive requests behind a long backlog (``DRAIN_MIN_WAITING``), at a
        drain rate measured while requests waited; else None (it may wait).
        """
        if not self.settings.admit_by_drain or item.request.tier == Tier.batch or ahead < DRAIN_MIN_WAITING:
            return None
        rate = self.drain.per_s()
        if rate is None:
            return None
        deadline = item.request.deadline_at or item.received_at + self.settings.max_wait_s
        left_s, drain_s = deadline - now, (ahead + 1) / rate
        if drain_s <= left_s:
            return None
        return (f"the {ahead} requests ahead of it drain in about {drain_s:.1f} s at the cluster's recent "
                f"{rate:.1f} jobs/s, past its deadline ({max(left_s, 0.0):.1f} s from now)")

    def forget_backlog(self) -> None:
        """Drop every waiting request (this dispatcher lost the lease: another one routes them now)."""
        self.backlog = Backlog(self.settings.batch_age_s, self.settings.late_last)

    def withdraw(self, entry_ids: set[str]) -> list[Pending]:
        """Take requests out of the backlog without a decision (they ended elsewhere: cancelled); return them."""
        return self.backlog.remove(entry_ids)

    def route(self, now: float) -> list[Action]:
        """Decide every backlog item that can be decided now; the rest keep waiting, each with its reason.

        Interactive requests go first — those that can still be on time, then the late ones
        (``Lateness``) — then batch (aged batch requests promoted). Once
        ``MAX_WAITS_PER_ROUTE`` requests in a row found no worker, the cluster is full: the rest are
        only checked for expiry, and for a deadline the requests ahead of them cannot drain before
        (``admit_by_drain``), so a long backlog costs little while nothing can move.
        """
        self.drain.sample(now, waiting=len(self.backlog) > 0)
        if not len(self.backlog):
            return []
        self.backlog.promote_aged(now)
        self.backlog.demote_late(now, self.lateness.fraction)
        actions: list[Action] = []
        waits_in_a_row = 0
        last_wait = "no worker could take it"
        for position, item in enumerate(self.backlog.in_order()):
            if waits_in_a_row >= MAX_WAITS_PER_ROUTE:
                item.wait_reason = item.wait_reason or f"the cluster was full ({last_wait})"
                ahead = position - len(actions)  # still waiting ahead of it
                if self._expired(item, now):
                    actions.append(self._no_capacity(item, item.wait_reason))
                elif (late := self._undrainable(item, ahead, now)) is not None:
                    actions.append(Reject(item, f"overloaded: {late}", self.retry_after_s(ahead)))
                continue
            decision = self.policy.decide(item.request, self.cluster, now)
            waits_in_a_row = waits_in_a_row + 1 if decision.wait else 0
            if decision.row is not None:
                actions.append(self._dispatch(item, decision, now))
            elif decision.reject:
                actions.append(Reject(item, decision.reason or "no worker can serve it",
                                      self._jittered(decision.retry_after_s)))
            elif self._expired(item, now):
                actions.append(self._no_capacity(item, decision.reason))
            else:
                item.wait_reason = decision.reason
                last_wait = decision.reason or last_wait
        self.backlog.remove({action.item.entry_id for action in actions})
        return actions

    def give_up(self) -> list[Reject]:
        """Reject everything still waiting (a replay that ended with work nobody could take)."""
        rejects = [self._no_capacity(item, item.wait_reason) for item in self.backlog.in_order()]
        self.forget_backlog()
        return rejects

    def ended(self, done: Completion) -> float | None:
        """A job ended on its worker: release its reservation, and learn from it if it completed.

        Returns the prediction error (ms) of a completed job on a known worker, else None.
        """
        self.drain.count()
        row = self.cluster.index.get(done.worker)
        if row is None:
            return None
        if done.status != JobStatus.completed:
            self.cluster.release(row, done.job)
            return None
        return self.cluster.complete(row, done.job, done.prompt_tokens, done.cached_tokens, done.output_tokens,
                                     done.service_ms, done.ttft_ms)

    def retry_after_s(self, ahead: int | None = None) -> float:
        """A hint for requests rejected under load: when ``ahead`` waiting requests (the backlog) drained, jittered."""
        drain_s = self.drain_s(len(self.backlog) if ahead is None else ahead)
        hint = self._jittered(d.REJECT_RETRY_AFTER_S if drain_s is None else drain_s)
        assert hint is not None
        return hint

    def drain_s(self, ahead: int) -> float | None:
        """Predict how long ``ahead`` waiting requests take to leave (s); None when nothing is known yet.

        At the recent drain rate when it is known; else the workers' mean service time for each
        round of their sequence slots the requests fill.
        """
        rate = self.drain.per_s()
        if rate is not None:
            return max(ahead, 1) / rate
        cluster = self.cluster
        serving = cluster.alive & (cluster.service_ms > 0)
        if not serving.any():
            return None
        rounds = max(1.0, ahead / max(int(cluster.slots[cluster.alive].sum()), 1))
        return float(cluster.service_ms[serving].mean()) / 1000.0 * rounds

    def _jittered(self, hint_s: float | None) -> float | None:
        if hint_s is None:
            return None
        spread = self.rng.uniform(1.0 - RETRY_JITTER, 1.0 + RETRY_JITTER)
        return round(min(max(hint_s * spread, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S), 3)

    def _dispatch(self, item: Pending, decision: Decision, now: float) -> Dispatch:
        row = decision.row
        assert row is not None
        self.lateness.dispatched(item, now)
        self.cluster.dispatched(row, item.request, decision.kv_tokens, now, decision.ceiling, decision.prompt_tokens)
        return Dispatch(item, row, self.cluster.ids[row], decision)

    def _expired(self, item: Pending, now: float) -> bool:
        return expired(item.request, item.received_at, now, self.settings.max_wait_s)

    def _no_capacity(self, item: Pending, why: str | None) -> Reject:
        why = why or "no worker could take it while it waited"
        return Reject(item, f"no capacity before its deadline: {why}", self.retry_after_s())
