"""``dio top`` and ``dio inspect`` against a running local cluster (``dio up``), from Redis alone.

``dio up`` also prints each process's ``/metrics`` address: the test scrapes them as an operator's
``curl`` would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import urllib.request

import pytest

from dio.client import Client
from dio.ops.top import Snapshot, rates
from tests.dio_up import running_dio_up
from tests.waiting import wait_for

WIDTH = 100
METRICS_LINE = re.compile(r"metrics: (\S+)\s+(http://127\.0\.0\.1:\d+/metrics)")


def snapshot(at: float, dispatched: int, completed: dict[str, int]) -> Snapshot:
    workers = {wid: {"completed": n, "failed": 0} for wid, n in completed.items()}
    return Snapshot(at=at, prefix="{p}:", lease="d", intake=0, pending=0, unread=0, deadletter=0,
                    dispatcher={"dispatched": str(dispatched), "rejected": "0"}, workers=workers)


def test_rates_are_counter_changes_per_second_and_unknown_after_a_restart():
    before = snapshot(100.0, dispatched=10, completed={"a": 5, "b": 7})
    after = snapshot(102.0, dispatched=30, completed={"a": 9, "b": 3, "c": 4})
    r = rates(before, after)
    assert r["cluster"]["dispatched"] == 10.0  # (30 - 10) / 2 s
    assert r["workers"]["a"]["completed"] == 2.0
    assert r["workers"]["b"]["completed"] is None  # its counter went back: the process restarted
    assert r["workers"]["c"]["completed"] is None  # new: nothing to compare with yet
    assert r["cluster"]["completed"] == 2.0
    assert rates(None, after)["cluster"]["dispatched"] is None  # a first frame has no rates


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dio.ops.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def up(redis_url: str, redis_prefix: str):
    """``dio up`` with two simulated GPUs; yields (its environment for other commands, its output lines)."""
    env = {**os.environ, "DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": redis_prefix, "PYTHONUNBUFFERED": "1",
           "COLUMNS": str(WIDTH)}
    args = ["--workers", "H100:1,T4:1", "--time-scale", "10", "--gateway-port", "0"]
    with running_dio_up(args, env) as (proc, output):
        wait_for(lambda: any("Ctrl-C" in line for line in output) or proc.poll() is not None, 30, "dio up")
        assert proc.poll() is None, "".join(output)
        yield env, output


@pytest.mark.integration
@pytest.mark.slow
def test_top_and_inspect_show_a_running_cluster_in_100_columns(up, redis_url, redis_prefix):
    env, output = up
    endpoints = dict(METRICS_LINE.findall("".join(output)))
    assert {"dispatcher", "H100-1", "T4-1"} <= set(endpoints) <= {"dispatcher", "H100-1", "T4-1", "gateway"}, output
    with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
        handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 200, "max_tokens": 32} for _ in range(30)])
        assert {r.status.value for r in dio.wait_all(handles, timeout=60)} == {"completed"}
        # Requests keep arriving while top reads: its rates show the flow.
        stop, flowing = threading.Event(), []

        def submit() -> None:
            while not stop.wait(0.02):
                flowing.append(dio.submit("x", num_prompt_tokens=200, max_tokens=32))

        submitter = threading.Thread(target=submit)
        submitter.start()
        try:
            screen = _cli(env, "top", "--once", "--interval", "1.5")
        finally:
            stop.set()
            submitter.join()
        assert {r.status.value for r in dio.wait_all(flowing, timeout=60)} == {"completed"}
    for name, url in endpoints.items():  # what `curl -s <url>` shows
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        kind = name if name in ("dispatcher", "gateway") else "worker"
        assert f"dio_{kind}_" in text, name

    lines = screen.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, screen
    assert f"keys {redis_prefix}" in screen and "policy dio" in screen
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("H100-1", "T4-1"))}
    assert set(rows) == {"H100-1", "T4-1"}, screen
    assert rows["H100-1"][1] == "H100-80GB" and rows["T4-1"][1] == "T4" and rows["H100-1"][2] == "ok"
    assert sum(int(row[8]) for row in rows.values()) >= 30, screen  # "done": jobs each worker completed
    flow = next(line for line in lines if line.startswith("per second:"))
    rate = {name: float(value) for name, value in re.findall(r"(completed|dispatched) (\d+\.\d)", flow)}
    assert rate["dispatched"] > 0 and rate["completed"] > 0, flow

    shown = _cli(env, "inspect")
    assert max(len(line) for line in shown.splitlines()) <= WIDTH, shown
    assert f"XINFO GROUPS '{redis_prefix}intake'" in shown and "H100-80GB" in shown and "…" not in shown, shown
