"""The package layout: one import root, and a product that never loads benchmark, lab or test code."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
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


def test_nothing_imports_the_simulators_old_scheduler_name() -> None:
    # The simulated GPU's scheduler is BatchScheduler; ``Scheduler`` named the dispatcher's routing policy too.
    users = []
    for folder in (*PRODUCT_FOLDERS, "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            if any(isinstance(node, ast.ImportFrom) and node.module == "dio.gpu_worker.sim.scheduler"
                   and any(alias.name == "Scheduler" for alias in node.names) for node in ast.walk(tree)):
                users.append(path.relative_to(REPO).as_posix())
    assert users == []  # import BatchScheduler instead


@pytest.fixture(scope="module")
def wheel_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel, as ``pip install .`` does, and unpack it: what a user's site-packages gets."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy of the checkout's files: setuptools builds in the source tree
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("dio-*.whl")
    tree = out / "site"
    zipfile.ZipFile(wheel).extractall(tree)
    return tree


def _run_installed(tree: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` on the unpacked wheel only: the checkout's editable import hook is taken out."""
    prelude = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd="/", env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_the_wheel_installs_one_package_dio_without_the_lab(wheel_tree: Path) -> None:
    assert sorted(p.name for p in wheel_tree.iterdir()) == ["dio", "dio-0.1.0.dist-info"]
    assert (wheel_tree / "dio-0.1.0.dist-info" / "top_level.txt").read_text().split() == ["dio"]
    assert not (wheel_tree / "dio" / "ops" / "bench").exists() and not (wheel_tree / "dio" / "ops" / "gpu").exists()
    assert not [p for p in wheel_tree.rglob("*") if "results" in p.parts]
    done = _run_installed(wheel_tree, "import dio, dio.client, dio.dispatcher, dio.gpu_worker, dio.protocol, dio.ops\n"
                                      "import dio.ops.cli, dio.ops.demo\n"
                                      "from dio.protocol.scripts import Scripts\n"
                                      "from dio.ops.traces import BUNDLED, bundled\n"
                                      "assert all(bundled(name).exists() for name in BUNDLED)\n"
                                      "print(dio.__file__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(wheel_tree))


@pytest.mark.slow
def test_dio_bench_from_a_wheel_says_where_the_benchmarks_are(wheel_tree: Path) -> None:
    done = _run_installed(wheel_tree, "import sys; sys.argv = ['dio', 'bench', 'replay', '--help']\n"
                                      "from dio.ops.cli import app; app()")
    assert done.returncode == 2
    assert "the benchmarks run from a DIO checkout" in done.stderr and "Traceback" not in done.stderr
