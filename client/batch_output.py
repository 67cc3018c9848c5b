"""The output JSONL file of a batch: what it already answers (for resuming), and appending to it.

Each line is written and flushed as soon as its result arrives, so a runner that dies loses at
most the line it was writing; that torn last line is cut off when the file is opened again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dio.client.openai_batch import line_record_id

log = logging.getLogger(__name__)

LINE_RECORD_PREFIX = line_record_id(0)[:-1]  # "batch_req_line_": lines that never became a job
SCAN_CHUNK_BYTES = 1 << 16


class AnswerIndex:
    """Which requests of a batch already have their output line (the records seen so far)."""

    def __init__(self) -> None:
        self.custom_ids: set[str] = set()  # answered by a job (response or job error)
        self.line_ids: set[str] = set()  # input lines answered with an error before any job
        self.done = 0  # records with a response
        self.failed = 0  # records with an error

    def index(self, record: dict[str, Any]) -> None:
        """Count one output record."""
        record_id, custom_id = record.get("id"), record.get("custom_id")
        if isinstance(record_id, str) and record_id.startswith(LINE_RECORD_PREFIX):
            self.line_ids.add(record_id)
        elif isinstance(custom_id, str):
            self.custom_ids.add(custom_id)
        if record.get("response") is not None:
            self.done += 1
        else:
            self.failed += 1

    def index_text(self, text: str, where: str) -> None:
        """Count every record of JSONL ``text`` (lines that are not records are logged and skipped)."""
        for n, line in enumerate(text.splitlines(), 1):
            try:
                self.index(json.loads(line))
            except (json.JSONDecodeError, AttributeError):
                log.warning("%s line %d is not an output record; ignored", where, n)

    def has_line(self, line_no: int) -> bool:
        """Tell whether input line ``line_no`` was answered with an error before any job."""
        return line_record_id(line_no) in self.line_ids

    def has_custom_id(self, custom_id: str) -> bool:
        """Tell whether the request ``custom_id`` already has its output line."""
        return custom_id in self.custom_ids

    def write(self, record: dict[str, Any]) -> None:
        """Store one record (where: the subclass's)."""
        raise NotImplementedError


class OutputFile(AnswerIndex):
    """An output file opened for appending, with the index of the lines it already holds."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        if self.path.exists():
            truncate_torn_line(self.path)
            self._load()
        self._file = open(self.path, "a", encoding="utf-8")  # closed by close()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, text in enumerate(f, 1):
                try:
                    self.index(json.loads(text))
                except (json.JSONDecodeError, AttributeError):
                    log.warning("%s line %d is not an output record; ignored", self.path, n)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the OS."""
        self._file.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_torn_line(path: Path) -> None:
    """Cut a last line that has no newline (a write interrupted by a crash)."""
    with open(path, "rb+") as f:
        end = pos = f.seek(0, 2)
        cut = 0
        while pos > 0:
            step = min(SCAN_CHUNK_BYTES, pos)
            pos -= step
            f.seek(pos)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                cut = pos + newline + 1
                break
        if cut < end:
            log.warning("%s: cutting a torn last line (%d bytes)", path, end - cut)
            f.truncate(cut)
