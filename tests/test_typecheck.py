"""The type checker keeps the layout honest: mypy passes on the product, and catches the mix-ups it must.

mypy finds modules on disk, not through the editable install's import hook, so it is given the
``dio`` tree that pyproject's package-dir maps, as links to the repository's folders (as ``.ci/lint``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("protocol", "client", "dispatcher", "gpu_worker", "ops")
CHECKED = ("dio.protocol", "dio.dispatcher")  # at least these; .ci/lint names every package it checks

MIXUPS = '''
import redis
import redis.asyncio as aioredis
from dio.protocol.keys import Keys
from dio.protocol.models import JobResult, JobStatus, WorkerInfo, from_hash
from dio.protocol.scripts import AsyncScripts, Scripts


async def mixups(sync: redis.Redis, aio: aioredis.Redis) -> None:
    result = JobResult(id="a", status=JobStatus.completed)
    await Scripts(sync, Keys()).finish(sync, result, None)  # line 11: a sync call awaited
    AsyncScripts(aio, Keys()).finish(aio, result, None)  # line 12: an async call not awaited
    if AsyncScripts(aio, Keys()).finish(aio, result, None) == 1:  # line 13: a coroutine compared with a reply
        pass
    info = from_hash(WorkerInfo, {})
    print(info.no_such_field)  # line 16: the codec returns the real model, whose fields are known
'''


@pytest.fixture(scope="module")
def link_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mypy")
    (root / "dio").mkdir()
    (root / "dio" / "__init__.py").symlink_to(REPO / "dio" / "__init__.py")
    for folder in FOLDERS:
        (root / "dio" / folder).symlink_to(REPO / folder)
    return root


def _mypy(link_tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                           "--cache-dir", str(link_tree / ".mypy_cache"), *args],
                          cwd=REPO, env={"MYPYPATH": str(link_tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mypy_passes_on_the_protocol_and_the_dispatcher(link_tree: Path) -> None:
    done = _mypy(link_tree, *[arg for package in CHECKED for arg in ("-p", package)])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_catches_script_runner_and_codec_mixups(link_tree: Path, tmp_path: Path) -> None:
    snippet = tmp_path / "mixups.py"
    snippet.write_text(MIXUPS)
    done = _mypy(link_tree, str(snippet))
    lines = sorted({int(m.group(1)) for m in re.finditer(r"mixups\.py:(\d+): error", done.stdout)})
    assert lines == [11, 12, 13, 16], done.stdout
