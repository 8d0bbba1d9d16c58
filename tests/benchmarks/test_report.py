"""benchmarks/report.py: results JSON → Markdown, and the marker splice that refreshes docs/performance.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import report  # noqa: E402


def test_splice_replaces_only_between_markers():
    text = f"head\n{report.START}\nold\n{report.END}\ntail\n"
    assert report.splice(text, "new") == f"head\n{report.START}\nnew\n{report.END}\ntail\n"
    with pytest.raises(ValueError, match="markers"):
        report.splice("no markers here", "new")


def test_render_reads_what_is_there(tmp_path):
    machine = {"cpu": "cpu", "cores": 2, "load_avg_1m": 0.5}
    (tmp_path / "gpu.json").write_text(json.dumps({"skipped": "no CUDA device", "machine": machine, "when": "t"}))
    (tmp_path / "train.json").write_text(json.dumps({"chains": 10, "machine": machine, "when": "t", "runs": [
        {"device": "cpu", "selector": "slot, k=8", "steps": 4, "batch_size": 8, "rows_per_s": 1234.5, "train_s": 1.0,
         "final_eval_accuracy": 0.5, "target_accuracy": 0.4, "reached_at_step": 2, "reached_after_s": 0.5}]}))
    out = report.render(tmp_path)
    assert "Not run: no CUDA device" in out
    assert "| cpu | slot, k=8 | 4 | 8 | 1,234 | 1 | 0.5 | 0.4 | step 2, 0 s |" in out
    assert "Decode" not in out
