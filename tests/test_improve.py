"""Self-improvement rounds on a real table and a real trained question-aware selector: verified chains become a new
table version and more training, and an interrupted round resumes without decoding or learning twice."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from overlay import table as tbl
from overlay.chains import Chain, Step
from overlay.cli import app
from overlay.configs import ImproveConfig
from overlay.dataset import DatasetConfig, build_dataset
from overlay.improve import kept_chains, run_improve
from overlay.table import SemanticTable, build_table
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
from overlay.train import TrainConfig, train

DOMAIN = "improve-test"


def synthetic(n: int, seed: int) -> list[Chain]:
    """One-step chains whose numbers come from the question."""
    rng = random.Random(seed)
    chains = []
    for i in range(n):
        a, b = rng.randint(11, 89), rng.randint(2, 9)
        steps = [Step("<ACTION>", f"CALL calc({a}*{b})"), Step("<RESULT>", str(a * b)),
                 Step("<CHECK>", f"calc({a}*{b}) = {a * b}")]
        chains.append(Chain(f"Ana buys {b} boxes of {a} pens. How many pens does Ana have?", steps, str(a * b), i + 1))
    return chains


@pytest.fixture(scope="module")
def start(overlay_redis, tmp_path_factory):
    """A table and a small selector trained on 80 synthetic chains (it solves most questions of that shape)."""
    folder = tmp_path_factory.mktemp("improve")
    chains = synthetic(80, 0)
    texts = [c.to_text() for c in chains]
    tok = train_tokenizer(texts + [str(i) for i in range(100)], vocab_size=500)
    build_table(overlay_redis, DOMAIN, [encode(tok, t) for t in texts], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok), max_order=3)
    build_dataset(SemanticTable(overlay_redis, DOMAIN), tok, chains, folder / "ds", DatasetConfig(candidates=16))
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(data=str(folder / "ds"), out=str(folder / "model"), steps=250, n_layer=2, n_head=2,
                          n_embd=64, chains_per_batch=16, warmup=10, lr=1e-2, eval_every=0, save_every=0, threads=2),
              progress=False)
    finally:
        torch.set_num_threads(threads)
    return folder


class Interrupt(Exception):
    """Stands for a kill: raised from the log once a stage's message appears."""


def test_a_round_learns_verified_chains_and_resumes_after_an_interruption(overlay_redis, start, tmp_path):
    questions, out = synthetic(12, 7), tmp_path / "run"
    config = ImproveConfig(rounds=1, questions=0, samples=2, steps=5, chains_per_batch=4, max_tokens=40, threads=1)
    before = tbl.active_version(overlay_redis, DOMAIN)

    def stop_after_learning(message: str) -> None:
        if "chains kept" in message:
            raise Interrupt(message)

    with pytest.raises(Interrupt):
        run_improve(overlay_redis, DOMAIN, start / "model", questions, out, config, log=stop_after_learning)
    decoded = json.loads((out / "round-1" / "decoded.json").read_text())
    kept = [t for q in decoded for t in q["kept"]]
    assert kept and all(Chain.from_text(t).answer == q["gold"] for q in decoded for t in q["kept"])
    learned = tbl.active_version(overlay_redis, DOMAIN)
    assert learned > before and not (out / "state.json").exists()
    stamp = (out / "round-1" / "decoded.json").stat().st_mtime_ns

    logs: list[str] = []
    rounds = run_improve(overlay_redis, DOMAIN, start / "model", questions, out, config, log=logs.append)
    assert (out / "round-1" / "decoded.json").stat().st_mtime_ns == stamp  # not decoded again
    assert tbl.active_version(overlay_redis, DOMAIN) == learned  # not learned twice
    tagged = [v for v, m in tbl.versions(overlay_redis, DOMAIN).items() if m.get("improve_round")]
    assert tagged == [learned] and "verified chains" in tbl.versions(overlay_redis, DOMAIN)[learned]["source"]
    assert len(rounds) == 1 and rounds[0]["table_version"] == learned and rounds[0]["kept_chains"] == len(kept)
    assert rounds[0]["solved"] == sum(bool(q["kept"]) for q in decoded) / 12
    assert (out / "round-1" / "model" / "model.safetensors").exists()
    live = json.loads((out / "round-1" / "live.json").read_text())  # held-out variants, table before and after
    assert live["variants"] > 0 and rounds[0]["live"] == live
    assert (live["before"]["table_version"], live["after"]["table_version"]) == (before, learned)

    # The learned version counts a kept chain's continuation more often than the version it was learned from.
    ids = encode(SemanticTable(overlay_redis, DOMAIN).tokenizer(), kept[0])
    old, new = SemanticTable(overlay_redis, DOMAIN, before), SemanticTable(overlay_redis, DOMAIN, learned)
    context, target = ids[:6], ids[6]
    counts = {name: dict(zip(t.neighbours(context, k=64).ids, t.neighbours(context, k=64).counts))
              for name, t in (("old", old), ("new", new))}
    assert counts["new"][target] > counts["old"].get(target, 0)


def test_only_verified_chains_with_the_gold_answer_are_kept(start, overlay_redis):
    from overlay.decode import DecodeConfig, OverlayDecoder
    from overlay.selector import load_selector

    model, tok = load_selector(start / "model")
    decoder = OverlayDecoder(SemanticTable(overlay_redis, DOMAIN), model, tok, DecodeConfig(max_tokens=40))
    chain = synthetic(1, 3)[0]
    result = decoder.generate(chain.question)
    assert result.answer == chain.answer and result.well_formed
    assert kept_chains([result, result], chain.answer) == [result.text]
    assert kept_chains([result], str(int(chain.answer) + 1)) == []
    result.verdicts = [{"verdict": "fail"}]
    assert kept_chains([result], chain.answer) == []


def test_cli_runs_a_round_and_rejects_bad_settings(start, overlay_redis, tmp_path):
    data = tmp_path / "q.jsonl"
    exprs = [(c, c.steps[0].text[len("CALL calc("):-1]) for c in synthetic(4, 11)]
    data.write_text("".join(json.dumps({"question": c.question, "answer": f"{e} = <<{e}={c.answer}>>{c.answer}\n"
                                                                          f"#### {c.answer}"}) + "\n" for c, e in exprs))
    env = {"OVERLAY_REDIS_URL": f"unix://{overlay_redis.socket_file}", "COLUMNS": "200"}
    args = ["improve", "--model", str(start / "model"), "--data", str(data), "--domain", DOMAIN,
            "--out", str(tmp_path / "run"), "--rounds", "1", "--samples", "2", "--steps", "3", "--max-tokens", "40",
            "--chains-per-batch", "2", "--threads", "1"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "round 1: solved" in result.output and (tmp_path / "run" / "state.json").exists()
    bad = CliRunner().invoke(app, args[:-2] + ["--samples", "0"], env=env)
    assert bad.exit_code != 0 and "samples ≥ 1" in bad.output


def test_a_round_without_verified_chains_keeps_the_model_and_the_table(overlay_redis, start, tmp_path):
    wrong = [Chain(c.question, c.steps, str(int(c.answer) + 1), c.line) for c in synthetic(3, 21)]  # unreachable gold
    before = tbl.active_version(overlay_redis, DOMAIN)
    config = ImproveConfig(rounds=1, questions=0, samples=2, steps=5, max_tokens=40, threads=1)
    rounds = run_improve(overlay_redis, DOMAIN, start / "model", wrong, tmp_path / "run", config, log=lambda _: None)
    assert rounds[0]["solved"] == 0 and rounds[0]["kept_chains"] == 0
    assert rounds[0]["model"] == str(start / "model") and rounds[0]["table_version"] == before
    assert tbl.active_version(overlay_redis, DOMAIN) == before and not (tmp_path / "run" / "round-1" / "model").exists()
