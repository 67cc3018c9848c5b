"""The worker daemon's settings (environment variables ``DIO_<FIELD>``)."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from dio.protocol import defaults as d
from dio.protocol.keys import check_model_name
from dio.protocol.metrics import DEFAULT_METRICS_ADDR
from dio.protocol.settings import CommonSettings


class WorkerSettings(CommonSettings):
    worker_id: str | None = None  # default: <engine>-<gpu>-<host>-<pid>
    engine: str = "sim"  # sim | vllm | instant
    # Simulated engine.
    profile: str = "H100-80GB"
    model: str = d.DEFAULT_MODEL
    time_scale: float = 1.0
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    kv_capacity_tokens: int | None = None  # override the computed KV capacity (tests, what-ifs)
    # vLLM engine.
    enforce_eager: bool = True
    load_format: str = "auto"
    # Daemon.
    heartbeat_interval_s: float = d.HEARTBEAT_INTERVAL_S
    heartbeat_ttl_s: float = d.HEARTBEAT_TTL_S
    read_block_ms: int = 100
    job_ttl_s: float = d.JOB_TTL_S
    drain_timeout_s: float = 300.0
    # Token streams of jobs submitted with stream=True: entries kept (approximate MAXLEN), TTL while
    # the job runs (renewed at each write) and after its end.
    token_stream_maxlen: int = Field(default=d.TOKEN_STREAM_MAXLEN, ge=10)
    token_stream_ttl_s: float = Field(default=d.TOKEN_STREAM_TTL_S, ge=1)
    token_stream_end_ttl_s: float = Field(default=d.TOKEN_STREAM_END_TTL_S, ge=1)
    # Prometheus: serve /metrics on this port (None: not served; 0: any free port) and address. One
    # endpoint per process: the workers it hosts are told apart by the ``worker`` label.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_addr: str = DEFAULT_METRICS_ADDR

    @field_validator("model")
    @classmethod
    def _model_names_a_pool(cls, model: str, info: ValidationInfo) -> str:
        return check_model_name(model) if info.data.get("shard_by_model") else model
