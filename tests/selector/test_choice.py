"""The decoder's lean choice path: one float conversion per token, the greedy choice is the first allowed maximum,
and the traced score and margin are the selector's log-probabilities, whether scores come as a tensor or a list."""

from __future__ import annotations

import math
import random

import torch

from overlay.decode import choice_margin, choose_index


def test_greedy_is_the_first_allowed_maximum_for_tensors_and_lists():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 40)
        values = [rng.choice([-1.0, -2.0, -0.5, rng.uniform(-5, 0)]) for _ in range(n)]  # ties are common
        allowed = [rng.random() < 0.7 for _ in range(n)] if rng.random() < 0.8 else None
        masked = values if allowed is None or not any(allowed) else \
            [v if ok else -math.inf for v, ok in zip(values, allowed)]
        first = min(i for i, v in enumerate(masked) if v == max(masked))
        tensor = torch.tensor(values, dtype=torch.float64)
        assert choose_index(values, allowed=allowed) == choose_index(tensor, allowed=allowed) == first
        margin = choice_margin(values, allowed, first)
        assert margin == choice_margin(tensor, allowed, first) and margin >= 0


def test_sampling_is_unchanged_by_the_input_type():
    logp = torch.log_softmax(torch.randn(12, generator=torch.Generator().manual_seed(1)), -1)
    picks = [choose_index(logp, 0.8, 0.9, seed, 7) for seed in range(20)]
    assert picks == [choose_index(logp.tolist(), 0.8, 0.9, seed, 7) for seed in range(20)]
    assert len(set(picks)) > 1


def test_repetition_cost_and_offered_copies_match_the_tensor_formulas(overlay_redis):
    """The repetition cost subtracted in float32 list by list gives exactly the numbers of the tensor subtraction it
    replaced, and the offered copies' labels follow the copies list they were made from."""
    from overlay.chains import load_chains
    from overlay.decode import DecodeConfig, OverlayDecoder
    from overlay.table import SemanticTable, build_table
    from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer

    from conftest import EXAMPLES

    chains = load_chains(EXAMPLES / "gsm8k_train_sample.jsonl", limit=8).chains
    tok = train_tokenizer([c.to_text() for c in chains], vocab_size=600)
    build_table(overlay_redis, "choice-test", [encode(tok, c.to_text()) for c in chains], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok), max_order=3)
    dec = OverlayDecoder(SemanticTable(overlay_redis, "choice-test"), None, tok,
                         DecodeConfig(repetition_penalty=1.7, repetition_window=16))
    rng = random.Random(3)
    words = [i for i, w in enumerate(dec.wordlike) if w]
    for _ in range(200):
        state = dec.new_state("Tom has 3 apples.")
        state.ids += [rng.choice(words[:12]) for _ in range(20)]
        cands = rng.sample(words[:40], 16)
        values = torch.log_softmax(torch.randn(18), -1).tolist()
        recent = state.ids[-16:]
        counts = [recent.count(c) if dec.wordlike[c] else 0 for c in cands] + [0, 0]
        expected = (torch.tensor(values) - torch.tensor(counts, dtype=torch.float) * dec.rep_cost).tolist()
        assert dec._penalty(state, cands, values) == expected
    copies = [("12", "question"), ("7", "result")]
    assert dec._offered(copies) == ["question:12", "result:7"] and dec._offered(copies) is dec._offered(copies)
    assert dec._offered([("5", "result")]) == ["result:5"]
