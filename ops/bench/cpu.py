"""CPU use of the processes a benchmark runs, in cores (CPU seconds per wall second).

Reads Linux's ``/proc`` counters and Redis's ``INFO cpu``; elsewhere the process figures are None.
A benchmark whose processes together near the machine's core count measures its own contention,
not DIO: the result files report these figures so a reader can tell.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

PROC = Path("/proc")


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


CLK_TCK = _clock_ticks()


def process_cpu_s(pid: int) -> float | None:
    """Return the user + system CPU seconds of a process, None if it cannot be read."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; utime and stime are fields 14, 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float | None:
    """Return the CPU seconds every core of the machine spent busy since boot (all processes)."""
    try:
        first = (PROC / "stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def redis_cpu_s(client: redis.Redis) -> float | None:
    """Return the Redis server's user + system CPU seconds (all its threads)."""
    try:
        info = client.info("cpu")
    except redis.RedisError:
        return None
    return float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))


@dataclass
class CpuMeter:
    """Measure the cores used by named processes, this process, Redis and the whole machine."""

    pids: dict[str, int] = field(default_factory=dict)
    client: redis.Redis | None = None
    _start: dict[str, float | None] = field(default_factory=dict)
    _wall0: float = 0.0

    def _sample(self) -> dict[str, float | None]:
        sample: dict[str, float | None] = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        sample["bench"] = time.process_time()
        sample["redis"] = redis_cpu_s(self.client) if self.client is not None else None
        sample["machine"] = machine_busy_s()
        return sample

    def start(self) -> None:
        """Take the first reading."""
        self._start = self._sample()
        self._wall0 = time.monotonic()

    def stop(self) -> dict[str, float | None]:
        """Return the cores each used since ``start`` (None where unreadable), and the wall seconds."""
        end = self._sample()
        wall = max(time.monotonic() - self._wall0, 1e-9)
        cores: dict[str, float | None] = {}
        for name, after in end.items():
            before = self._start.get(name)
            cores[name] = None if before is None or after is None else round((after - before) / wall, 3)
        cores["wall_s"] = round(wall, 2)
        cores["cpu_count"] = os.cpu_count()
        return cores
