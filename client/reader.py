"""The background thread that reads one client's reply stream.

Every job a client submits names the client's private reply stream; the dispatcher and the
workers XADD one notice there when the job ends. One thread per client reads them with a
blocking XREAD, so waiting for thousands of jobs costs one connection, not one each. The same
XREAD reads the token streams the client follows (``dio.client.stream``).
"""

from __future__ import annotations

import logging
import threading

import redis
from pydantic import ValidationError

from dio.client.mailbox import Mailbox
from dio.client.settings import READER_BATCH, READER_BLOCK_MS
from dio.client.stream import Subscriptions
from dio.protocol.keys import RESULT_FIELD, WAKE_FIELD
from dio.protocol.models import JobResult
from dio.protocol.retry import Outage

log = logging.getLogger(__name__)


def parse_notice(entry_id: str, fields: dict[str, str]) -> JobResult | None:
    """Return the JobResult a reply entry carries, or None for wake-ups and garbage."""
    raw = fields.get(RESULT_FIELD)
    if raw is None:
        return None
    try:
        return JobResult.model_validate_json(raw)
    except ValidationError as exc:
        # The entry is skipped; its job is still found by polling the job hash.
        log.warning("unreadable notice %s skipped: %s", entry_id, exc)
        return None


class ReplyReader(threading.Thread):
    """Read notices from ``stream`` and deliver them to ``mailbox`` until stopped."""

    def __init__(self, conn: redis.Redis, stream: str, mailbox: Mailbox, *, block_ms: int = READER_BLOCK_MS,
                 batch: int = READER_BATCH, outage: Outage | None = None,
                 streams: Subscriptions | None = None) -> None:
        super().__init__(name=f"dio-reply-reader:{stream}", daemon=True)
        self._conn = conn
        self._stream = stream
        self._mailbox = mailbox
        self._block_ms = block_ms
        self._batch = batch
        self._stopping = threading.Event()
        self._outage = outage or Outage(log, f"reply reader on {stream}")
        self._streams = streams or Subscriptions()  # token streams followed: read by the same XREAD
        # The stream is private to this client, so everything on it since the start is ours.
        self.last_id = "0-0"

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                doomed = self._streams.take_doomed()
                if doomed:  # token streams read to their end: one DEL for all (else their TTL ends them)
                    self._conn.delete(*doomed)
                keys = {self._stream: self.last_id, **self._streams.offsets()}
                replies = self._conn.xread(keys, count=self._batch, block=self._block_ms)
                self._consume(replies)
            except redis.RedisError as exc:
                # Notices wait in the stream; waiters poll job hashes meanwhile, so nothing is lost.
                self._stopping.wait(self._outage.failed(exc))
                continue
            self._outage.ok()

    def _consume(self, replies: list | None) -> None:
        # Token entries first: a job's deltas are handed over before its notice ends the stream.
        replies = [(key, entries) for key, entries in replies or [] if not self._streams.deliver(key, entries)]
        for _stream, entries in replies:
            for entry_id, fields in entries:
                self.last_id = entry_id
                result = parse_notice(entry_id, fields)
                if result is not None:
                    self._mailbox.deliver(result)
            if entries:
                # Drop what was read (the last entry stays: MINID keeps ids >= it).
                self._conn.xtrim(self._stream, minid=self.last_id, approximate=False)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop reading: wake the blocked XREAD with a marker entry, then wait for the thread."""
        self._stopping.set()
        if self.is_alive():
            try:
                self._conn.xadd(self._stream, {WAKE_FIELD: "1"})
            except redis.RedisError as exc:
                log.warning("could not wake reply reader on %s: %s", self._stream, exc)
            self.join(timeout_s)
