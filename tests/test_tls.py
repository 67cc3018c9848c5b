"""The pipeline over TLS: a private ``redis-server --tls-port`` that also requires client certificates.

The fixture makes a CA, a server certificate (for 127.0.0.1) and a client certificate with
openssl; the server listens on TLS only (``--port 0``) and asks for a password. Every process gets
the ``rediss://`` URL and the certificate files through its ``DIO_REDIS_*`` settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from dio.client import AsyncClient, Client, ClientSettings
from dio.ops.local_cluster import LocalCluster, WorkerSpec
from dio.ops.redis_server import find_redis_server, server_has_tls
from dio.protocol.connection import connect
from dio.protocol.settings import CommonSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if shutil.which("openssl") is None:
    pytest.skip("openssl is needed to make the test certificates", allow_module_level=True)
if not server_has_tls(find_redis_server()):
    pytest.skip(f"{find_redis_server()} was built without TLS", allow_module_level=True)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certificates(where: Path) -> None:
    """A CA (ca.crt), and server.crt/.key (for 127.0.0.1, localhost) and client.crt/.key signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=dio-test-ca",
            cwd=where)
    (where / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=dio-test-{name}",
                cwd=where)
        extra = ["-extfile", "server.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *extra, cwd=where)


@dataclass
class TlsRedis:
    url: str  # rediss://:password@127.0.0.1:port/0
    password: str
    certs: Path

    def settings(self, **more: object) -> CommonSettings:
        return CommonSettings(redis_url=self.url, redis_ca_certs=str(self.certs / "ca.crt"),
                              redis_certfile=str(self.certs / "client.crt"),
                              redis_keyfile=str(self.certs / "client.key"), **more)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A private TLS-only redis-server with a password, requiring client certificates; stopped afterwards."""
    certs = tmp_path_factory.mktemp("tls")
    make_certificates(certs)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    password = uuid.uuid4().hex
    args = [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
            "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes", "--requirepass", password,
            "--save", "", "--appendonly", "no", "--dir", str(certs), "--logfile", str(certs / "redis.log")]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = TlsRedis(f"rediss://:{password}@127.0.0.1:{port}/0", password, certs)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (certs / "redis.log").read_text()[-2000:]
            try:
                if connect(server.settings()).ping():
                    break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the TLS redis-server did not answer"
                time.sleep(0.05)
        yield server
    finally:
        process.terminate()
        process.wait(10)


def test_the_pipeline_runs_over_tls(tls_redis: TlsRedis, tmp_path: Path):
    prefix = f"{{t{uuid.uuid4().hex[:8]}}}:"
    settings = tls_redis.settings(key_prefix=prefix)
    logs = tmp_path / "logs"
    with LocalCluster(settings.redis_url, [WorkerSpec("H100", 1)], key_prefix=prefix, time_scale=200.0,
                      connection=settings, log_dir=logs):
        client_settings = ClientSettings(**settings.model_dump(), poll_interval_s=0.2)
        with Client(client_settings) as dio:
            results = dio.wait_all(dio.submit_many([{"prompt": "x", "max_tokens": 8} for _ in range(20)]),
                                   timeout=30)

        async def run_async() -> str:
            async with AsyncClient(client_settings) as aio:
                return (await (await aio.submit("over tls", max_tokens=4)).result(timeout=30)).status.value

        assert asyncio.run(run_async()) == "completed"
        env = {**os.environ, "DIO_REDIS_URL": settings.redis_url, "DIO_KEY_PREFIX": prefix,
               "DIO_REDIS_CA_CERTS": str(settings.redis_ca_certs), "DIO_REDIS_CERTFILE": str(settings.redis_certfile),
               "DIO_REDIS_KEYFILE": str(settings.redis_keyfile)}
        inspected = subprocess.run([sys.executable, "-m", "dio.ops.cli", "inspect", "--json"], env=env,
                                   capture_output=True, text=True, timeout=60, check=False)
    assert [(r.status.value, r.worker) for r in results] == [("completed", "H100-1")] * 20
    assert inspected.returncode == 0, inspected.stderr
    assert [w["id"] for w in json.loads(inspected.stdout.strip().splitlines()[-1])["workers"]] == ["H100-1"]
    for log in logs.iterdir():
        assert tls_redis.password not in log.read_text(), f"{log.name} shows the password"
    assert tls_redis.password not in inspected.stdout + inspected.stderr


def test_a_server_it_cannot_verify_is_refused(tls_redis: TlsRedis, tmp_path: Path):
    other_ca = tmp_path / "other"
    other_ca.mkdir()
    make_certificates(other_ca)
    wrong = tls_redis.settings().model_copy(update={"redis_ca_certs": str(other_ca / "ca.crt")})
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        connect(wrong).ping()


def test_a_client_without_a_certificate_is_refused(tls_redis: TlsRedis):
    anonymous = tls_redis.settings().model_copy(update={"redis_certfile": None, "redis_keyfile": None})
    with pytest.raises(redis.ConnectionError):
        connect(anonymous).ping()


def test_plain_text_to_the_tls_port_is_refused(tls_redis: TlsRedis):
    plain = tls_redis.settings().model_copy(update={"redis_url": tls_redis.url.replace("rediss://", "redis://")})
    with pytest.raises(redis.ConnectionError):
        connect(plain).ping()
