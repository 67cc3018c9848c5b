"""The dispatcher's view of the workers, as parallel numpy arrays (pure: no I/O).

One row per known worker. The service refreshes capabilities and telemetry from Redis and keeps
``reserved_kv`` / ``outstanding`` current as it dispatches and as completions come back; filters,
scorers and pickers read the arrays, so one decision costs a few vector operations whatever the
number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from dio.dispatcher.predictors import Predictor, make_predictor
from dio.dispatcher.prefix import PrefixIndex
from dio.dispatcher.prior import roofline_prior, token_priors
from dio.dispatcher.token_latency import OutputLengths, TokenLatency
from dio.protocol.models import Request, WorkerInfo, WorkerTelemetry

DEFAULT_LOAD_UNIT_TOKENS = 50_000.0  # when a worker does not report its weights (≈ a 3B model's)
BACKLOG_UNIT_TOKENS = 10_000.0  # the prefill backlog feature counts prompt tokens in these units
PROMPT_RATE_WINDOW_S = 5.0  # the recent prompt-token rate sent to a worker averages over about this long
DEFAULT_PREFILL_TOKENS_S = 10_000.0  # a worker's prefill rate while its TTFT predictor knows nothing


class Held(NamedTuple):
    """One job's reservation on a worker, and what the worker looked like when it was sent."""

    kv_tokens: int
    prompt_tokens: int  # to prefill there (net of prefix-cache hits)
    load: float  # the worker's KV load with the job (the predictor's load feature)
    backlog: float  # the worker's prefill backlog before the job (the predictor's backlog feature)
    ceiling: float  # the load past which the job misses its deadline (inf: none)
    max_tokens: int = 0  # its cap, to learn what fraction of it the job produced
    queue: float = 0.0  # prompt tokens waiting to be prefilled there before it (in BACKLOG_UNIT_TOKENS)
    prefill_share: float = 0.0  # the share of the worker's time going to prefill when it was sent


@dataclass
class Cluster:
    predictor_kind: str = "vector"
    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    infos: list[WorkerInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.predictor: Predictor = make_predictor(self.predictor_kind)
        self.tokens = TokenLatency()  # per-worker TTFT and TPOT
        # The TTFT and TPOT prediction errors (ms) of the last completion learned (None: not predicted),
        # for the dispatcher's metrics.
        self.token_errors: tuple[float | None, float | None] = (None, None)
        self.outputs: dict[str, OutputLengths] = {}  # per model: output tokens / max_tokens seen
        self.prefix = PrefixIndex()  # which workers probably cache which prompt-prefix blocks
        self.model = np.zeros(0, dtype=object)
        self.kv_capacity = np.zeros(0, dtype=np.int64)  # KV tokens the engine can hold
        self.max_model_len = np.zeros(0, dtype=np.int64)
        self.slots = np.zeros(0, dtype=np.int64)  # sequences the engine runs at once
        self.reserved_kv = np.zeros(0, dtype=np.int64)  # KV tokens of jobs sent, not yet ended
        self.outstanding = np.zeros(0, dtype=np.int64)  # jobs sent, not yet ended
        self.alive = np.zeros(0, dtype=bool)
        self.draining = np.zeros(0, dtype=bool)
        self.running = np.zeros(0, dtype=np.int64)
        self.waiting = np.zeros(0, dtype=np.int64)
        self.kv_usage = np.zeros(0)
        self.service_ms = np.zeros(0)  # recent mean service time, for queue-wait estimates
        # KV tokens whose bytes equal the model's weights: a decode step reads the weights plus the
        # batch's KV, so (KV in flight / load_unit) is how much slower each token gets.
        self.load_unit = np.zeros(0)
        # Per-worker reservations by job id, so a completion releases exactly what was reserved.
        self.reservations: list[dict[str, Held]] = []
        # Prompt tokens (net of prefix-cache hits) of the jobs on each worker: prefill work that may
        # still be queued ahead of a new request there (the predictor's backlog feature).
        self.prompt_in_flight = np.zeros(0, dtype=np.int64)
        # The lowest load ceiling of the jobs on each worker: the load (in weight units) past which
        # one of them is predicted to miss its deadline (see dispatcher.deadlines). inf: none at risk.
        self.ceiling = np.zeros(0)
        # A fluid model of each worker's prefill queue: uncached prompt tokens sent and probably not
        # prefilled yet, drained at the worker's prefill rate since ``prefill_stamp`` (s).
        self.prefill_queue = np.zeros(0)
        self.prefill_stamp = np.zeros(0)
        # Uncached prompt tokens sent to each worker per second, recently (an exponential average).
        self.prompt_rate = np.zeros(0)
        self.rate_stamp = np.zeros(0)

    def __len__(self) -> int:
        return len(self.ids)

    _ARRAYS = ("model", "kv_capacity", "max_model_len", "slots", "reserved_kv", "outstanding",
               "alive", "draining", "running", "waiting", "kv_usage", "service_ms", "load_unit", "ceiling",
               "prompt_in_flight", "prefill_queue", "prefill_stamp", "prompt_rate", "rate_stamp")

    def upsert(self, info: WorkerInfo) -> int:
        """Add a worker or refresh its capabilities; return its row."""
        row = self.index.get(info.id)
        if row is None:
            row = len(self.ids)
            self.ids.append(info.id)
            self.index[info.id] = row
            self.infos.append(info)
            self.reservations.append({})
            for name in self._ARRAYS:
                arr = getattr(self, name)
                setattr(self, name, np.append(arr, np.zeros(1, dtype=arr.dtype)))
            self.ceiling[row] = np.inf
            self.predictor.add_row()
            self.tokens.add_row()
            prior = roofline_prior(info)
            if prior is not None:
                self.predictor.prime(row, prior)
            priors = token_priors(info)
            if priors is not None:
                self.tokens.prime(row, *priors)
        self.infos[row] = info
        self.prefix.set_capacity(info.id, info.kv_capacity_tokens // self.prefix.block_tokens)
        self.model[row] = info.model
        self.kv_capacity[row] = info.kv_capacity_tokens
        self.max_model_len[row] = info.max_model_len
        self.slots[row] = info.max_num_seqs
        known = info.weight_bytes > 0 and info.kv_bytes_per_token > 0
        self.load_unit[row] = info.weight_bytes / info.kv_bytes_per_token if known else DEFAULT_LOAD_UNIT_TOKENS
        return row

    def remove(self, worker_id: str) -> None:
        """Forget a worker (its jobs were taken back)."""
        row = self.index.pop(worker_id)
        del self.ids[row]
        del self.infos[row]
        del self.reservations[row]
        for name in self._ARRAYS:
            setattr(self, name, np.delete(getattr(self, name), row))
        self.predictor.remove_row(row)
        self.tokens.remove_row(row)
        self.prefix.forget_worker(worker_id)
        self.index = {wid: i for i, wid in enumerate(self.ids)}

    def set_telemetry(self, row: int, telemetry: WorkerTelemetry, alive: bool) -> None:
        self.alive[row] = alive
        self.draining[row] = telemetry.draining
        self.running[row] = telemetry.running
        self.waiting[row] = telemetry.waiting
        self.kv_usage[row] = telemetry.kv_usage

    def load_with(self, kv_tokens: int) -> np.ndarray:
        """Each worker's KV load with a new request of ``kv_tokens``, in units of its weights' size."""
        return (self.reserved_kv + kv_tokens) / self.load_unit

    def load_now(self) -> np.ndarray:
        """Each worker's KV load now, in units of its weights' size."""
        return self.reserved_kv / self.load_unit

    def backlogs(self) -> np.ndarray:
        """Each worker's prefill backlog, in units of BACKLOG_UNIT_TOKENS prompt tokens."""
        return self.prompt_in_flight / BACKLOG_UNIT_TOKENS

    def prefill_rates(self) -> np.ndarray:
        """Prompt tokens per second each worker prefills, from its TTFT predictor (ms per 1,000 tokens)."""
        per_1k_ms = self.tokens.prefill_ms_per_1k()
        return np.where(per_1k_ms > 0, 1e6 / np.maximum(per_1k_ms, 1e-9), DEFAULT_PREFILL_TOKENS_S)

    def queued_prefill(self, now: float) -> np.ndarray:
        """Each worker's prefill queue at ``now``, in BACKLOG_UNIT_TOKENS prompt tokens (fluid model)."""
        drained = self.prefill_rates() * np.maximum(now - self.prefill_stamp, 0.0)
        return np.maximum(self.prefill_queue - drained, 0.0) / BACKLOG_UNIT_TOKENS

    def prompt_rates(self, now: float) -> np.ndarray:
        """Uncached prompt tokens per second each worker was sent recently (decayed to ``now``)."""
        return self.prompt_rate * np.exp(-np.maximum(now - self.rate_stamp, 0.0) / PROMPT_RATE_WINDOW_S)

    def prefill_shares(self, now: float, extra_tokens: float | np.ndarray = 0.0) -> np.ndarray:
        """The share of each worker's time its recent prompts take to prefill, with ``extra_tokens`` more."""
        rates = self.prompt_rates(now) + np.asarray(extra_tokens, dtype=float) / PROMPT_RATE_WINDOW_S
        return rates / self.prefill_rates()

    def _note_prompt(self, row: int, tokens: int, now: float) -> None:
        self.prefill_queue[row] = self.queued_prefill(now)[row] * BACKLOG_UNIT_TOKENS + tokens
        self.prefill_stamp[row] = now
        self.prompt_rate[row] = self.prompt_rates(now)[row] + tokens / PROMPT_RATE_WINDOW_S
        self.rate_stamp[row] = now

    def reserve(self, row: int, job_id: str, kv_tokens: int, ceiling: float = np.inf, prompt_tokens: int = 0,
                max_tokens: int = 0, now: float | None = None) -> None:
        """Count a job sent to a worker until its completion comes back.

        ``ceiling`` is the worker load past which this job would miss its deadline (inf: none);
        ``prompt_tokens`` the prompt it must prefill there (net of cache hits).
        """
        backlog = float(self.prompt_in_flight[row] / BACKLOG_UNIT_TOKENS)
        queue = share = 0.0
        if now is not None:
            queue = float(self.queued_prefill(now)[row])
            share = float(self.prefill_shares(now)[row])
            self._note_prompt(row, prompt_tokens, now)
        self.reserved_kv[row] += kv_tokens
        self.prompt_in_flight[row] += prompt_tokens
        load = float(self.reserved_kv[row] / self.load_unit[row])
        self.reservations[row][job_id] = Held(kv_tokens, prompt_tokens, load, backlog, ceiling, max_tokens, queue,
                                              share)
        self.outstanding[row] += 1
        self.ceiling[row] = min(self.ceiling[row], ceiling)

    def release(self, row: int, job_id: str) -> Held | None:
        """Release a finished job's reservation; return it (None if not held)."""
        held = self.reservations[row].pop(job_id, None)
        if held is None:
            return None
        self.reserved_kv[row] -= held.kv_tokens
        self.prompt_in_flight[row] -= held.prompt_tokens
        self.outstanding[row] -= 1
        if held.ceiling <= self.ceiling[row]:
            self._reset_ceiling(row)
        return held

    def _reset_ceiling(self, row: int) -> None:
        self.ceiling[row] = min((held.ceiling for held in self.reservations[row].values()), default=np.inf)

    def sync_reservations(self, row: int, held: dict[str, int]) -> None:
        """Replace a worker's reservations with the ones Redis holds (the source of truth)."""
        total = sum(held.values())
        known = self.reservations[row]
        load = float(total / self.load_unit[row])
        self.reservations[row] = {job: known.get(job, Held(kv, 0, load, 0.0, np.inf)) for job, kv in held.items()}
        self.reserved_kv[row] = total
        self.prompt_in_flight[row] = sum(h.prompt_tokens for h in self.reservations[row].values())
        self.outstanding[row] = len(held)
        self._reset_ceiling(row)

    def dispatched(self, row: int, request: Request, kv_tokens: int, now: float, ceiling: float = np.inf,
                   prompt_tokens: int = 0) -> None:
        """Count a request sent to a worker at ``now``: reserve its KV, queue its prefill, remember its prefix."""
        self.reserve(row, request.id, kv_tokens, ceiling, prompt_tokens, request.max_tokens, now)
        self.prefix.record(request.prefix_hashes, self.ids[row])

    def cached_tokens(self, prompt_tokens: int, prefix_hashes: list[int] | None) -> np.ndarray:
        """Prompt tokens each worker probably has in its prefix cache (never the whole prompt)."""
        if not prefix_hashes:
            return np.zeros(len(self.ids), dtype=np.int64)
        matched = self.prefix.matched_blocks(prefix_hashes, self.ids, np.arange(len(self.ids)))
        return np.minimum(matched * self.prefix.block_tokens, prompt_tokens - 1)

    def complete(self, row: int, job_id: str, prompt_tokens: int, cached_tokens: int, output_tokens: int,
                 service_ms: float, ttft_ms: float | None = None) -> float:
        """Release a completed job and learn from it, at the load it was sent with; return the error (ms).

        The predictors learn the prompt tokens the worker computed: a cached prefix costs no prefill.
        """
        held = self.release(row, job_id)
        load, backlog = (held.load, held.backlog) if held else (float(self.load_now()[row]), 0.0)
        uncached = max(prompt_tokens - cached_tokens, 1)
        queue, share = (held.queue, held.prefill_share) if held else (0.0, 0.0)
        predicted = bool(self.tokens.warm[row])
        errors = self.tokens.learn(row, uncached, output_tokens, ttft_ms, service_ms, load, queue, share)
        self.token_errors = errors if predicted else (None, None)
        if held is not None and held.max_tokens:
            self.outputs_of(str(self.model[row])).learn(output_tokens, held.max_tokens)
        return self.learn(row, uncached, output_tokens, service_ms, load, backlog)

    def outputs_of(self, model: str) -> OutputLengths:
        """What requests for ``model`` produced so far (output / max_tokens)."""
        if model not in self.outputs:
            self.outputs[model] = OutputLengths()
        return self.outputs[model]

    def learn(self, row: int, prompt_tokens: int, output_tokens: int, service_ms: float, load: float,
              backlog: float = 0.0) -> float:
        """Feed one completion to the worker's predictor; return the prediction error (ms).

        ``prompt_tokens`` counts what the worker computed: a prompt's cached prefix costs no prefill.
        """
        alpha = 0.1
        previous = self.service_ms[row]
        self.service_ms[row] = service_ms if previous == 0 else (1 - alpha) * previous + alpha * service_ms
        return self.predictor.update(row, prompt_tokens, output_tokens, service_ms, load, backlog)
