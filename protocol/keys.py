"""Every Redis key, stream and group name DIO uses.

All keys share one prefix. The default, ``{dio}:``, is a Redis Cluster hash tag: every key lands
in the same slot, so the Lua scripts that touch several keys run unchanged on a Cluster. That slot
is the deployment's hot spot: all of its traffic goes to the one node that owns it. Deployments
with different prefixes (one per model pool, say) land on different slots, most likely other nodes.

Sharded by model (``DIO_SHARD_BY_MODEL``), one deployment keeps each model's jobs, workers and
dispatcher under a pool prefix of its own, derived from the base prefix's hash tag (``pool_keys``:
``{dio}:`` and ``llama-3.2-3b`` give ``{dio/llama-3.2-3b}:``): every script still touches one pool's
keys only, and each pool has its own slot. The Batch API's keys and the pool registry
(``Keys.pools``) stay under the base prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "{dio}:"
POOL_SEPARATOR = "/"  # between the base hash tag and the model in a pool's tag: {dio/llama-3.2-3b}
# Characters that would end a hash tag early or make a pool's name ambiguous in logs and patterns.
BAD_MODEL_NAME = re.compile(r"[{}\s]")
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]{}])")  # escaped in a SCAN/KEYS pattern (braces for clarity)

# Consumer groups.
DISPATCHER_GROUP = "dispatchers"  # the dispatchers' group, on the intake and the completions streams
WORKER_GROUP = "workers"  # a worker's group on its own queue stream

# Stream entry fields (the Lua scripts get the same names from ``dio.protocol.scripts``' prelude).
REQUEST_FIELD = "req"  # intake and queue entries: the Request JSON
JOB_FIELD = "job"  # queue entries: the job id
COMPLETION_FIELD = "c"  # completions entries: the Completion JSON
RESULT_FIELD = "r"  # reply entries: the JobResult JSON (the job's terminal state)
WAKE_FIELD = "wake"  # reply entries with only this field wake a blocked reader up (on close)

# Token stream entries (``Keys.tokens``): one run of a job (each attempt has its own run id) appends
# deltas ``run``, ``o``, ``t``, ``n``; its end is one entry with ``run`` and ``end``.
TOKEN_RUN_FIELD = "run"  # the id of the run (one attempt of the job) that wrote the entry
TOKEN_OFFSET_FIELD = "o"  # characters of this run's text before this delta
TOKEN_TEXT_FIELD = "t"  # the delta: text generated since the run's previous entry (may be empty)
TOKEN_COUNT_FIELD = "n"  # output tokens of this run so far (cumulative)
TOKEN_END_FIELD = "end"  # the run ended: the job's status as its worker saw it (the job hash has the result)

# Request metadata read by the simulated engine only (never by the dispatcher): where the simulated
# model emits EOS, in output tokens, so a benchmark can replay a trace's true output lengths while
# max_tokens stays a cap the router sees, as with a real model.
SIM_EOS_METADATA = "sim_eos_tokens"

# Job-hash fields that scripts and processes read by name (the rest are JobResult's fields).
STATUS_FIELD = "status"
ATTEMPTS_FIELD = "attempts"
DIED_ON_FIELD = "died_on"  # JSON list of the workers a job was taken back from (requeue.lua), newest last
DIED_ON_MAX = 16  # requeue.lua keeps this many of them


@dataclass(frozen=True)
class Keys:
    """Build key names under one prefix.

    Layout (``P`` is the prefix):

    ==============================  ======  ==========================================================
    key                             type    what it holds
    ==============================  ======  ==========================================================
    P intake                        stream  submitted requests (field ``req``: Request JSON)
    P job:<id>                      hash    a job's status, worker, output, timings, error/reason
    P reply:<client>                stream  result notices for one client (field ``r``: JobResult)
    P workers                       set     ids of registered workers
    P worker:<id>                   hash    a worker's capabilities and live telemetry
    P alive:<id>                    string  heartbeat (the owning process's token), expires after HEARTBEAT_TTL_S
    P queue:<id>                    stream  jobs handed to one worker (fields ``job``, ``req``)
    P reserved:<id>                 hash    job id -> KV tokens reserved on that worker
    P completions                   stream  every terminal job of a worker (field ``c``)
    P predictor                     hash    worker id -> predictor state JSON
    P dispatcher:lease              string  the active dispatcher's name, with a TTL
    P dispatcher:stats              hash    the active dispatcher's counters and backlog, each second (``dio top``)
    P deadletter                    stream  intake entries that could not even be parsed; poisoned jobs
    P batch:<id>                    hash    an offline batch job's progress (a Batch API batch: its BatchObject)
    P batch:<id>:lease              string  the batch runner running it (JSON), with a TTL
    P batch:<id>:inflight           hash    job id -> custom_id of its jobs in flight (a new runner cancels them)
    P batches                       zset    Batch API batch ids by creation time (``dio batch list``)
    P batches:active                set     Batch API batches not ended yet (what batch runners look for)
    P batches:submitted             string  requests every batch runner ever submitted (their pacing's counter)
    P file:<id>                     hash    a Batch API file's metadata (FileObject fields)
    P file:<id>:data                string  its content (a batch's output and error files grow by APPEND)
    P tokens:<job id>               stream  a streaming job's text deltas and end marker; MAXLEN-bounded, expires
    P pools                         set     sharded by model: the models whose pools have registered workers
    ==============================  ======  ==========================================================

    Sharded by model, the job, worker and dispatcher keys above (intake to tokens, not the batch
    and file keys) live under each pool's prefix (``pool_keys``); ``pools`` is read under the base one.
    """

    prefix: str = DEFAULT_PREFIX

    @property
    def intake(self) -> str:
        return f"{self.prefix}intake"

    @property
    def completions(self) -> str:
        return f"{self.prefix}completions"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    @property
    def predictor(self) -> str:
        return f"{self.prefix}predictor"

    @property
    def lease(self) -> str:
        return f"{self.prefix}dispatcher:lease"

    @property
    def dispatcher_stats(self) -> str:
        return f"{self.prefix}dispatcher:stats"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}deadletter"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def reply(self, client_id: str) -> str:
        return f"{self.prefix}reply:{client_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def alive(self, worker_id: str) -> str:
        return f"{self.prefix}alive:{worker_id}"

    def queue(self, worker_id: str) -> str:
        return f"{self.prefix}queue:{worker_id}"

    def reserved(self, worker_id: str) -> str:
        return f"{self.prefix}reserved:{worker_id}"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}"

    def batch_lease(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}:lease"

    def batch_inflight(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}:inflight"

    @property
    def batches(self) -> str:
        return f"{self.prefix}batches"

    @property
    def active_batches(self) -> str:
        return f"{self.prefix}batches:active"

    @property
    def batch_submitted(self) -> str:
        return f"{self.prefix}batches:submitted"

    def file(self, file_id: str) -> str:
        return f"{self.prefix}file:{file_id}"

    def file_data(self, file_id: str) -> str:
        return f"{self.prefix}file:{file_id}:data"

    def tokens(self, job_id: str) -> str:
        """The token stream of a job submitted with ``stream=True`` (no other job has one)."""
        return f"{self.prefix}tokens:{job_id}"

    @property
    def pools(self) -> str:
        """The pool registry (a set of model names), under the base prefix; written by workers as they register."""
        return f"{self.prefix}pools"

    def all_keys_pattern(self) -> str:
        """Glob matching every key under this prefix (for cleanup in tests and `dio reset`)."""
        return _GLOB_SPECIAL.sub(r"\\\1", self.prefix) + "*"


def check_model_name(model: str) -> str:
    """Return ``model`` if it can name a pool; ValueError for an empty name, braces or whitespace.

    A brace would end (or start) the pool's hash tag inside the name, so its keys would hash elsewhere.
    """
    if not model or BAD_MODEL_NAME.search(model):
        raise ValueError(f"the model name {model!r} cannot name a key pool: it must be non-empty, without "
                         "braces or whitespace")
    return model


def pool_prefix(base_prefix: str, model: str) -> str:
    """The prefix of ``model``'s pool: the base prefix's hash tag with ``/<model>`` added.

    ``{dio}:`` and ``llama-3.2-3b`` give ``{dio/llama-3.2-3b}:``. ValueError when the base prefix does
    not begin with a hash tag (``{tag}``), or for a model name ``check_model_name`` refuses.
    """
    check_model_name(model)
    end = base_prefix.find("}")
    if not base_prefix.startswith("{") or end < 2:
        raise ValueError(f"sharding by model needs a key prefix that begins with a hash tag such as "
                         f"{DEFAULT_PREFIX!r}, not {base_prefix!r}")
    return f"{base_prefix[:end]}{POOL_SEPARATOR}{model}{base_prefix[end:]}"


def pool_keys(base: Keys, model: str) -> Keys:
    """The keys of ``model``'s pool under the deployment's base keys (pure; see ``pool_prefix``)."""
    return Keys(pool_prefix(base.prefix, model))
