"""Tests for overlay.tokenizer: atomic tags, digit splitting, exact round trip, save/load, hash, byte fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlay.chains import SPECIAL_TOKENS, Chain, load_chains
from overlay.tokenizer import (
    TokenizerMismatch,
    check_tokenizers,
    decode,
    encode,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [c.to_text() for c in load_chains(DATA / "gsm8k_train_sample.jsonl").chains]


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, vocab_size=800)


def test_specials_have_ids_0_to_9_and_are_single_tokens(tok):
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(special) == i
        assert encode(tok, special) == [i]
        assert encode(tok, f"x{special}y").count(i) == 1
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = encode(tok, "<Q> a <THOUGHT> b <ACTION> CALL calc(1+2) <RESULT> 3 <CHECK> 3 = 3 <ANSWER> 3 <EOS>")
    assert [i for i in ids if i < 10] == [4, 5, 6, 7, 8, 9, 3]


def test_numbers_split_into_digits_and_operators_isolated(tok):
    ids = encode(tok, "12345")
    assert len(ids) == 5
    assert [decode(tok, [i]) for i in ids] == list("12345")
    pieces = tok.convert_ids_to_tokens(encode(tok, "calc(48/2+3*4-1=$5%.,)"))
    for op in "+-*/=()$%.,":
        assert op in pieces


def test_round_trip_sample_chains(tok, texts):
    for text in texts:
        ids = encode(tok, text)
        assert ids[0] == 4 and ids[-1] == 3  # <Q> ... <EOS>, no BOS added
        assert decode(tok, ids) == text


def test_round_trip_spacing_preserved(tok):
    # Spaces (single, double, leading, trailing) round-trip.
    text = "  Natalia  sold 48 clips . "
    assert decode(tok, encode(tok, text)) == text


def test_unknown_characters_become_bytes_and_never_raise(tok):
    ids = encode(tok, "漢🙂")
    assert len(ids) == 7 and all(10 <= i < 266 for i in ids)  # 3 + 4 UTF-8 bytes, one byte token each
    assert decode(tok, encode(tok, "a漢b")) == "a漢b"
    assert encode(tok, "") == []
    assert decode(tok, [10**9, -5]) == "<UNK><UNK>"


def test_save_load_same_ids_and_hash(tok, texts, tmp_path):
    folder = save_tokenizer(tok, tmp_path / "tok")
    assert (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # temp dir cleaned up
    for loaded in (load_tokenizer(folder), load_tokenizer(folder / "tokenizer.json")):
        assert tokenizer_hash(loaded) == tokenizer_hash(tok)
        assert len(tokenizer_hash(loaded)) == 16
        assert [encode(loaded, t) for t in texts[:20]] == [encode(tok, t) for t in texts[:20]]
        assert loaded.pad_token == "<PAD>" and loaded.eos_token_id == 3
    save_tokenizer(tok, folder)  # overwriting in place works
    assert tokenizer_hash(load_tokenizer(folder)) == tokenizer_hash(tok)


def test_hash_differs_for_different_vocab(tok, texts):
    other = train_tokenizer(texts[:50], vocab_size=300)
    assert tokenizer_hash(other) != tokenizer_hash(tok)


def test_load_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")


def test_byte_fallback_layout_and_vocab_size_is_the_total(tok):
    assert len(tok) == 800
    assert tok.convert_ids_to_tokens(list(range(12))) == [*SPECIAL_TOKENS, "<0x00>", "<0x01>"]
    assert tok.convert_ids_to_tokens(265) == "<0xFF>"
    assert decode(tok, encode(tok, "<ANSWER> 1234")) == "<ANSWER> 1234" and len(encode(tok, "1234")) == 4


@pytest.mark.parametrize("text", ["It is 25 °C outside.", "√16 is 4", "pages 3 – 7", "Tom 🙂 has 3 apples", "über 5 €"])
def test_unseen_characters_encode_without_unk_and_round_trip(tok, text):
    ids = encode(tok, text)
    assert 1 not in ids
    assert decode(tok, ids) == text
    assert [decode(tok, [i]) for i in encode(tok, text + " 905")][-3:] == ["9", "0", "5"]  # digits stay single tokens


def test_chain_with_unseen_characters_decodes_well_formed(tok):
    chain = Chain.from_text("<Q> A 30° turn twice, then √9 more: how far? <ACTION> CALL calc(30*2) <RESULT> 60 "
                            "<CHECK> calc(30*2) = 60 <ANSWER> 60 <EOS>")
    ids = encode(tok, chain.to_text())
    assert 1 not in ids
    assert Chain.from_text(decode(tok, ids)) == chain


def test_check_tokenizers_is_the_one_compatibility_check(tok, texts):
    other = train_tokenizer(texts[:20], vocab_size=300)
    h = tokenizer_hash(tok)
    assert check_tokenizers({"table t v1": h, "model m": tok, "dataset d": "", "peer": None}) == h
    assert check_tokenizers({"table": None, "dataset": ""}) == ""
    message = rf"^model m \({tokenizer_hash(other)}\) uses another tokenizer than table t v1 \({h}\)$"
    with pytest.raises(TokenizerMismatch, match=message):
        check_tokenizers({"table t v1": h, "dataset d": tok, "model m": other})
    with pytest.raises(ValueError, match=r"^dataset \(x\) and control \(y\) use another tokenizer than table \(z\)$"):
        check_tokenizers({"table": "z", "dataset": "x", "model": "z", "control": "y"})
