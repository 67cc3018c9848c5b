"""Fuzz the dispatcher's intake path: anyone can XADD anything to the intake stream.

Hypothesis writes raw entries straight to a test intake (random bytes, random field maps, valid
requests mutated field by field and byte by byte), then runs the real dispatcher's turn on them
(``Dispatcher.step``: read, parse, reject or dead-letter, route). For every entry: the dispatcher
never raises; a valid request is accepted (ended with a reason, or still waiting in the backlog);
an invalid one that names a valid job id ends ``rejected`` with a reason; one that names none is
dead-lettered byte for byte and taken off the intake. Nothing is left unaccounted for.

CI runs ``DIO_FUZZ_EXAMPLES`` examples (default 200); the long run is
``DIO_FUZZ_EXAMPLES=10000 python -m pytest -q tests/test_fuzz_intake.py``.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.service import Dispatcher
from dio.protocol.connection import connect, delete_keys, ensure_group
from dio.protocol.keys import DISPATCHER_GROUP, REQUEST_FIELD, STATUS_FIELD, Keys
from dio.protocol.models import JobId, JobStatus, Request

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("DIO_FUZZ_EXAMPLES", "200"))
REQ = REQUEST_FIELD.encode()
DEADLETTER_RAW_CHARS = 2000  # what the dead-letter entry keeps of a payload (dio.dispatcher.intake)
JOB_ID = TypeAdapter(JobId)

# --- strategies ----------------------------------------------------------------------------------

job_ids = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9_.:\-]{1,20}\Z"),  # valid, half the time
    st.sampled_from(["", "bad id!", "x" * 129, "é", "a/b", "\udcff", 7, None, ["a"]]),  # invalid
)
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
json_values = st.recursive(json_leaves, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=8)
REQUEST_KEYS = sorted(Request.model_fields)


@st.composite
def requests_mutated(draw: st.DrawFn) -> bytes:
    """A valid request, then a few of its fields dropped, retyped or added, and maybe its bytes damaged."""
    body: dict[str, Any] = {"id": draw(job_ids), "prompt": draw(st.text(min_size=1, max_size=30)),
                            "max_tokens": draw(st.integers(1, 64))}
    if draw(st.booleans()):
        body["tier"] = draw(st.sampled_from(["interactive", "batch", "other"]))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([*REQUEST_KEYS, "evil", "v"]))
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(json_values)
    data = json.dumps(body).encode("utf-8", "surrogateescape")
    damage = draw(st.sampled_from(["none", "none", "truncate", "insert", "wrap"]))
    if damage == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif damage == "wrap":
        data = json.dumps([body]).encode("utf-8", "surrogateescape")
    return data


field_names = st.one_of(st.just(REQ), st.binary(min_size=1, max_size=8), st.sampled_from([b"job", b"v", b"\xc3("]))
deep = st.integers(1, 5000).map(lambda n: b'{"id": "deep", "x": ' + b"[" * n + b"]" * n + b"}")  # recursion limits
long = st.binary(min_size=1, max_size=8).map(lambda b: b * 1000)  # past the dead letter's 2,000 characters
payloads = st.one_of(requests_mutated(), st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                     deep, long)
entries = st.one_of(
    requests_mutated().map(lambda p: {REQ: p}),  # the usual shape, a damaged request
    st.builds(lambda p, extra: {**extra, REQ: p}, requests_mutated(),  # the same, beside other fields
              st.dictionaries(field_names, payloads, max_size=2)),
    st.dictionaries(field_names, payloads, min_size=1, max_size=3),  # any field map, any payload
)

# --- what each entry must become -----------------------------------------------------------------


def expected(fields: dict[bytes, bytes]) -> str:
    """Return "accepted", "rejected" or "deadlettered": what the intake must do with this entry."""
    raw = fields.get(REQ, b"")
    try:
        Request.model_validate_json(raw.decode("utf-8"))
        return "accepted"
    except (UnicodeDecodeError, ValidationError):
        pass
    try:
        data = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return "deadlettered"
    if isinstance(data, dict) and _valid_id(data.get("id")):
        return "rejected"
    return "deadlettered"


def _valid_id(value: object) -> bool:
    try:
        JOB_ID.validate_python(value)
    except ValidationError:
        return False
    return True


def job_id_of(fields: dict[bytes, bytes]) -> str:
    return json.loads(fields[REQ].decode("utf-8", "surrogateescape"))["id"]


# --- the test ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conn(redis_url: str):
    client = redis.Redis.from_url(redis_url)  # bytes in, bytes out
    yield client
    client.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(entries, min_size=1, max_size=8))
def test_every_intake_entry_is_accepted_rejected_or_deadlettered(conn: redis.Redis, redis_url: str,
                                                                 batch: list[dict[bytes, bytes]]) -> None:
    keys = Keys(f"{{fz{uuid.uuid4().hex[:8]}}}:")
    config = DispatcherSettings(redis_url=redis_url, key_prefix=keys.prefix, block_ms=1, max_wait_s=0.0,
                                dispatcher_name="fuzz")
    dispatcher = Dispatcher(config, connect(config))
    try:
        ensure_group(dispatcher.redis, keys.intake, DISPATCHER_GROUP)
        ensure_group(dispatcher.redis, keys.completions, DISPATCHER_GROUP)
        written = [(conn.xadd(keys.intake, fields).decode(), fields) for fields in batch]
        dispatcher.step()  # one turn reads them all, parses, ends or dead-letters, routes: it must not raise
        check(conn, keys, dispatcher, written)
    finally:
        dispatcher.redis.close()
        delete_keys(conn, keys)


def check(conn: redis.Redis, keys: Keys, dispatcher: Dispatcher, written: list[tuple[str, dict[bytes, bytes]]]) -> None:
    dead = {fields[b"entry"].decode(): fields for _, fields in conn.xrange(keys.deadletter)}
    waiting = {item.entry_id for item in dispatcher.backlog.in_order()}
    pending = {entry["message_id"].decode() for entry in
               conn.xpending_range(keys.intake, DISPATCHER_GROUP, "-", "+", 100)}
    for entry_id, fields in written:
        outcome = expected(fields)
        event(outcome)
        if outcome == "deadlettered":
            assert entry_id in dead, (fields, dead)
            raw = fields.get(REQ, b"").decode("utf-8", "surrogateescape")[:DEADLETTER_RAW_CHARS]
            assert dead[entry_id][b"raw"] == raw.encode("utf-8", "surrogateescape")  # kept byte for byte
            assert not conn.xrange(keys.intake, entry_id, entry_id)  # taken off the intake
            continue
        assert entry_id not in dead
        job = conn.hgetall(keys.job(job_id_of(fields)))
        if outcome == "accepted" and entry_id in waiting:
            assert entry_id in pending  # waiting in the backlog: still pending on the intake (a crash loses nothing)
            continue
        # Ended: rejected with a reason (invalid, or a valid request that could not wait), and acknowledged.
        assert job.get(STATUS_FIELD.encode()) == JobStatus.rejected.value.encode(), (fields, job)
        assert job.get(b"reason"), job
        assert entry_id not in pending
