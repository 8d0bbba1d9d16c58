"""Render the committed performance results (``benchmarks/results/performance/*.json``) as Markdown.

Three places hold published speed figures, each between markers, each rewritten only by this script:
docs/performance.md (every table, between ``<!-- results:start -->`` and ``<!-- results:end -->``), README's
performance section (one summary table, ``<!-- performance:start -->`` … ``<!-- performance:end -->``) and the REST
paragraph of docs/langflow.md (``<!-- rest:start -->`` … ``<!-- rest:end -->``). Every block names the command,
date, machine and load of the file it comes from, so no figure is typed by hand.

    python benchmarks/report.py                     # print docs/performance.md's tables
    python benchmarks/report.py --write             # rewrite all three places from the result files
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common

START, END = "<!-- results:start -->", "<!-- results:end -->"
README_START, README_END = "<!-- performance:start -->", "<!-- performance:end -->"
REST_START, REST_END = "<!-- rest:start -->", "<!-- rest:end -->"
TARGETS = {"docs/performance.md": (START, END), "README.md": (README_START, README_END),
           "docs/langflow.md": (REST_START, REST_END)}


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (key, header) columns, numbers formatted as ``common.fmt`` does."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(common.fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine a result came from and how loaded it was."""
    load = m.get("load_avg_at_start")
    start = f"{load[0]:.1f} at the start, " if load else ""
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory', '?')}, torch {m.get('torch', '?')}, "
            f"redis-py {m.get('redis_py', '?')}, Python {m.get('python', '?')}; 1-minute load {start}"
            f"{m.get('load_avg_1m', 0):.1f} at the end")


def source(doc: dict[str, Any], prefix: str = "") -> str:
    """Where a block's figures come from: command, date, machine and load, and the file (linked from ``prefix``)."""
    name = f"{doc['benchmark']}.json"
    link = f"{prefix}benchmarks/results/performance/{name}"
    return f"<sub>`{doc['command']}` · {doc['when']} · {machine_line(doc['machine'])} · [{name}]({link})</sub>\n"


def load(results: Path = common.PERFORMANCE) -> dict[str, dict[str, Any]]:
    """Every result file present, by benchmark name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def _ratio(value: float | None) -> str:
    return f"{value:.1f}×" if value else "–"


def _met(t: dict[str, Any]) -> dict[str, Any]:
    return t | {"met": "met" if t["met"] else "**missed**"}


def decode_section(d: dict[str, Any]) -> str:
    """Per-token times with ratios, the targets, and the per-stage breakdown."""
    rows = [r | {"speedup": _ratio(r.get("speedup_vs_hf"))} for r in d["results"]]
    med = [r for r in d["breakdown_us"] if r["stat"] == "median"]
    stages = [("lookup", "table lookup"), ("kernel", "selector arithmetic (C kernel)"),
              ("selector_python", "selector, Python + NumPy"), ("choose", "choice"), ("accumulator", "accumulator"),
              ("router", "router"), ("stop_rules", "stop rules"), ("total", "total")]
    return "\n".join([
        f"### Decode cost per token (batch 1, CPU, {d['threads']} torch thread, {d['selector']} selector)",
        f"{d['samples']} chains × {d['tokens']} timed tokens per position and repeat, {d['repeats']} repeats; overlay "
        "(compiled step; NumPy step; no table cache) and `generate()` interleaved on the same contexts.", "",
        md_table(rows, [("shape", "layers×width"), ("method", "method"), ("position", "position"),
                        ("median_ms", "median ms"), ("p99_ms", "p99 ms"), ("vs_first_position", "÷ first position"),
                        ("speedup", "generate() ÷ this")]), "",
        md_table([_met(t) for t in d["targets"]], [("target", "target"), ("measured", "measured"), ("met", "")]), "",
        "Where the overlay's time goes (µs per token, medians of each stage over the same steps, table cache on, "
        "stage counters on):", "",
        md_table(med, [("shape", "layers×width"), ("position", "position"), *stages]), ""])


def step_section(d: dict[str, Any]) -> str:
    """The selector's per-token step alone, by implementation, with its difference from the NumPy fallback."""
    rows = [r | {"speedup": _ratio(r["speedup_vs_numpy"])} for r in d["rows"]]
    lines = [f"### The selector's step alone, by implementation (batch 1, CPU, {d['threads']} torch thread)",
             f"{d['tokens']} steps × {d['repeats']} repeats per implementation, interleaved; question of "
             f"{d['question_tokens']} tokens in memory, result slots filled. Kernel flags: `{d['kernel_flags']}`.", "",
             md_table(rows, [("shape", "layers×width"), ("method", "implementation"), ("median_us", "median µs"),
                             ("p10_us", "p10 µs"), ("speedup", "NumPy ÷ this"),
                             ("max_abs_diff_vs_numpy", "max abs diff vs NumPy")]), ""]
    lines += [f"{name}: {why}." for name, why in d.get("not_timed", {}).items()]
    return "\n".join(lines + [""])


def answers_section(d: dict[str, Any]) -> str:
    """Seconds per answer in process, overlay against the peer on chains of the same length."""
    return "\n".join([
        f"### Seconds per answer, in process ({d['count']} questions of {d['questions']}, {d['shape']})",
        f"Greedy chains of at most {d['max_tokens']} tokens, {d['mean_tokens']:.0f} tokens per answer on average; the "
        f"peer decodes a chain of the same length from the same prompt. Peer ÷ overlay: "
        f"**{_ratio(d['peer_over_overlay'])}**.", "",
        md_table(d["summary"], [("decoder", "decoder"), ("answers", "answers"), ("median_s", "median s"),
                                ("mean_s", "mean s"), ("answers_per_s", "answers/s"), ("ms_per_token", "ms/token")]),
        ""])


def rest_section(d: dict[str, Any]) -> str:
    """``lfx serve`` latency and throughput by worker count, with the in-process peer."""
    return "\n".join([
        f"### REST (`lfx serve` {d['flow']}, {d['questions']}, {d['mean_tokens']:.0f} tokens per answer on average)",
        "", md_table(d["rows"], [("measure", "measure"), ("workers", "workers"), ("requests", "requests"),
                                 ("failed", "failed"), ("median_s", "median s"), ("p99_s", "p99 s"),
                                 ("answers_per_s", "answers/s")]), ""])


def neighbours_section(d: dict[str, Any]) -> str:
    """Lookups per second against raw pipelined ZREVRANGE, and on a cluster against one server."""
    out = [f"### GetNeighbours (K = {d['k']}, {d['contexts']:,} lookups over {d['distinct_contexts']:,} distinct contexts)",
           f"Redis {d['redis_server']}, embedded (unix socket); cache hit rate {d['cache_hit_rate']:.2f}; redis-py's own "
           f"client-side caching: {d['redis_py_client_side_caching']}.", "",
           md_table(d["summary"], [("method", "method"), ("batch", "batch"), ("lookups_per_s", "lookups/s"),
                                   ("vs_raw_zrevrange", "÷ raw ZREVRANGE")]), ""]
    c = d.get("cluster")
    if c:
        out += [f"At scale: the same {c['contexts']:,} lookups (cache off) on a {c['nodes']}-node Redis Cluster and on "
                f"one server, both on loopback TCP, each holding the table of the first {c['chains']:,} chains.", "",
                md_table(c["summary"], [("server", "server"), ("batch", "batch"), ("lookups_per_s", "lookups/s"),
                                        ("vs_one_server", "÷ one server")]), ""]
    return "\n".join(out)


def table_build_section(d: dict[str, Any]) -> str:
    """Build throughput and Redis memory per entry."""
    return "\n".join([
        f"### Table build (max order {d['max_order']}, vocabulary {d['vocab_size']:,})", "",
        md_table(d["builds"], [("corpus", "corpus"), ("tokens", "tokens"), ("contexts", "contexts"),
                               ("entries", "entries"), ("build_s", "build s"), ("entries_per_s", "entries/s"),
                               ("memory_mb", "Redis MiB"), ("bytes_per_entry", "bytes/entry")]), ""])


def train_section(d: dict[str, Any]) -> str:
    """Training speed and time to the stated held-out accuracy."""
    rows = [r | {"reached": f"step {r['reached_at_step']}, {r['reached_after_s']:.0f} s" if r.get("reached_at_step")
                 else "not reached"} for r in d["runs"]]
    return "\n".join([
        f"### Training ({d['chains']:,} chains, 2 layers × 128)", "",
        md_table(rows, [("device", "device"), ("selector", "selector"), ("steps", "steps"), ("batch_size", "batch"),
                        ("rows_per_s", "target tokens/s"), ("train_s", "train s"),
                        ("final_eval_accuracy", "held-out acc@1"), ("target_accuracy", "target acc"),
                        ("reached", "reached at")]), ""])


def gpu_section(d: dict[str, Any]) -> str:
    """GPU batch decoding, or why it did not run."""
    if "skipped" in d:
        return f"### GPU batch decoding\nNot run: {d['skipped']}.\n"
    return "\n".join([f"### GPU batch decoding ({d['gpu']}, {d['tokens_per_chain']} tokens per chain)", "",
                      md_table(d["rows"], [("dtype", "dtype"), ("batch", "batch"), ("tokens_per_s", "tokens/s"),
                                           ("lookup_share", "lookup share"), ("selector_share", "selector share"),
                                           ("selector_only_windows_per_s", "selector alone, windows/s")]), ""])


def get_tracks_section(d: dict[str, Any]) -> str:
    """GetTracks per question against the in-process BM25 scan of the same tracks, GetNeighbours for scale."""
    return "\n".join([
        f"### GetTracks (k = {d['k']}, {d['tracks']:,} tracks in {d['shards']} shards, {d['questions']:,} questions)",
        f"The in-process scan computes the same BM25 scores in Python over every track: "
        f"it is {d['ratio_peer_over_round_trip']:.1f}× the round trip's median.", "",
        md_table(d["ms"], [("what", "what"), ("median", "median ms"), ("mean", "mean ms"), ("p99", "p99 ms")]), ""])


def live_learning_section(d: dict[str, Any]) -> str:
    """Held-out variants of learned questions before and after one feedback batch, same selector."""
    return "\n".join([
        f"### Live learning ({d['records']} questions of `{Path(d['learn']).name}` learned in one feedback batch, "
        f"{d['variants']} held-out variants of them decoded before and after)",
        f"Same selector (`{d['model']}`); only the table and its track memory change ({d['tracks_before']:,} → "
        f"{d['tracks_after']:,} tracks, the batch applied in {d['learn_s']} s).", "",
        md_table(d["rows"], [("when", "when"), ("version", "version"), ("overlay", "overlay exact-match"),
                             ("track_only", "track only"), ("table_only", "table only")]), ""])


SECTIONS = {"decode": decode_section, "step": step_section, "answers": answers_section, "rest": rest_section,
            "neighbours": neighbours_section, "get_tracks": get_tracks_section, "learning": live_learning_section,
            "table_build": table_build_section, "train": train_section, "gpu": gpu_section}


def render(results: Path = common.PERFORMANCE, prefix: str = "../") -> str:
    """docs/performance.md's results: every result file present, each section with its source line."""
    docs = load(results)
    return "\n".join(section(docs[name]) + "\n" + source(docs[name], prefix) for name, section in SECTIONS.items()
                     if name in docs)


def _by(rows: list[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)


def _join(values: list[float | None], fmt: str) -> str:
    return " / ".join(format(v, fmt) if v is not None else "–" for v in values)


def readme(results: Path = common.PERFORMANCE) -> str:
    """README's summary: the headline figure of each benchmark beside its peer in the same run, then the sources."""
    docs = load(results)
    rows: list[tuple[str, str, str]] = []
    if "decode" in docs:
        d = docs["decode"]
        shape, positions = d["shapes"][0], d["positions"]
        at = {(r["method"], r["position"]): r for r in d["results"] if r["shape"] == shape}
        ms = lambda m: [at[(m, p)]["median_ms"] if (m, p) in at else None for p in positions]  # noqa: E731
        where = " / ".join(f"{p:,}" for p in positions)
        rows.append((f"decode per token at position {where} ({shape}, batch 1)", f"{_join(ms('overlay'), '.3f')} ms",
                     f"`generate()` of a same-size GPT-2, KV cache: {_join(ms('HF generate()'), '.3f')} ms"))
        rows.append(("… with the NumPy fallback instead of the compiled step", f"{_join(ms('overlay, NumPy step'), '.3f')} ms", ""))
        rows += [(f"target: {t['target']}", f"{t['measured']}: {'met' if t['met'] else '**missed**'}", "")
                 for t in d["targets"]]
    if "step" in docs:
        d = docs["step"]
        shape = d["rows"][0]["shape"]
        k, n = _by(d["rows"], shape=shape, method="C kernel (default)"), _by(d["rows"], shape=shape, method="NumPy (fallback)")
        if k and n:
            rows.append((f"the selector's step alone ({shape})", f"{k['median_us']:.0f} µs (C kernel)",
                         f"NumPy fallback: {n['median_us']:.0f} µs"))
    if "answers" in docs:
        d = docs["answers"]
        o, p = d["summary"]
        rows.append((f"seconds per answer, {d['questions']} ({d['count']} questions, in process)",
                     f"{o['median_s']:.3f} s median, {o['answers_per_s']:.2f} answers/s",
                     f"peer `generate()`, same chain lengths: {p['median_s']:.3f} s ({_ratio(d['peer_over_overlay'])})"))
    if "rest" in docs and "rows" in docs["rest"]:
        d = docs["rest"]
        one = _by(d["rows"], measure="lfx serve, one request at a time")
        peer = _by(d["rows"], measure="in-process OverlayDecoder.generate (peer)")
        if one and peer:
            rows.append(("REST, `lfx serve`, one answer", f"{one['median_s']:.2f} s median",
                         f"in-process decoder: {peer['median_s']:.2f} s"))
        conc = [r for r in d["rows"] if r["measure"].startswith("lfx serve, concurrency")]
        if conc:
            rows.append((f"REST, concurrency {d['concurrency']}, {' / '.join(str(r['workers']) for r in conc)} workers",
                         f"{_join([r['answers_per_s'] for r in conc], '.2f')} answers/s", ""))
    if "neighbours" in docs:
        d = docs["neighbours"]
        get = lambda m, b: (_by(d["summary"], method=m, batch=b) or {}).get("lookups_per_s")  # noqa: E731
        batches = sorted({r["batch"] for r in d["summary"]})
        rows.append((f"GetNeighbours, lookups/s, batch {' / '.join(map(str, batches))} (cache off)",
                     _join([get("GetNeighbours, no cache", b) for b in batches], ",.0f"),
                     f"raw pipelined `ZREVRANGE`: {_join([get('raw pipelined ZREVRANGE (redis-py)', b) for b in batches], ',.0f')}"))
        c = d.get("cluster")
        if c:
            on = lambda s, b: (_by(c["summary"], server=s, batch=b) or {}).get("lookups_per_s")  # noqa: E731
            rows.append((f"… on a {c['nodes']}-node Redis Cluster (TCP), batch {' / '.join(map(str, batches))}",
                         _join([on("three-node cluster", b) for b in batches], ",.0f"),
                         f"one server (TCP): {_join([on('one server', b) for b in batches], ',.0f')}"))
    if "get_tracks" in docs:
        d = docs["get_tracks"]
        trip = _by(d["ms"], what="get_tracks_round_trip") or {}
        scan = _by(d["ms"], what="peer_in_process_scan") or {}
        rows.append((f"GetTracks, one round trip (k = {d['k']}, {d['tracks']:,} tracks)", f"{trip.get('median', 0):.2f} ms median",
                     f"the same BM25 in process over every track: {scan.get('median', 0):.2f} ms"))
    if "learning" in docs:
        d = docs["learning"]
        before, after = d["rows"][0], d["rows"][-1]
        rows.append((f"live learning: held-out variants of {d['records']} questions learned in one feedback batch",
                     f"{before['overlay']:.2f} → {after['overlay']:.2f} exact-match", "same selector, no retraining"))
    if "table_build" in docs:
        builds = docs["table_build"]["builds"]
        rows.append((f"table build: {' / '.join(b['corpus'] for b in builds)}",
                     f"{_join([b['entries_per_s'] for b in builds], ',.0f')} entries/s; "
                     f"{_join([b['bytes_per_entry'] for b in builds], '.0f')} bytes per entry", ""))
    if "gpu" in docs and "skipped" in docs["gpu"]:
        rows.append(("GPU batch decoding", f"not run: {docs['gpu']['skipped']}", ""))
    table = ["| measure | figure | peer in the same run |", "|---|---|---|",
             *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    sources = [source(docs[name], "") for name in SECTIONS if name in docs]
    return "\n".join(table + [""] + sources)


def langflow_rest(results: Path = common.PERFORMANCE) -> str:
    """docs/langflow.md's REST paragraph: seconds per answer and answers per second by worker count."""
    d = load(results).get("rest")
    if not d or "rows" not in d:
        return "No REST measurement is committed yet (`python benchmarks/bench_rest.py`)."
    one = _by(d["rows"], measure="lfx serve, one request at a time")
    peer = _by(d["rows"], measure="in-process OverlayDecoder.generate (peer)")
    conc = [r for r in d["rows"] if r["measure"].startswith("lfx serve, concurrency")]
    by_workers = ", ".join(f"**{r['answers_per_s']:.2f} answers/s** with {r['workers']} worker{'s' * (r['workers'] > 1)}"
                           for r in conc)
    return "\n".join([
        f"REST through `lfx serve` ({d['flow']}, the benchmark's 2-layer selector, {d['questions']} questions, "
        f"{d['mean_tokens']:.0f} tokens per answer on average): one request at a time, median **{one['median_s']:.2f} s** "
        f"per answer (the same questions decoded in process: {peer['median_s']:.2f} s; the rest is Langflow's graph "
        f"build and HTTP); at concurrency {d['concurrency']}: {by_workers}. A worker runs one flow at a time, so "
        "concurrency queues rather than overlaps; use `--workers N` (with `--flow-dir`) to serve more. All figures: "
        "[docs/performance.md](performance.md).", "", source(d, "../")])


def splice(text: str, body: str, start: str = START, end: str = END) -> str:
    """Replace what lies between the ``start`` and ``end`` markers in ``text`` with ``body``."""
    if start not in text or end not in text:
        raise ValueError(f"the file has no {start} … {end} markers to write between")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def rendered(results: Path = common.PERFORMANCE) -> dict[str, str]:
    """What goes between the markers of each published file (paths relative to the checkout)."""
    return {"docs/performance.md": render(results), "README.md": readme(results),
            "docs/langflow.md": langflow_rest(results)}


def write(root: Path = common.ROOT, results: Path = common.PERFORMANCE) -> list[Path]:
    """Rewrite the marked sections of the three published files from the result files."""
    out = []
    for rel, body in rendered(results).items():
        path = root / rel
        start, end = TARGETS[rel]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(splice(path.read_text(), body, start, end))
        tmp.replace(path)
        out.append(path)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=common.PERFORMANCE, help="folder with the benchmark JSON files")
    p.add_argument("--write", action="store_true", help="rewrite docs/performance.md, README.md and docs/langflow.md")
    args = p.parse_args()
    if not args.write:
        print(render(args.results))
        return
    for path in write(results=args.results):
        print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
