"""The deployment files' structure: docker-compose.yml, the Dockerfiles, .dockerignore.

``.ci/compose`` validates the Compose file with a real Compose implementation and lints the
Dockerfiles; these tests check what DIO needs of them: Redis with AOF, two dispatchers, the
gateway, simulated workers, vLLM workers on NVIDIA GPUs behind the ``gpu`` profile, and every
command a real ``dio`` command with real options.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from dio.ops.cli import app
from dio.ops.env_check import known_variables, settings_classes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def sharded() -> dict[str, dict[str, Any]]:
    """The services docker-compose.sharded.yml adds or changes (an override of the base file)."""
    return yaml.safe_load((ROOT / "docker-compose.sharded.yml").read_text())["services"]


def dio_services(services: dict[str, dict[str, Any]], subcommand: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("command", [])[:2] == ["dio", subcommand]}


def test_redis_keeps_an_append_only_file_on_a_volume(compose, services):
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-data" in compose["volumes"]
    assert "healthcheck" in redis and "ports" not in redis  # not published: it has no password


def test_two_dispatchers_with_their_own_names(services):
    dispatchers = dio_services(services, "dispatcher")
    assert len(dispatchers) == 2
    names = {s["command"][s["command"].index("--name") + 1] for s in dispatchers.values()}
    assert len(names) == 2


def test_the_gateway_listens_on_every_address_and_is_published(services):
    gateway = services["gateway"]
    assert gateway["command"] == ["dio", "gateway", "--host", "0.0.0.0", "--port", "8000"]
    assert any(str(port).endswith(":8000") for port in gateway["ports"])


def test_simulated_workers_are_in_the_default_stack_and_vllm_workers_behind_the_gpu_profile(services):
    workers = dio_services(services, "worker")
    sim = {n: s for n, s in workers.items() if s["command"][s["command"].index("--engine") + 1] == "sim"}
    vllm = {n: s for n, s in workers.items() if s["command"][s["command"].index("--engine") + 1] == "vllm"}
    assert sim and vllm
    assert all("profiles" not in s for s in sim.values())
    for service in vllm.values():
        assert service["profiles"] == ["gpu"]
        assert "--model" in service["command"]
        assert service["build"]["dockerfile"] == "Dockerfile.vllm"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_every_dio_process_waits_for_a_healthy_redis_and_finds_it_by_name(services):
    for name, service in services.items():
        if service.get("command", [None])[0] != "dio":
            continue
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["environment"]["DIO_REDIS_URL"] == "redis://redis:6379/0", name
        assert service["image"].startswith("dio"), name


def test_every_command_is_a_dio_command_with_options_it_has(services, sharded):
    commands = typer.main.get_command(app).commands
    for name, service in [*services.items(), *sharded.items()]:
        command = service.get("command", [])
        if command[:1] != ["dio"]:
            continue
        assert command[1] in commands, f"{name}: dio has no command {command[1]!r}"
        options = {opt for param in commands[command[1]].params for opt in getattr(param, "opts", [])}
        for arg in command[2:]:
            if arg.startswith("--"):
                assert arg in options, f"{name}: dio {command[1]} has no option {arg}"


def test_every_dio_variable_the_file_sets_is_a_setting(services, sharded):
    known = known_variables(settings_classes())
    for name, service in [*services.items(), *sharded.items()]:
        for variable in service.get("environment", {}):
            if variable.startswith("DIO_"):
                assert variable in known, f"{name}: {variable} is not a DIO setting"


def test_the_sharded_variant_names_a_pool_for_every_dispatcher_and_shards_every_dio_service(services, sharded):
    merged = {name: {**services.get(name, {}), **service,
                     "environment": {**services.get(name, {}).get("environment", {}), **service["environment"]}}
              for name, service in sharded.items()}
    dio = {name: s for name, s in {**services, **merged}.items()
           if s.get("command", [])[:1] == ["dio"] and "gpu" not in s.get("profiles", [])}
    assert all(s["environment"].get("DIO_SHARD_BY_MODEL") == "true" for s in dio.values()), sorted(dio)
    pools = {s["environment"].get("DIO_MODEL") for s in dio.values() if s["command"][1] == "dispatcher"}
    assert pools == {"llama-3.2-3b", "tiny-llama-1b"}
    workers = [s["command"] for s in dio.values() if s["command"][1] == "worker"]
    assert any("tiny-llama-1b" in command for command in workers)  # each pool has a worker


def dockerfile(name: str) -> list[str]:
    return [line for line in (ROOT / name).read_text().splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.vllm"])
def test_the_images_run_as_a_non_root_user(name):
    users = [line.split()[1] for line in dockerfile(name) if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


def test_the_core_image_is_slim_python_with_the_server_extra():
    lines = dockerfile("Dockerfile")
    assert all(re.fullmatch(r"FROM python:3\.1[12]-slim( AS \w+)?", line) for line in lines if line.startswith("FROM "))
    assert any("'.[server]'" in line for line in lines)


def test_the_vllm_image_is_vllms_own_with_dio_on_top():
    lines = dockerfile("Dockerfile.vllm")
    assert lines[0] == "FROM vllm/vllm-openai:v0.26.0"
    assert any("[vllm]" in line and "pip install" in line for line in lines)
    assert "ENTRYPOINT []" in lines  # the image's own entry point starts vLLM's server, not DIO


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.vllm"])
def test_what_the_images_copy_is_in_the_build_context(name):
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    for line in dockerfile(name):
        if line.startswith("COPY ") and "--from" not in line:
            for source in shlex.split(line)[1:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
                assert source.rstrip("/") not in ignored, f"{name}: COPY {source} is in .dockerignore"
