"""Redis connections from settings: ACL users and passwords, in the URL or as separate settings."""

import uuid

import pytest
import redis

from dio.protocol.connection import connect
from dio.protocol.settings import CommonSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def acl_user(redis_url: str):
    """A Redis ACL user limited to one key prefix, removed afterwards."""
    admin = redis.Redis.from_url(redis_url)
    name, password = f"dio-test-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["{acl}:*"], commands=["+@all"])
    yield name, password
    admin.acl_deluser(name)


def test_acl_user_and_password_as_settings(redis_url: str, acl_user):
    name, password = acl_user
    client = connect(CommonSettings(redis_url=redis_url, redis_username=name, redis_password=password))
    assert client.acl_whoami() == name
    client.set("{acl}:k", "v")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("elsewhere", "v")  # the ACL confines this user to its prefix


def test_acl_user_and_password_in_the_url(redis_url: str, acl_user):
    name, password = acl_user
    url = redis_url.replace("redis://", f"redis://{name}:{password}@")
    assert connect(CommonSettings(redis_url=url)).acl_whoami() == name


def test_a_wrong_password_is_a_clear_error(redis_url: str, acl_user):
    name, _ = acl_user
    with pytest.raises(redis.exceptions.AuthenticationError):
        connect(CommonSettings(redis_url=redis_url, redis_username=name, redis_password="wrong")).ping()


def test_tls_settings_are_passed_for_rediss_urls():
    client = connect(CommonSettings(redis_url="rediss://127.0.0.1:6390/0", redis_ca_certs="/tmp/ca.pem"))
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/tmp/ca.pem"
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
