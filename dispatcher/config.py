"""The dispatcher's settings (environment variables ``DIO_<FIELD>``)."""

from __future__ import annotations

import os
import socket

from pydantic import Field, PositiveFloat, ValidationInfo, field_validator

from dio.protocol import defaults as d
from dio.protocol.keys import Keys, check_model_name
from dio.protocol.metrics import DEFAULT_METRICS_ADDR
from dio.protocol.settings import CommonSettings


class DispatcherSettings(CommonSettings):
    # Sharded by model (DIO_SHARD_BY_MODEL), a dispatcher serves one model's pool: this one (DIO_MODEL,
    # as for that pool's workers; `dio dispatcher --model`). Not sharded, it is not read.
    model: str | None = Field(default=None, validate_default=True)
    # dio | round-robin | random | least-loaded | power-of-two | queue-kv | weighted-least-connections
    # | token-load-prefix | kv-cost (see dispatcher/policies.py)
    policy: str = "dio"
    # weighted-least-connections: capacity weight by GPU name (WorkerInfo.gpu, e.g. "H100-80GB") or
    # worker id, as JSON in DIO_POLICY_WEIGHTS; a worker not named gets its datasheet's decode rate.
    policy_weights: dict[str, PositiveFloat] = Field(default_factory=dict)
    # token-load-prefix: the largest TTFT penalty (s) a prefix-cache hit may cost before the warm
    # worker counts as saturated (τ = its peak prefill rate × this).
    affinity_ttft_penalty_s: PositiveFloat = 1.0
    predictor: str = "vector"  # seed | vector | rls (see dispatcher/predictors.py)
    dispatcher_name: str = Field(default_factory=lambda: f"dispatcher-{socket.gethostname()}-{os.getpid()}")
    read_count: int = 1024  # intake entries read per round trip
    block_ms: int = 50  # longest wait for new work when idle
    prefetch: int = 2  # jobs queued at a worker beyond the sequences its engine runs
    max_backlog: int = 100_000  # requests held waiting for capacity; beyond it new ones are shed
    max_backlog_bytes: int = 256 * 1024 * 1024  # bytes of request JSON held waiting; beyond it new ones are shed
    # Reject at once an interactive request that the backlog ahead of it, at the cluster's recent
    # drain rate, would keep waiting past its deadline (or max_wait_s): it would only expire there.
    admit_by_drain: bool = True
    # Interactive requests already past their TTFT limit wait behind those that can still be on time
    # (``dio.dispatcher.backlog``); False: one FIFO line.
    late_last: bool = True
    max_wait_s: float = 60.0  # an interactive request without a deadline waits at most this long
    batch_age_s: float = 30.0  # a batch request waiting this long is served like an interactive one
    # dio policy: reject (with retry-after) a sheddable request (Request.sheddable) predicted to miss
    # its deadline on every worker, instead of running it late; false: run it anyway, where it harms
    # no other job's deadline. Requests not marked sheddable are always run.
    shed_late: bool = True
    shed_margin: float = Field(default=1.0, ge=1.0)  # shed when predicted > margin x the time left
    worker_refresh_s: float = 0.25
    persist_interval_s: float = 2.0
    reservation_sync_s: float = 5.0
    lease_ttl_ms: int = d.LEASE_TTL_MS
    job_ttl_s: float = d.JOB_TTL_S
    seed: int | None = None
    # Prometheus: serve /metrics on this port (None: not served; 0: any free port) and address.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_addr: str = DEFAULT_METRICS_ADDR

    @field_validator("model")
    @classmethod
    def _sharded_dispatcher_names_its_pool(cls, model: str | None, info: ValidationInfo) -> str | None:
        if not info.data.get("shard_by_model"):
            return model
        if model is None:
            raise ValueError("DIO_SHARD_BY_MODEL is on, so a dispatcher serves one model's pool: name it with "
                             "--model or DIO_MODEL")
        return check_model_name(model)

    @property
    def pool_keys(self) -> Keys:
        """The keys this dispatcher routes in: its model's pool's when sharded, else the deployment's."""
        return self.keys_for(self.model) if self.model else self.keys  # keys_for: the base keys unsharded
