"""Time DIO's most frequent Redis calls through its Redis Cluster client (``protocol/cluster.py``).

    python -m dio.ops.bench.cluster_calls        # a private three-node cluster, started and stopped here

Prints the median of 500 calls (after 50 warm-up calls) of: a pipeline of HSET + EXPIRE + XADD (no
movable keys), a pipelined EVAL (how the dispatcher's and workers' transitions go on a cluster) and
an XREAD over two streams (the client's reply reader). Used for the README's *Redis Cluster*
figures: pipelined EVAL and XREAD with and without ``command_keys``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from dio.ops.redis_server import start_private_cluster
from dio.protocol.connection import connect
from dio.protocol.keys import Keys
from dio.protocol.settings import CommonSettings

WARMUP, CALLS = 50, 500


def median_ms(call: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def main() -> None:
    with start_private_cluster() as cluster:
        conn = connect(CommonSettings(redis_url=cluster.url))
        keys = Keys("{bench}:")
        conn.xadd(keys.intake, {"a": "1"})

        def pipeline() -> None:
            pipe = conn.pipeline(transaction=False)
            pipe.hset(keys.job("x"), "a", "1")
            pipe.expire(keys.job("x"), 60)
            pipe.xadd(keys.completions, {"c": "1"}, maxlen=100)
            pipe.execute()

        def pipelined_eval() -> None:
            pipe = conn.pipeline(transaction=False)
            pipe.execute_command("EVAL", "return 1", 1, keys.intake)
            pipe.execute()

        def xread() -> None:
            conn.xread({keys.intake: "0", keys.completions: "0"}, count=1)

        try:
            for label, call in (("pipeline HSET+EXPIRE+XADD", pipeline), ("pipelined EVAL", pipelined_eval),
                                ("XREAD over 2 streams", xread)):
                print(f"{label}: median {median_ms(call):.3f} ms")
        finally:
            conn.delete(keys.intake, keys.completions, keys.job("x"))
            conn.close()


if __name__ == "__main__":
    main()
