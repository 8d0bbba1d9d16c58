"""Track Probe node: the probe on a real table and a real tiny selector, called through the node's outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lfx.services.deps import get_settings_service

from overlay.langflow_support import NodeError
from overlay.selector import load_selector
from overlay_components.overlay.track_probe import TrackProbeComponent

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k_train_sample.jsonl"


@pytest.fixture(autouse=True)
def unrestricted_paths(monkeypatch):
    """Local paths are allowed only when the server opts out of lfx's storage-scope restriction."""
    monkeypatch.setattr(get_settings_service().settings, "restrict_local_file_access", False)


@pytest.fixture(scope="module")
def untrained(overlay_window_model, tmp_path_factory) -> str:
    """A control that learnt nothing: the test selector's folder (same tokenizer) with freshly initialised weights."""
    model, _ = load_selector(overlay_window_model.model_dir)
    folder = tmp_path_factory.mktemp("untrained") / "model"
    shutil.copytree(overlay_window_model.model_dir, folder)
    torch.manual_seed(0)
    type(model)(model.config).save_pretrained(folder)
    return str(folder)


def node(model, tmp_path, **values) -> TrackProbeComponent:
    """A Track Probe node on the test table and selector (no control unless given), two tracks, one figure."""
    return TrackProbeComponent(**({"library": str(SAMPLE), "model_dir": model.model_dir, "control_dir": "",
                                   "domain": model.domain, "redis_url": model.redis_url, "out_dir": str(tmp_path / "probe"),
                                   "prefix_steps": "1", "next_steps": 2, "variants": 5, "heldout": 1, "seed": 0,
                                   "limit": 2} | values))


def test_summary_and_report(overlay_window_model, untrained, tmp_path):
    component = node(overlay_window_model, tmp_path, control_dir=untrained)
    summary = component.get_summary().data
    assert summary["report"] == str(tmp_path / "probe") and summary["tracks"] == 2 and summary["heldout_variants"] == 2
    assert set(summary["models"]) == {"model", "control"}
    model, control = summary["models"]["model"], summary["models"]["control"]
    assert model["expected_steps"] == control["expected_steps"] > 0  # the same held-out variants for both
    assert model["followed_units"] > control["followed_units"]  # the trained selector keeps to its tracks longer
    assert len(model["layer_similarity"]) == 2 and len(model["anchor_attention"]) == 1  # one block: embeddings + 1
    assert all(Path(f).is_file() for f in summary["figures"]) and len(summary["figures"]) == 3
    report = component.get_report().text
    assert report.startswith("# Track probe") and "| entry_rate |" in report
    assert component.status.startswith("model: entry ") and "on 2 held-out variants" in component.status


def test_both_outputs_share_one_run(overlay_window_model, tmp_path):
    component = node(overlay_window_model, tmp_path, control_dir="", limit=1)
    component.get_summary()
    first = component._result
    component.get_report()
    assert component._result is first and set(first[0]["models"]) == {"model"}
    component._pre_run_setup()
    assert component._result is None


def test_empty_fields_fall_back_to_the_environment(overlay_window_model, tmp_path, monkeypatch):
    for key, value in overlay_window_model.env().items():
        monkeypatch.setenv(key, value)
    summary = node(overlay_window_model, tmp_path, model_dir="", domain="", redis_url="", control_dir="", limit=1).get_summary().data
    assert set(summary["models"]) == {"model"}


@pytest.mark.parametrize(("change", "message"), [
    ({"library": ""}, "no library given"),
    ({"library": "/nonexistent/lib.yaml"}, "library file not found: /nonexistent/lib.yaml"),
    ({"model_dir": "/nonexistent/model"}, "model folder /nonexistent/model does not exist"),
    ({"domain": "missing"}, "no complete table for domain 'missing'"),
    ({"prefix_steps": "one"}, "prefix_steps must be comma-separated integers"),
    ({"heldout": 9}, "need 0 ≤ heldout ≤ variants ≤ 50"),
])
def test_bad_input_gives_one_readable_line(overlay_window_model, tmp_path, change, message):
    with pytest.raises(NodeError) as info:
        node(overlay_window_model, tmp_path, **change).get_summary()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_empty_library_and_bad_slots(overlay_window_model, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("tracks: []\n")
    with pytest.raises(NodeError, match="has no tracks"):
        node(overlay_window_model, tmp_path, library=str(empty)).get_summary()
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracks:\n  - id: t\n    question: '{name} has {n1}'\n    solution: ['<<{n1}+{n2}=x>>']\n"
                   "    slots: {name: [Tom], n1: [2]}\n")
    with pytest.raises(NodeError, match=r"uses slot \{n2\} but the library gives no value"):
        node(overlay_window_model, tmp_path, library=str(bad)).get_summary()
