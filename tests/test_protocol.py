"""The wire protocol: validation with clear messages, size limits, hash round trips, key names."""

import json

import pytest
from pydantic import ValidationError

from dio.dispatcher.intake import InvalidEntry, parse_entry
from dio.protocol import defaults as d
from dio.protocol.keys import REQUEST_FIELD, Keys
from dio.protocol.models import (
    SCHEMA_VERSION,
    JobResult,
    JobStatus,
    Request,
    WorkerInfo,
    WorkerTelemetry,
    describe_validation_error,
    from_hash,
    hash_json_fields,
    to_hash,
)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"id": "a", "prompt": "x", "prompt_token_ids": [1]}, "exactly one of"),
        ({"id": "a"}, "exactly one of"),
        ({"id": "a", "prompt": ""}, "empty"),
        ({"id": "a b", "prompt": "x"}, "id: String should match pattern"),
        ({"id": "a", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"id": "a", "prompt": "x", "max_tokens": d.MAX_OUTPUT_TOKENS + 1}, "max_tokens"),
        ({"id": "a", "prompt_token_ids": [1] * (d.MAX_PROMPT_TOKENS + 1)}, "prompt_token_ids"),
        ({"id": "a", "prompt": "x", "temperature": 9}, "temperature"),
        ({"id": "a", "prompt": "x", "pickle": "cos\nsystem"}, "pickle: Extra inputs are not permitted"),
        ({"id": "x" * 200, "prompt": "x"}, "id"),
    ],
)
def test_bad_requests_get_a_clear_message(fields, message):
    with pytest.raises(ValidationError) as caught:
        Request.model_validate(fields)
    assert message in describe_validation_error(caught.value)


def test_prompt_tokens_and_kv_tokens():
    assert Request(id="a", prompt_token_ids=[1, 2, 3], max_tokens=5).kv_tokens == 8
    assert Request(id="a", prompt="x" * 400, max_tokens=5).prompt_tokens == 100  # 4 characters per token
    assert Request(id="a", prompt="hi", num_prompt_tokens=700, max_tokens=5).prompt_tokens == 700


def test_terminal_statuses():
    assert {s for s in JobStatus if s.terminal} == {JobStatus.completed, JobStatus.rejected, JobStatus.failed,
                                                   JobStatus.cancelled}


def test_worker_models_round_trip_through_a_hash():
    info = WorkerInfo(id="L4-1", engine="sim", model="m", gpu="L4", kv_capacity_tokens=100, kv_bytes_per_token=2,
                      max_num_seqs=8, max_model_len=100)
    telemetry = WorkerTelemetry(running=3, draining=True, kv_usage=0.5)
    fields = {**to_hash(info), **to_hash(telemetry)}
    assert all(isinstance(v, str) for v in fields.values())
    assert from_hash(WorkerInfo, fields) == info
    assert from_hash(WorkerTelemetry, fields).draining is True


def test_job_results_round_trip_through_the_one_codec():
    result = JobResult(id="j1", status=JobStatus.completed, output='["looks", "like", "json"]', output_token_ids=[1, 2],
                       attempts=2, finished_at=1700000000.5)
    fields = to_hash(result)
    assert fields["output_token_ids"] == "[1,2]" and fields["attempts"] == "2"
    back = from_hash(JobResult, {k: v for k, v in fields.items() if k != "id"}, id="j1")  # the id is in the key
    assert isinstance(back, JobResult) and back == result  # text stays text, even when it looks like JSON
    assert hash_json_fields(JobResult) == {"output_token_ids"}
    assert hash_json_fields(Request) == {"prompt_token_ids", "prefix_hashes", "metadata", "stop"}


def test_intake_entries_without_an_id_are_dead_lettered_others_rejected():
    invalid = parse_entry("1-0", {REQUEST_FIELD: '{"id": "ok-id", "prompt": "x", "max_tokens": -1, "reply_to": "c"}'})
    assert isinstance(invalid, InvalidEntry) and invalid.result.status == JobStatus.rejected
    assert invalid.reply_to == "c" and "max_tokens" in invalid.result.reason
    for raw in ("not json", "[]", '{"id": "bad id", "prompt": "x"}', ""):
        invalid = parse_entry("1-0", {REQUEST_FIELD: raw})
        assert isinstance(invalid, InvalidEntry) and invalid.result is None


def test_a_request_of_another_schema_version_is_refused_with_a_clear_message():
    with pytest.raises(ValidationError) as caught:
        Request(id="a", prompt="x", v=SCHEMA_VERSION + 1)
    assert f"schema version {SCHEMA_VERSION + 1} is not supported" in describe_validation_error(caught.value)
    invalid = parse_entry("1-0", {REQUEST_FIELD: json.dumps({"v": 0, "id": "old", "prompt": "x"})})
    assert isinstance(invalid, InvalidEntry) and invalid.result.status == JobStatus.rejected
    assert f"this DIO reads version {SCHEMA_VERSION}" in invalid.result.reason


@pytest.mark.parametrize(
    "fields",
    [
        # What a connection decoding with errors="surrogateescape" gives for bytes that are not UTF-8.
        {REQUEST_FIELD: b'{"id": "j", "reply_to": "c", "prompt": "caf\xe9"}'.decode("utf-8", "surrogateescape")},
        # What a connection that does not decode gives.
        {REQUEST_FIELD: b'{"id": "j", "reply_to": "c", "prompt": "caf\xe9"}'},
        {REQUEST_FIELD.encode(): b'{"id": "j", "reply_to": "c", "prompt": "caf\xe9"}'},
    ],
)
def test_intake_entries_that_are_not_utf8_are_rejected_with_the_offending_byte(fields):
    invalid = parse_entry("1-0", fields)
    assert isinstance(invalid, InvalidEntry) and invalid.result is not None
    assert invalid.result.id == "j" and invalid.reply_to == "c"
    assert invalid.result.reason == "invalid request: not UTF-8 (byte 0xe9 at offset 43)"


def test_intake_entries_that_are_not_utf8_and_name_no_job_keep_their_bytes():
    invalid = parse_entry("1-0", {REQUEST_FIELD: b"\xff\xfe"})
    assert isinstance(invalid, InvalidEntry) and invalid.result is None
    assert invalid.raw.encode("utf-8", "surrogateescape") == b"\xff\xfe"  # written back byte for byte
    invalid = parse_entry("1-0", {"r\udcc3q": "x"})  # a field name that was not UTF-8: no request field
    assert isinstance(invalid, InvalidEntry) and invalid.result is None


def test_keys_share_one_cluster_hash_tag():
    keys = Keys()
    names = [keys.intake, keys.completions, keys.workers, keys.predictor, keys.lease, keys.deadletter,
             keys.job("j"), keys.reply("c"), keys.worker("w"), keys.alive("w"), keys.queue("w"), keys.reserved("w")]
    assert all(name.startswith("{dio}:") for name in names)
    assert len(set(names)) == len(names)
