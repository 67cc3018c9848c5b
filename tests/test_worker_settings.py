"""``dio worker`` takes its settings from DIO_* variables, and a command-line option overrides them.

The real command runs in a subprocess (``python -m dio.ops.cli worker``), configured by the
environment alone; what it used is read back from its registration hash in Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from dio.protocol.keys import Keys

pytestmark = pytest.mark.integration

REGISTER_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
WORKER_ENV = {"DIO_ENGINE": "sim", "DIO_PROFILE": "L4", "DIO_MODEL": "llama-3.1-8b", "DIO_TIME_SCALE": "7",
              "DIO_MAX_NUM_SEQS": "9"}


def _env(redis_url: str, redis_prefix: str) -> dict[str, str]:
    """Return this process's environment without its DIO_* variables, plus the worker's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIO_")}
    return {**env, **WORKER_ENV, "DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": redis_prefix,
            "PYTHONUNBUFFERED": "1"}


def _registrations(redis_url: str, redis_prefix: str, args: list[str], ids: list[str]) -> dict[str, dict[str, str]]:
    """Start ``dio worker ARGS``, wait until every worker in ``ids`` registered, SIGTERM it; return their hashes."""
    keys = Keys(redis_prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    proc = subprocess.Popen([sys.executable, "-m", "dio.ops.cli", "worker", *args], env=_env(redis_url, redis_prefix),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        hashes: dict[str, dict[str, str]] = {}
        while len(hashes) < len(ids):
            assert proc.poll() is None, f"dio worker exited early ({proc.returncode}):\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, f"workers {ids} did not register within {REGISTER_TIMEOUT_S:.0f} s"
            hashes = {wid: h for wid in ids if (h := raw.hgetall(keys.worker(wid)))}
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # idle workers drain at once and exit cleanly
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, proc.stderr.read()
        return hashes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
        raw.close()


@pytest.mark.parametrize(("args", "expected"), [
    # Nothing on the command line: every value comes from the environment.
    (["--id", "env-1"], {"env-1": ("L4", "llama-3.1-8b", 7.0, 9)}),
    # Options override their variables; the rest still come from the environment.
    (["--id", "opt-1", "--model", "llama-3.2-3b", "--time-scale", "3", "--max-num-seqs", "5"],
     {"opt-1": ("L4", "llama-3.2-3b", 3.0, 5)}),
    # Without --id, --count N names the workers after DIO_PROFILE.
    (["--count", "2"], {"L4-1": ("L4", "llama-3.1-8b", 7.0, 9), "L4-2": ("L4", "llama-3.1-8b", 7.0, 9)}),
], ids=["environment", "options-override", "count-ids-from-profile"])
def test_worker_uses_the_environment_unless_an_option_is_given(redis_url, redis_prefix, args, expected):
    hashes = _registrations(redis_url, redis_prefix, args, list(expected))
    used = {wid: (h["gpu"], h["model"], float(h["time_scale"]), int(h["max_num_seqs"])) for wid, h in hashes.items()}
    assert used == expected
    assert {h["engine"] for h in hashes.values()} == {"sim"}
