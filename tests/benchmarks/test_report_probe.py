"""benchmarks/report_probe.py: docs/probe.md's tables and figures are exactly what the committed result files render."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib.image
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report_probe  # noqa: E402

DOC = ROOT / "docs" / "probe.md"


def section(path: Path) -> str:
    text = path.read_text()
    return re.search(f"{re.escape(report_probe.START)}\n(.*)\n{re.escape(report_probe.END)}", text, re.S).group(1)


def test_the_page_holds_the_rendered_tables():
    assert section(DOC) == report_probe.render()


def test_the_page_has_no_table_outside_the_rendered_section():
    text = DOC.read_text()
    outside = text.split(report_probe.START)[0] + text.split(report_probe.END)[1]
    assert not re.search(r"^\|.*\|$", outside, re.M)


def test_every_result_names_its_commands_commit_machine_and_date():
    files = list(report_probe.RESULTS.glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        assert data["commands"] and all(c.startswith("overlay probe ") for c in data["commands"])
        assert data["commit"] and data["machine"]["cpu"] and re.fullmatch(r"\d{4}-\d\d-\d\d", data["date"])
        assert "entries" not in data["probe"] and path.stat().st_size < 100_000


def test_the_figures_are_drawn_from_the_result_files(tmp_path):
    drawn = report_probe.draw(report_probe.RESULTS, tmp_path)
    assert drawn
    for path in drawn:
        assert f"]({path.name})" in DOC.read_text()
        assert np.array_equal(matplotlib.image.imread(path), matplotlib.image.imread(DOC.parent / path.name)), path.name


def test_a_changed_figure_changes_the_rendering(tmp_path):
    source = next(report_probe.RESULTS.glob("*.json"))
    data = json.loads(source.read_text())
    before = report_probe.render(report_probe.RESULTS)
    data["probe"]["models"]["model"]["heldout"]["0"]["entry_rate"] = 0.777
    (tmp_path / source.name).write_text(json.dumps(data))
    after = report_probe.render(tmp_path)
    assert after != before and "| entry_rate | 0.777 |" in after
