"""Selector training: real tiny runs on synthetic Parquet shards (loss, parameters, LoRA, resume, errors)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel

from overlay.chains import SPECIAL_TOKENS
from overlay.selector import HFCausalSelector, SelectorConfig, SelectorModel, load_selector, save_selector
from overlay.train import TrainConfig, config_from_kwargs, held_out_mask, load_adapters, train

V, k, K = 40, 8, 8
CUDA = torch.cuda.is_available()
WORDS = V - 10
TINY = dict(arch="window", n_layer=1, n_head=2, n_embd=32, batch_size=64, lr=1e-2, warmup=5, eval_every=10, save_every=0, threads=1)


def write_dataset(folder: Path, shift: int, chains: int = 80, seed: int = 0, tok_hash: str | None = None,
                  k_: int = k, big_k: int = K) -> Path:
    """Chains BOS w w+shift w+2·shift ... (mod the 30 words): one shard + manifest + tokenizer in the builder's schema."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {c: [] for c in ("window", "target", "candidates", "label", "present", "table_weights",
                                              "order", "tag", "position", "chain")}
    for chain in range(chains):
        start = int(rng.integers(WORDS))
        seq = [2] + [10 + (start + i * shift) % WORDS for i in range(12)] + [3]
        for t in range(1, len(seq)):
            window = ([0] * k_ + seq[:t])[-k_:]
            target = seq[t]
            others = rng.choice([w for w in range(10, V) if w != target], big_k - 1, replace=False).tolist()
            cands = others + [target]
            rng.shuffle(cands)
            for name, value in (("window", window), ("target", target), ("candidates", cands),
                                ("label", cands.index(target)), ("present", True),
                                ("table_weights", rng.normal(-3, 1, big_k).astype(np.float32).tolist()),
                                ("order", 1), ("tag", 0), ("position", t), ("chain", chain)):
                cols[name].append(value)
    schema = pa.schema([("window", pa.list_(pa.int32())), ("target", pa.int32()), ("candidates", pa.list_(pa.int32())),
                        ("label", pa.int16()), ("present", pa.bool_()), ("table_weights", pa.list_(pa.float32())),
                        ("order", pa.int8()), ("tag", pa.int8()), ("position", pa.int32()), ("chain", pa.int32())])
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), folder / "shard-00000.parquet")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)} | {f"w{i}": i for i in range(10, V)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<UNK>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(folder / "tokenizer.json"))
    manifest = {"k": k_, "K": big_k, "rows": len(cols["label"]), "shards": ["shard-00000.parquet"],
                "tokenizer_hash": tok_hash or "words40", "table": {"domain": "synthetic", "version": 1},
                "vocab_size": V, "splits": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def eval_batch(shift: int, n: int = 64, seed: int = 99) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh windows of the shift pattern with candidates and labels, for scoring trained models."""
    rng = np.random.default_rng(seed)
    windows, cands, labels = [], [], []
    for _ in range(n):
        start, t = int(rng.integers(WORDS)), int(rng.integers(2, 9))
        seq = [10 + (start + i * shift) % WORDS for i in range(t + 1)]
        windows.append(([0] * k + seq[:t])[-k:])
        others = rng.choice([w for w in range(10, V) if w != seq[t]], K - 1, replace=False).tolist()
        cands.append(others + [seq[t]])
        labels.append(K - 1)
    return torch.tensor(windows), torch.tensor(cands), torch.tensor(labels)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return (scores.argmax(-1) == labels).float().mean().item()


def params_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def data_a(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "a", shift=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_a) -> Path:
    """A selector trained from scratch on pattern A (the base for LoRA tests)."""
    out = tmp_path_factory.mktemp("models") / "base"
    train(TrainConfig(data=str(data_a), out=str(out), steps=40, **TINY), progress=False)
    return out


def test_tiny_run_loss_falls_and_every_parameter_changes(tmp_path, data_a):
    torch.manual_seed(1)
    start = tmp_path / "start"
    save_selector(SelectorModel(SelectorConfig(vocab_size=V, window=k, n_layer=1, n_head=2, n_embd=32,
                                               tokenizer_hash="words40")), data_a, start)
    before = params_of(start)
    result = train(TrainConfig(data=str(data_a), out=str(tmp_path / "out"), base=str(start), steps=30, **TINY),
                   progress=False)
    after = params_of(tmp_path / "out")
    assert result.step == 30 and result.trainable_params == result.params == sum(t.numel() for t in before.values())
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]
    assert result.eval_loss < np.log(K) and result.eval_accuracy > 0.5
    assert result.rows_eval > 0 and result.tokens_per_s > 0
    assert set(before) == set(after)
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    assert torch.equal(params_of(start)["wte.weight"], before["wte.weight"])


def test_alibi_selector_trains_and_reloads(tmp_path, data_a):
    out = tmp_path / "alibi"
    result = train(TrainConfig(data=str(data_a), out=str(out), steps=40, positions="alibi", attn_span=4, **TINY),
                   progress=False)
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"] and result.eval_accuracy > 0.5
    model, _ = load_selector(out)
    assert (model.config.positions, model.config.attn_span) == ("alibi", 4)
    with pytest.raises(ValueError, match="positions must be slot or alibi"):
        TrainConfig(data=str(data_a), positions="rope")
    with pytest.raises(ValueError, match="more than the window"):
        train(TrainConfig(data=str(data_a), out=str(tmp_path / "wide"), steps=2, positions="alibi", attn_span=9,
                          **TINY), progress=False)


def test_output_folder_and_reload(base, data_a):
    names = {p.name for p in base.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_result.json"} <= names
    assert (base / "tokenizer.json").read_bytes() == (data_a / "tokenizer.json").read_bytes()
    saved = json.loads((base / "train_result.json").read_text())
    assert saved["step"] == 40 and saved["config"]["data"] == str(data_a)
    model, _ = load_selector(base)
    windows, cands, labels = eval_batch(1)
    assert accuracy(model.score(windows, cands), labels) > 0.8
    assert model.config.tokenizer_hash == "words40"


def test_lora_adapters_train_switch_disable_and_reload(tmp_path, base):
    out = tmp_path / "model"
    shutil.copytree(base, out)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    runs = {}
    for name, shift in (("plus3", 3), ("plus7", 7)):
        data = write_dataset(tmp_path / name, shift=shift, seed=shift)
        runs[name] = train(TrainConfig(data=str(data), out=str(out), lora=True, domain=name, steps=30, lora_r=2,
                                       **TINY | {"lr": 2e-2}), progress=False)
        assert runs[name].trainable_params < runs[name].params / 10
        lora = load_file(str(out / "adapters" / name / "adapter_model.safetensors"))
        assert lora and all(t.abs().sum() > 0 for n, t in lora.items() if "lora_B" in n)
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == digest
    plain, _ = load_selector(out)
    model = load_adapters(out, ["plus3", "plus7"])
    scores = {}
    for name, shift in (("plus3", 3), ("plus7", 7)):
        windows, cands, labels = eval_batch(shift)
        model.set_adapter(name)
        scores[name] = model(windows, cands).logits.detach()
        assert accuracy(scores[name], labels) > accuracy(plain.score(windows, cands), labels) + 0.2
        with model.disable_adapter():
            assert torch.equal(model(windows, cands).logits, plain.score(windows, cands))
    windows, cands, _ = eval_batch(3)
    model.set_adapter("plus7")
    assert not torch.allclose(model(windows, cands).logits.detach(), scores["plus3"])
    model.set_adapter("plus3")
    assert torch.equal(model(windows, cands).logits.detach(), scores["plus3"])
    model.save_pretrained(tmp_path / "again", selected_adapters=["plus3"])
    reloaded = PeftModel.from_pretrained(load_selector(out)[0], tmp_path / "again" / "plus3", adapter_name="plus3")
    assert torch.equal(reloaded(windows, cands).logits.detach(), scores["plus3"])
    with pytest.raises(FileNotFoundError, match="adapter 'nope' not found.*plus3"):
        load_adapters(out, ["nope"])


def test_resume_matches_uninterrupted_run(tmp_path, data_a):
    settings = dict(data=str(data_a), steps=20, **TINY | {"save_every": 10})
    full = train(TrainConfig(out=str(tmp_path / "full"), **settings), progress=False)

    class Stop(Exception):
        pass

    def stop_at_10(step: int, metrics: dict) -> None:
        if step == 10:
            raise Stop

    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        train(TrainConfig(out=str(cut), **settings), progress=False, on_step=stop_at_10)
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 10
    resumed = train(TrainConfig(out=str(cut), resume=True, **settings), progress=False)
    assert resumed.step == 20 and [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    a, b = params_of(tmp_path / "full"), params_of(cut)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    with pytest.raises(ValueError, match="lr: checkpoint 0.01 vs now 0.02"):
        train(TrainConfig(out=str(cut), resume=True, **settings | {"lr": 2e-2}), progress=False)


def test_hf_causal_lm_as_base(tmp_path, data_a):
    torch.manual_seed(0)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    result = train(TrainConfig(data=str(data_a), out=str(tmp_path / "out"), base=str(gpt2), steps=10,
                               **TINY | {"eval_every": 5}), progress=False)
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]
    model, _ = load_selector(tmp_path / "out")
    assert isinstance(model, HFCausalSelector)


def test_config_fields_all_have_defaults_and_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.default is not dataclasses.MISSING and f.metadata.get("help"), f.name
    assert config_from_kwargs(steps=5, lr=None).steps == 5
    with pytest.raises(TypeError, match="unknown training option"):
        config_from_kwargs(stepz=5)
    with pytest.raises(ValueError, match="n_embd \\(30\\) must be divisible"):
        TrainConfig(n_embd=30, n_head=4)


def test_input_errors(tmp_path, data_a, base):
    empty = write_dataset(tmp_path / "empty", shift=1, chains=0)
    with pytest.raises(ValueError, match="empty"):
        train(TrainConfig(data=str(empty), out=str(tmp_path / "o1"), **TINY), progress=False)
    for bad_k, bad_big_k in ((0, 8), (8, 1)):
        bad = write_dataset(tmp_path / f"bad{bad_k}{bad_big_k}", shift=1, chains=2,
                            k_=max(bad_k, 1), big_k=max(bad_big_k, 2))
        manifest = json.loads((bad / "manifest.json").read_text()) | {"k": bad_k, "K": bad_big_k}
        (bad / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="need k ≥ 1" if bad_k == 0 else "need K ≥ 2"):
            train(TrainConfig(data=str(bad), out=str(tmp_path / "o2"), **TINY), progress=False)
    other = write_dataset(tmp_path / "other", shift=1, chains=4, tok_hash="different")
    with pytest.raises(ValueError, match=r"base model .* uses another tokenizer than dataset \(different\)"):
        train(TrainConfig(data=str(other), out=str(base), lora=True, **TINY), progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{broken} is missing model.safetensors"):
        train(TrainConfig(data=str(data_a), out=str(broken), lora=True, **TINY), progress=False)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o3"), **TINY), progress=False)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: asking for it is no error here (test_trains_on_cuda runs)")
def test_cuda_without_a_gpu_is_an_error(tmp_path, data_a):
    with pytest.raises(RuntimeError, match="CUDA was requested"):
        train(TrainConfig(data=str(data_a), out=str(tmp_path / "o4"), device="cuda", **TINY), progress=False)


@pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False")
def test_trains_on_cuda(tmp_path, data_a):
    """On a GPU the run trains there (its tensors take GPU memory, it reports cuda), learns, and the saved model
    scores on the GPU."""
    torch.cuda.reset_peak_memory_stats()
    result = train(TrainConfig(data=str(data_a), out=str(tmp_path / "cuda"), device="cuda", steps=40, **TINY),
                   progress=False)
    assert torch.device(result.device).type == "cuda"
    assert torch.cuda.max_memory_allocated() > 4 * result.params  # at least the fp32 weights lived on the GPU
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"] and result.eval_accuracy > 0.5
    model, _ = load_selector(tmp_path / "cuda")
    model = model.to("cuda").eval()
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    windows, cands, labels = eval_batch(shift=1)
    with torch.no_grad():
        scores = model.score(windows.to("cuda"), cands.to("cuda"))
    assert scores.device.type == "cuda" and accuracy(scores.cpu(), labels) > 0.5


def test_held_out_split_from_dev_flags_or_last_chains():
    chain = np.repeat(np.arange(40), 5)
    assert held_out_mask(chain).sum() == 10 and set(chain[held_out_mask(chain)]) == {38, 39}
    dev = np.isin(chain, [0, 5])
    assert set(chain[held_out_mask(chain, dev)]) == {0, 5}
    assert set(chain[held_out_mask(chain, np.zeros(len(chain), bool))]) == {38, 39}
    assert not held_out_mask(np.zeros(9, dtype=np.int64)).any()



def test_epochs_and_max_rows(tmp_path, data_a):
    result = train(TrainConfig(data=str(data_a), out=str(tmp_path / "o"), epochs=2, max_rows=300, **TINY),
                   progress=False)
    assert result.rows_train + result.rows_eval == 300
    assert result.step == 2 * (result.rows_train // 64)
