"""Redis connection: URLs, the embedded default, cluster URLs and clear errors."""

from __future__ import annotations

import pytest
from redis.cluster import RedisCluster

from overlay import store


def test_embedded_default_is_a_real_persisted_server(tmp_path, monkeypatch):
    monkeypatch.setenv(store.ENV_HOME, str(tmp_path))
    monkeypatch.delenv(store.ENV_URL, raising=False)
    client = store.connect()
    client.set("k", "v")
    assert store.connect() is client
    assert client.info("server")["redis_version"]
    client.save()
    assert (tmp_path / "overlay.rdb").exists()
    client.shutdown()
    store._embedded.clear()


def test_unix_socket_url(redis_server):
    client = store.connect(f"unix://{redis_server.socket_file}")
    assert client.ping()


def test_unreachable_url_names_host_not_password():
    with pytest.raises(store.StoreUnavailable) as err:
        store.connect("redis://:hunter2@127.0.0.1:1/0", timeout=0.5)
    assert "127.0.0.1:1" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_env_url_is_used(monkeypatch):
    monkeypatch.setenv(store.ENV_URL, "redis://127.0.0.1:1")
    with pytest.raises(store.StoreUnavailable, match="127.0.0.1:1"):
        store.connect(timeout=0.5)


def test_bad_scheme():
    with pytest.raises(ValueError, match="unsupported Redis URL scheme"):
        store.connect("http://localhost:6379")


def test_redact():
    assert store.redact("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert store.redact("redis://h:1") == "redis://h:1"


def test_cluster_url(redis_cluster):
    _, ports = redis_cluster
    for url in (f"redis+cluster://127.0.0.1:{ports[0]}", f"redis://127.0.0.1:{ports[1]}?cluster=true"):
        client = store.connect(url)
        assert isinstance(client, RedisCluster)
        client.set("x", 1)
        assert client.get("x") == b"1"
        client.delete("x")
