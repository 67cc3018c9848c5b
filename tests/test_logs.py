"""Logging: the level and format options, JSON lines, and one line for each lifecycle event."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError
from waiting import wait_for

from dio.protocol import logs
from dio.protocol.keys import Keys


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger back as it was: setup_logging replaces its handlers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_event_and_its_fields(restore_logging, capsys):
    logs.setup_logging(level="info", fmt="JSON")
    log = logging.getLogger("dio.test")
    logs.event(log, logging.WARNING, logs.WORKER_DEAD, "worker %s declared dead", "L4-1", worker="L4-1")
    log.debug("not shown at INFO")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("with a traceback")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["message"] == "worker L4-1 declared dead"
    assert (first["event"], first["worker"], first["level"], first["logger"]) == ("worker_dead", "L4-1", "WARNING",
                                                                                    "dio.test")
    assert first["ts"].endswith("+00:00")
    assert "RuntimeError: boom" in second["exc"] and "event" not in second


def test_the_text_format_and_level_come_from_the_environment(restore_logging, capsys, monkeypatch):
    monkeypatch.setenv("DIO_LOG_LEVEL", "warning")
    settings = logs.setup_logging()
    assert (settings.log_level, settings.log_format) == ("WARNING", "text")
    logging.getLogger("dio.test").info("hidden")
    logging.getLogger("dio.test").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "dio.test WARNING shown" in err


def test_an_unknown_level_or_format_is_refused():
    with pytest.raises(ValidationError, match="log_format"):
        logs.LogSettings(log_format="xml")
    with pytest.raises(ValidationError, match="log_level"):
        logs.LogSettings(log_level="loud")


# --- lifecycle events from the real processes ------------------------------------------------


def events(path: Path) -> list[dict]:
    """Return the JSON lines of a process's log that carry an event."""
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "event" in record:
            out.append(record)
    return out


def has(path: Path, name: str, **fields: object) -> bool:
    return any(e["event"] == name and all(e.get(k) == v for k, v in fields.items()) for e in events(path))


@pytest.mark.integration
@pytest.mark.slow
def test_each_lifecycle_event_is_one_json_line(redis_url, redis_prefix, tmp_path, client_settings):
    from dio.client import Client

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DIO_")}, "DIO_REDIS_URL": redis_url,
           "DIO_KEY_PREFIX": redis_prefix, "DIO_LOG_FORMAT": "json", "DIO_HEARTBEAT_TTL_S": "1",
           "DIO_HEARTBEAT_INTERVAL_S": "0.2", "DIO_WORKER_REFRESH_S": "0.1", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> Path:
        log = tmp_path / f"{name}.log"
        with open(log, "ab") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "dio.ops.cli", *args], env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
        return log

    dispatcher = start("dispatcher", "dispatcher", "--name", "d1")
    leaving = start("a", "worker", "--engine", "instant", "--id", "a")
    # A slow simulated L4: the jobs it is given are still running when it is killed.
    dying_args = ("worker", "--engine", "sim", "--profile", "L4", "--time-scale", "0.01", "--id", "b")
    start("b", *dying_args)
    try:
        wait_for(lambda: has(dispatcher, logs.LEASE_GAINED, dispatcher="d1"), 20, "lease_gained")
        wait_for(lambda: has(dispatcher, logs.WORKER_JOINED, worker="a") and
                 has(dispatcher, logs.WORKER_JOINED, worker="b"), 20, "worker_joined a and b")

        procs[1].send_signal(signal.SIGTERM)  # a drains, deregisters, and the dispatcher sees it leave
        procs[1].wait(20)
        assert has(leaving, logs.WORKER_DRAINED, worker="a", unfinished=0)
        assert has(leaving, logs.WORKER_LEFT, worker="a")
        wait_for(lambda: has(dispatcher, logs.WORKER_LEFT, worker="a"), 10, "worker_left a")

        with Client(client_settings) as client:  # b is the only worker: it gets them all
            for i in range(3):
                client.submit(f"request {i}", max_tokens=200)
        conn = redis.Redis.from_url(redis_url, decode_responses=True)
        wait_for(lambda: conn.xlen(Keys(redis_prefix).queue("b")) >= 3, 20, "jobs queued at b")
        procs[2].kill()
        procs[2].wait()
        wait_for(lambda: has(dispatcher, logs.WORKER_DEAD, worker="b"), 10, "worker_dead b")
        requeued = [e for e in events(dispatcher) if e["event"] == logs.JOBS_REQUEUED]
        assert [(e["worker"], e["jobs"]) for e in requeued] == [("b", 3)]
        assert not has(dispatcher, logs.WORKER_LEFT, worker="b")

        start("b-again", *dying_args)
        wait_for(lambda: has(dispatcher, logs.WORKER_REJOINED, worker="b"), 20, "worker_rejoined b")

        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(20)
        assert has(dispatcher, logs.LEASE_RELEASED, dispatcher="d1")
        conn.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for line in dispatcher.read_text().splitlines():  # every line of the log is one JSON object
        assert isinstance(json.loads(line), dict), line
