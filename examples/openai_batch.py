"""The ``openai`` package's Batch API against ``dio gateway``: upload examples/batch.jsonl, run it, read it.

    dio up &                  # runs a gateway and a batch runner
    python examples/openai_batch.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import openai

client = openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                       api_key=os.environ.get("OPENAI_API_KEY", "none"))
path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "batch.jsonl"

uploaded = client.files.create(file=(path.name, path.read_bytes()), purpose="batch")
batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
print(f"{batch.id}: {batch.request_counts.total} requests")
while batch.status not in ("completed", "failed", "cancelled", "expired"):
    time.sleep(1)
    batch = client.batches.retrieve(batch.id)
    print(f"  {batch.status}: {batch.request_counts.completed + batch.request_counts.failed}"
          f"/{batch.request_counts.total}")
if batch.output_file_id:
    for line in client.files.content(batch.output_file_id).text.splitlines():
        record = json.loads(line)
        print(f"{record['custom_id']}: {record['response']['body']['choices'][0]['message']['content'][:60]!r}")
if batch.error_file_id:
    for line in client.files.content(batch.error_file_id).text.splitlines():
        record = json.loads(line)
        print(f"{record['custom_id']}: error {record['error']['message']}")
sys.exit(0 if batch.status == "completed" else 1)
