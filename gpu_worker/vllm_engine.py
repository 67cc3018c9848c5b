"""The vLLM engine: DIO's ``Engine`` interface over vLLM's ``AsyncLLM``, used unmodified.

vLLM batches every request in flight (continuous batching); the daemon calls ``stream`` once per
job, concurrently, from one event loop. vLLM is imported only in ``start`` (through
``load_vllm_backend``), so this module imports on machines without it; CPU tests replace the
backend with a stand-in (``gpu_worker/vllm_standin.py``).

Models without downloads: ``gpu_worker/models/<name>/config.json`` holds real Llama shapes but no
weights and no tokenizer, so they run with random weights (``load_format="dummy"``) and token-id
prompts. A text prompt sent to such a model becomes ``prompt_tokens`` synthetic token ids
(``synthetic_token_ids``): the timing physics are real, the text is noise either way.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dio.gpu_worker import nvml
from dio.gpu_worker.chat_template import read_chat_template
from dio.gpu_worker.engine import (
    Engine,
    EngineCapacity,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    OutOfMemory,
    RequestRejected,
)
from dio.gpu_worker.sim.profiles import match_profile
from dio.protocol.defaults import CHARS_PER_TOKEN

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FIRST_SYNTHETIC_TOKEN_ID = 3  # skip the usual pad/bos/eos ids
DEFAULT_VOCAB_SIZE = 32000
# Aborts of ids not (yet) in vLLM are remembered so a stream that starts later ends at once;
# aborts of already finished jobs land there too, hence the bound.
MAX_PENDING_ABORTS = 4096

# Names in vllm.v1.metrics.reader.get_metrics_snapshot() (vLLM 0.26.0, v1/metrics/loggers.py).
# Counters appear without their "_total" sample suffix; both spellings are accepted.
METRIC_RUNNING = "vllm:num_requests_running"
METRIC_WAITING = "vllm:num_requests_waiting"
METRIC_KV_USAGE = "vllm:kv_cache_usage_perc"  # a fraction, 0..1, despite the name
METRIC_PREEMPTIONS = ("vllm:num_preemptions", "vllm:num_preemptions_total")
METRIC_PREFIX_QUERIES = ("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total")
METRIC_PREFIX_HITS = ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")


# --- model folders ----------------------------------------------------------------------------------


def bundled_model_path(name: str) -> Path:
    """Return the folder of a model shipped with DIO (e.g. "llama-3.2-3b"); KeyError if unknown."""
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        known = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())
        raise KeyError(f"no bundled model {name!r}; bundled: {', '.join(known)}")
    return path


def resolve_model(name_or_path: str) -> str:
    """Return a local folder as is, a bundled model's folder by name, else the name (a hub id)."""
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path))
    try:
        return str(bundled_model_path(name_or_path))
    except KeyError:
        return name_or_path


def has_tokenizer(model: str) -> bool:
    """Tell whether a model has a tokenizer; a model that is not a local folder is assumed to."""
    path = Path(model)
    if not path.is_dir():
        return True
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def has_weights(model: str) -> bool:
    """Tell whether a model has weight files; a model that is not a local folder is assumed to."""
    path = Path(model)
    if not path.is_dir():
        return True
    return any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir())


def read_model_config(model: str) -> dict[str, Any]:
    """Return a local model folder's config.json as a dict ({} when there is none)."""
    path = Path(model) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int = 2) -> int:
    """Return the KV-cache bytes one token takes: 2 (K and V) x layers x KV heads x head dim x dtype.

    Args:
        config: a Hugging Face config.json as a dict (Llama-style field names).
        dtype_bytes: bytes per KV element (2 for bf16/fp16, 1 for fp8).
    """
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or 0) // heads)
    layers = int(config.get("num_hidden_layers") or 0)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def weight_bytes(config: dict[str, Any], dtype_bytes: int = 2) -> int:
    """Return the bytes a Llama-style model's weights take (0 if the config lacks the shape).

    Per layer: q and o (hidden²), k and v (hidden × KV width), the gated MLP (3 × hidden ×
    intermediate); plus the embeddings and, unless tied, the LM head.
    """
    hidden = int(config.get("hidden_size") or 0)
    layers = int(config.get("num_hidden_layers") or 0)
    inter = int(config.get("intermediate_size") or 0)
    vocab = int(config.get("vocab_size") or 0)
    if not (hidden and layers and inter and vocab):
        return 0
    heads = int(config.get("num_attention_heads") or 1)
    kv_width = int(config.get("num_key_value_heads") or heads) * int(config.get("head_dim") or hidden // heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return (layers * per_layer + embeddings) * dtype_bytes


def synthetic_token_ids(text: str, count: int, vocab_size: int) -> list[int]:
    """Return ``count`` deterministic token ids standing for ``text`` (for models without a tokenizer).

    Token i hashes characters [4i, 4i+4) of the text, so equal text prefixes give equal token
    prefixes (the prefix cache behaves as with a real tokenizer); past the end of the text the ids
    hash the text and the position. The model has random weights: the ids are noise either way.
    """
    span = max(1, vocab_size - FIRST_SYNTHETIC_TOKEN_ID)
    ids = []
    for i in range(count):
        chunk = text[CHARS_PER_TOKEN * i : CHARS_PER_TOKEN * (i + 1)]  # as DIO's estimate counts
        seed = chunk if chunk else f"{text}\x00{i}"
        ids.append(FIRST_SYNTHETIC_TOKEN_ID + zlib.crc32(seed.encode()) % span)
    return ids


# --- the backend: what of vLLM the adapter calls -------------------------------------------------------


@dataclass
class VllmBackend:
    """The parts of vLLM the adapter calls; CPU tests pass a stand-in with the same shapes."""

    make_engine: Callable[[dict[str, Any]], Any]  # AsyncEngineArgs fields -> a started AsyncLLM
    sampling_params: Callable[..., Any]  # vllm.SamplingParams
    metrics_snapshot: Callable[[], list[Any]]  # vllm.v1.metrics.reader.get_metrics_snapshot
    # vllm.sampling_params.RequestOutputKind (CUMULATIVE, DELTA, FINAL_ONLY); None: cumulative outputs only.
    output_kind: Any = None


def load_vllm_backend() -> VllmBackend:
    """Import vLLM (slow: ~30 s cold) and return its real backend."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.reader import get_metrics_snapshot

    def make_engine(args: dict[str, Any]) -> Any:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    return VllmBackend(make_engine, SamplingParams, get_metrics_snapshot, RequestOutputKind)


@dataclass
class _Progress:
    """One request's outputs so far: DELTA outputs carry only what is new, so the adapter adds them up."""

    delta: bool  # vLLM sends the new tokens and text of each step (streaming), not all of them
    final_only: bool  # vLLM sends the finished output alone (FINAL_ONLY)
    started_at: float  # wall clock when the request was handed to vLLM
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    first_token_at: float | None = None


def _metrics_first_token_at(raw: Any, started_at: float) -> float | None:
    """Return when vLLM produced the first token, from a final output's per-request metrics (None: not there).

    A FINAL_ONLY output is the only one a request sends, so its first token is timed by vLLM's
    ``RequestOutput.metrics``: a ``RequestStateStats`` (v1/metrics/stats.py), whose
    ``first_token_latency`` counts wall seconds from its ``arrival_time`` (the frontend's clock).
    """
    metrics = getattr(raw, "metrics", None)
    latency = getattr(metrics, "first_token_latency", None)
    if not isinstance(latency, (int, float)) or not latency > 0:
        return None
    arrival = getattr(metrics, "arrival_time", None)
    base = float(arrival) if isinstance(arrival, (int, float)) and arrival > 1e9 else started_at  # epoch seconds
    return base + float(latency)


def _is_out_of_memory(exc: BaseException) -> bool:
    """Tell whether an exception or one of its causes is a CUDA out-of-memory error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if "OutOfMemory" in type(current).__name__ or "out of memory" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def _engine_error(exc: Exception) -> EngineError:
    """Translate an exception from vLLM's generate() into DIO's engine errors."""
    if _is_out_of_memory(exc):
        return OutOfMemory(f"vLLM ran out of GPU memory: {exc}")
    cause = exc.__cause__ or exc
    return EngineError(f"vLLM failed: {type(exc).__name__}: {cause}")


# --- the engine -----------------------------------------------------------------------------------------


class VllmEngine(Engine):
    """DIO's engine over vLLM's AsyncLLM (continuous batching, streaming, abort, live metrics).

    Args:
        model: a model folder, a bundled model name ("llama-3.2-3b") or a hub id.
        served_model_name: the model name the worker registers (default: the folder's name).
        gpu_memory_utilization: share of the GPU's memory this engine may take (weights + KV cache).
        max_model_len: context length (prompt + output tokens); None: the model's.
        max_num_seqs: most sequences batched at once; None: vLLM's default.
        max_num_batched_tokens: token budget of one engine step; None: vLLM's default.
        enforce_eager: skip torch.compile and CUDA graphs (engine start takes seconds, not minutes).
        load_format: vLLM's load format; None: "dummy" (random weights) for a folder without
            weight files, else "auto".
        skip_tokenizer_init: None: True for a folder without tokenizer files; then text prompts
            become synthetic token ids and outputs carry token ids only.
        seed: vLLM's global seed.
        dtype: model dtype ("auto": the config's).
        scheduling_policy: "fcfs" or "priority"; only "priority" passes ``request.priority`` on.
        enable_prefix_caching: None: vLLM's default (on for decoder models).
        kv_cache_memory_bytes: a fixed KV-cache size instead of the utilization-based one.
        extra_engine_args: any other AsyncEngineArgs fields.
        backend: what of vLLM to call (tests pass a stand-in); None: the real vLLM.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        served_model_name: str | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enforce_eager: bool = True,
        load_format: str | None = None,
        skip_tokenizer_init: bool | None = None,
        seed: int | None = 0,
        dtype: str = "auto",
        scheduling_policy: str = "fcfs",
        enable_prefix_caching: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        extra_engine_args: dict[str, Any] | None = None,
        backend: VllmBackend | None = None,
    ) -> None:
        self.model = resolve_model(model)
        self.served_model_name = served_model_name or Path(self.model).name
        self.skip_tokenizer = not has_tokenizer(self.model) if skip_tokenizer_init is None else skip_tokenizer_init
        self.load_format = load_format or ("auto" if has_weights(self.model) else "dummy")
        self.scheduling_policy = scheduling_policy
        self._options: dict[str, Any] = {
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "enforce_eager": enforce_eager,
            "seed": seed,
            "dtype": dtype,
            "enable_prefix_caching": enable_prefix_caching,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            **(extra_engine_args or {}),
        }
        self._backend = backend
        self._config = read_model_config(self.model)
        self._engine: Any = None
        self._capacity: EngineCapacity | None = None
        self._vocab = int(self._config.get("vocab_size") or DEFAULT_VOCAB_SIZE)
        self._active: dict[str, int] = {}  # id -> streams that handed it to vLLM (a redelivery may overlap)
        # Can a FINAL_ONLY request be timed (vLLM's per-request metrics)? None: not known yet; False:
        # requests that do not stream use DELTA outputs instead, so their first token is still timed.
        self._final_only_timed: bool | None = None
        self._pending_aborts: dict[str, None] = {}  # aborted before their stream reached vLLM (ordered)

    # --- lifecycle ---

    def engine_args(self) -> dict[str, Any]:
        """Return the AsyncEngineArgs fields this engine starts vLLM with (None values left out)."""
        args = {
            "model": self.model,
            "served_model_name": self.served_model_name,
            "load_format": self.load_format,
            "skip_tokenizer_init": self.skip_tokenizer,
            "scheduling_policy": self.scheduling_policy,
            "disable_log_stats": False,  # the Prometheus gauges stats() reads need it
            **self._options,
        }
        return {key: value for key, value in args.items() if value is not None}

    async def start(self) -> None:
        """Start vLLM's engine core (loads the model, profiles memory, allocates the KV cache).

        Blocks the event loop while vLLM starts (seconds warm, about a minute cold); call it
        before the worker registers. Raises EngineError when vLLM cannot start.
        """
        backend = self._backend or load_vllm_backend()
        self._backend = backend
        try:
            self._engine = backend.make_engine(self.engine_args())
        except Exception as exc:  # the worker cannot serve: it exits with this message
            if _is_out_of_memory(exc):
                raise OutOfMemory(f"vLLM could not start, out of GPU memory: {exc}") from exc
            raise EngineError(f"vLLM could not start: {type(exc).__name__}: {exc}") from exc
        self._capacity = self._read_capacity()
        self._vocab = self._vocab_size()

    async def shutdown(self) -> None:
        """Stop vLLM's engine core and free the GPU."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise EngineError("the vLLM engine is not started")
        return self._engine

    # --- requests ---

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run one request in vLLM, yielding cumulative outputs; the last has ``finished=True``.

        Raises RequestRejected for a request vLLM refuses (it raises ValueError, e.g. a prompt
        longer than max_model_len: the job ends rejected, not retried), OutOfMemory for CUDA OOM,
        EngineError for anything else (the job ends failed).
        """
        engine = self._require_engine()
        if request.id in self._pending_aborts:
            del self._pending_aborts[request.id]
            yield EngineOutput(finished=True, finish_reason="abort", prompt_tokens=request.prompt_tokens)
            return
        prompt, prompt_tokens = self._prompt(request)
        kind = self._output_kind(request)
        params = self._sampling_params(request, kind)
        extra = {"priority": request.priority} if self.scheduling_policy == "priority" else {}
        kinds = self._backend.output_kind if self._backend is not None else None
        progress = _Progress(delta=kinds is not None and kind == kinds.DELTA,
                             final_only=kinds is not None and kind == kinds.FINAL_ONLY, started_at=time.time())
        self._active[request.id] = self._active.get(request.id, 0) + 1
        try:
            async with aclosing(engine.generate(prompt, params, request.id, **extra)) as outputs:
                async for raw in outputs:
                    out = self._to_output(raw, prompt_tokens, progress)
                    if out.finished and progress.final_only:
                        self._learn_final_only_timing(out)
                    yield out
        except ValueError as exc:  # vLLM's request validation: rejected, not retried
            raise RequestRejected(str(exc)) from exc
        except EngineError:
            raise
        except Exception as exc:  # the job ends failed; an engine-dead error fails every later job too
            raise _engine_error(exc) from exc
        finally:
            self._release(request.id)

    def _output_kind(self, request: EngineRequest) -> Any:
        """Return what vLLM sends back: the new text each step for a stream, else the final output only.

        None when the backend knows no output kinds (cumulative outputs, vLLM's default).
        """
        kinds = self._backend.output_kind if self._backend is not None else None
        if kinds is None:
            return None
        if request.stream or self._final_only_timed is False:
            return kinds.DELTA
        return kinds.FINAL_ONLY

    def _learn_final_only_timing(self, out: EngineOutput) -> None:
        """Fall back to DELTA outputs for good when a FINAL_ONLY output did not say when its first token came."""
        if out.output_tokens == 0 or self._final_only_timed is not None:
            return
        self._final_only_timed = out.first_token_at is not None
        if not self._final_only_timed:
            log.warning("vLLM's final outputs carry no first-token time (RequestOutput.metrics): requests that "
                        "do not stream now get DELTA outputs, so that their time to first token is measured")

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``finish_reason='abort'`` (vLLM frees its KV blocks)."""
        if request_id in self._active:
            await self._require_engine().abort(request_id)
        else:  # its stream has not reached vLLM yet (or already ended): end it on arrival
            self._pending_aborts[request_id] = None
            while len(self._pending_aborts) > MAX_PENDING_ABORTS:  # forget the oldest
                del self._pending_aborts[next(iter(self._pending_aborts))]

    def _release(self, request_id: str) -> None:
        """Forget one stream of a request once it has ended."""
        left = self._active.pop(request_id, 1) - 1
        if left > 0:
            self._active[request_id] = left

    def _prompt(self, request: EngineRequest) -> tuple[Any, int]:
        """Return vLLM's prompt (token ids, or text when there is a tokenizer) and its token count.

        Raises RequestRejected for a token id outside the vocabulary when there is no tokenizer:
        vLLM checks ids only when it has one, and an out-of-range id on the GPU would kill the
        engine for every job.
        """
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            if self.skip_tokenizer and ids and (max(ids) >= self._vocab or min(ids) < 0):
                bad = max(ids) if max(ids) >= self._vocab else min(ids)
                raise RequestRejected(f"token id {bad} is outside the model's vocabulary of {self._vocab}")
            return {"prompt_token_ids": ids}, len(ids)
        text = request.prompt or ""
        if self.skip_tokenizer:
            ids = synthetic_token_ids(text, max(1, request.prompt_tokens), self._vocab)
            return {"prompt_token_ids": ids}, len(ids)
        return text, request.prompt_tokens

    def _sampling_params(self, request: EngineRequest, output_kind: Any = None) -> Any:
        """Return vLLM SamplingParams; max_tokens is always set (vLLM's default is 16)."""
        assert self._backend is not None
        extra = {} if output_kind is None else {"output_kind": output_kind}
        if request.stop:  # vLLM ends the text before the first stop sequence (Request.stop)
            extra["stop"] = list(request.stop)
        return self._backend.sampling_params(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            detokenize=not self.skip_tokenizer,
            **extra,
        )

    def _to_output(self, raw: Any, prompt_tokens: int, progress: _Progress) -> EngineOutput:
        """Translate one vLLM RequestOutput (cumulative, DELTA or FINAL_ONLY) into a cumulative EngineOutput.

        ``token_ids`` of an unfinished output is a growing list (vLLM's own, or the adapter's sum
        of deltas: no copy per step); the finished output carries a copy. A DELTA output's text is
        the ``text_delta``; the cumulative ``text`` is joined once, on the finished output.
        """
        completion = raw.outputs[0] if raw.outputs else None
        new_ids = completion.token_ids if completion is not None else []
        piece = completion.text if completion is not None and not self.skip_tokenizer else None
        finished = bool(raw.finished)
        delta: str | None = None
        if progress.delta:
            progress.token_ids.extend(new_ids)
            token_ids = progress.token_ids
            if piece is not None:
                progress.pieces.append(piece)
                delta = piece
            text = "".join(progress.pieces) if finished and piece is not None else None
        else:
            token_ids, text = new_ids, piece
        if progress.first_token_at is None and len(token_ids) > 0:
            # The first output with tokens: now, unless it is the FINAL_ONLY output (vLLM's metrics say when).
            progress.first_token_at = (_metrics_first_token_at(raw, progress.started_at) if progress.final_only
                                       else time.time())
        prompt_ids = getattr(raw, "prompt_token_ids", None)
        return EngineOutput(
            output_tokens=len(token_ids),
            text=text,
            text_delta=delta,
            token_ids=list(token_ids) if finished else token_ids,
            finished=finished,
            finish_reason=completion.finish_reason if completion is not None and finished else None,
            prompt_tokens=len(prompt_ids) if prompt_ids is not None else prompt_tokens,
            cached_tokens=int(getattr(raw, "num_cached_tokens", None) or 0),
            first_token_at=progress.first_token_at,
        )

    def _vocab_size(self) -> int:
        """Return the model's vocabulary size (synthetic token ids, the token id range check)."""
        try:
            return int(self._engine.vllm_config.model_config.get_vocab_size())
        except Exception:  # a stand-in or an older vLLM: read the config file instead
            return int(self._config.get("vocab_size") or DEFAULT_VOCAB_SIZE)

    # --- capacity and telemetry ---

    def capacity(self) -> EngineCapacity:
        """Return the engine's real limits, read from vLLM's config after start."""
        if self._capacity is None:
            raise EngineError("the vLLM engine is not started")
        return self._capacity

    def _read_capacity(self) -> EngineCapacity:
        """Read KV tokens, max sequences and context length from the started engine's vllm_config."""
        config = self._require_engine().vllm_config
        cache = config.cache_config
        kv_tokens = getattr(cache, "kv_cache_size_tokens", None) or (cache.num_gpu_blocks or 0) * cache.block_size
        memory = nvml.gpu_memory()
        gpu = nvml.gpu_name() or "unknown GPU"
        datasheet = match_profile(gpu)  # peak FLOP/s and bandwidth: the dispatcher's prior
        # The gateway renders chat messages with the tokenizer's template (a text prompt needs a tokenizer).
        template, eos = (None, None) if self.skip_tokenizer else read_chat_template(self.model)
        return EngineCapacity(
            gpu=gpu,
            model=self.served_model_name,
            kv_capacity_tokens=int(kv_tokens),
            kv_bytes_per_token=self._kv_bytes_per_token(config),
            max_num_seqs=int(config.scheduler_config.max_num_seqs),
            max_model_len=int(config.model_config.max_model_len),
            total_vram_bytes=memory[1] if memory else 0,
            weight_bytes=weight_bytes(self._config),
            peak_flops=datasheet.peak_flops if datasheet else 0.0,
            mem_bandwidth=datasheet.mem_bandwidth_bytes_s if datasheet else 0.0,
            chat_template=template,
            eos_token=eos,
        )

    def _kv_bytes_per_token(self, config: Any) -> int:
        """Return KV bytes per token from vLLM's model config, else from config.json (bf16)."""
        try:
            model, parallel = config.model_config, config.parallel_config
            cache_dtype = str(config.cache_config.cache_dtype)
            dtype_bytes = 1 if cache_dtype.startswith("fp8") else model.dtype.itemsize
            layers = model.get_num_layers(parallel)
            return 2 * layers * model.get_num_kv_heads(parallel) * model.get_head_size() * dtype_bytes
        except Exception:  # a stand-in config without vLLM's methods
            return kv_bytes_per_token(self._config)

    def stats(self) -> EngineStats:
        """Return live telemetry from vLLM's in-process Prometheus metrics; never raises.

        vLLM refreshes its gauges on engine steps only, so once no request is in flight they keep
        the last busy step's values: then running, waiting and KV usage are reported as 0.
        """
        metrics = self._metrics()
        in_flight = sum(self._active.values())
        running = min(int(metrics.get(METRIC_RUNNING, 0)), in_flight)
        waiting = min(int(metrics.get(METRIC_WAITING, 0)), in_flight - running)
        usage = min(max(float(metrics.get(METRIC_KV_USAGE, 0.0)), 0.0), 1.0) if in_flight else 0.0
        kv_tokens = self._capacity.kv_capacity_tokens if self._capacity else 0
        memory = nvml.gpu_memory()
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_used_tokens=round(usage * kv_tokens),
            kv_usage=usage,
            preemptions=int(_first(metrics, METRIC_PREEMPTIONS)),
            free_vram_bytes=memory[0] if memory else None,
            extra={
                "prefix_cache_queries": _first(metrics, METRIC_PREFIX_QUERIES),
                "prefix_cache_hits": _first(metrics, METRIC_PREFIX_HITS),
            },
        )

    def _metrics(self) -> dict[str, float]:
        """Return vLLM's gauges and counters summed over label sets ({} when unreadable)."""
        if self._backend is None:
            return {}
        totals: dict[str, float] = {}
        try:
            for metric in self._backend.metrics_snapshot():
                value = getattr(metric, "value", None)
                if isinstance(value, (int, float)):
                    totals[metric.name] = totals.get(metric.name, 0.0) + float(value)
        except Exception:  # telemetry is best effort: this heartbeat reports zeros
            return {}
        return totals


def _first(metrics: dict[str, float], names: tuple[str, ...]) -> float:
    """Return the first of several metric spellings that is present, else 0."""
    for name in names:
        if name in metrics:
            return metrics[name]
    return 0.0
