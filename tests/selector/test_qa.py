"""The question-aware selector: decode-time scorer = training forward, the question is seen and copied, copies are
traced with their source, the full-context peer trains and decodes, and per-token state stays bounded."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from overlay.chains import Chain, Step, load_chains
from overlay.dataset import DatasetConfig, build_dataset, prompt_length
from overlay.decode import PEER_MARGIN, DecodeConfig, OverlayDecoder
from overlay.selector import QAScorer, QASelector, QASelectorConfig, load_selector
from overlay.selector.batches import collate, make_example
from overlay.selector.state import NumberSpans, token_texts
from overlay.table import SemanticTable, build_table
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
from overlay.train import TrainConfig, train

from conftest import EXAMPLES

NAMES = ["Tom", "Ana", "Raj", "Lee", "Mia", "Ola"]
CUDA = torch.cuda.is_available()


def synthetic(n: int, seed: int) -> list[Chain]:
    """Two-step chains whose numbers come from the question: only a model that reads the question gets them."""
    rng = random.Random(seed)
    chains = []
    for i in range(n):
        a, b, name = rng.randint(11, 89), rng.randint(2, 9), rng.choice(NAMES)
        total = a * b
        steps = [Step("<ACTION>", f"CALL calc({a}*{b})"), Step("<RESULT>", str(total)),
                 Step("<CHECK>", f"calc({a}*{b}) = {total}")]
        chains.append(Chain(f"{name} buys {b} boxes of {a} pens. How many pens does {name} have?", steps, str(total), i))
    return chains


@pytest.fixture(scope="module")
def trained(overlay_redis, tmp_path_factory):
    """A table and a 2×64 question-aware selector trained 300 steps on 120 synthetic chains, plus a peer."""
    folder = tmp_path_factory.mktemp("qa")
    chains = synthetic(120, 0)
    texts = [c.to_text() for c in chains]
    tok = train_tokenizer(texts + [str(i) for i in range(100)], vocab_size=600)
    build_table(overlay_redis, "qa-test", [encode(tok, t) for t in texts], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok), max_order=3)
    table = SemanticTable(overlay_redis, "qa-test")
    build_dataset(table, tok, chains, folder / "ds", DatasetConfig(candidates=16))
    threads = torch.get_num_threads()
    try:
        common = dict(data=str(folder / "ds"), steps=300, n_layer=2, n_head=2, n_embd=64, chains_per_batch=16,
                      warmup=10, lr=1e-2, eval_every=0, save_every=0, threads=2)
        result = train(TrainConfig(out=str(folder / "qa"), **common), progress=False)
        peer = train(TrainConfig(out=str(folder / "peer"), arch="peer", **common | {"steps": 20}), progress=False)
    finally:
        torch.set_num_threads(threads)
    return table, folder, result, peer


def test_scorer_equals_whole_chain_forward():
    """Token by token with its memory, the scorer gives the training forward's scores at every scored position,
    also once chain tokens slide out of the span and tool results out of the result memory."""
    chains = load_chains(EXAMPLES / "gsm8k_train_sample.jsonl", limit=8).chains
    tok = train_tokenizer([c.to_text() for c in chains], vocab_size=700)
    numbers = NumberSpans(token_texts(tok))
    torch.manual_seed(0)
    model = QASelector(QASelectorConfig(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, attn_span=3,
                                        result_tokens=4)).eval()
    rng = np.random.default_rng(0)
    worst, copies_seen = 0.0, 0
    for chain in chains[:2]:
        ids = encode(tok, chain.to_text())
        plen = prompt_length(ids)
        positions = list(range(plen, len(ids)))
        cands = [[ids[p], *rng.integers(10, len(tok), 5).tolist()] for p in positions]
        ex = make_example(ids, plen, positions, cands, [0] * len(positions), numbers, model.config, len(ids) + 1)
        with torch.no_grad():
            ref = model(**collate([ex])).logits.numpy()
        scorer = QAScorer(model, numbers)
        mem = scorer.start(ex.question)
        for n, p in enumerate(ex.at):
            scorer.feed(mem, ex.stream[:p + 1])
            logits, copies = scorer.scores(mem, ex.candidates[n])
            worst = max(worst, float(np.abs(logits - ref[n, :6]).max()))
            visible = {ex.values[v] for v in range(len(ex.values)) if ref[n, 6 + v] > -1e30}
            assert {value for value, _, _ in copies} == visible
            for value, score, _ in copies:
                worst = max(worst, abs(score - ref[n, 6 + ex.values.index(value)]))
            copies_seen += len(copies)
    assert worst < 1e-4 and copies_seen > 0


def test_training_moves_every_parameter(trained):
    _, folder, result, _ = trained
    assert result.history[-1]["train_loss"] < 1.0
    model, _ = load_selector(folder / "qa")
    assert isinstance(model, QASelector)
    fresh = QASelector(model.config)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()) if not torch.equal(p, q)]
    assert len(changed) == len(list(model.parameters()))


def test_changing_a_number_in_the_question_changes_the_copied_number(trained):
    """The chain copies the question's numbers: the same question with other numbers gets other numbers, traced
    to the question."""
    table, folder, _, _ = trained
    model, tok = load_selector(folder / "qa")
    dec = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=40))
    got = {}
    for a, b in ((47, 3), (62, 7)):
        result = dec.generate(f"Ana buys {b} boxes of {a} pens. How many pens does Ana have?")
        got[a] = result
        assert f"calc({a}*{b})" in result.text, result.text
        copied = [s for s in result.trace["steps"] if s["source"] == "question"]
        assert copied and all(f"question:{a}" in s["copies"] for s in copied)
        assert result.well_formed and result.answer == str(a * b)
    assert got[47].text.split("?", 1)[1] != got[62].text.split("?", 1)[1]


def test_peer_trains_and_decodes_with_the_same_loop(trained):
    table, folder, _, peer = trained
    assert peer.step == 20 and peer.train_loss is not None
    model, tok = load_selector(folder / "peer")
    result = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=30)).generate(
        "Tom buys 4 boxes of 21 pens. How many pens does Tom have?")
    assert result.tokens > 0
    assert all(s["source"] in ("table", "tool") for s in result.trace["steps"])
    # a token limit past the peer's positions stops the chain where they end, never inside the model
    context = model.config.n_positions
    long = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=context * 2, max_step_repeats=10**6))
    state = long.new_state("Tom buys 4 boxes of 21 pens. How many pens does Tom have?")
    step = encode(tok, "<ACTION> CALL calc(21*4) <RESULT> 84 <CHECK> calc(21*4) = 84 ")
    while len(state.ids) < context - PEER_MARGIN:
        long.force(state, step)
    long.run_batch([state])
    assert state.acc.stop_reason in ("context_limit", "eos") and len(state.ids) < context
    assert sum(not s.injected for s in state.acc.steps) == 1  # one decision past the limit, then it stops


def test_per_token_state_does_not_grow_with_the_chain(trained):
    """The memory a chain holds (question keys/values, the ring, the result slots) is the same size after 200 and
    after 800 chain tokens, and its copy values are bounded by the question's numbers and the result slots:
    per-token work is bounded by the question, never by the chain."""
    table, folder, _, _ = trained
    model, tok = load_selector(folder / "qa")
    dec = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=10_000, max_step_repeats=10**6))
    state = dec.new_state("Tom buys 4 boxes of 21 pens. How many pens does Tom have?")
    step = encode(tok, "<ACTION> CALL calc(21*4) <RESULT> 84 <CHECK> calc(21*4) = 84 ")
    sizes = {}
    for target in (200, 800):
        while len(state.ids) - state.prompt_len < target:
            dec.force(state, step)
        dec.step([state])
        mem = state.kv[1]
        sizes[target] = (mem.keys.shape, mem.values.shape, mem.bias.shape, mem.pin_pos.shape)
        assert len(mem.occurrences) <= 2 + model.config.result_tokens  # the question's numbers + results in memory
    assert mem.consumed > 800 and sizes[200] == sizes[800]
    cfg = model.config
    assert mem.keys.shape[2] == mem.n_question + cfg.attn_span + cfg.result_tokens


def test_a_domain_adapter_is_folded_into_the_decode_scorer(trained, overlay_redis):
    """A LoRA adapter trained on the base decodes through the fast scorer with its update folded in (same scores as
    the peft model's forward), and load_decoder picks it by domain while the base stays shared."""
    from overlay.decode import adapter_for, load_decoder
    from overlay.train import load_adapters

    table, folder, _, _ = trained
    train(TrainConfig(data=str(folder / "ds"), out=str(folder / "qa"), lora=True, domain="qa-test", steps=5,
                      chains_per_batch=8, eval_every=0, save_every=0, threads=2), progress=False)
    assert adapter_for(folder / "qa", "qa-test") == "qa-test" and adapter_for(folder / "qa", "other") == ""
    peft = load_adapters(folder / "qa", ["qa-test"])
    _, tok = load_selector(folder / "qa")
    numbers = NumberSpans(token_texts(tok))
    chain = synthetic(1, 5)[0]
    ids = encode(tok, chain.to_text())
    plen = prompt_length(ids)
    positions = list(range(plen, len(ids)))
    cands = [[ids[p], 5, 6, 7] for p in positions]
    ex = make_example(ids, plen, positions, cands, [0] * len(positions), numbers, peft.config, len(ids) + 1)
    with torch.no_grad():
        ref = peft(**collate([ex])).logits.numpy()
        base = load_selector(folder / "qa")[0](**collate([ex])).logits.numpy()
    scorer = QAScorer(peft, numbers, "qa-test")
    mem = scorer.start(ex.question)
    scorer.feed(mem, ex.stream[:ex.at[-1] + 1])
    logits, _ = scorer.scores(mem, ex.candidates[-1])
    assert np.abs(logits - ref[-1, :4]).max() < 1e-4 and np.abs(ref - base).max() > 1e-6
    url = f"unix://{overlay_redis.socket_file}"
    dec = load_decoder("qa-test", str(folder / "qa"), url)
    assert dec.adapter == "qa-test"
    assert dec.generate("Lee buys 5 boxes of 33 pens. How many pens does Lee have?").tokens > 0


@pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False")
def test_question_aware_selector_trains_and_scores_on_cuda(trained, tmp_path):
    """On a GPU whole-chain training runs there (its tensors take GPU memory, it reports cuda) and learns, and the
    trained model's forward on the GPU gives the CPU's scores."""
    _, folder, _, _ = trained
    torch.cuda.reset_peak_memory_stats()
    result = train(TrainConfig(data=str(folder / "ds"), out=str(tmp_path / "qa-cuda"), steps=40, n_layer=2, n_head=2,
                               n_embd=64, chains_per_batch=16, warmup=5, lr=1e-2, eval_every=10, save_every=0,
                               device="cuda"), progress=False)
    assert torch.device(result.device).type == "cuda" and torch.cuda.max_memory_allocated() > 4 * result.params
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]
    model, tok = load_selector(folder / "qa")
    gpu = copy.deepcopy(model).to("cuda")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    ids = encode(tok, synthetic(1, 7)[0].to_text())
    plen = prompt_length(ids)
    positions = list(range(plen, len(ids)))
    cands = [[ids[p], 5, 6, 7] for p in positions]
    ex = make_example(ids, plen, positions, cands, [0] * len(positions), NumberSpans(token_texts(tok)), model.config,
                      len(ids) + 1)
    with torch.no_grad():
        logits = gpu(**collate([ex], "cuda")).logits
        reference = model(**collate([ex])).logits
    assert logits.device.type == "cuda"
    scored = reference > -1e29
    assert torch.equal(logits.cpu() > -1e29, scored)
    assert torch.allclose(logits.cpu()[scored], reference[scored], atol=1e-3)
