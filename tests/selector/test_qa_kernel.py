"""The compiled per-token step of the question-aware selector: the same scores as the NumPy fallback and the training
forward, the same decoded chain, safe from several threads, bounds-checked like NumPy, cached per compiler version
and CPU features, and a fallback that says why when it cannot build (tested on every machine, kernel or not)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from overlay.chains import load_chains
from overlay.dataset import prompt_length
from overlay.decode import DecodeConfig, OverlayDecoder
from overlay.selector import QAScorer, QASelector, QASelectorConfig, qa_kernel
from overlay.selector.batches import collate, make_example
from overlay.selector.state import NumberSpans, token_texts
from overlay.table import SemanticTable, build_table
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer

from conftest import EXAMPLES



@pytest.fixture
def kernel():
    """The compiled kernel (built at test time, never while collecting); tests that compare it skip without it."""
    if qa_kernel.load() is None:
        pytest.skip(f"no compiled kernel here: {qa_kernel.reason()}")
    return qa_kernel.load()


@pytest.fixture(scope="module")
def sample():
    """Sample chains, a tokenizer over them and its number spans."""
    chains = load_chains(EXAMPLES / "gsm8k_train_sample.jsonl", limit=12).chains
    tok = train_tokenizer([c.to_text() for c in chains], vocab_size=700)
    return chains, tok, NumberSpans(token_texts(tok))


def model(tok, **shape) -> QASelector:
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, attn_span=3, result_tokens=4) | shape
    return QASelector(QASelectorConfig(**cfg)).eval()


@pytest.mark.parametrize("shape", [{}, {"n_layer": 3, "n_head": 4, "n_embd": 64, "attn_span": 16, "result_tokens": 64}])
def test_compiled_step_equals_numpy_and_the_training_forward(sample, shape, kernel):
    """Token by token, the compiled step's scores, log-probabilities (one softmax over candidates and copy values),
    copy values and memory equal the NumPy fallback's (float32 rounding apart), and both equal the whole-chain
    training forward, including once tokens leave the span and results leave the result memory."""
    chains, tok, numbers = sample
    m = model(tok, **shape)
    compiled, fallback = QAScorer(m, numbers), QAScorer(m, numbers, compiled=False)
    assert compiled.kernel is not None and fallback.kernel is None
    rng = np.random.default_rng(0)
    worst_pair = worst_ref = 0.0
    copies_seen = 0
    for chain in chains[:3]:
        ids = encode(tok, chain.to_text())
        plen = prompt_length(ids)
        positions = list(range(plen, len(ids)))
        cands = [[ids[p], *rng.integers(10, len(tok), 5).tolist()] for p in positions]
        ex = make_example(ids, plen, positions, cands, [0] * len(positions), numbers, m.config, len(ids) + 1)
        with torch.no_grad():
            ref = m(**collate([ex])).logits.numpy()
        a, b = compiled.start(ex.question), fallback.start(ex.question)
        for n, p in enumerate(ex.at):
            compiled.feed(a, ex.stream[:p + 1])
            fallback.feed(b, ex.stream[:p + 1])
            (la, ca), (lb, cb) = compiled.scores(a, ex.candidates[n]), fallback.scores(b, ex.candidates[n])
            assert [(v, s) for v, _, s in ca] == [(v, s) for v, _, s in cb]
            (pa, va), (pb, vb) = compiled.log_probs(a, ex.candidates[n]), fallback.log_probs(b, ex.candidates[n])
            softmax = torch.log_softmax(torch.tensor([*lb.tolist(), *(x[1] for x in cb)]), -1).numpy()
            assert va == vb == [(v, s) for v, _, s in cb] and pa.dtype == pb.dtype == np.float32
            worst_pair = max(worst_pair, float(np.abs(pa - pb).max()), float(np.abs(pb - softmax).max()))
            worst_pair = max(worst_pair, float(np.abs(la - lb).max()), float(np.abs(a.last - b.last).max()),
                             *(abs(x[1] - y[1]) for x, y in zip(ca, cb)))
            worst_ref = max(worst_ref, float(np.abs(la - ref[n, :6]).max()),
                            *(abs(s - ref[n, 6 + ex.values.index(v)]) for v, s, _ in ca))
            copies_seen += len(ca)
        assert np.array_equal(a.bias, b.bias)  # the attention bias is computed exactly alike
        assert np.abs(a.keys - b.keys).max() < 1e-5 and np.abs(a.values - b.values).max() < 1e-5
    assert worst_pair < 1e-5 and worst_ref < 1e-4 and copies_seen > 0


def test_decoding_gives_the_same_chain_either_way(sample, overlay_redis, kernel):
    """A whole decoded chain (choices, copies, tool results, trace) is the same with the compiled step and the NumPy
    fallback."""
    chains, tok, _ = sample
    build_table(overlay_redis, "kernel-test", [encode(tok, c.to_text()) for c in chains], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok), max_order=3)
    table = SemanticTable(overlay_redis, "kernel-test")
    m = model(tok)
    results = []
    for compiled in (True, False):
        dec = OverlayDecoder(table, m, tok, DecodeConfig(max_tokens=80))
        if not compiled:
            dec._scorers()[2].kernel = None  # the decoder's own scorer on its NumPy path
        results.append([dec.generate(c.question) for c in chains[:3]])
    for a, b in zip(*results):
        assert a.text == b.text and a.stop_reason == b.stop_reason
        ta, tb = a.trace["steps"], b.trace["steps"]
        assert [(s["token_id"], s["chosen_rank"], s["source"], s["copies"]) for s in ta] == \
               [(s["token_id"], s["chosen_rank"], s["source"], s["copies"]) for s in tb]
        assert max(abs(x["score"] - y["score"]) for x, y in zip(ta, tb)) < 1e-5


def test_chains_in_several_threads_match_one_at_a_time(sample, kernel):
    """The kernel keeps no state between calls (its scratch is on the stack, each chain owns its memory), so chains
    pushed from several threads at once end exactly where each ends alone."""
    chains, tok, numbers = sample
    scorer = QAScorer(model(tok, n_embd=64), numbers)
    streams = []
    for c in chains[:4]:
        ids = encode(tok, c.to_text())
        plen = prompt_length(ids)
        streams.append((ids[:plen], [2] + ids[plen:] * 3))

    def run(question, stream):
        mem = scorer.start(question)
        scorer.feed(mem, stream)
        return mem.last.copy()

    alone = [run(*s) for s in streams]
    together: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i, s=s: together.__setitem__(i, run(*s))) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(alone[i], together[i]) for i in range(len(streams)))


def test_without_a_compiler_or_when_switched_off_the_fallback_says_why(monkeypatch, sample):
    _, tok, numbers = sample
    try:
        qa_kernel.load.cache_clear()
        monkeypatch.setenv(qa_kernel.ENV, "0")
        assert qa_kernel.load() is None and qa_kernel.ENV in qa_kernel.reason()
        assert QAScorer(model(tok), numbers).kernel is None
        qa_kernel.load.cache_clear()
        monkeypatch.delenv(qa_kernel.ENV)
        monkeypatch.setattr(qa_kernel, "_compiler", lambda: None)
        assert qa_kernel.load() is None and "compiler" in qa_kernel.reason()
        assert QAScorer(model(tok), numbers).kernel is None
    finally:
        monkeypatch.undo()
        qa_kernel.load.cache_clear()
    assert (qa_kernel.load() is None) == (qa_kernel.reason() != "")


def test_out_of_range_ids_raise_index_error_on_either_path(sample, kernel):
    """A candidate id past the vocabulary (or below 0), or a token id past the embeddings, raises IndexError on the
    compiled path as on the NumPy one, instead of reading memory past the weights."""
    chains, tok, numbers = sample
    m = model(tok)
    ids = encode(tok, chains[0].to_text())
    plen = prompt_length(ids)
    for compiled in (True, False):
        scorer = QAScorer(m, numbers, compiled=compiled)
        assert (scorer.kernel is not None) == compiled
        mem = scorer.start(ids[:plen])
        scorer.feed(mem, [2] + ids[plen:plen + 5])
        assert len(scorer.log_probs(mem, [5, 6])[0]) >= 2
        with pytest.raises(IndexError):
            scorer.log_probs(mem, [5, len(tok) + 1000])
        with pytest.raises(IndexError):
            scorer.push(mem, len(tok) + 1000)
    scorer = QAScorer(m, numbers)
    mem = scorer.start(ids[:plen])
    scorer.feed(mem, [2, 5])
    with pytest.raises(IndexError, match="candidate id -1 is outside the vocabulary"):
        scorer.log_probs(mem, [5, -1])


def test_the_cache_key_follows_the_compiler_version_and_cpu_features(monkeypatch):
    """A cache shared between hosts (NFS, a volume, CI) never hands one CPU a kernel built for another's features,
    nor a kernel from another compiler version."""
    key = qa_kernel.cache_key("cc")
    monkeypatch.setattr(qa_kernel, "_cpu", lambda: "model name : same\nflags : sse2 avx2")
    with_avx2 = qa_kernel.cache_key("cc")
    monkeypatch.setattr(qa_kernel, "_cpu", lambda: "model name : same\nflags : sse2 avx512f")
    assert qa_kernel.cache_key("cc") != with_avx2
    monkeypatch.setattr(qa_kernel, "_compiler_version", lambda cc: "cc (GCC) 99.1")
    assert qa_kernel.cache_key("cc") not in (with_avx2, key)
    monkeypatch.undo()
    assert "flags" in qa_kernel._cpu() or "Features" in qa_kernel._cpu() or not Path("/proc/cpuinfo").exists()


def test_collecting_the_tests_compiles_nothing(tmp_path):
    """Collection imports this module without building the kernel (an empty cache folder stays empty)."""
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", __file__],
                          capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not list(tmp_path.rglob("*.so"))
