"""IT-LM Selector node: a real tiny trained selector scoring a real table's candidates."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from overlay.decode import choose_index
from overlay.langflow_support import NodeError, candidate_logits, shared_selector
from overlay.tokenizer import encode
from overlay_components.overlay.get_neighbours import GetNeighboursComponent
from overlay_components.overlay.selector import ITLMSelectorComponent

CONTEXT = "<Q> Natalia sold clips to 48 of her friends. <THOUGHT> Natalia sold"


@pytest.fixture(scope="module")
def candidates(overlay_model):
    """GetNeighbours' Candidates for CONTEXT."""
    return GetNeighboursComponent(context=CONTEXT, domain=overlay_model.domain, redis_url=overlay_model.redis_url,
                                  k=16).get_candidates()


def node(model, cands, **values) -> ITLMSelectorComponent:
    """A Selector node on the test model."""
    return ITLMSelectorComponent(**({"context": CONTEXT, "candidates": cands, "model_dir": model.model_dir} | values))


def test_greedy_choice_is_the_models_best_candidate(overlay_model, candidates):
    component = node(overlay_model, candidates)
    choice = component.get_choice().data
    loaded, _ = shared_selector(overlay_model.model_dir)
    ids = candidates["token_id"].tolist()
    logits = candidate_logits(loaded, encode(loaded.tokenizer, CONTEXT), ids)
    best = int(logits.argmax())
    assert choice["token_id"] == ids[best] and choice["rank"] == best + 1
    assert choice["score"] == pytest.approx(float(torch.log_softmax(logits, -1)[best]), abs=1e-5)
    assert choice["margin"] >= 0
    assert sum(c["prob"] for c in choice["candidates"]) == pytest.approx(1.0, abs=1e-3)
    assert choice["table_weight"] == pytest.approx(candidates["weight"].tolist()[best])
    assert component.status.startswith(f"chose {choice['token']!r} (candidate {best + 1} of 16")


def test_the_selector_reads_the_question_in_the_context(overlay_model, candidates):
    ids = candidates["token_id"].tolist()
    loaded, _ = shared_selector(overlay_model.model_dir)
    if hasattr(loaded.model, "score"):
        pytest.skip("a window selector reads only the last k tokens")
    asked = [candidate_logits(loaded, encode(loaded.tokenizer, f"<Q> {q} <THOUGHT> Natalia sold"), ids)
             for q in ("Natalia sold clips to 48 of her friends.", "Natalia sold clips to 72 of her friends.")]
    assert not torch.equal(*asked)
    with pytest.raises(NodeError, match="start the context with <Q> and the question"):
        node(overlay_model, candidates, context="<THOUGHT> Natalia sold").get_choice()


def test_sampling_is_seeded_and_is_the_decoders_sampler(overlay_model, candidates):
    picks = [node(overlay_model, candidates, temperature=1.5, seed=s).get_choice().data for s in range(12)]
    again = [node(overlay_model, candidates, temperature=1.5, seed=s).get_choice().data for s in range(12)]
    assert picks == again and len({p["token_id"] for p in picks}) > 1
    assert {p["token_id"] for p in picks} <= set(candidates["token_id"].tolist())
    logprobs = [math.log(c["prob"]) for c in picks[0]["candidates"]]
    position = len(picks[0]["context_ids"])
    assert [p["rank"] - 1 for p in picks] == [choose_index(logprobs, 1.5, 1.0, s, position) for s in range(12)]


def test_table_weight_mix_moves_the_choice_towards_the_table(overlay_model, candidates):
    choice = node(overlay_model, candidates, mix=1000.0).get_choice().data
    assert choice["table_weight"] == max(candidates["weight"].tolist())


def test_candidates_also_come_as_rows(overlay_model, candidates):
    rows = candidates.to_dict("records")
    assert node(overlay_model, rows).get_choice().data == node(overlay_model, candidates).get_choice().data


def test_selector_output_is_the_decoders_spec(overlay_model, monkeypatch):
    monkeypatch.setenv("OVERLAY_MODEL_DIR", overlay_model.model_dir)
    component = ITLMSelectorComponent(temperature=0.0, top_p=0.9, seed=3)
    assert component.get_selector().data == {"kind": "overlay.selector", "model_dir": overlay_model.model_dir,
                                             "temperature": 0.0, "top_p": 0.9, "seed": 3, "mix": 0.0}
    assert "window k=8" in component.status or "question + last" in component.status


def test_the_model_loads_once_per_process_and_again_when_retrained(overlay_model, tmp_path):
    folder = tmp_path / "selector"
    shutil.copytree(overlay_model.model_dir, folder)
    first = ITLMSelectorComponent(model_dir=str(folder))
    first.get_selector()
    assert f"selector {folder.name} (loaded in" in first.status
    loaded, fresh = shared_selector(str(folder))
    second = ITLMSelectorComponent(model_dir=str(folder))
    second.get_selector()
    assert not fresh and f"selector {folder.name} (already loaded)" in second.status
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # retrained in place
    told = []
    reloaded, fresh = shared_selector(str(folder), told.append)
    assert fresh and reloaded.model is not loaded.model
    assert told == [f"loading selector {folder.name} (once per server process)…"]


def test_model_folder_dropdown_offers_the_data_directorys_models(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERLAY_HOME", str(tmp_path))
    for name in ("gsm8k", "mawps", "no-config", "gsm8k.tmp-1a2b3c4d"):
        (tmp_path / "models" / name).mkdir(parents=True)
        if name != "no-config":
            (tmp_path / "models" / name / "config.json").write_text("{}")
    component = ITLMSelectorComponent()
    template = component.to_frontend_node()["data"]["node"]["template"]
    assert template["model_dir"]["combobox"] and template["model_dir"]["refresh_button"]
    updated = component.update_build_config(template, "/my/own/folder", "model_dir")
    assert updated["model_dir"]["options"] == [str(tmp_path / "models" / "gsm8k"), str(tmp_path / "models" / "mawps")]
    assert updated["model_dir"]["value"] == "/my/own/folder"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model_dir": ""}, "no model folder given: fill the node's Model Folder field or set OVERLAY_MODEL_DIR"),
        ({"model_dir": "/nonexistent/model"}, "model folder /nonexistent/model does not exist"),
        ({"candidates": None}, "no candidates: connect the Candidates output of a GetNeighbours node"),
        ({"candidates": [{"token": "x"}]}, "GetNeighbours rows with a token_id column"),
        ({"candidates": [{"token_id": 10**6}]}, "outside the selector's vocabulary"),
        ({"temperature": -1.0}, "Temperature must be ≥ 0"),
        ({"top_p": 0.0}, "Top-p must be in (0, 1]"),
    ],
)
def test_bad_input_gives_one_readable_line(overlay_model, candidates, monkeypatch, values, message):
    monkeypatch.delenv("OVERLAY_MODEL_DIR", raising=False)
    with pytest.raises(NodeError) as info:
        node(overlay_model, candidates, **values).get_choice()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_folder_without_weights_names_what_is_missing(overlay_model, candidates, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NodeError, match="is missing") as info:
        node(overlay_model, candidates, model_dir=str(tmp_path)).get_selector()
    assert all(name in str(info.value) for name in ("model.safetensors", "tokenizer.json", "OVERLAY_MODEL_DIR"))
    assert math.isfinite(node(overlay_model, candidates).get_choice().data["score"])
