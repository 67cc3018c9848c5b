"""The Lua scripts' prelude: names spelled once in Python, none left in the scripts themselves."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import redis

from dio.protocol import keys
from dio.protocol.models import SCHEMA_VERSION, JobResult, JobStatus
from dio.protocol.scripts import BATCH_SCRIPT_NAMES, SCRIPT_NAMES, _load, prelude

SCRIPTS = sorted(p.name.removesuffix(".lua") for p in resources.files("dio.protocol").joinpath("lua").iterdir()
                 if p.name.endswith(".lua"))
WIRE_FIELDS = {keys.REQUEST_FIELD, keys.JOB_FIELD, keys.COMPLETION_FIELD, keys.RESULT_FIELD, keys.STATUS_FIELD,
               keys.ATTEMPTS_FIELD}
# What a script must get from the prelude rather than spell: statuses, stream fields, job-hash fields.
SPELLED_IN_PYTHON = {s.value for s in JobStatus} | WIRE_FIELDS | set(JobResult.model_fields)


def script_code(name: str) -> str:
    """Return a script's source without its comments (the header may name fields in words)."""
    text = resources.files("dio.protocol").joinpath("lua", f"{name}.lua").read_text()
    return re.sub(r"--[^\n]*", "", text)


@pytest.fixture
def conn(redis_url: str):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def run_prelude(conn: redis.Redis, body: str):
    return conn.eval(prelude() + body, 0)


def test_the_scripts_are_the_ones_scripts_py_loads():
    assert SCRIPTS == sorted(SCRIPT_NAMES + BATCH_SCRIPT_NAMES)
    assert SCRIPT_NAMES == ("submit", "handoff", "finish", "start", "requeue", "lease", "heartbeat", "release")


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_script_spells_a_status_or_field_name(name):
    code = script_code(name)
    literals = set(re.findall(r"'([^']*)'", code)) | set(re.findall(r'"([^"]*)"', code))
    assert literals & SPELLED_IN_PYTHON == set()
    assert not re.search(r"\bv\s*=\s*\d", code)  # the schema version is SCHEMA_VERSION


def test_prelude_terminal_set_is_the_enums_terminal_statuses(conn):
    terminal = run_prelude(conn, "local out = {} for s in pairs(TERMINAL) do out[#out + 1] = s end return out")
    assert set(terminal) == {s.value for s in JobStatus if s.terminal}
    assert run_prelude(conn, "return TERMINAL[false] == nil and 1 or 0") == 1  # HGET of a missing field


def test_prelude_names_match_python(conn):
    names = ["REQUEST_FIELD", "JOB_FIELD", "COMPLETION_FIELD", "RESULT_FIELD", "STATUS_FIELD", "ATTEMPTS_FIELD"]
    assert run_prelude(conn, f"return {{{', '.join(names)}}}") == [getattr(keys, n) for n in names]
    assert run_prelude(conn, "return SCHEMA_VERSION") == SCHEMA_VERSION
    assert run_prelude(conn, "return {STATUS.queued, STATUS.cancelled, JOB_HASH.dispatched_at}") == [
        "queued", "cancelled", "dispatched_at"]
    assert run_prelude(conn, "return JSON_FIELDS.output_token_ids and 1 or 0") == 1


def test_a_misspelt_name_fails_the_script_instead_of_writing(conn, redis_prefix):
    key = f"{redis_prefix}job:x"
    with pytest.raises(redis.ResponseError, match="must be strings or integers"):
        conn.eval(prelude() + "return redis.call('HSET', KEYS[1], JOB_HASH.wroker, STATUS.finishd)", 1, key)
    assert not conn.exists(key)


def test_job_hash_constants_are_job_result_fields():
    assert {keys.STATUS_FIELD, keys.ATTEMPTS_FIELD} <= set(JobResult.model_fields)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_compiles_with_its_prelude(conn, name):
    assert re.fullmatch(r"[0-9a-f]{40}", conn.script_load(_load(name)))


def test_a_heartbeat_writes_capabilities_when_registering_and_only_telemetry_after(conn, redis_prefix):
    from dio.protocol.keys import Keys
    from dio.protocol.scripts import Scripts

    keys = Keys(redis_prefix)
    scripts = Scripts(conn, keys)
    capabilities = {"model": "m", "chat_template": "{{ messages }}" * 100}
    assert scripts.heartbeat(conn, "w1", "tok", 5000, capabilities, {"running": "1"}) == 2
    assert conn.hgetall(keys.worker("w1")) == {**capabilities, "running": "1"}
    conn.hset(keys.worker("w1"), "model", "edited")  # a renewal must not rewrite it
    assert scripts.heartbeat(conn, "w1", "tok", 5000, capabilities, {"running": "2"}) == 1
    assert conn.hmget(keys.worker("w1"), ["model", "running"]) == ["edited", "2"]
    conn.srem(keys.workers, "w1")  # taken out of the set (its heartbeat lapsed): registers anew
    assert scripts.heartbeat(conn, "w1", "tok", 5000, capabilities, {"running": "3"}) == 2
    assert conn.hmget(keys.worker("w1"), ["model", "running"]) == ["m", "3"]
    assert scripts.heartbeat(conn, "w1", "other", 5000, capabilities, {"running": "4"}) == 0
    assert conn.hget(keys.worker("w1"), "running") == "3"
    assert scripts.heartbeat(conn, "w1", "tok", 5000, {}, {"running": "5"}) == 1  # a renewal needs no capabilities
    assert conn.hmget(keys.worker("w1"), ["model", "running"]) == ["m", "5"]
    conn.srem(keys.workers, "w1")  # registering without the capabilities writes nothing and asks for them
    assert scripts.heartbeat(conn, "w1", "tok", 5000, {}, {"running": "6"}) == 3
    assert conn.hget(keys.worker("w1"), "running") == "5" and not conn.sismember(keys.workers, "w1")
