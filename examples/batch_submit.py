"""Submit examples/batch.jsonl as a batch, show its progress, print each answer.

Needs a running DIO with a batch runner (``dio up`` starts both):

    dio up &                              # prints the DIO_REDIS_URL to export
    python examples/batch_submit.py       # or: dio batch submit examples/batch.jsonl --wait
"""

from __future__ import annotations

import sys
from pathlib import Path

from dio import Client

HERE = Path(__file__).parent


def main(path: Path = HERE / "batch.jsonl") -> int:
    with Client() as dio:
        batch = dio.submit_batch(path)
        print(f"{batch.id}: submitted {path}", file=sys.stderr)

        def show(b) -> None:
            counts = b.request_counts
            print(f"  {b.status.value}: {counts.completed + counts.failed}/{counts.total}", file=sys.stderr)

        final = batch.wait(timeout=600, poll_s=1.0, on_progress=show)
        for record in batch.results():
            if record["response"] is not None:
                answer = record["response"]["body"]["choices"][0]["message"]["content"]
                print(f"{record['custom_id']}: {answer[:70]!r}")
            else:
                print(f"{record['custom_id']}: error {record['error']['code']}: {record['error']['message']}")
        print(f"{final.id}: {final.status.value}, {final.request_counts}", file=sys.stderr)
        return 0 if final.status.value == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "batch.jsonl"))
