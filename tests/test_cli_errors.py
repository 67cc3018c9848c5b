"""An operator's mistake: one ``error:`` line, exit code 2, no traceback, no password; the real ``dio`` command."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dio.gpu_worker.config import WorkerSettings
from dio.ops.cli_edge import UsageError, bad_settings_line, take_common_options
from dio.ops.env_check import known_variables, settings_classes, unknown_variables

PASSWORD = "s3cret-Pa55"
DIO = Path(sys.executable).with_name("dio")  # the console script the install made


def dead_port() -> int:
    """Return a 127.0.0.1 port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dio(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``dio`` command with the environment less any DIO_* variable, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("DIO_")}
    return subprocess.run([str(DIO), *args], env={**clean, **env}, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """Assert the command failed with exit code 2 and a single ``error:`` line on stderr; return it."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in done.stderr
    return lines[0]


def test_the_command_is_installed():
    assert DIO.exists(), f"no dio script beside {sys.executable}: pip install -e '.[dev,server]'"


@pytest.mark.parametrize(("command", "how"), [(["inspect"], "option"), (["inspect"], "variable"),
                                             (["reset"], "option"), (["submit", "hello"], "option")])
def test_unreachable_redis_is_one_line_with_the_password_masked(command, how):
    url = f"redis://:{PASSWORD}@127.0.0.1:{dead_port()}/0"
    retry = {"DIO_CLIENT_RETRY_S": "0.2"}  # the client rides out an outage this long first
    done = dio(*command, "--redis-url", url, **retry) if how == "option" else dio(*command, DIO_REDIS_URL=url, **retry)
    line = one_error_line(done)
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in line
    assert "DIO_REDIS_URL" in line  # what to check
    assert PASSWORD not in done.stdout + done.stderr


def test_a_bad_setting_names_the_variable_its_value_and_what_is_allowed():
    line = one_error_line(dio("worker", "--engine", "sim", DIO_MAX_NUM_SEQS="lots"))
    assert "DIO_MAX_NUM_SEQS" in line and "'lots'" in line and "valid integer" in line


def test_a_setting_that_is_not_valid_json_is_one_line():
    line = one_error_line(dio("dispatcher", DIO_POLICY_WEIGHTS="{H100: 2}"))
    assert "bad setting DIO_POLICY_WEIGHTS = '{H100: 2}': not valid JSON" in line


def test_a_bad_log_format_is_one_line():
    line = one_error_line(dio("dispatcher", "--log-format", "xml"))
    assert "DIO_LOG_FORMAT" in line and "'xml'" in line and "'text' or 'json'" in line


def test_a_bad_setting_never_shows_a_password():
    with pytest.raises(ValidationError) as caught:  # a password that is not a string: its value is masked too
        WorkerSettings.model_validate({"redis_password": ["not", PASSWORD], "redis_url": 7})
    line = bad_settings_line(caught.value)
    assert "DIO_REDIS_PASSWORD = '***'" in line and "DIO_REDIS_URL" in line
    assert PASSWORD not in line


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_says_what_to_install():
    line = one_error_line(dio("worker", "--engine", "vllm", "--model", "some/model"))
    assert "pip install 'dio[vllm]'" in line


def test_a_misspelled_variable_gets_a_warning_with_the_closest_name():
    done = dio("--version", DIO_REDIS_ULR="redis://127.0.0.1:6379/0", DIO_MAX_NUM_SEQ="8")
    assert done.returncode == 0, done.stderr
    assert "warning: DIO_REDIS_ULR is not a DIO setting" in done.stderr
    assert "did you mean DIO_REDIS_URL?" in done.stderr
    assert "did you mean DIO_MAX_NUM_SEQS?" in done.stderr


def test_known_variables_get_no_warning():
    done = dio("--version", DIO_REDIS_URL="redis://127.0.0.1:6379/0", DIO_LOG_FORMAT="json", DIO_POLICY="dio",
               DIO_MAX_NUM_SEQS="8", DIO_RESULT_TIMEOUT_S="5")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr


def test_version():
    done = dio("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"dio {importlib.metadata.version('dio')}"


def test_up_with_a_configured_redis_that_does_not_answer_says_so_and_starts_none():
    url = f"redis://:{PASSWORD}@127.0.0.1:{dead_port()}/0"
    done = dio("up", "--redis-url", url, "--workers", "H100:1", timeout=60)
    line = one_error_line(done)
    assert "no Redis answers at redis://:***@127.0.0.1:" in line
    assert "starts no Redis of its own" in line
    assert "DIO is up" not in done.stdout and PASSWORD not in done.stdout + done.stderr


# --- the pieces, without a process ------------------------------------------------------------


def test_common_options_are_taken_off_anywhere_before_a_double_dash():
    args, found = take_common_options(["inspect", "--redis-url", "redis://h:1/0", "--json", "--log-format=json",
                                       "--", "--log-level", "x"])
    assert args == ["inspect", "--json", "--", "--log-level", "x"]
    assert found == {"DIO_REDIS_URL": "redis://h:1/0", "DIO_LOG_FORMAT": "json"}
    with pytest.raises(UsageError, match="--log-level needs a value"):
        take_common_options(["worker", "--log-level"])


def test_unknown_variables_are_found_case_insensitively_with_a_suggestion():
    known = known_variables(settings_classes())
    assert {"DIO_REDIS_URL", "DIO_POLICY", "DIO_MAX_NUM_SEQS", "DIO_RESULT_TIMEOUT_S", "DIO_LOG_FORMAT"} <= known
    environ = {"DIO_REDIS_URL": "x", "dio_key_prefix": "p", "DIO_HEARTBEAT_TTL": "1", "DIO_ZZZ": "1", "PATH": "/"}
    assert unknown_variables(environ, known) == [("DIO_HEARTBEAT_TTL", "DIO_HEARTBEAT_TTL_S"), ("DIO_ZZZ", None)]


# --- the CLI's names agree ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["worker", "up", "demo", "chaos"])
def test_workers_and_cluster_are_the_same_option(command):
    import typer.main

    from dio.ops.cli import app

    params = typer.main.get_command(app).commands[command].params
    assert any({"--workers", "--cluster"} <= set(getattr(param, "opts", [])) for param in params)


def test_gpu_short_names_are_accepted_wherever_a_profile_is_named():
    from dio.dispatcher.scorers import capacity_weight
    from dio.gpu_worker.sim.engine import SimEngine
    from dio.gpu_worker.sim.profiles import get_profile
    from dio.ops.local_cluster import parse_workers

    assert [(s.profile, s.count) for s in parse_workers("H100:1, h100-80gb:2,L4")] == [
        ("H100", 1), ("h100-80gb", 2), ("L4", 1)]
    assert get_profile("H100") == get_profile("h100-80gb") == get_profile("H100-80GB")
    engine = SimEngine("H100", "llama-3.2-3b")
    info = engine.capacity().worker_info("h1", engine.name)
    assert info.gpu == "H100-80GB"
    assert capacity_weight(info, {"H100": 3.0}) == 3.0  # DIO_POLICY_WEIGHTS by the short name


def test_up_with_an_unknown_gpu_is_one_line():
    line = one_error_line(dio("up", "--workers", "H100:1,B200:1"))  # refused at once, not in a worker process
    assert "unknown GPU profile 'B200'" in line
