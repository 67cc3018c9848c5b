"""Describe the machine, the package versions and the code a benchmark ran on."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

PACKAGES = ("dio", "redis", "hiredis", "numpy", "pydantic", "rq", "vllm", "torch")
REPO_DIR = Path(__file__).resolve().parents[1]
GIT_TIMEOUT_S = 5.0


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Return the installed version of each distribution, None where it is not installed.

    Reads package metadata rather than importing, so asking about vLLM costs nothing.
    """
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def redis_server_info(client: redis.Redis) -> dict[str, Any]:
    """Return the server's version, mode and OS from ``INFO server``."""
    info = client.info("server")
    return {key: info.get(key) for key in ("redis_version", "redis_mode", "os", "arch_bits")}


def _git(*args: str) -> str | None:
    """Run git in the repository and return its stripped output, or None if that fails."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    """Return the checked-out commit and whether the work tree has uncommitted changes."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine_info(client: redis.Redis | None = None) -> dict[str, Any]:
    """Return a JSON-ready description of this machine, for benchmark result files."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_commit(),
    }
    if client is not None:
        info["redis_server"] = redis_server_info(client)
    return info
