"""Train the IT-LM selector (or a per-domain LoRA adapter on it) on token-level windows from Parquet shards.

One dataclass config (TRL style), one ``train`` entry point. Rows are held in memory as tensors; batches
are drawn by a permutation seeded per epoch, so the data order is a function of the step alone and a
resumed run replays exactly what an uninterrupted run would have done.
"""

import filecmp
import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from overlay.configs import TrainConfig
from overlay.dataset import target_mask
from overlay.peer import peer_accuracy, peer_batch, peer_model
from overlay.selector import (
    LORA_TARGETS,
    TOKENIZER_FILE,
    HFCausalSelector,
    QASelector,
    QASelectorConfig,
    WEIGHTS_FILE,
    Selector,
    SelectorConfig,
    SelectorModel,
    check_model_folder,
    load_model,
    replace_dir,
    resolve_device,
    save_selector,
    unwrap,
)
from overlay.selector.batches import ChainSource, collate, load_chains_with_rows, make_example
from overlay.selector.state import NumberSpans, token_texts
from overlay.table import check_domain
from overlay.tokenizer import check_tokenizers, load_tokenizer, tokenizer_hash

RUN_FIELDS = {"out", "device", "threads", "eval_every", "save_every", "resume"}


def config_from_kwargs(**kw: object) -> TrainConfig:
    """Build a TrainConfig from CLI/keyword options; None means "use the default", unknown names are an error."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}; valid: {sorted(names)}")
    return TrainConfig(**{k: v for k, v in kw.items() if v is not None})


@dataclass
class TrainResult:
    """What a run did: final step, losses, held-out accuracy@1 over candidates, speed, sizes, history."""

    out: str
    adapter: str
    step: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    tokens_per_s: float
    seconds: float
    params: int
    trainable_params: int
    rows_train: int
    rows_eval: int
    device: str
    history: list[dict] = field(default_factory=list)


@dataclass
class Rows:
    """Dataset rows in memory: windows [N,k], candidates [N,K], labels [N], chain ids [N], dev-split flags [N]."""

    window: torch.Tensor
    candidates: torch.Tensor
    label: torch.Tensor
    chain: torch.Tensor
    dev: torch.Tensor

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch as int64 tensors on device."""
        return (self.window[idx].long().to(device), self.candidates[idx].long().to(device),
                self.label[idx].long().to(device))


def read_manifest(folder: str | Path) -> dict:
    """Load and validate manifest.json: k ≥ 1, K ≥ 2, rows > 0, tokenizer.json next to it."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"dataset folder {folder} has no manifest.json")
    manifest = json.loads(path.read_text())
    k, big_k = int(manifest.get("k", 0)), int(manifest.get("K", 0))
    if k < 1:
        raise ValueError(f"dataset {folder}: window length k={k} in manifest.json, need k ≥ 1")
    if big_k < 2:
        raise ValueError(f"dataset {folder}: K={big_k} candidates in manifest.json, need K ≥ 2 to choose among")
    if int(manifest.get("rows", 0)) <= 0:
        raise ValueError(f"dataset {folder} is empty: manifest.json says it has 0 rows")
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"dataset folder {folder} has no {TOKENIZER_FILE} (the builder writes it there)")
    return manifest


def _list_column(table, name: str, width: int, folder: Path) -> np.ndarray:
    """A list<int> column as an [N,width] int32 array; every row must have exactly width entries."""
    column = table.column(name).combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    if len(flat) != len(table) * width:
        raise ValueError(f"dataset {folder}: column {name!r} rows must all have length {width} (from manifest.json)")
    return flat.astype(np.int32, copy=False).reshape(len(table), width)


def load_rows(folder: str | Path, manifest: dict, max_rows: int = 0) -> Rows:
    """Read the shards listed in the manifest (or shard-*.parquet) into tensors, up to max_rows rows."""
    folder = Path(folder)
    names = manifest.get("shards") or sorted(p.name for p in folder.glob("shard-*.parquet"))
    k, big_k = int(manifest["k"]), int(manifest["K"])
    parts, total = [], 0
    for name in names:
        if max_rows and total >= max_rows:
            break
        columns = ["window", "candidates", "label", "chain"]
        has_split = "split" in pq.read_schema(folder / name).names
        table = pq.read_table(folder / name, columns=columns + ["split"] * has_split)
        if max_rows:
            table = table.slice(0, max_rows - total)
        total += len(table)
        parts.append((_list_column(table, "window", k, folder), _list_column(table, "candidates", big_k, folder),
                      table.column("label").to_numpy().astype(np.int64), table.column("chain").to_numpy().astype(np.int64),
                      np.asarray(table.column("split").to_pylist()) == "dev" if has_split else np.zeros(len(table), bool)))
    if total == 0:
        raise ValueError(f"dataset {folder} is empty: its shards hold 0 rows")
    window, cands, label, chain, dev = (np.concatenate(cols) for cols in zip(*parts))
    bad = (label < 0) | (label >= big_k)
    if bad.any():
        raise ValueError(f"dataset {folder}: {int(bad.sum())} labels outside 0..{big_k - 1}")
    return Rows(torch.from_numpy(window), torch.from_numpy(cands), torch.from_numpy(label), torch.from_numpy(chain),
                torch.from_numpy(dev))


def held_out_mask(chain: np.ndarray, dev: np.ndarray | None = None) -> np.ndarray:
    """Rows kept out of training: the dataset's ``split == "dev"`` rows, else the top chain ids covering ≥ 5% of rows."""
    if dev is not None and dev.any():
        return dev
    ids, counts = np.unique(chain, return_counts=True)
    if len(ids) < 2:
        return np.zeros(len(chain), dtype=bool)
    covered = np.cumsum(counts[::-1])
    n_chains = min(int(np.searchsorted(covered, 0.05 * len(chain))) + 1, len(ids) - 1)
    return np.isin(chain, ids[len(ids) - n_chains:])


def _model_hash(model: Selector, folder: Path | None) -> str:
    """The tokenizer fingerprint a model was trained with: its config's, else its folder's tokenizer.json."""
    stored = getattr(model.config, "tokenizer_hash", "") or ""
    if stored or folder is None or not (folder / TOKENIZER_FILE).is_file():
        return stored
    return tokenizer_hash(load_tokenizer(folder))


def check_compatible(model: Selector, manifest: dict, folder: Path | None) -> None:
    """Raise ValueError when the dataset's window, vocabulary or tokenizer does not fit the base model."""
    where = f"base model {folder}" if folder else "model"
    if isinstance(model, (SelectorModel, QASelector)):
        if isinstance(model, SelectorModel) and int(manifest["k"]) > model.config.window:
            raise ValueError(f"window: dataset k={manifest['k']} is longer than {where}'s k={model.config.window}")
        if manifest.get("vocab_size") is not None and int(manifest["vocab_size"]) != model.config.vocab_size:
            raise ValueError(f"vocab_size does not match: dataset {manifest['vocab_size']}, "
                             f"{where} {model.config.vocab_size}")
    elif manifest.get("vocab_size") is not None:
        rows = model.model.get_output_embeddings().weight.shape[0]
        if int(manifest["vocab_size"]) > rows:
            raise ValueError(f"vocab_size does not match: dataset {manifest['vocab_size']}, {where} has {rows} rows")
    check_tokenizers({"dataset": manifest.get("tokenizer_hash") or "", where: _model_hash(model, folder)})


def lr_lambda(total: int, warmup: int, min_lr: float) -> Callable[[int], float]:
    """Linear warmup to 1 then cosine decay to min_lr (a ratio), as a LambdaLR factor of the step."""
    warmup = min(warmup, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The row permutation of one epoch, from a generator seeded by (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row positions of one batch: epoch step // batches-per-epoch, permuted by a generator seeded per epoch."""
    epoch, j = divmod(step, max(1, n // batch_size))
    return _epoch_order(n, seed, epoch)[j * batch_size:(j + 1) * batch_size]


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file then os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (the whole model, or only the LoRA weights)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, config: TrainConfig,
                    history: list) -> None:
    """Write trainable weights, optimizer, scheduler, RNG, step and config to folder atomically."""
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        weights = {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        _write_json(tmp / "state.json", {"step": step, "config": asdict(config), "history": history})
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig) -> tuple[int, list]:
    """Restore a checkpoint written by save_checkpoint; returns (step, history). Settings must match."""
    state = json.loads((folder / "state.json").read_text())
    saved, now = asdict(TrainConfig()) | state["config"], asdict(config)  # options added later count as defaults
    changed = sorted(k for k in now if k not in RUN_FIELDS and saved.get(k) != now[k])
    if changed:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume from {folder} with different settings ({detail}); "
                         "repeat the original options or start without resume")
    weights = load_file(str(folder / "trainable.safetensors"))
    params = _trainable(model)
    if set(weights) != set(params):
        raise ValueError(f"checkpoint {folder} does not hold this model's trainable parameters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt"))
    rng = torch.load(folder / "rng.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"]), state["history"]


def _same_model(a: Path, b: Path) -> bool:
    """Whether two model folders hold byte-identical config and weights."""
    return all((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False)
               for n in ("config.json", WEIGHTS_FILE))


def _build(config: TrainConfig, manifest: dict, out: Path) -> tuple[torch.nn.Module, str]:
    """The model to train and the adapter name ("" for a full run); LoRA wraps a frozen base with peft."""
    if config.lora:
        name = config.domain or (manifest.get("table") or {}).get("domain") or ""
        if not name:
            raise ValueError("lora=True needs an adapter name: give domain (the manifest names no table domain)")
        if check_domain(name).startswith("."):
            raise ValueError(f"adapter name {name!r} must not start with '.': it names a folder")
        base = Path(config.base) if config.base else out
        model = load_model(check_model_folder(base))
        check_compatible(model, manifest, base)
        if base.resolve() != out.resolve():
            if not (out / "config.json").is_file():
                save_selector(model, base, out)
            elif not _same_model(base, out):
                raise ValueError(f"{out} already holds a different model than base {base}: adapters in {out} "
                                 "must belong to the model stored there")
        targets = [t.strip() for t in config.target_modules.split(",") if t.strip()]
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets or (list(LORA_TARGETS) if isinstance(model, (SelectorModel, QASelector)) else None))
        return get_peft_model(model, lora, adapter_name=name), name
    if config.base:
        base = check_model_folder(config.base, tokenizer=False)
        model = load_model(base)
        check_compatible(model, manifest, base)
        return model, ""
    tok_hash = manifest.get("tokenizer_hash") or ""
    if config.arch == "qa":
        return QASelector(QASelectorConfig(
            vocab_size=int(manifest["vocab_size"]), n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
            dropout=config.dropout, question_len=config.question_len, attn_span=config.chain_span,
            result_tokens=config.result_tokens, candidates=int(manifest["K"]), tokenizer_hash=tok_hash)), ""
    if config.arch == "peer":
        return peer_model(int(manifest["vocab_size"]), config.n_layer, config.n_head, config.n_embd,
                          n_positions=config.question_len + config.max_chain + 1, tokenizer_hash=tok_hash,
                          dropout=config.dropout), ""
    model = SelectorModel(SelectorConfig(
        vocab_size=int(manifest["vocab_size"]), window=int(manifest["k"]), n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, positions=config.positions,
        attn_span=config.attn_span, tokenizer_hash=manifest.get("tokenizer_hash") or ""))
    return model, ""


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norms are not decayed), nanoGPT style."""
    params = list(_trainable(model).values())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.95))


def train(config: TrainConfig, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train per config; ``on_step(step, metrics)`` runs after every step (and its checkpoint, if any).

    ``threads`` applies for the duration of the run only; torch's previous setting is restored afterwards.
    """
    if not config.data:
        raise ValueError("data: give the dataset folder")
    device = resolve_device(config.device)
    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, device, progress, on_step)
    finally:
        torch.set_num_threads(previous)


class WindowSource:
    """Batches of token windows (the window selector's rows), drawn as ``batch_indices`` says."""

    def __init__(self, train: Rows, held: Rows, batch_size: int, seed: int, device: torch.device) -> None:
        self.train, self.held, self.batch_size, self.seed, self.device = train, held, batch_size, seed, device

    def __len__(self) -> int:
        return len(self.train)

    def batch(self, step: int) -> dict:
        """The rows of one training step as model keyword arguments."""
        window, cands, label = self.train.take(batch_indices(step, len(self.train), self.batch_size, self.seed), self.device)
        return {"input_ids": window, "candidate_ids": cands, "labels": label}

    def held_out(self, chunk: int = 4096) -> Iterator[dict]:
        """The held-out rows in chunks."""
        for start in range(0, len(self.held), chunk):
            window, cands, label = self.held.take(torch.arange(start, min(start + chunk, len(self.held))), self.device)
            yield {"input_ids": window, "candidate_ids": cands, "labels": label}


def _window_source(config: TrainConfig, data: Path, manifest: dict, device: torch.device) -> WindowSource:
    """Rows split into training and held-out (a seeded sample of eval_rows) for the window selector."""
    rows = load_rows(data, manifest, config.max_rows)
    held = torch.from_numpy(held_out_mask(rows.chain.numpy(), rows.dev.numpy()))
    train_idx, eval_idx = (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)
    if len(train_idx) == 0:
        raise ValueError(f"dataset {data}: every row is in the held-out split, nothing left to train on")
    if config.eval_rows and len(eval_idx) > config.eval_rows:
        pick = torch.randperm(len(eval_idx), generator=torch.Generator().manual_seed(config.seed))
        eval_idx = eval_idx[pick[:config.eval_rows].sort().values]
    cols = (rows.window, rows.candidates, rows.label, rows.chain, rows.dev)
    return WindowSource(Rows(*(c[train_idx] for c in cols)), Rows(*(c[eval_idx] for c in cols)), config.batch_size,
                        config.seed, device)


def _chain_source(config: TrainConfig, model: torch.nn.Module, data: Path, manifest: dict,
                  device: torch.device) -> ChainSource:
    """Whole chains for the question-aware selector (examples with copy labels) or the full-context peer."""
    chains = load_chains_with_rows(data, manifest, config.max_rows)
    base = unwrap(model)
    if isinstance(base, QASelector):
        numbers = NumberSpans(token_texts(load_tokenizer(data)))
        examples = [make_example(ids, plen, *rows, numbers, base.config, config.max_chain) for ids, plen, _, rows in chains]
        collate_fn: Callable[[list], dict] = lambda batch: collate(batch, device)  # noqa: E731
    else:
        limit = int(getattr(base.config, "n_positions", 1024))
        examples = [(ids, target_mask(ids)) for ids, _, _, _ in chains]
        collate_fn = lambda batch: peer_batch(batch, limit, device)  # noqa: E731
    dev = [d for _, _, d, _ in chains]
    train = [e for e, d in zip(examples, dev) if not d]
    held = [e for e, d in zip(examples, dev) if d]
    if not train:
        raise ValueError(f"dataset {data}: every chain is in the held-out split, nothing left to train on")
    if config.eval_rows:
        held = held[:max(1, config.eval_rows // 100)]
    return ChainSource(train, held, collate_fn, config.chains_per_batch, config.seed)


def _correct(output: Any, batch: dict) -> tuple[int, int]:
    """(correct, scored) predictions of one batch: candidate accuracy@1, or next-token accuracy for the peer."""
    labels = batch["labels"]
    if output.logits.dim() == 3:
        return peer_accuracy(output.logits, labels)
    scored = labels != -100
    return int(((output.logits.argmax(-1) == labels) & scored).sum()), int(scored.sum())


def evaluate_source(model: torch.nn.Module, source: Any, autocast: Callable) -> tuple[float, float]:
    """Mean loss and accuracy@1 over a source's held-out batches (weighted by scored positions)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, scored = 0.0, 0, 0
    with torch.inference_mode(), autocast():
        for batch in source.held_out():
            output = model(**batch)
            hit, n = _correct(output, batch)
            loss_sum += output.loss.item() * n
            correct, scored = correct + hit, scored + n
    model.train(was_training)
    return loss_sum / max(1, scored), correct / max(1, scored)


def _run(config: TrainConfig, device: torch.device, progress: bool,
         on_step: Callable[[int, dict], None] | None) -> TrainResult:
    """The training loop behind ``train``: one loop for window rows and whole chains."""
    data, out = Path(config.data), Path(config.out)
    manifest = read_manifest(data)
    if "vocab_size" not in manifest and not (config.base or config.lora):
        raise ValueError(f"dataset {data}: manifest.json has no vocab_size to size a new model")
    torch.manual_seed(config.seed)
    model, adapter = _build(config, manifest, out)
    model.to(device).train()
    base = unwrap(model)
    windows = isinstance(base, (SelectorModel, HFCausalSelector)) and not getattr(base.config, "overlay_peer", False)
    source = (_window_source(config, data, manifest, device) if windows
              else _chain_source(config, model, data, manifest, device))
    per_epoch = len(source) // (config.batch_size if windows else config.chains_per_batch)
    total = config.epochs * max(1, per_epoch) if config.epochs else config.steps
    params = list(_trainable(model).values())
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, config.warmup, config.min_lr))
    ckpt = out / (f"checkpoint-{adapter}" if adapter else "checkpoint")
    step, history = 0, []
    if config.resume and (ckpt / "state.json").is_file():
        step, history = load_checkpoint(ckpt, model, optimizer, scheduler, config)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast():
        """bf16 autocast on CUDA, nothing on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    processed, loss_sum, acc_sum, seen = 0, 0.0, 0.0, 0
    last_train = last_eval = last_acc = None
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"lora {adapter}" if adapter else "train")
    while step < total:
        batch = source.batch(step)
        with autocast():
            output = model(**batch)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        hit, scored = _correct(output, batch)
        processed += scored
        loss, acc = output.loss.item(), hit / max(1, scored)
        loss_sum, acc_sum, seen = loss_sum + loss, acc_sum + acc, seen + 1
        metrics = {"loss": loss, "accuracy": acc, "lr": scheduler.get_last_lr()[0]}
        if (config.eval_every and step % config.eval_every == 0) or step == total:
            last_train = loss_sum / seen
            entry = {"step": step, "train_loss": last_train, "train_accuracy": acc_sum / seen, "lr": metrics["lr"]}
            if source.held:
                last_eval, last_acc = evaluate_source(model, source, autocast)
                entry |= {"eval_loss": last_eval, "eval_accuracy": last_acc}
            history.append(entry)
            metrics |= entry
            loss_sum, acc_sum, seen = 0.0, 0.0, 0
        if config.save_every and (step % config.save_every == 0 or step == total):
            save_checkpoint(ckpt, model, optimizer, scheduler, step, config, history)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}",
                        **({"eval_acc": f"{last_acc:.3f}"} if last_acc is not None else {}))
        if on_step is not None:
            on_step(step, metrics)
    bar.close()
    seconds = time.perf_counter() - start
    if last_train is None and history:
        last = history[-1]
        last_train, last_eval, last_acc = last["train_loss"], last.get("eval_loss"), last.get("eval_accuracy")
    model.eval()
    target = _save(model, adapter, data, out)
    result = TrainResult(
        out=str(target), adapter=adapter, step=step, train_loss=last_train, eval_loss=last_eval,
        eval_accuracy=last_acc, tokens_per_s=processed / seconds if seconds else 0.0,
        seconds=seconds, params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in params), rows_train=len(source),
        rows_eval=len(source.held), device=str(device), history=history)
    _write_json(target / "train_result.json", asdict(result) | {"config": asdict(config)})
    return result


def _save(model: torch.nn.Module, adapter: str, data: Path, out: Path) -> Path:
    """Write the trained model (config, safetensors, tokenizer.json) or only the adapter to OUT/adapters/NAME."""
    if not adapter:
        if (out / "adapters").is_dir():
            warnings.warn(f"{out / 'adapters'} holds adapters trained on the model this run replaces; retrain them")
        return save_selector(model, data / TOKENIZER_FILE, out)
    root = out / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{adapter}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp), selected_adapters=[adapter])
        replace_dir(tmp / adapter if adapter != "default" else tmp, root / adapter)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / adapter


def load_adapters(model_folder: str | Path, names: str | Sequence[str], device: str = "cpu") -> PeftModel:
    """Load the base selector in model_folder with its adapters (OUT/adapters/NAME); the first one is active."""
    folder = Path(model_folder)
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("give at least one adapter name")
    paths = [folder / "adapters" / name for name in names]
    for name, path in zip(names, paths):
        if not (path / "adapter_config.json").is_file():
            have = sorted(p.parent.name for p in (folder / "adapters").glob("*/adapter_config.json"))
            raise FileNotFoundError(f"adapter {name!r} not found in {folder / 'adapters'} (available: {have or 'none'})")
    model = load_model(check_model_folder(folder), device)
    peft_model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.set_adapter(names[0])
    return peft_model.eval()

