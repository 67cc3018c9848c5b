"""The package layout: one import root, and a product that never loads benchmark, lab or test code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT_FOLDERS = ("dio", "protocol", "client", "dispatcher", "gpu_worker", "ops")
LAB_PACKAGES = ("dio.ops.bench", "dio.ops.gpu")  # benchmarks, peers, the HTTP simulated GPU, the GPU lab
OLD_ROOTS = ("protocol", "client", "dispatcher", "gpu_worker", "ops", "tests", "vllm_standin")


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter outside the checkout (so only the installed ``dio`` is found)."""
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_part_imports_from_the_dio_root_outside_the_checkout() -> None:
    out = _run("import dio.client, dio.dispatcher, dio.gpu_worker, dio.protocol, dio.ops\n"
               "from dio import Client, AsyncClient\n"
               "from dio.client import Client as C\n"
               "assert Client is C\n"
               f"import sys; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OLD_ROOTS!r})))")
    assert out.strip() == "[]"  # nothing is importable, or imported, under the old top-level names


def test_the_dio_command_loads_no_benchmark_lab_or_test_code() -> None:
    out = _run("import sys\n"
               "import dio.ops.cli\n"
               "import dio.dispatcher.service, dio.gpu_worker.daemon, dio.gpu_worker.engine_factory\n"
               "import dio.ops.demo, dio.ops.local_cluster\n"
               "print('\\n'.join(sorted(m for m in sys.modules)))")
    loaded = out.split()
    assert [m for m in loaded if m.startswith(LAB_PACKAGES)] == []
    assert [m for m in loaded if m.split(".")[0] in OLD_ROOTS] == []


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def _product_files() -> list[Path]:
    files = []
    for folder in PRODUCT_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if not rel.startswith(("ops/bench/", "ops/gpu/")):
                files.append(path)
    return files


@pytest.mark.parametrize("path", _product_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_product_modules_import_only_the_product(path: Path) -> None:
    bad = [m for m in _imports(path) if m.startswith(LAB_PACKAGES) or m.split(".")[0] in OLD_ROOTS]
    # dio.ops.cli's `dio bench` is the one door to the benchmarks, opened when the command runs.
    if path == REPO / "ops" / "cli.py":
        bad = [m for m in bad if m != "dio.ops.bench.cli"]
    assert bad == []
