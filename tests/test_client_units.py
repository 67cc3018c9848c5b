"""Client pieces that need no Redis: the mailbox, request building, job-hash parsing, outcomes."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from dio.client import JobCancelled, JobFailed, JobRejected, JobStatus, Request, Tier
from dio.client.jobs import build_request, is_terminal, outcome, parse_job
from dio.client.mailbox import Mailbox
from dio.client.settings import ClientSettings
from dio.protocol.keys import ATTEMPTS_FIELD, STATUS_FIELD
from dio.protocol.models import JobResult


def done(job_id: str, status: JobStatus = JobStatus.completed, **fields) -> JobResult:
    return JobResult(id=job_id, status=status, **fields)


def test_mailbox_resolves_a_waiting_future():
    box: Mailbox[Future] = Mailbox(Future)
    future = box.expect("a")
    box.deliver(done("a", output="x"))
    assert future.result(0).output == "x" and len(box) == 0


def test_mailbox_keeps_a_notice_that_arrives_before_its_handle():
    box: Mailbox[Future] = Mailbox(Future)
    box.deliver(done("early"))
    assert box.expect("early").result(0).id == "early"


def test_mailbox_drops_the_oldest_early_notices_beyond_its_bound():
    box: Mailbox[Future] = Mailbox(Future, early_max=2)
    for job_id in ("a", "b", "c"):
        box.deliver(done(job_id))
    assert not box.expect("a").done()  # dropped: its handle will poll the job hash
    assert box.expect("c").done()


def test_mailbox_settle_wins_once():
    box: Mailbox[Future] = Mailbox(Future)
    future = box.expect("a")
    box.settle("a", done("a", JobStatus.cancelled))
    box.settle("a", done("a"), future)  # a later poll does not change the outcome
    box.deliver(done("a"))  # nor does a late notice (kept as early, harmlessly)
    assert future.result(0).status is JobStatus.cancelled
    box.settle("nobody-waits", done("nobody-waits"))  # no future: nothing happens


def test_build_request_fills_defaults_and_keeps_explicit_values():
    settings = ClientSettings(model="m", max_tokens=7, tier=Tier.batch)
    req = build_request(settings, "client1", {"prompt": "hi", "max_tokens": 3})
    assert (req.model, req.max_tokens, req.tier, req.reply_to) == ("m", 3, Tier.batch, "client1")
    assert len(req.id) == 32
    given = Request(id="r1", prompt="hi", reply_to="other")
    assert build_request(settings, "client1", given) is given  # its reply address is kept
    assert build_request(settings, "client1", Request(id="r2", prompt="hi")).reply_to == "client1"
    with pytest.raises(TypeError):
        build_request(settings, "client1", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_parse_job_reads_numbers_lists_and_text_verbatim():
    fields = {STATUS_FIELD: "completed", "output": "[not json", "output_token_ids": "[1, 2]", ATTEMPTS_FIELD: "2",
              "finished_at": "1700000000.5", "reply_to": "c1", "tier": "batch"}
    result = parse_job("j1", fields)
    assert (result.output, result.output_token_ids, result.attempts) == ("[not json", [1, 2], 2)
    assert result.finished_at == 1700000000.5
    assert parse_job("j1", {}) is None


@pytest.mark.parametrize(
    "status, error",
    [
        (JobStatus.completed, None),
        (JobStatus.rejected, JobRejected),
        (JobStatus.failed, JobFailed),
        (JobStatus.cancelled, JobCancelled),
        (JobStatus.running, None),  # not terminal: returned as it is
    ],
)
def test_outcome_raises_the_matching_error(status, error):
    result = done("j", status)
    assert outcome(result, raise_on_error=False) is result
    if error is None:
        assert outcome(result, raise_on_error=True) is result
    else:
        with pytest.raises(error) as info:
            outcome(result, raise_on_error=True)
        assert info.value.result is result and info.value.job_id == "j"


def test_error_messages_are_readable():
    assert str(JobRejected(done("j", JobStatus.rejected))) == "job j rejected: no reason given"
    assert str(JobFailed(done("j", JobStatus.failed, error="boom"))) == "job j failed: boom"
    assert str(JobCancelled(done("j", JobStatus.cancelled, reason="by me"))) == "job j was cancelled: by me"


def test_is_terminal():
    assert is_terminal("completed") and is_terminal("cancelled")
    assert not is_terminal("running") and not is_terminal(None)
