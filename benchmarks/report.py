"""Render the JSON under ``benchmarks/results/`` as Markdown: the machine, every benchmark's table, the targets.

``run_all.py`` writes the result to ``benchmarks/results/summary.md``; ``--into FILE`` replaces the text
between ``<!-- results:start -->`` and ``<!-- results:end -->`` in FILE (how ``docs/performance.md`` is
refreshed after a run), so published figures are always a script's output, never retyped.

    python benchmarks/report.py                       # print
    python benchmarks/report.py --into docs/performance.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common

START, END = "<!-- results:start -->", "<!-- results:end -->"


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with (key, header) columns, numbers formatted as ``common.fmt`` does."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(common.fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine a result came from."""
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory', '?')}, torch {m.get('torch', '?')}, "
            f"redis-py {m.get('redis_py', '?')}, Python {m.get('python', '?')}; 1-minute load {m.get('load_avg_1m', 0):.1f}")


def decode_section(d: dict[str, Any]) -> str:
    """Per-token times with ratios, the targets, and the per-stage breakdown."""
    rows = [r | {"speedup": f"{r['speedup_vs_hf']:.1f}×" if r.get("speedup_vs_hf") else "–"} for r in d["results"]]
    out = [f"### Decode cost per token (batch 1, CPU, {d['threads']} torch thread)",
           f"{d['samples']} chains × {d['tokens']} timed "
           f"tokens per position and repeat, {d['repeats']} repeats, overlay and `generate()` interleaved on the same "
           "context.", "",
           md_table(rows, [("shape", "layers×width"), ("method", "method"), ("position", "position"),
                           ("median_ms", "median ms"), ("p99_ms", "p99 ms"), ("vs_first_position", "÷ first position"),
                           ("speedup", "generate() ÷ this")]), "",
           md_table([t | {"met": "met" if t["met"] else "**missed**"} for t in d["targets"]],
                    [("target", "target"), ("measured", "measured"), ("met", "")]), ""]
    med = [r for r in d["breakdown_us"] if r["stat"] == "median"]
    names = ["lookup", "selector", "choose", "accumulator", "router", "stop_rules", "total"]
    out += ["Where the overlay's time goes (µs per token, medians, cache on, stage counters on):", "",
            md_table(med, [("shape", "layers×width"), ("position", "position"), *((n, n) for n in names)]), ""]
    e2e = d.get("end_to_end")
    if e2e:
        out += [f"Whole chains through `OverlayDecoder.generate` ({e2e['questions']} questions, greedy): "
                f"{e2e['tokens_per_s']:,.0f} tokens/s, {e2e['ms_per_token']:.3f} ms per token.", ""]
    return "\n".join(out)


def neighbours_section(d: dict[str, Any]) -> str:
    """Lookups per second against raw pipelined ZREVRANGE, with and without the client-side cache."""
    return "\n".join([
        f"### GetNeighbours (K = {d['k']}, {d['contexts']:,} lookups over {d['distinct_contexts']:,} distinct contexts)",
        f"Redis {d['redis_server']}; cache hit rate {d['cache_hit_rate']:.2f}; "
        f"redis-py's own client-side caching: {d['redis_py_client_side_caching']}.", "",
        md_table(d["summary"], [("method", "method"), ("batch", "batch"), ("lookups_per_s", "lookups/s"),
                                ("vs_raw_zrevrange", "÷ raw ZREVRANGE")]), ""])


def table_build_section(d: dict[str, Any]) -> str:
    """Build throughput and Redis memory per entry, full train and the larger variant corpus."""
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


def rest_section(d: dict[str, Any]) -> str:
    """``lfx serve`` latency and throughput, with the in-process peer."""
    return "\n".join([
        f"### REST (`lfx serve` {d['flow']}, one worker, {d['mean_tokens']:.0f} tokens per answer on average)", "",
        md_table(d["rows"], [("measure", "measure"), ("requests", "requests"), ("median_s", "median s"),
                             ("p99_s", "p99 s"), ("requests_per_s", "requests/s")]), ""])


SECTIONS = {"decode": decode_section, "neighbours": neighbours_section, "table_build": table_build_section,
            "train": train_section, "gpu": gpu_section, "rest": rest_section}


def render(results: Path = common.RESULTS) -> str:
    """Markdown for every result file present, each section naming its command and date."""
    out = []
    for name, section in SECTIONS.items():
        path = results / f"{name}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        out.append(section(doc))
        out.append(f"<sub>{doc.get('when', '')} · {machine_line(doc.get('machine', {}))}</sub>\n")
    return "\n".join(out)


def splice(text: str, body: str, start: str = START, end: str = END) -> str:
    """Replace what lies between the ``start`` and ``end`` markers in ``text`` with ``body``."""
    if start not in text or end not in text:
        raise ValueError(f"the file has no {start} … {end} markers to write between")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=common.RESULTS, help="folder with the benchmark JSON files")
    p.add_argument("--into", type=Path, default=None, help="Markdown file whose result markers are replaced")
    args = p.parse_args()
    body = render(args.results)
    if args.into is None:
        print(body)
        return
    tmp = args.into.with_suffix(".tmp")
    tmp.write_text(splice(args.into.read_text(), body))
    tmp.replace(args.into)
    print(f"wrote {args.into}")


if __name__ == "__main__":
    main()
