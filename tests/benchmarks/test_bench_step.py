"""benchmarks/bench_step.py: every implementation of the selector's step is timed on the same stream and agrees with
the NumPy fallback (the comparison behind the choice of the compiled kernel)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_step  # noqa: E402


def test_implementations_agree_and_are_all_timed():
    args = argparse.Namespace(shapes="1x32,2x64", tokens=30, warm=50, vocab=300, threads=1, repeats=1, no_compile=True)
    out = bench_step.run(args)
    methods = {r["method"] for r in out["rows"]}
    assert methods == {"NumPy (fallback)", "C kernel (default)", "torch eager"}
    assert all(r["n"] == 30 and r["median_us"] > 0 for r in out["rows"])
    assert max(r["max_abs_diff_vs_numpy"] for r in out["rows"]) < 1e-4
    assert out["kernel"] == "in use"
