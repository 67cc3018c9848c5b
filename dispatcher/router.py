"""The routing core: a backlog, a policy and the cluster state, driven by a clock (pure: no I/O).

Two drivers run it: the dispatcher (``dio.dispatcher.service``: Redis streams, Lua scripts, wall
time) and the virtual replay (``dio.ops.bench.virtual``: simulated GPUs, a discrete-event clock).
Each feeds it requests (``accept``), asks what to do now (``route``), carries the answers out with
its own I/O (a hand-off to a worker's queue; a simulated GPU's ``add``), and reports every job that
ended (``ended``). So every rule — tiers and the promotion of aged batch requests, the backlog
bound, expiry, the waits per route, KV reservations, prefix records, learning from completions —
is one piece of code, configured by one ``DispatcherSettings``, whichever driver runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dio.dispatcher.backlog import Backlog, Pending, expired
from dio.dispatcher.cluster import Cluster
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.policies import make_policy
from dio.dispatcher.policy import Decision, Policy
from dio.protocol import defaults as d
from dio.protocol.models import Completion, JobStatus

MAX_WAITS_PER_ROUTE = 64  # after this many requests in a row found no worker, the rest wait too


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
        self.backlog = Backlog(settings.batch_age_s)

    def accept(self, item: Pending) -> Reject | None:
        """Queue a request for routing; shed it at once (a rejection) when the backlog is full."""
        if len(self.backlog) >= self.settings.max_backlog:
            return Reject(item, f"overloaded: {len(self.backlog)} requests already waiting", self.retry_after_s())
        self.backlog.add(item)
        return None

    def forget_backlog(self) -> None:
        """Drop every waiting request (this dispatcher lost the lease: another one routes them now)."""
        self.backlog = Backlog(self.settings.batch_age_s)

    def route(self, now: float) -> list[Action]:
        """Decide every backlog item that can be decided now; the rest keep waiting, each with its reason.

        Interactive requests go first, then batch (aged batch requests promoted). Once
        ``MAX_WAITS_PER_ROUTE`` requests in a row found no worker, the cluster is full: the rest are
        only checked for expiry, so a long backlog costs little while nothing can move.
        """
        if not len(self.backlog):
            return []
        self.backlog.promote_aged(now)
        actions: list[Action] = []
        waits_in_a_row = 0
        for item in self.backlog.in_order():
            if waits_in_a_row >= MAX_WAITS_PER_ROUTE:
                if self._expired(item, now):
                    actions.append(self._no_capacity(item, item.wait_reason))
                continue
            decision = self.policy.decide(item.request, self.cluster, now)
            waits_in_a_row = waits_in_a_row + 1 if decision.wait else 0
            if decision.row is not None:
                actions.append(self._dispatch(item, decision, now))
            elif decision.reject:
                actions.append(Reject(item, decision.reason or "no worker can serve it", decision.retry_after_s))
            elif self._expired(item, now):
                actions.append(self._no_capacity(item, decision.reason))
            else:
                item.wait_reason = decision.reason
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
        row = self.cluster.index.get(done.worker)
        if row is None:
            return None
        if done.status != JobStatus.completed:
            self.cluster.release(row, done.job)
            return None
        return self.cluster.complete(row, done.job, done.prompt_tokens, done.cached_tokens, done.output_tokens,
                                     done.service_ms, done.ttft_ms)

    def retry_after_s(self) -> float:
        """A hint for shed requests: about one mean service time of the cluster."""
        cluster = self.cluster
        alive = cluster.service_ms[cluster.alive & (cluster.service_ms > 0)]
        return round(float(alive.mean()) / 1000.0, 3) if len(alive) else d.REJECT_RETRY_AFTER_S

    def _dispatch(self, item: Pending, decision: Decision, now: float) -> Dispatch:
        row = decision.row
        assert row is not None
        self.cluster.dispatched(row, item.request, decision.kv_tokens, now, decision.ceiling, decision.prompt_tokens)
        return Dispatch(item, row, self.cluster.ids[row], decision)

    def _expired(self, item: Pending, now: float) -> bool:
        return expired(item.request, item.received_at, now, self.settings.max_wait_s)

    def _no_capacity(self, item: Pending, why: str | None) -> Reject:
        return Reject(item, f"no capacity before its deadline: {why}", self.retry_after_s())
