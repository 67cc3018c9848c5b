"""Discrete-event model of vLLM's scheduler on one GPU: continuous batching, chunked prefill, preemption.

Pure: no asyncio and no clock; the caller passes simulated time in. Each engine step is planned at
the time the previous one ends, as vLLM's V1 scheduler does:

1. every decoding sequence takes one token of the step's budget (``max_num_batched_tokens``) and
   one new KV slot. When the KV cache has too few free slots, the running request with the lowest
   priority and latest admission is preempted (recompute: its KV is freed and it waits at the front
   of the queue to prefill its prompt and generated tokens again), as often as it takes, as vLLM
   does. ``max_preemptions``, when set, fails a request preempted more often than that instead (a
   what-if; vLLM has no such limit);
2. requests still prefilling take chunks of the remaining budget, in admission order;
3. if nothing was preempted, waiting requests (lowest ``priority`` value first, then FIFO) join
   while fewer than ``max_num_seqs`` run, budget is left and all their tokens' KV fits; the head of
   the queue blocks the rest (no skipping), as in vLLM.

Decoding sequences advance in lockstep, so they are kept as one group: a step costs O(1) for the
group however large the batch, and a request's progress is read from the group's step counter only
when it matters (it finishes, is preempted or aborted). A run of steps that only decode leaves the
batch unchanged until the first request finishes or the KV cache runs out, so it is one plan, costed
in closed form (``roofline.decode_steps_time_s``).

Simplifications: KV is counted in tokens, not 16-token blocks, and a request reserves its whole
prompt's KV when admitted; requests sharing a prefix each hold their own KV (vLLM would share the
blocks); the prefix cache is an LRU of block hashes beside the KV cache whose hits skip prefill
compute.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from dio.gpu_worker.engine import RequestRejected
from dio.gpu_worker.sim import roofline
from dio.gpu_worker.sim.profiles import GpuProfile, ModelShape
from dio.protocol.defaults import PREFIX_BLOCK_TOKENS

DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_PREEMPTIONS: int | None = None  # None: recompute as often as it takes, as vLLM does


class EventKind(str, Enum):
    first_token = "first_token"
    finished = "finished"
    failed = "failed"


class Phase(str, Enum):
    waiting = "waiting"
    prefill = "prefill"
    decode = "decode"
    done = "done"


@dataclass(frozen=True, slots=True)
class SchedulerEvent:
    """Something the driver reports to a request's client, at simulated ``time``."""

    kind: EventKind
    request_id: str
    time: float
    output_tokens: int
    cached_tokens: int
    preemptions: int
    error: str | None = None


@dataclass(slots=True, eq=False)
class SimRequest:
    """A request inside the scheduler, with its progress.

    While decoding, ``output_tokens``, ``computed`` and ``kv_tokens`` are as of decode step
    ``tick0``; each step since then added one to each (see ``BatchScheduler._sync``).
    """

    id: str
    prompt_tokens: int
    max_tokens: int
    # Where the model stops (emits EOS), in output tokens: the engine's secret, never the router's.
    # None: it runs to max_tokens. Either way max_tokens caps it.
    eos_tokens: int | None = None
    priority: int = 0
    prefix_hashes: Sequence[int] | None = None
    output_tokens: int = 0
    computed: int = 0  # tokens whose KV has been computed
    kv_tokens: int = 0  # KV slots held
    cached_tokens: int = -1  # prompt tokens the prefix cache served at first admission; -1: not yet
    preemptions: int = 0
    prefix_inserted: bool = False
    phase: Phase = Phase.waiting
    order: int = 0  # place in the waiting queue among equal priorities (negative: preempted)
    admit_seq: int = 0  # admission order: the latest admitted is preempted first
    tick0: int = 0

    @property
    def stop_tokens(self) -> int:
        """Return the output tokens it will have when it finishes: at EOS, or at max_tokens."""
        return self.max_tokens if self.eos_tokens is None else max(1, min(self.eos_tokens, self.max_tokens))

    @property
    def num_tokens(self) -> int:
        """Return the tokens the request knows: prompt plus every sampled token."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """The scheduler's state at its clock."""

    running: int
    waiting: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    kv_usage: float
    preemptions: int
    finished: int
    failed: int
    prefix_hit_tokens: int


@dataclass(slots=True)
class _Plan:
    """The next engine step, or run of identical decode steps, decided at ``start``."""

    start: float
    decode_batch: int  # decoding sequences in each step
    decode_ctx: int  # KV tokens the decoding sequences read in the first step
    duration: float = 0.0
    steps: int = 1  # >1 only for a run of pure decode steps
    preempted: list[SimRequest] = field(default_factory=list)
    failed: list[SimRequest] = field(default_factory=list)
    admitted: list[tuple[SimRequest, int]] = field(default_factory=list)  # (request, cached tokens)
    prefill: list[tuple[SimRequest, int, int]] = field(default_factory=list)  # (request, offset, tokens)

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def victims(self) -> list[SimRequest]:
        return self.preempted + self.failed


class PrefixCache:
    """An LRU of prompt-block hashes; a request's leading cached blocks skip prefill."""

    def __init__(self, capacity_tokens: int, block_tokens: int = PREFIX_BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self._max_blocks = capacity_tokens // block_tokens
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: Sequence[int] | None) -> int:
        """Return how many leading blocks of ``hashes`` are cached (no LRU update)."""
        count = 0
        for h in hashes or ():
            if h not in self._blocks:
                break
            count += 1
        return count

    def touch(self, hashes: Sequence[int], blocks: int) -> None:
        """Mark the first ``blocks`` hashes as just used."""
        for h in hashes[:blocks]:
            self._blocks.move_to_end(h)

    def insert(self, hashes: Sequence[int] | None) -> None:
        """Cache every block of a prompt just prefilled, evicting the least recently used."""
        for h in hashes or ():
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)


def _wait_key(r: SimRequest) -> tuple[int, int]:
    return r.priority, r.order


def _victim_key(r: SimRequest) -> tuple[int, int]:
    return r.priority, r.admit_seq


class BatchScheduler:
    """vLLM's scheduler on one simulated GPU; time is simulated seconds passed in by the caller.

    Drive it with ``add`` and ``abort`` as requests come and go, ``next_event_time`` to know when
    to call ``advance_to`` next, and ``advance_to`` to collect the events due by then.
    """

    def __init__(
        self,
        gpu: GpuProfile,
        model: ModelShape,
        *,
        kv_capacity_tokens: int | None = None,
        gpu_memory_utilization: float = roofline.DEFAULT_GPU_MEMORY_UTILIZATION,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int = roofline.DEFAULT_MAX_BATCHED_TOKENS,
        max_preemptions: int | None = DEFAULT_MAX_PREEMPTIONS,
        prefix_block_tokens: int = PREFIX_BLOCK_TOKENS,
        prefix_cache_tokens: int | None = None,
    ) -> None:
        if max_num_batched_tokens < max_num_seqs:
            # vLLM refuses this too: every running sequence must be able to decode in one step.
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        self.gpu, self.model = gpu, model
        if kv_capacity_tokens is None:
            kv_capacity_tokens = roofline.kv_capacity_tokens(gpu, model, gpu_memory_utilization)
        self.kv_capacity = kv_capacity_tokens
        self.max_model_len = min(model.max_context, kv_capacity_tokens)
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_num_batched_tokens
        self.max_preemptions = max_preemptions
        self.prefix_cache = PrefixCache(prefix_cache_tokens or kv_capacity_tokens, prefix_block_tokens)
        self.now = 0.0  # when the next step can start: the end of the last step executed
        self.kv_used = 0
        self.preemptions = self.finished = self.failed = self.prefix_hit_tokens = 0
        self._requests: dict[str, SimRequest] = {}
        self._waiting: list[SimRequest] = []  # sorted by (priority, order)
        self._prefilling: list[SimRequest] = []  # admission order
        self._decoding: dict[str, SimRequest] = {}
        self._tick = 0  # decode steps the decoding group has taken
        self._decode_ctx = 0  # sum of (computed + 1) over decoding requests: what a decode step reads
        self._finish_heap: list[tuple[int, int, SimRequest]] = []  # (finish tick, admit_seq, request)
        self._pending: deque[SchedulerEvent] = deque()  # events of executed steps, in time order
        self._plan: _Plan | None = None
        self._seq = 0

    # --- the driver's interface ------------------------------------------------------------------

    def add(self, request: SimRequest, now: float) -> None:
        """Queue ``request``, arrived at ``now``.

        Raises:
            RequestRejected: the prompt plus max_tokens exceed max_model_len (vLLM's 400).
            ValueError: a request with this id is already in the scheduler.
        """
        if request.id in self._requests:
            raise ValueError(f"request {request.id!r} is already scheduled")
        self._check_length(request)
        self._run_until(now)
        self.now = max(self.now, now)  # the GPU idled until this arrival
        request.order = self._next_seq()
        self._requests[request.id] = request
        bisect.insort(self._waiting, request, key=_wait_key)
        self._plan = None  # the next step may take the newcomer

    def abort(self, request_id: str, now: float) -> SimRequest | None:
        """Remove a request at ``now`` (freeing its KV); return it, or None if it is not here."""
        self._run_until(now)
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        if request.phase is Phase.waiting:
            self._waiting.remove(request)
        else:
            self._release(request)
        request.phase = Phase.done
        self._plan = None
        return request

    def next_event_time(self) -> float | None:
        """Return when ``advance_to`` next has something to do; None when idle."""
        plan = self._current_plan()  # may fail a request at once (a preemption past the limit)
        if self._pending:
            return self._pending[0].time
        return None if plan is None else plan.end

    def advance_to(self, t: float) -> list[SchedulerEvent]:
        """Run every step that starts before ``t``; return the events due by ``t``."""
        self._run_until(t)
        events = []
        while self._pending and self._pending[0].time <= t:
            events.append(self._pending.popleft())
        return events

    def progress(self, request_id: str) -> int:
        """Return a request's output tokens as of the scheduler's clock (0 when it is not here)."""
        r = self._requests.get(request_id)
        if r is None:
            return 0
        return r.output_tokens + (self._tick - r.tick0 if r.phase is Phase.decode else 0)

    def stats(self) -> SchedulerStats:
        """Return the state at the scheduler's clock (``self.now``)."""
        return SchedulerStats(
            running=len(self._decoding) + len(self._prefilling),
            waiting=len(self._waiting),
            kv_used_tokens=self.kv_used,
            kv_capacity_tokens=self.kv_capacity,
            kv_usage=self.kv_used / self.kv_capacity,
            preemptions=self.preemptions,
            finished=self.finished,
            failed=self.failed,
            prefix_hit_tokens=self.prefix_hit_tokens,
        )

    # --- planning: decides the next step at self.now, changes nothing but stale heap entries ------

    def _check_length(self, request: SimRequest) -> None:
        if request.prompt_tokens < 1 or request.max_tokens < 1:
            raise RequestRejected("prompt_tokens and max_tokens must be at least 1")
        total = request.prompt_tokens + request.max_tokens
        if total > self.max_model_len:
            raise RequestRejected(
                f"prompt ({request.prompt_tokens} tokens) + max_tokens ({request.max_tokens}) = {total}"
                f" exceeds max_model_len {self.max_model_len} of {self.model.name} on {self.gpu.name}"
            )

    def _current_plan(self) -> _Plan | None:
        # A plan that only preempts takes no GPU time: apply it at once and plan again.
        while self._plan is None and self._requests:
            plan = self._make_plan()
            if plan.decode_batch or plan.prefill:
                self._plan = plan
            elif plan.victims:
                self._execute(plan, 1)
            else:  # cannot happen: with nothing running, the head of the queue always fits
                raise RuntimeError(f"scheduler stuck: {len(self._waiting)} waiting, nothing schedulable")
        return self._plan

    def _make_plan(self) -> _Plan:
        """Decide the next step from the state at ``self.now``."""
        plan = _Plan(start=self.now, decode_batch=len(self._decoding), decode_ctx=self._decode_ctx)
        free = self._choose_victims(plan, self.kv_capacity - self.kv_used)
        budget = self.max_batched_tokens - plan.decode_batch
        victims = plan.victims
        for r in self._prefilling:
            if budget <= 0:
                break
            if r not in victims:
                tokens = min(r.num_tokens - r.computed, budget)
                plan.prefill.append((r, r.computed, tokens))
                budget -= tokens
        if victims:  # as in vLLM: a step that preempts admits nobody
            plan.duration = self._step_time(plan)
            return plan
        # This step's decode tokens take their KV slots before any newcomer does.
        self._admit_waiting(plan, free - plan.decode_batch, budget)
        if plan.prefill or not plan.decode_batch:
            plan.duration = self._step_time(plan)
            return plan
        return self._decode_run(plan)

    def _choose_victims(self, plan: _Plan, free: int) -> int:
        """Preempt until every decoding sequence has a free KV slot; return the slots left."""
        if free >= plan.decode_batch:
            return free
        running = itertools.chain(self._decoding.values(), self._prefilling)
        for victim in sorted(running, key=_victim_key, reverse=True):
            if free >= plan.decode_batch:
                break
            kv = victim.kv_tokens
            if victim.phase is Phase.decode:
                kv += self._tick - victim.tick0
                plan.decode_batch -= 1
                plan.decode_ctx -= victim.computed + (self._tick - victim.tick0) + 1
            free += kv
            over = self.max_preemptions is not None and victim.preemptions + 1 > self.max_preemptions
            (plan.failed if over else plan.preempted).append(victim)
        return free

    def _admit_waiting(self, plan: _Plan, free: int, budget: int) -> None:
        """Admit waiting requests in queue order while seats, budget and KV for all their tokens last."""
        running = len(self._decoding) + len(self._prefilling)
        for r in self._waiting:
            if budget <= 0 or running >= self.max_num_seqs or r.num_tokens > free:
                break
            blocks = self.prefix_cache.match(r.prefix_hashes)
            cached = min(blocks * self.prefix_cache.block_tokens, r.num_tokens - 1)
            tokens = min(r.num_tokens - cached, budget)
            plan.admitted.append((r, cached))
            plan.prefill.append((r, cached, tokens))
            running += 1
            free -= r.num_tokens
            budget -= tokens

    def _decode_run(self, plan: _Plan) -> _Plan:
        """Extend a pure decode step until the first request finishes or the KV cache runs out."""
        free = self.kv_capacity - self.kv_used
        plan.steps = max(1, min(self._next_finish_tick() - self._tick, free // plan.decode_batch))
        plan.duration = roofline.decode_steps_time_s(
            self.gpu, self.model, plan.decode_batch, plan.decode_ctx, plan.steps
        )
        return plan

    def _next_finish_tick(self) -> int:
        heap = self._finish_heap
        while heap and not self._heap_entry_live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0]

    @staticmethod
    def _heap_entry_live(entry: tuple[int, int, SimRequest]) -> bool:
        _, admit_seq, r = entry
        return r.phase is Phase.decode and r.admit_seq == admit_seq

    def _step_time(self, plan: _Plan) -> float:
        prefill = sum(tokens for _, _, tokens in plan.prefill)
        # A decode query attends to each token of its context: as many KV reads as attention pairs.
        kv_read = plan.decode_ctx
        pairs: float = plan.decode_ctx  # a prefill chunk's causal triangle adds half-pairs
        for _, offset, tokens in plan.prefill:
            kv_read += offset + tokens
            pairs += tokens * offset + tokens * (tokens + 1) / 2
        return roofline.step_time_s(self.gpu, self.model, prefill, plan.decode_batch, kv_read, attention_pairs=pairs)

    # --- execution: applies plans, emits events ---------------------------------------------------

    def _run_until(self, t: float) -> None:
        """Execute every step that starts before ``t`` (a step once started runs to its end)."""
        while self.now < t:
            plan = self._current_plan()
            if plan is None:
                return
            steps = 1
            if plan.steps > 1:
                steps = roofline.decode_steps_started(
                    self.gpu, self.model, plan.decode_batch, plan.decode_ctx, plan.steps, t - plan.start
                )
            self._execute(plan, steps)
            self._plan = None

    def _execute(self, plan: _Plan, steps: int) -> None:
        """Apply the first ``steps`` steps of ``plan``: preemptions, admissions, tokens, then events."""
        for r in plan.preempted:
            self._preempt(r)
        for r in plan.failed:
            self._fail(r, plan.start)
        for r, cached in plan.admitted:
            self._admit(r, cached)
        end = plan.end
        if steps != plan.steps:
            duration = roofline.decode_steps_time_s(self.gpu, self.model, plan.decode_batch, plan.decode_ctx, steps)
            end = plan.start + duration
        self._decode_steps(steps)
        for r, _, tokens in plan.prefill:
            r.computed += tokens
        self.now = end
        for r, _, _ in plan.prefill:
            if r.computed == r.num_tokens:
                self._sample_first(r, end)
        self._finish_due(end)

    def _decode_steps(self, steps: int) -> None:
        """Advance every decoding sequence by ``steps`` tokens (each takes one more KV slot per step)."""
        batch = len(self._decoding)
        self._tick += steps
        self.kv_used += batch * steps
        self._decode_ctx += batch * steps

    def _sample_first(self, r: SimRequest, t: float) -> None:
        """Sample the token that ends ``r``'s prefill; it then decodes with the group or is done."""
        if not r.prefix_inserted and r.prefix_hashes:
            self.prefix_cache.insert(r.prefix_hashes)
            r.prefix_inserted = True
        r.output_tokens += 1
        if r.output_tokens == 1:
            self._emit(EventKind.first_token, r, t)
        if r.output_tokens >= r.stop_tokens:
            self._finish(r, t)
            return
        self._prefilling.remove(r)
        r.phase, r.tick0 = Phase.decode, self._tick
        self._decoding[r.id] = r
        self._decode_ctx += r.computed + 1
        heapq.heappush(self._finish_heap, (self._tick + r.stop_tokens - r.output_tokens, r.admit_seq, r))

    def _finish_due(self, t: float) -> None:
        heap = self._finish_heap
        while heap and heap[0][0] <= self._tick:
            entry = heapq.heappop(heap)
            if self._heap_entry_live(entry):
                self._finish(entry[2], t)

    def _admit(self, r: SimRequest, cached: int) -> None:
        self._waiting.remove(r)
        if r.prefix_hashes and cached:
            self.prefix_cache.touch(r.prefix_hashes, -(-cached // self.prefix_cache.block_tokens))
        if r.cached_tokens < 0:
            r.cached_tokens = cached
            self.prefix_hit_tokens += cached
        r.computed = cached
        r.kv_tokens = r.num_tokens
        self.kv_used += r.kv_tokens
        r.admit_seq = self._next_seq()
        r.phase = Phase.prefill
        self._prefilling.append(r)

    def _sync(self, r: SimRequest) -> None:
        """Bring a decoding request's counters up to the group's current step."""
        delta = self._tick - r.tick0
        r.output_tokens += delta
        r.computed += delta
        r.kv_tokens += delta
        r.tick0 = self._tick

    def _release(self, r: SimRequest) -> None:
        """Take ``r`` out of the running batch and free its KV."""
        if r.phase is Phase.decode:
            self._sync(r)
            del self._decoding[r.id]
            self._decode_ctx -= r.computed + 1
        else:
            self._prefilling.remove(r)
        self.kv_used -= r.kv_tokens
        r.kv_tokens = r.computed = 0

    def _preempt(self, r: SimRequest) -> None:
        """Send ``r`` back to the front of the queue; it recomputes its prompt and output."""
        self._release(r)
        r.preemptions += 1
        self.preemptions += 1
        r.phase = Phase.waiting
        r.order = -self._next_seq()  # ahead of every arrival of its priority, latest preempted first
        bisect.insort(self._waiting, r, key=_wait_key)

    def _fail(self, r: SimRequest, t: float) -> None:
        self._release(r)
        r.preemptions += 1
        self.preemptions += 1
        self.failed += 1
        self._end(r)
        error = f"KV cache exhausted: preempted {r.preemptions} times on {self.gpu.name}"
        self._emit(EventKind.failed, r, t, error)

    def _finish(self, r: SimRequest, t: float) -> None:
        self._release(r)
        self.finished += 1
        self._end(r)
        self._emit(EventKind.finished, r, t)

    def _end(self, r: SimRequest) -> None:
        r.phase = Phase.done
        del self._requests[r.id]

    def _emit(self, kind: EventKind, r: SimRequest, t: float, error: str | None = None) -> None:
        cached = max(r.cached_tokens, 0)
        self._pending.append(SchedulerEvent(kind, r.id, t, r.output_tokens, cached, r.preemptions, error))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq
