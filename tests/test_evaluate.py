"""Evaluation of a really trained tiny selector against a real Redis table: metrics, invariants, report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlay.chains import load_chains
from overlay.dataset import DatasetConfig, build_dataset, target_mask
from overlay.evaluate import LAMBDAS, METHODS, evaluate, write_report
from overlay.selector import load_selector
from overlay.table import SemanticTable, build_table
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
from overlay.train import TrainConfig, train

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
TAGS = ("THOUGHT", "ACTION", "CHECK", "ANSWER")
BUCKETS = ("0-31", "32-63", "64-127", "128-255", "256+")


def setup(client, tmp: Path, chains: int, steps: int, domain: str) -> tuple[SemanticTable, Path]:
    """Tokenizer, table, dataset and a selector trained for `steps` steps on the first `chains` sample chains."""
    train_chains = load_chains(DATA / "gsm8k_train_sample.jsonl", limit=chains).chains
    tok = train_tokenizer([c.to_text() for c in train_chains], vocab_size=556)
    build_table(client, domain, [encode(tok, c.to_text()) for c in train_chains], vocab_size=len(tok), max_order=3,
                tokenizer_hash=tokenizer_hash(tok), tokenizer_json=tok.backend_tokenizer.to_str())
    table = SemanticTable(client, domain)
    build_dataset(table, tok, train_chains, tmp / "data", DatasetConfig(window=8, candidates=32))
    train(TrainConfig(data=str(tmp / "data"), out=str(tmp / "model"), arch="window", n_layer=1, n_head=2, n_embd=32, steps=steps,
                      batch_size=64, lr=1e-2, warmup=10, eval_every=0, eval_rows=2000, save_every=0, device="cpu"),
          progress=False)
    return table, tmp / "model"


@pytest.fixture(scope="module")
def trained(redis_server, tmp_path_factory):
    """One small training run shared by this module's tests (its own domain on the session's real server)."""
    redis_server.flushall()
    return setup(redis_server, tmp_path_factory.mktemp("eval"), chains=40, steps=60, domain="evalfast")


def check_results(results: dict, tok, test_chains) -> None:
    """Every key present, every rate in [0, 1], breakdowns adding up, the recall ceiling respected."""
    rates = [results["recall_at_K"], results["full_vocab_accuracy"], *results["recall"].values()]
    for method in METHODS:
        rates += results["methods"][method].values()
        for group in (*results["by_tag"].values(), *results["by_position"].values()):
            rates += group[method].values()
    rates += [v for g in results["lambda_grid"] for k, v in g.items() if k != "lambda"]
    assert all(0.0 <= r <= 1.0 for r in rates)
    assert set(results["methods"]) == set(METHODS)
    assert {"8", "32", "128"} <= set(results["recall"]) and results["recall_at_K"] == results["recall"]["32"]
    assert set(TAGS) <= set(results["by_tag"]) and list(results["by_position"]) == list(BUCKETS)
    assert results["lambda"] in LAMBDAS and [g["lambda"] for g in results["lambda_grid"]] == list(LAMBDAS)
    assert results["lambda_tuned_on"] == "dev"
    ceiling = results["recall_at_K"]
    assert results["methods"]["overlay"]["accuracy"] <= ceiling
    assert results["methods"]["overlay_mixed"]["accuracy"] <= ceiling
    assert results["methods"]["table"]["accuracy"] == results["recall"]["1"]
    assert results["full_vocab_accuracy"] == results["methods"]["full_vocab"]["accuracy"]
    if results["lambda"] == 0:
        assert results["methods"]["overlay_mixed"] == results["methods"]["overlay"]
    total = sum(sum(m[1:]) for m in (target_mask(encode(tok, c.to_text())) for c in test_chains))
    assert results["positions"] + results["dev_positions"] == total
    assert sum(g["n"] for g in results["by_tag"].values()) == results["positions"]
    assert sum(g["n"] for g in results["by_position"].values()) == results["positions"]


def test_evaluate_trained_selector(trained, tmp_path):
    table, folder = trained
    model, tok = load_selector(folder)
    test_chains = load_chains(DATA / "gsm8k_test_sample.jsonl", limit=20).chains
    results = evaluate(table, model, tok, test_chains, K=32, seed=1)
    assert results["chains"] == 20 and results["k"] == 8 and results["K"] == 32
    assert results["table"] == {"domain": "evalfast", "version": 1}
    assert results["methods"]["overlay"]["accuracy"] > 0.1
    check_results(results, tok, test_chains)
    assert evaluate(table, model, tok, test_chains, K=32, seed=1)["methods"] == results["methods"]
    paths = write_report(results, tmp_path / "report")
    assert [p.name for p in paths] == ["eval.json", "eval.md", "accuracy_by_tag.png", "accuracy_by_position.png",
                                       "recall_at_k.png"]
    assert json.loads(paths[0].read_text())["methods"] == results["methods"]
    md = paths[1].read_text()
    assert "| overlay (selector over K) |" in md and "## By tag" in md and "| THOUGHT |" in md and "| 256+ |" in md
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_evaluate_refuses_mismatches(trained):
    table, folder = trained
    model, tok = load_selector(folder)
    chains = load_chains(DATA / "gsm8k_test_sample.jsonl", limit=2).chains
    other = train_tokenizer([c.to_text() for c in chains], vocab_size=376)
    with pytest.raises(ValueError, match=r"^table \(\w+\) .*another tokenizer than tokenizer"):
        evaluate(table, model, other, chains)
    with pytest.raises(ValueError, match="K must be ≥ 2"):
        evaluate(table, model, tok, chains, K=1)
    with pytest.raises(ValueError, match="window k=9"):
        evaluate(table, model, tok, chains, k=9)
    with pytest.raises(ValueError, match="no target positions"):
        evaluate(table, model, tok, [])


def test_shorter_window_and_small_k(trained):
    table, folder = trained
    model, tok = load_selector(folder)
    chains = load_chains(DATA / "gsm8k_test_sample.jsonl", limit=5).chains
    results = evaluate(table, model, tok, chains, K=4, k=3, dev_fraction=0.0)
    assert results["k"] == 3 and results["lambda_tuned_on"] == "all" and "4" in results["recall"]
    assert results["methods"]["overlay"]["accuracy"] <= results["recall"]["4"]


@pytest.mark.slow
def test_evaluate_longer_training(redis_client, tmp_path):
    table, folder = setup(redis_client, tmp_path, chains=100, steps=400, domain="evalslow")
    model, tok = load_selector(folder)
    test_chains = load_chains(DATA / "gsm8k_test_sample.jsonl", limit=20).chains
    results = evaluate(table, model, tok, test_chains)
    check_results(results, tok, test_chains)
    assert results["methods"]["overlay"]["accuracy"] > 0.2
    assert len(write_report(results, tmp_path / "report")) == 5
