"""benchmarks/report_reasoning.py: the published reasoning figures are exactly what the committed result files render."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report_reasoning  # noqa: E402


def section(path: Path) -> str:
    text = path.read_text()
    return re.search(f"{re.escape(report_reasoning.START)}\n(.*)\n{re.escape(report_reasoning.END)}", text, re.S).group(1)


def test_readme_and_docs_hold_the_rendered_figures():
    assert section(ROOT / "README.md") == report_reasoning.summary()
    assert section(ROOT / "docs" / "reasoning.md") == report_reasoning.full("..")


def test_every_result_names_its_command_machine_and_date():
    files = [p for folder in (report_reasoning.RESULTS, report_reasoning.STELLATOR, report_reasoning.IMPROVE)
             for p in folder.glob("*.json")]
    assert files
    for path in files:
        data = json.loads(path.read_text())
        assert data["command"].startswith("overlay ") and data["machine"] and re.fullmatch(r"\d{4}-\d\d-\d\d", data["date"])


def test_a_changed_figure_changes_the_rendering(tmp_path, monkeypatch):
    source = next(report_reasoning.RESULTS.glob("*.json"))
    data = json.loads(source.read_text())
    monkeypatch.setattr(report_reasoning, "RESULTS", tmp_path)
    (tmp_path / source.name).write_text(json.dumps(data))
    before = report_reasoning.summary()
    data["generation"]["overlay"]["exact_match"] = 0.777
    (tmp_path / source.name).write_text(json.dumps(data))
    assert report_reasoning.summary() != before and "0.777" in report_reasoning.summary()
