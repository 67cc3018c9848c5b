"""Submit one request with the SDK and wait for its result.

    dio up &                  # a local cluster; prints the DIO_REDIS_URL to export
    python examples/submit.py
"""

from __future__ import annotations

from dio import Client
from dio.client import JobRejected


def main() -> None:
    with Client() as dio:  # DIO_REDIS_URL, DIO_KEY_PREFIX
        handle = dio.submit("Explain the tides in two sentences.", max_tokens=48)
        try:
            result = handle.result(timeout=60)
        except JobRejected as exc:  # e.g. too large for every worker, or shed under load
            print(f"rejected: {exc.reason} (retry after {exc.retry_after_s} s)")
            return
        print(f"{result.status.value} on {result.worker} in {result.latency_s * 1000:.0f} ms, "
              f"{result.output_tokens} tokens:")
        print(result.output)


if __name__ == "__main__":
    main()
