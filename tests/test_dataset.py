"""Lithography against a real Redis table and a real tokenizer: rows, fill-up, manifest, shards, load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

from overlay.chains import Chain, load_chains
from overlay.dataset import (MISSING_WEIGHT, DatasetConfig, answer_warning, build_dataset, load_dataset, target_mask,
                             token_tags, window_of, with_variants)
from overlay.table import SemanticTable, build_table
from overlay.tokenizer import encode, load_tokenizer, tokenizer_hash, train_tokenizer

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
A = Chain.from_text("<Q> Tom has 3 apples. <THOUGHT> He buys 2 more. <ACTION> CALL calc(3+2) <RESULT> 5 "
                    "<CHECK> calc(3+2) = 5 <ANSWER> 5 <EOS>")
B = Chain.from_text("<Q> Ann has 4 pens. <THOUGHT> She loses 1. <ACTION> CALL calc(4-1) <RESULT> 3 "
                    "<CHECK> calc(4-1) = 3 <ANSWER> 3 <EOS>")


@pytest.fixture(scope="module")
def tok():
    chains = load_chains(DATA / "gsm8k_train_sample.jsonl").chains
    return train_tokenizer([c.to_text() for c in chains], vocab_size=556)


def make_table(client, tok, chains=(A,), domain="tiny") -> SemanticTable:
    """A real order-2 table built from the given chains (only A by default, so B has unseen tokens)."""
    build_table(client, domain, [encode(tok, c.to_text()) for c in chains], vocab_size=len(tok), max_order=2,
                tokenizer_hash=tokenizer_hash(tok))
    return SemanticTable(client, domain)


def rows_of(data) -> list[dict]:
    return data.sort_by([("chain", "ascending"), ("position", "ascending")]).to_pylist()


def test_target_mask_and_tags_on_literal_ids():
    #      <Q>  q  <TH> t  <AC> a  <RE> r  r  <CH> c  <AN> n  <EOS>
    ids = [4, 11, 5, 12, 6, 13, 7, 14, 15, 8, 16, 9, 17, 3]
    assert target_mask(ids) == [False, False, True, True, True, True, True, False, False, True, True, True, True, True]
    assert token_tags(ids) == [0, 0, 1, 1, 2, 2, 0, 0, 0, 3, 3, 4, 4, 4]
    assert target_mask([4, 11, 12]) == [False] * 3
    assert window_of([7, 8, 9], 2, 4) == [0, 0, 7, 8]


def test_rows_exact_on_two_chains(redis_client, tok, tmp_path):
    table = make_table(redis_client, tok)
    cfg = DatasetConfig(window=16, candidates=4, dev_fraction=0.0)
    manifest, data = build_dataset(table, tok, [A, B], tmp_path / "ds", cfg), load_dataset(tmp_path / "ds")[1]
    rows = rows_of(data)
    ids = {0: encode(tok, A.to_text()), 1: encode(tok, B.to_text())}
    # Chain A: targets from <THOUGHT> (13) on; the RESULT contents "▁5▁" (35-37) are left out, its tag (34) kept.
    pos_a = [r["position"] for r in rows if r["chain"] == 0]
    assert pos_a == [p for p in range(13, 55) if p not in (35, 36, 37)]
    toks_a = tok.convert_ids_to_tokens([r["target"] for r in rows if r["chain"] == 0])
    assert toks_a[:3] == ["<THOUGHT>", "▁He", "▁b"] and "<RESULT>" in toks_a and toks_a[-1] == "<EOS>"
    assert toks_a[toks_a.index("<RESULT>") + 1] == "<CHECK>"
    pos_b = [r["position"] for r in rows if r["chain"] == 1]
    assert pos_b == [p for p in range(12, 52) if p not in (32, 33, 34)]
    first = rows[0]
    assert first["window"] == [0, 0, 0] + ids[0][:13] and first["target"] == 5 and first["tag"] == 1
    # Context ". ▁" was followed by <ACTION> then <THOUGHT> once each (ties: Redis orders members "6" > "5"),
    # then order 1 after "▁": "5" 3 times, then ties "9" > "8" > "7" ...
    assert first["candidates"] == [6, 5, tok.convert_tokens_to_ids("5"), 9] and first["label"] == 1 and first["present"] and first["order"] == 2
    by_tag = {r["position"]: r["tag"] for r in rows if r["chain"] == 0}
    assert [by_tag[p] for p in (13, 24, 25, 33, 34, 38, 49, 50, 54)] == [1, 1, 2, 2, 0, 3, 3, 4, 4]
    for r in rows:
        seq, pos = ids[r["chain"]], r["position"]
        assert r["window"] == ([0] * 16 + seq[:pos])[-16:]
        assert r["target"] == seq[pos] and r["candidates"][r["label"]] == r["target"]
        nb = table.neighbours(seq[:pos], 4)
        assert r["order"] == nb.order
        if r["present"]:
            assert r["candidates"] == nb.ids and r["label"] == nb.ids.index(r["target"])
            assert r["table_weights"] == pytest.approx(nb.weights)
        else:
            assert r["candidates"] == nb.ids[:3] + [r["target"]] and r["label"] == 3
            assert r["table_weights"][:3] == pytest.approx(nb.weights[:3]) and r["table_weights"][3] == MISSING_WEIGHT
    she = next(r for r in rows if r["chain"] == 1 and r["position"] == 13)
    assert tok.convert_ids_to_tokens(she["target"]) == "▁She" and not she["present"] and she["label"] == 3
    assert all(r["present"] for r in rows if r["chain"] == 0)
    assert manifest.rows == len(rows) and all(r["split"] == "train" for r in rows)


@pytest.mark.parametrize("strategy", ["table", "frequency", "cluster"])
def test_fill_up_keeps_k_distinct_ids(redis_client, tok, tmp_path, strategy):
    table = make_table(redis_client, tok)
    known = set(table.unigrams(1000).ids)
    K = len(known) + 12
    cfg = DatasetConfig(window=4, candidates=K, distractors=strategy, seed=3, dev_fraction=0.0)
    build_dataset(table, tok, [A, B], tmp_path / "a", cfg)
    rows = rows_of(load_dataset(tmp_path / "a")[1])
    other_tags: dict[int, set[int]] = {}
    for c in (A, B):
        seq = encode(tok, c.to_text())
        for t, m, tag in zip(seq, target_mask(seq), token_tags(seq)):
            if m and tag:
                for other in range(1, 5):
                    if other != tag:
                        other_tags.setdefault(other, set()).add(t)
    for r in rows:
        cands = r["candidates"]
        assert len(cands) == K == len(set(cands)) and r["target"] in cands and 0 not in cands
        assert all(0 <= c < len(tok) for c in cands)
        proposed = [c for c, w in zip(cands, r["table_weights"]) if w != MISSING_WEIGHT]
        assert set(proposed) == known
        extra = [c for c in cands if c not in known and c != r["target"]]
        assert len(extra) >= 11
        if strategy == "cluster":
            pool = other_tags[r["tag"]] - known - {r["target"]} if r["tag"] else set()
            assert set(extra[: len(pool)]) <= pool
    build_dataset(table, tok, [A, B], tmp_path / "b", cfg)
    assert load_dataset(tmp_path / "b")[1].equals(load_dataset(tmp_path / "a")[1])


def test_manifest_and_tokenizer_copy(redis_client, tok, tmp_path):
    table = make_table(redis_client, tok, chains=(A, B))
    chains = load_chains(DATA / "gsm8k_test_sample.jsonl", limit=10).chains
    manifest = build_dataset(table, tok, chains, tmp_path, DatasetConfig(window=5, candidates=6, dev_fraction=0.2))
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved == manifest.to_dict()
    assert saved["k"] == 5 and saved["K"] == 6 and saved["vocab_size"] == len(tok) and saved["chains"] == 10
    assert saved["tokenizer_hash"] == tokenizer_hash(tok)
    assert saved["table"] == {"domain": "tiny", "version": 1}
    assert saved["config"]["distractors"] == "table" and saved["config"]["window"] == 5
    _, data = load_dataset(tmp_path, expect_tokenizer_hash=tokenizer_hash(tok), expect_table=table)
    assert saved["rows"] == data.num_rows == saved["splits"]["train"] + saved["splits"]["dev"]
    assert saved["present_rate"] == pytest.approx(pc.mean(data["present"].cast("int8")).as_py())
    assert 0 < saved["present_rate"] < 1
    dev_chains = set(pc.unique(data.filter(pc.equal(data["split"], "dev"))["chain"]).to_pylist())
    train_chains = set(pc.unique(data.filter(pc.equal(data["split"], "train"))["chain"]).to_pylist())
    assert len(dev_chains) == 2 and not dev_chains & train_chains
    assert tokenizer_hash(load_tokenizer(tmp_path)) == tokenizer_hash(tok)


def test_shards_concatenate_to_single_shard_output(redis_client, tok, tmp_path):
    table = make_table(redis_client, tok)
    one = build_dataset(table, tok, [A, B], tmp_path / "one", DatasetConfig(candidates=8))
    many = build_dataset(table, tok, [A, B], tmp_path / "many", DatasetConfig(candidates=8, shard_rows=7))
    assert len(one.shards) == 1 and len(many.shards) == -(-many.rows // 7) > 3
    assert sorted(p.name for p in (tmp_path / "many").glob("shard-*.parquet")) == many.shards
    assert load_dataset(tmp_path / "many")[1].equals(load_dataset(tmp_path / "one")[1])
    again = build_dataset(table, tok, [A, B], tmp_path / "many", DatasetConfig(candidates=8))
    assert sorted(p.name for p in (tmp_path / "many").glob("shard-*.parquet")) == again.shards == ["shard-00000.parquet"]


def test_load_errors(redis_client, tok, tmp_path):
    table = make_table(redis_client, tok)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete build"):
        load_dataset(tmp_path / "half")
    build_dataset(table, tok, [], tmp_path / "empty")
    with pytest.raises(ValueError, match="empty dataset"):
        load_dataset(tmp_path / "empty")
    build_dataset(table, tok, [A], tmp_path / "ok", DatasetConfig(candidates=4))
    h = tokenizer_hash(tok)
    with pytest.raises(ValueError, match=f"(?s){h}.*another tokenizer than expected.*0123456789abcdef"):
        load_dataset(tmp_path / "ok", expect_tokenizer_hash="0123456789abcdef")
    with pytest.raises(ValueError, match=r"table mismatch.*tiny v1.*other v1"):
        load_dataset(tmp_path / "ok", expect_table={"domain": "other", "version": 1})
    with pytest.raises(ValueError, match=r"tiny v1.*tiny v2"):
        load_dataset(tmp_path / "ok", expect_table={"domain": "tiny", "version": 2})
    assert load_dataset(tmp_path / "ok", expect_table={"domain": "tiny", "version": None})[0].rows > 0
    for field, value in (("K", 1), ("k", 0)):
        manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
        manifest[field] = value
        (tmp_path / "ok" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="need k ≥ 1 and K ≥ 2"):
            load_dataset(tmp_path / "ok")
    with pytest.raises(ValueError, match="K must be ≥ 2"):
        DatasetConfig(candidates=1)
    with pytest.raises(ValueError, match="k must be ≥ 1"):
        DatasetConfig(window=0)
    with pytest.raises(ValueError, match="distractors"):
        DatasetConfig(distractors="random")


def test_table_built_with_other_tokenizer_is_refused(redis_client, tok, tmp_path):
    build_table(redis_client, "tiny", [encode(tok, A.to_text())], vocab_size=len(tok), tokenizer_hash="feedfacefeedface")
    with pytest.raises(ValueError, match="feedfacefeedface"):
        build_dataset(SemanticTable(redis_client, "tiny"), tok, [A], tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_variants_keep_every_source_chain_and_say_why_others_have_none():
    """--variants adds variants where a chain becomes a track and never drops a source chain."""
    chains = load_chains(DATA / "gsm8k_train_sample.jsonl", limit=40).chains
    out, lines = with_variants(chains, 2, seed=0)
    assert out[:len(chains)] == chains and len(out) > len(chains)
    assert lines[0].startswith("stellator: ") and f"training on all {len(chains)} source chains + " in lines[0]
    tracks = int(lines[0].split()[1])
    if tracks < len(chains):
        assert lines[1].startswith(f"{len(chains) - tracks} chains kept without variants — ")


def test_a_mapping_whose_answers_are_letters_is_named_on_one_line(tmp_path):
    records = [{"question": f"Which is {n} + 1? A) {n + 1} B) {n}", "steps": [f"{n} + 1 = {n + 1}"], "correct": "A"}
               for n in range(10)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = load_chains(data, "jsonl", answer_field="correct")
    warning = answer_warning(report.chains, report.noisy, "correct")
    assert warning.startswith("10 of 10 gold answers are not numbers (e.g. 'A')") and "\n" not in warning
    assert "--answer-field 'correct'" in warning
    assert answer_warning(load_chains(DATA / "gsm8k_train_sample.jsonl", limit=20).chains, 0, "answer") is None
