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


def test_a_saved_result_is_stamped_by_the_code(tmp_path, monkeypatch):
    """--save records the commit, whether the tree was clean, versions, load and the named models' configuration."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 128}))
    (model / "train_result.json").write_text(json.dumps({"step": 1000, "params": 734848}))
    source = json.loads(next(report_reasoning.RESULTS.glob("*-tracks.json")).read_text())
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"generation": source["generation"], "table": {"domain": "d", "version": 3}}))
    monkeypatch.setattr(report_reasoning, "RESULTS", tmp_path / "results")
    saved = json.loads(report_reasoning.save(report, "x", f"overlay eval --peer {model} --data q.jsonl  # why").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", saved["commit"]) and isinstance(saved["tree_clean"], bool)
    assert saved["versions"]["numpy"] and len(saved["load_avg"]) == 3 and saved["table"]["version"] == 3
    assert saved["models"] == {"peer": {"path": str(model), "model_type": "gpt2", "n_layer": 2, "n_embd": 128,
                                        "step": 1000, "params": 734848}}
