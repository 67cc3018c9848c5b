"""``dio up`` as a child process for the integration tests: started, its output collected, stopped with Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def running_dio_up(args: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """Run ``dio up ARGS``; yield the process and the list its output lines are appended to as they come.

    On exit it is sent SIGINT (what an operator's Ctrl-C does) and given 30 s to stop, then killed.
    """
    proc = subprocess.Popen([sys.executable, "-m", "dio.ops.cli", "up", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        yield proc, output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(5)
