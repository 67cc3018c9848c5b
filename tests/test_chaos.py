"""``dio chaos``: its pieces, and a CI-sized run of the whole thing (every fault, fewer requests)."""

from __future__ import annotations

import json
import random
import time

import pytest

from dio.dispatcher.intake import InvalidEntry, parse_entry
from dio.ops.chaos import FAILURE_COUNTS, ChaosConfig, malformed_entry, passed, plan_requests, run_chaos

KINDS = 12  # malformed_entry cycles through this many kinds


def as_read(fields: dict[bytes, bytes]) -> dict[str, str]:
    """An entry as the dispatcher's connection reads it (bytes that are not UTF-8 as lone surrogates)."""
    return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape") for k, v in fields.items()}


@pytest.mark.parametrize("i", range(KINDS))
def test_each_malformed_entry_is_refused_as_the_chaos_run_expects(i: int):
    fields, job_id = malformed_entry(i, reply_to="chaos-client")
    parsed = parse_entry(f"{i}-0", as_read(fields))
    assert isinstance(parsed, InvalidEntry)
    if job_id is None:  # names no job: dead-lettered
        assert parsed.result is None
    else:  # rejected with the validation message
        assert parsed.result is not None and parsed.result.id == job_id and parsed.result.reason


def test_the_plan_spreads_the_requests_over_the_window_at_the_clusters_capacity():
    config = ChaosConfig(requests=2000, submit_s=120.0)
    planned, time_scale = plan_requests(config, random.Random(0))
    assert len(planned) == 2000
    assert all(a.at_s < b.at_s for a, b in zip(planned, planned[1:], strict=False))
    assert 100 < planned[-1].at_s < 140  # Poisson arrivals at requests / submit_s
    assert 0.03 < sum(p.cancel_after_s is not None for p in planned) / 2000 < 0.07
    assert 0 < time_scale < 10


def test_a_config_without_enough_workers_is_refused():
    with pytest.raises(ValueError, match="at least 4 workers"):
        ChaosConfig(workers="H100:2,L4:1").validate()
    with pytest.raises(ValueError, match="at least 4 workers"):
        ChaosConfig(workers="L4:4").validate()


def test_any_loss_duplicate_stuck_job_or_leak_fails_the_run():
    clean = {name: 0 for name in FAILURE_COUNTS} | {"fault_error": None, "crashed_processes": []}
    assert passed(clean)
    for name in FAILURE_COUNTS:
        assert not passed(clean | {name: 1})
    assert not passed(clean | {"crashed_processes": ["L4-1"]})


def test_the_command_exits_non_zero_and_ends_with_the_json_when_the_promise_breaks(monkeypatch):
    from typer.testing import CliRunner

    from dio.ops import chaos, cli

    broken = {name: 0 for name in FAILURE_COUNTS} | {"fault_error": None, "crashed_processes": [], "stuck": 2}
    monkeypatch.setattr(chaos, "run_chaos", lambda config: broken)
    monkeypatch.setattr(chaos, "print_summary", lambda summary: None)
    result = CliRunner().invoke(cli.app, ["chaos", "--requests", "10", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output.strip().splitlines()[-1])["stuck"] == 2


@pytest.mark.integration
@pytest.mark.slow
def test_a_ci_sized_chaos_run_keeps_the_delivery_promise():
    config = ChaosConfig(requests=300, submit_s=24.0, worker_kills=2, worker_stalls=1, stall_s=4.0, dispatcher_kills=1,
                         redis_restarts=1, redis_kills=1, redis_kill_down_s=4.0, malformed=24, drain_s=45.0, seed=7)
    started = time.monotonic()
    summary = run_chaos(config)
    assert passed(summary), {k: v for k, v in summary.items() if k != "faults"}
    assert summary["submitted"] == 300 and summary["malformed"] == 24
    assert (summary["completed"] + summary["rejected"] + summary["failed"] + summary["cancelled"]) == 300
    faults = ("worker_kills", "worker_stalls", "dispatcher_kills", "dispatcher_stalls", "redis_restarts", "redis_kills")
    assert [summary[name] for name in faults] == [2, 1, 1, 1, 1, 1]
    assert summary["worker_restarts_same_id"] == 2  # each killed worker came back under its id
    assert summary["malformed_rejected"] + summary["malformed_deadlettered"] == 24
    assert summary["cancelled"] >= 1 and summary["reexecuted"] >= 1  # the faults hit jobs in flight
    assert time.monotonic() - started < 120
