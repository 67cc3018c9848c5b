"""Every Redis key, stream and group name DIO uses.

All keys share one prefix. The default, ``{dio}:``, is a Redis Cluster hash tag: every key lands
in the same slot, so the Lua scripts that touch several keys run unchanged on a Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "{dio}:"

# Consumer groups.
DISPATCHER_GROUP = "dispatchers"  # the dispatchers' group, on the intake and the completions streams
WORKER_GROUP = "workers"  # a worker's group on its own queue stream

# Stream entry fields (the Lua scripts get the same names from ``dio.protocol.scripts``' prelude).
REQUEST_FIELD = "req"  # intake and queue entries: the Request JSON
JOB_FIELD = "job"  # queue entries: the job id
COMPLETION_FIELD = "c"  # completions entries: the Completion JSON
RESULT_FIELD = "r"  # reply entries: the JobResult JSON (the job's terminal state)
WAKE_FIELD = "wake"  # reply entries with only this field wake a blocked reader up (on close)

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
    P deadletter                    stream  intake entries that could not even be parsed; poisoned jobs
    P batch:<id>                    hash    an offline batch job's progress
    ==============================  ======  ==========================================================
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

    def all_keys_pattern(self) -> str:
        """Glob matching every key under this prefix (for cleanup in tests and `dio reset`)."""
        return f"{self.prefix}*".replace("{", "\\{").replace("}", "\\}")
