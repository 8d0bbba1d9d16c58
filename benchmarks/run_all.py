"""Run every benchmark that applies on this machine, sharing one table + selector setup; print a summary.

Each script runs as its own process (``python benchmarks/<script>.py``) with the same ``--data`` and one
shared ``--home`` (a temporary OVERLAY_HOME with its embedded Redis, removed at the end unless ``--home`` is
given), so the table and the small selector are built once. GPU batch decoding runs only where CUDA is
present (the script says so otherwise). Results land in ``benchmarks/results/performance/<name>.json`` (committed;
``report.py --write`` publishes them), a combined ``benchmarks/results/summary.json`` and all of it as Markdown in
``benchmarks/results/summary.md``. Defaults finish in about 20 minutes on 2 idle CPU cores; ``--full`` runs the
full-size settings (decode with more samples and a 6 × 384 shape, torch.compile in the step comparison, 64
answers, 50k neighbour lookups and the whole table on the cluster, training on all 7,473 chains, 32 REST requests).

    python benchmarks/run_all.py --data ../shared/data/gsm8k/train.jsonl
    python benchmarks/run_all.py --full --only decode,step
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import report

SCRIPTS = {
    "decode": ("bench_decode.py", ["--shapes", "2x128,4x256"], ["--shapes", "2x128,4x256,6x384", "--samples", "16", "--tokens", "64", "--repeats", "3"]),
    "step": ("bench_step.py", ["--no-compile"], []),
    "answers": ("bench_answers.py", [], ["--count", "64"]),
    "neighbours": ("bench_neighbours.py", [], ["--contexts", "50000", "--cluster-chains", "7473"]),
    "table_build": ("bench_table_build.py", [], ["--scale", "10"]),
    "train": ("bench_train.py", [], ["--chains", "7473", "--steps", "2000", "--eval-every", "200", "--target", "0.5"]),
    "gpu": ("bench_gpu.py", [], ["--tokens", "256"]),
    "rest": ("bench_rest.py", [], ["--requests", "32"]),
}


def headline(name: str, doc: dict) -> str:
    """One line per benchmark for the summary."""
    if "skipped" in doc:
        return f"skipped: {doc['skipped']}"
    if name == "decode":
        return "; ".join(f"{t['target']}: {t['measured']} ({'met' if t['met'] else 'missed'})" for t in doc["targets"])
    if name == "step":
        return "; ".join(f"{r['shape']} {r['method']}: {r['median_us']:.0f} µs" for r in doc["rows"])
    if name == "answers":
        return "; ".join(f"{r['decoder']}: {r['median_s']:.3f} s per answer" for r in doc["summary"])
    if name == "neighbours":
        s = {(r["method"], r["batch"]): r["lookups_per_s"] for r in doc["summary"]}
        return ", ".join(f"{m} b{b}: {v:,.0f}/s" for (m, b), v in s.items())
    if name == "table_build":
        return "; ".join(f"{b['corpus']}: {b['entries_per_s']:,.0f} entries/s, {b['bytes_per_entry']:.0f} B/entry"
                         for b in doc["builds"])
    if name == "train":
        return "; ".join(f"{r['device']}: {r['rows_per_s']:,.0f} rows/s, acc {r['final_eval_accuracy']:.3f}, "
                         f"≥{r['target_accuracy']} after {r['reached_after_s'] or float('nan'):.0f} s" for r in doc["runs"])
    if name == "gpu":
        return "; ".join(f"{r['dtype']} b{r['batch']}: {r['tokens_per_s']:,.0f} tok/s" for r in doc["rows"])
    if name == "rest":
        return "; ".join(f"{r['measure']} ({r['workers']} workers): {r['median_s']:.2f} s median, "
                         f"{r['answers_per_s']:.2f} answers/s" for r in doc["rows"])
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=common.default_data(), help="GSM8K-style train JSONL")
    p.add_argument("--home", type=Path, default=None, help="shared OVERLAY_HOME to keep and reuse (default: temporary)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--full", action="store_true", help="full-size settings (much longer)")
    args = p.parse_args()
    chosen = [n for n in SCRIPTS if (not args.only or n in args.only.split(",")) and n not in args.skip.split(",")]
    home = args.home or Path(tempfile.mkdtemp(prefix="overlay-bench-all-"))
    here = Path(__file__).resolve().parent
    status: dict[str, dict] = {}
    try:
        for name in chosen:
            script, quick, full = SCRIPTS[name]
            cmd = [sys.executable, str(here / script), "--data", str(args.data), "--home", str(home)]
            cmd += full if args.full else quick
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            start = time.perf_counter()
            rc = subprocess.call(cmd, cwd=common.ROOT)
            seconds = time.perf_counter() - start
            path = common.PERFORMANCE / f"{name}.json"
            doc = json.loads(path.read_text()) if rc == 0 and path.exists() else {}
            status[name] = {"rc": rc, "seconds": round(seconds, 1), "headline": headline(name, doc) if doc else "failed"}
    finally:
        if args.home is None:  # each script stops its embedded Redis on exit; only the folder is left
            shutil.rmtree(home, ignore_errors=True)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "summary.json").write_text(json.dumps({"machine": common.machine(), "full": args.full,
                                                             "benchmarks": status}, indent=2))
    (common.RESULTS / "summary.md").write_text(report.render())
    print(f"\n=== summary (Markdown of every result: {common.RESULTS / 'summary.md'}; publish: report.py --write)")
    for name, s in status.items():
        print(f"{name:12s} rc={s['rc']} {s['seconds']:7.1f} s  {s['headline']}")
    sys.exit(1 if any(s["rc"] for s in status.values()) else 0)


if __name__ == "__main__":
    main()
