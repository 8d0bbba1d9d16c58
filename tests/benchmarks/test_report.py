"""benchmarks/report.py: the published speed figures (docs/performance.md, README's performance section, docs/langflow.md's
REST paragraph) are exactly what the committed result files render, and each result says how it was made."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import report  # noqa: E402

MACHINE = {"cpu": "cpu", "cores": 2, "load_avg_1m": 0.5, "load_avg_at_start": [0.4, 0.3, 0.2]}


def section(text: str, start: str, end: str) -> str:
    return re.search(f"{re.escape(start)}\n(.*)\n{re.escape(end)}", text, re.S).group(1)


def test_splice_replaces_only_between_markers():
    text = f"head\n{report.START}\nold\n{report.END}\ntail\n"
    assert report.splice(text, "new") == f"head\n{report.START}\nnew\n{report.END}\ntail\n"
    with pytest.raises(ValueError, match="markers"):
        report.splice("no markers here", "new")


def test_render_reads_what_is_there(tmp_path):
    stamp = {"machine": MACHINE, "when": "t", "command": "python benchmarks/x.py"}
    (tmp_path / "gpu.json").write_text(json.dumps({"benchmark": "gpu", "skipped": "no CUDA device"} | stamp))
    (tmp_path / "train.json").write_text(json.dumps({"benchmark": "train", "chains": 10, "runs": [
        {"device": "cpu", "selector": "slot, k=8", "steps": 4, "batch_size": 8, "rows_per_s": 1234.5, "train_s": 1.0,
         "final_eval_accuracy": 0.5, "target_accuracy": 0.4, "reached_at_step": 2, "reached_after_s": 0.5}]} | stamp))
    out = report.render(tmp_path)
    assert "Not run: no CUDA device" in out
    assert "| cpu | slot, k=8 | 4 | 8 | 1,234 | 1 | 0.5 | 0.4 | step 2, 0 s |" in out
    assert "`python benchmarks/x.py`" in out and "load 0.4 at the start, 0.5 at the end" in out
    assert "Decode" not in out


def test_published_sections_are_the_rendering():
    """README, docs/performance.md and docs/langflow.md hold exactly what the committed files render."""
    for rel, body in report.rendered().items():
        start, end = report.TARGETS[rel]
        assert section((ROOT / rel).read_text(), start, end) == body, f"{rel} differs: run benchmarks/report.py --write"


def test_every_result_names_its_command_machine_versions_and_load():
    files = sorted(common.PERFORMANCE.glob("*.json"))
    assert {p.stem for p in files} >= {"decode", "step", "answers", "rest", "neighbours"}
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["command"].startswith(f"python benchmarks/bench_{path.stem}.py") and doc["when"]
        assert doc["machine"]["cpu"] and doc["machine"]["load_avg_at_start"] and doc["versions"]["numpy"]
        assert path.stat().st_size < 100_000


def test_a_changed_figure_changes_every_place_it_is_published(tmp_path):
    for path in common.PERFORMANCE.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    before = report.rendered(tmp_path)
    doc = json.loads((tmp_path / "decode.json").read_text())
    row = next(r for r in doc["results"] if r["method"] == "overlay")
    row["median_ms"] = 0.1234
    (tmp_path / "decode.json").write_text(json.dumps(doc))
    after = report.rendered(tmp_path)
    assert "0.123" in after["docs/performance.md"] and after["README.md"] != before["README.md"]
    rest = json.loads((tmp_path / "rest.json").read_text())
    rest["rows"][0]["median_s"] = 9.87
    (tmp_path / "rest.json").write_text(json.dumps(rest))
    assert "9.87 s" in report.rendered(tmp_path)["docs/langflow.md"]
