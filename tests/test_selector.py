"""Selector model: candidate scoring, padding, hidden states, save/load, the HF causal-LM wrapper, devices."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from overlay.chains import SPECIAL_TOKENS
from overlay.selector import (
    CachedScorer,
    FastScorer,
    HFCausalSelector,
    SelectorConfig,
    SelectorModel,
    load_selector,
    resolve_device,
    save_selector,
)

V, K = 40, 6
CUDA = torch.cuda.is_available()


def word_tokenizer(vocab_size: int = V) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the 10 specials, then words w10..w{V-1}."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)} | {f"w{i}": i for i in range(10, vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<UNK>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<PAD>", unk_token="<UNK>")


@pytest.fixture(scope="module")
def model() -> SelectorModel:
    torch.manual_seed(0)
    return SelectorModel(SelectorConfig(vocab_size=V, window=8, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(folder)
    return folder


def batch(seed: int = 0, b: int = 4, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (row 0 left-padded by 3) and K distinct non-PAD candidates per row."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(10, V, (b, k), generator=g)
    windows[0, :3] = 0
    cands = torch.stack([torch.randperm(V - 10, generator=g)[:K] + 10 for _ in range(b)])
    return windows, cands


def test_config_defaults_and_auto_registration():
    cfg = SelectorConfig()
    assert (cfg.model_type, cfg.window, cfg.n_layer, cfg.n_head, cfg.n_embd) == ("overlay-selector", 8, 2, 4, 128)
    assert cfg.pad_token_id == 0 and cfg.tie_word_embeddings and cfg.dropout == 0.0
    assert isinstance(AutoConfig.for_model("overlay-selector"), SelectorConfig)


def test_candidate_scores_equal_full_vocab_columns(model):
    windows, cands = batch()
    scores = model.score(windows, cands)
    assert scores.shape == (4, K)
    assert torch.allclose(scores, model.full_vocab_logits(windows).gather(1, cands), atol=1e-5)


def test_loss_is_candidate_cross_entropy_plus_weighted_full_vocab_term(model):
    windows, cands = batch()
    labels = torch.tensor([0, 3, -100, 5])
    out = model(windows, cands, labels)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    assert torch.allclose(out.loss, expected) and out.full_logits is None
    mixed = model(windows, cands, labels, full_vocab_weight=0.5)
    targets = cands[keep].gather(1, labels[keep, None]).squeeze(1)
    full = torch.nn.functional.cross_entropy(mixed.full_logits[keep], targets)
    assert mixed.full_logits.shape == (4, V)
    assert torch.allclose(mixed.loss, expected + 0.5 * full, atol=1e-6)


def test_padded_positions_do_not_matter(model):
    windows, cands = batch()
    garbage = windows.clone()
    garbage[0, :3] = torch.tensor([11, 25, 37])
    mask = (windows != 0).long()
    reference = model.score(windows, cands)
    assert torch.equal(model.score(garbage, cands, attention_mask=mask), reference)
    assert torch.allclose(model.score(windows[:1, 3:], cands[:1]), reference[:1], atol=1e-6)


def test_pad_candidates_are_never_chosen(model):
    windows, cands = batch()
    cands[:, 0] = 0
    scores = model.score(windows, cands)
    assert (scores.argmax(-1) != 0).all() and (scores[:, 0] < -1e30).all()


def test_hidden_states_and_attention_maps(model):
    windows, cands = batch()
    out = model(windows, cands, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and all(h.shape == (4, 8, 32) for h in out.hidden_states)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (4, 2, 8, 8)
    att = out.attentions[0]
    assert torch.allclose(att.sum(-1), torch.ones(4, 2, 8))
    assert (att[0, :, 3:, :3] == 0).all()
    assert torch.isfinite(torch.stack(out.hidden_states)).all()


def test_bad_inputs_raise(model):
    windows, cands = batch()
    with pytest.raises(ValueError, match="candidate_ids must be given"):
        model(windows, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="window length 9"):
        model(torch.ones(1, 9, dtype=torch.long), cands[:1])


@pytest.mark.parametrize("with_table", [True, False])
def test_fast_scorer_matches_model_score(model, with_table, monkeypatch):
    """The decode path's written-out forward scores like model.score, with or without the first-block table."""
    if not with_table:
        monkeypatch.setattr(FastScorer, "table_limit_bytes", 0)
    fast = FastScorer.build(model)
    assert fast is not None and fast.usable(model) and (fast.qkv0 is not None) is with_table
    windows = torch.randint(10, V, (3, model.config.window))
    cands = torch.randint(10, V, (3, 16))
    cands[0, -2:] = 0
    want, got = model.score(windows, cands), fast(windows, cands)
    assert torch.allclose(got[:, :-2], want[:, :-2], atol=1e-5)
    assert (got[0, -2:] == want[0, -2:]).all()
    short = windows[:, 3:]
    assert torch.allclose(fast(short, cands[:, :-2], has_pad=False), model.score(short, cands[:, :-2]), atol=1e-5)


def test_fast_scorer_steps_down_when_the_model_changes(model):
    """Other model types get no fast path; training mode, swapped modules or changed weights make it stale."""
    assert FastScorer.build(None) is None and FastScorer.build(torch.nn.Linear(2, 2)) is None
    copy = SelectorModel(model.config).eval()
    copy.load_state_dict(model.state_dict())
    fast = FastScorer.build(copy)
    copy.train()
    assert not fast.usable(copy)
    copy.eval()
    assert fast.usable(copy)
    with torch.no_grad():
        copy.wpe.weight.add_(0.1)
    assert not fast.usable(copy)
    fresh = FastScorer.build(copy)
    windows, cands = torch.randint(10, V, (2, 8)), torch.randint(10, V, (2, K))
    assert torch.allclose(fresh(windows, cands), copy.score(windows, cands), atol=1e-5)
    copy.h[0].attn.c_attn = torch.nn.Linear(32, 96)
    assert not fresh.usable(copy) and FastScorer.build(copy) is not None


def alibi_model(seed: int = 0, window: int = 9, span: int = 5, n_layer: int = 2) -> SelectorModel:
    """A banded ALiBi selector with perturbed norms and biases, so every weight matters in comparisons."""
    torch.manual_seed(seed)
    m = SelectorModel(SelectorConfig(vocab_size=V, window=window, n_layer=n_layer, n_head=2, n_embd=32,
                                     positions="alibi", attn_span=span)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_alibi_band_sees_only_its_receptive_field():
    """With span s and L layers the last token depends on exactly its last L(s-1)+1 tokens."""
    m = alibi_model()
    assert m.config.receptive_field == 9 and not hasattr(m, "wpe")
    windows, cands = torch.randint(10, V, (2, 9)), torch.randint(10, V, (2, K))
    base = m.score(windows, cands)
    changed = windows.clone()
    changed[:, 0] = (changed[:, 0] - 9) % (V - 10) + 10
    assert not torch.allclose(m.score(changed, cands), base)  # the first token is still in reach
    short = alibi_model(span=3)  # receptive field 5 of 9
    assert torch.allclose(short.score(changed, cands), short.score(windows, cands))
    assert torch.allclose(short.score(windows[:, 4:], cands), short.score(windows, cands), atol=1e-6)


@pytest.mark.parametrize("bad, match", [(dict(positions="rope", attn_span=2), "slot' or 'alibi"),
                                        (dict(positions="alibi", attn_span=0), "attn_span ≥ 1"),
                                        (dict(positions="alibi", attn_span=8), "more than the window")])
def test_position_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        SelectorModel(SelectorConfig(vocab_size=V, window=8, n_layer=2, n_head=2, n_embd=32, **bad))


def test_cached_scorer_equals_the_window_forward():
    """One new row per block against cached keys/values scores like model.score on the last window, from the
    chain's first token on, after jumps of several tokens and after more than the receptive field at once."""
    m = alibi_model()
    cached = CachedScorer.build(m)
    assert cached is not None and FastScorer.build(m) is None and CachedScorer.build(alibi_model().train()) is not None
    g = torch.Generator().manual_seed(3)
    ids = (torch.randint(10, V, (80,), generator=g)).tolist()
    cache = cached.new_cache()
    for end in [*range(1, 20), 22, 30, 31, 60, 80]:
        cands = torch.randint(10, V, (K,), generator=g).tolist()
        cands[-1] = 0
        got = torch.from_numpy(cached.scores(cache, ids[:end], cands))
        window = ([0] * 9 + ids[:end])[-9:]
        want = m.score(torch.tensor([window]), torch.tensor([cands]))[0]
        assert torch.allclose(got[:-1], want[:-1], atol=1e-5), end
        assert got[-1] == torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="new token"):
        cached.scores(cache, ids[:80], cands)


def test_cached_scorer_steps_down_when_the_model_changes():
    m = alibi_model()
    cached = CachedScorer.build(m)
    assert CachedScorer.build(SelectorModel(SelectorConfig(vocab_size=V, window=8, n_layer=1, n_head=2, n_embd=32))) is None
    assert cached.usable(m)
    with torch.no_grad():
        m.h[1].mlp.c_fc.bias.add_(0.1)
    assert not cached.usable(m)
    m.train()
    assert not CachedScorer.build(m).usable(m)


def test_alibi_selector_round_trips(tmp_path):
    m = alibi_model()
    save_selector(m, word_tokenizer(), tmp_path / "alibi")
    loaded, _ = load_selector(tmp_path / "alibi")
    assert (loaded.config.positions, loaded.config.attn_span) == ("alibi", 5)
    windows, cands = batch(k=9)
    assert torch.allclose(loaded.score(windows, cands), m.score(windows, cands))


def test_save_load_gives_identical_scores(model, tmp_path):
    windows, cands = batch(1)
    folder = tmp_path / "sel"
    save_selector(model, word_tokenizer(), folder)
    (folder / "adapters").mkdir()
    save_selector(model, word_tokenizer(), folder)
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapters"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["sel"]
    loaded, tok = load_selector(folder)
    assert isinstance(loaded, SelectorModel) and tok.convert_tokens_to_ids("w12") == 12
    assert torch.equal(loaded.score(windows, cands), model.score(windows, cands))
    auto = AutoModel.from_pretrained(folder).eval()
    assert isinstance(auto, SelectorModel)
    assert torch.equal(auto.score(windows, cands), model.score(windows, cands))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_load_selector_names_the_missing_file(model, tmp_path, name):
    folder = save_selector(model, word_tokenizer(), tmp_path / "sel")
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{folder}.*{name}"):
        load_selector(folder)


def test_hf_causal_selector_on_local_gpt2(gpt2_folder):
    wrapped = HFCausalSelector(gpt2_folder).eval()
    windows, cands = batch(2)
    lm = GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    with torch.no_grad():
        lm_logits = lm(windows[1:]).logits[:, -1]
    scores = wrapped.score(windows, cands)
    assert torch.allclose(scores[1:], lm_logits.gather(1, cands[1:]), atol=1e-5)
    assert torch.allclose(scores, wrapped.full_vocab_logits(windows).gather(1, cands), atol=1e-5)
    garbage = windows.clone()
    garbage[0, :3] = 44
    assert torch.allclose(wrapped.score(garbage, cands, attention_mask=(windows != 0).long()), scores, atol=1e-5)
    assert torch.allclose(wrapped.score(windows[:1, 3:], cands[:1]), scores[:1], atol=1e-5)
    out = wrapped(windows, cands, torch.tensor([0, 1, 2, 3]), output_hidden_states=True, output_attentions=True)
    out.loss.backward()
    assert len(out.hidden_states) == 2 and out.attentions[0].shape == (4, 2, 8, 8)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: asking for it is no error here (the CUDA tests run)")
def test_cuda_without_a_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="CUDA was requested but torch.cuda.is_available\\(\\) is False"):
        resolve_device("cuda")


@pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False")
def test_scores_on_cuda_match_cpu(model):
    """The selector moved to the GPU scores there, and gives the CPU's scores."""
    gpu = copy.deepcopy(model).to(resolve_device("cuda"))
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    windows, cands = batch()
    with torch.no_grad():
        scores = gpu.score(windows.to("cuda"), cands.to("cuda"))
        reference = model.score(windows, cands)
    assert scores.device.type == "cuda"
    assert torch.allclose(scores.cpu(), reference, atol=1e-3)
