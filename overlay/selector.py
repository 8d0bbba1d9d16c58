"""The IT-LM selector: a small causal transformer over the last k tokens that scores only K table candidates.

Scoring gathers the candidates' rows of the (tied) output embedding and dots them with the last hidden
state, so a decode step costs one forward over k tokens plus K dot products: independent of chain length
and of vocabulary size (an ALiBi selector with an attention span keeps each chain's keys and values and
computes one new row per block instead). Full-vocabulary logits exist only for training (optional extra loss
term) and for the evaluation baseline.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers import initialization as init
from transformers.utils import ModelOutput

from overlay.tokenizer import load_tokenizer

PAD_ID = 0
SQRT_HALF = np.float32(math.sqrt(0.5))
IGNORE_INDEX = -100
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX, TOKENIZER_FILE = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json")


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" / "cpu" / "cuda[:n]" to a torch.device; asking for CUDA without it is an error, not a fallback."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"CUDA was requested but torch.cuda.is_available() is False (device {name!r}); "
            "use device='cpu' or 'auto', or install a CUDA build of torch on a machine with a GPU")
    return device


class SelectorConfig(PretrainedConfig):
    """Shape of the selector: vocabulary, window length k, depth, heads, width; PAD (id 0) is masked out.

    ``positions="slot"`` (the default) adds a learned embedding per window slot and every token attends to the
    whole window before it. ``positions="alibi"`` with ``attn_span`` = s > 0 makes every token attend only to
    its own last s tokens with a linear distance penalty (ALiBi) and no slot embedding: a token's keys and
    values then never change once computed, so decoding keeps them (``CachedScorer``) and computes one new row
    per block per token. Such a model needs window ≥ n_layer·(s − 1) + 1 (its receptive field).
    """

    model_type = "overlay-selector"

    vocab_size: int = 2000
    window: int = 8
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int | None = PAD_ID
    tokenizer_hash: str = ""
    positions: str = "slot"
    attn_span: int = 0

    @property
    def receptive_field(self) -> int:
        """How many tokens the last position's output can depend on."""
        return alibi_window(self.n_layer, self.attn_span) if self.attn_span else self.window

    def check_positions(self) -> None:
        """Reject a position scheme that cannot work, naming the field."""
        if self.positions not in ("slot", "alibi"):
            raise ValueError(f"positions must be 'slot' or 'alibi', got {self.positions!r}")
        if self.positions == "alibi" and self.attn_span < 1:
            raise ValueError("positions='alibi' needs attn_span ≥ 1 (the tokens each token attends to)")
        if self.attn_span < 0 or self.attn_span > self.window or self.receptive_field > self.window:
            raise ValueError(f"attn_span={self.attn_span} with {self.n_layer} layers sees {self.receptive_field} tokens, "
                             f"more than the window k={self.window}; use window ≥ n_layer·(attn_span − 1) + 1")


def alibi_window(n_layer: int, attn_span: int) -> int:
    """The receptive field of ``n_layer`` blocks that each attend to ``attn_span`` tokens: the window an ALiBi
    selector's training rows need."""
    return n_layer * (attn_span - 1) + 1


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head distance penalties 2^(-8(i+1)/h) (Press et al., 2022)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / n_head) for i in range(n_head)])


@dataclass
class SelectorOutput(ModelOutput):
    """Candidate scores [B,K], optional loss, per-layer hidden states / attention maps, full-vocab logits."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    full_logits: torch.Tensor | None = None


def key_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int = PAD_ID) -> torch.Tensor:
    """Boolean [B,T] mask of real tokens: the given attention_mask, else every id that is not PAD."""
    return attention_mask.bool() if attention_mask is not None else input_ids != pad_id


def candidate_head(
    last: torch.Tensor,
    weight: torch.Tensor,
    candidate_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    full_vocab_weight: float,
    bias: torch.Tensor | None = None,
    pad_id: int = PAD_ID,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Score candidates by gathering output-embedding rows; PAD candidates get -inf-like scores (never chosen).

    Returns (loss, candidate logits, full logits). The loss is cross-entropy over the candidate set against
    ``labels`` (indices into candidates), plus ``full_vocab_weight`` × full-vocabulary cross-entropy against
    the target tokens ``candidates[label]``, computed only when that weight is positive.
    """
    if candidate_ids is None:
        if labels is not None:
            raise ValueError("labels index into candidate_ids, so candidate_ids must be given with labels")
        return None, None, None
    if candidate_ids.dim() != 2 or candidate_ids.shape[0] != last.shape[0]:
        raise ValueError(f"candidate_ids must be [B,K] with B={last.shape[0]}, got {tuple(candidate_ids.shape)}")
    rows = weight[candidate_ids]
    logits = torch.einsum("bd,bkd->bk", last, rows.to(last.dtype))
    if bias is not None:
        logits = logits + bias[candidate_ids].to(logits.dtype)
    logits = logits.masked_fill(candidate_ids == pad_id, torch.finfo(logits.dtype).min)
    if labels is None:
        return None, logits, None
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    full = None
    if full_vocab_weight > 0:
        full = last @ weight.to(last.dtype).T
        if bias is not None:
            full = full + bias.to(full.dtype)
        target = candidate_ids.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        target = target.masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
        loss = loss + full_vocab_weight * F.cross_entropy(full.float(), target, ignore_index=IGNORE_INDEX)
    return loss, logits, full


class Attention(nn.Module):
    """Multi-head causal self-attention written out, so attention probabilities can be returned."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_proj = True
        self.attn_drop = nn.Dropout(config.dropout)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend where ``allowed`` [B,1,T,T] is True, scores plus ``bias`` [1,h,T,T] (ALiBi) when given;
        returns (output, probabilities [B,h,T,T])."""
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if bias is not None:
            att = att + bias
        att = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = (self.attn_drop(att) @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.c_proj(y)), att


class MLP(nn.Module):
    """Position-wise feed-forward layer (4× width, GELU)."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_proj = True
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand, GELU, project back."""
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block (nanoGPT shape)."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual attention then residual MLP; returns (x, attention probabilities)."""
        a, att = self.attn(self.ln_1(x), allowed, bias)
        x = x + a
        return x + self.mlp(self.ln_2(x)), att


class SelectorModel(PreTrainedModel):
    """Causal transformer over a k-token window that scores K candidate next tokens."""

    config_class = SelectorConfig
    base_model_prefix = "selector"
    main_input_name = "input_ids"

    def __init__(self, config: SelectorConfig) -> None:
        config.check_positions()
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "slot":
            self.wpe = nn.Embedding(config.window, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        if not config.tie_word_embeddings:
            self.out_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, 0.02) everywhere; residual projections scaled by 1/sqrt(2·n_layer) (GPT-2 scheme)."""
        super()._init_weights(module)
        if getattr(module, "residual_proj", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (also the output embedding when tied)."""
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.wte = value

    @property
    def output_weight(self) -> torch.Tensor:
        """[V,d] rows that candidates are scored against: the input embedding when tied."""
        return self.wte.weight if self.config.tie_word_embeddings else self.out_emb.weight

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Run the blocks; returns (last position's final hidden [B,d], hidden states, attention maps).

        Windows are right-aligned to positions k-T..k-1, so the last token always sits at position k-1.
        ``hidden_states`` has n_layer+1 entries [B,T,d] (embeddings, then the residual stream after each block);
        PAD positions never influence real ones (each PAD query attends only to itself, so nothing is NaN).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B,k], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        k = self.config.window
        if not 1 <= t <= k:
            raise ValueError(f"window length {t} must be between 1 and the model's window k={k}")
        real = key_mask(input_ids, attention_mask, self.config.pad_token_id)
        eye = torch.eye(t, dtype=torch.bool, device=input_ids.device)
        pos = torch.arange(t, device=input_ids.device)
        distance = pos[:, None] - pos[None, :]
        causal = distance >= 0
        if self.config.attn_span:
            causal = causal & (distance < self.config.attn_span)
        allowed = (causal & real[:, None, :]) | eye
        allowed = allowed[:, None, :, :]
        bias = None
        if self.config.positions == "slot":
            x = self.drop(self.wte(input_ids) + self.wpe(pos + k - t))
        else:
            x = self.drop(self.wte(input_ids))
            slopes = alibi_slopes(self.config.n_head).to(x.device)  # not a buffer: from_pretrained leaves those empty
            bias = (-slopes[:, None, None] * distance.clamp(min=0)).to(x.dtype)[None]
        hiddens, atts = [x], []
        for block in self.h:
            x, att = block(x, allowed, bias)
            hiddens.append(x)
            atts.append(att)
        last = self.ln_f(x[:, -1])
        return (last, tuple(hiddens) if output_hidden_states else None,
                tuple(atts) if output_attentions else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        candidate_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        full_vocab_weight: float = 0.0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        attention_mask: torch.Tensor | None = None,
        **_: object,
    ) -> SelectorOutput:
        """Candidate scores [B,K] (+ loss when labels are given); see ``candidate_head`` for the loss."""
        last, hiddens, atts = self.encode(input_ids, attention_mask, output_hidden_states, output_attentions)
        loss, logits, full = candidate_head(last, self.output_weight, candidate_ids, labels, full_vocab_weight,
                                            pad_id=self.config.pad_token_id)
        return SelectorOutput(loss=loss, logits=logits, hidden_states=hiddens, attentions=atts, full_logits=full)

    def score(self, input_ids: torch.Tensor, candidate_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode-path scores [B,K] for the given candidates, without autograd."""
        with torch.inference_mode():
            return self(input_ids, candidate_ids, attention_mask=attention_mask).logits

    def full_vocab_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits over the whole vocabulary [B,V]: for the evaluation baseline only."""
        with torch.inference_mode():
            last, _, _ = self.encode(input_ids, attention_mask)
            return last @ self.output_weight.T


class _DecodeView:
    """What the decode-time scorers share: they read a plain SelectorModel's modules and weights directly, so they
    are stale once the model trains, an adapter swaps one of its modules, or a weight they copied changes."""

    def __init__(self, model: SelectorModel, params: tuple[torch.Tensor, ...]) -> None:
        self.model = model
        self.slots = self.module_slots(model)
        self.params = params
        self.versions = self._versions()

    @staticmethod
    def plain(model: SelectorModel) -> bool:
        """True when every module read by a written-out forward is the stock one (no adapter layers)."""
        blocks = all(type(b.attn.c_attn) is nn.Linear and type(b.attn.c_proj) is nn.Linear and type(b.mlp.c_fc) is nn.Linear
                     and type(b.mlp.c_proj) is nn.Linear and type(b.ln_1) is nn.LayerNorm and type(b.ln_2) is nn.LayerNorm
                     for b in model.h)
        return blocks and type(model.wte) is nn.Embedding and type(model.ln_f) is nn.LayerNorm

    @staticmethod
    def module_slots(model: SelectorModel) -> list[tuple[dict, str, nn.Module]]:
        """(parent's module dict, name, module) for every module a written-out forward reads: adapters swap
        modules in place, which makes the written-out forward stale."""
        names = [(model, "wte"), (model, "ln_f")] + [(model, "wpe")] * ("wpe" in model._modules) + [
            (m, n) for b in model.h for m, ns in ((b, ("ln_1", "ln_2")), (b.attn, ("c_attn", "c_proj")),
                                                  (b.mlp, ("c_fc", "c_proj"))) for n in ns]
        return [(m._modules, n, m._modules[n]) for m, n in names]

    def _versions(self) -> tuple[int, ...]:
        """In-place modification counters of the weights this view copied or precomputed from."""
        return tuple(p._version for p in self.params)

    def usable(self, model: nn.Module | None) -> bool:
        """Still the same model, in eval mode, with no module replaced and no copied weight changed."""
        return (model is self.model and not model.training and all(d.get(n) is m for d, n, m in self.slots)
                and self._versions() == self.versions)


class FastScorer(_DecodeView):
    """``SelectorModel.score`` written out for decoding: the same weights and math without module-call
    overhead or mask building. The first block's layer norm and QKV projection depend only on (token, window
    slot), so they are a precomputed table read by index; the last block computes only the last position (the
    only one scored). Used for PAD-free windows of a plain SelectorModel in eval mode; anything else
    (adapters, HF causal LMs, padded windows) goes through ``model.score``.
    """

    table_limit_bytes = 64 * 2**20

    def __init__(self, model: SelectorModel) -> None:
        cfg = model.config
        self.n_embd, self.n_head, self.window, self.pad = cfg.n_embd, cfg.n_head, cfg.window, cfg.pad_token_id
        self.wte, self.wpe, self.out = model.wte.weight, model.wpe.weight, model.output_weight
        self.ln_f = (model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
        self.blocks = [((b.ln_1.weight, b.ln_1.bias, b.ln_1.eps), b.attn.c_attn.weight, b.attn.c_attn.bias,
                        b.attn.c_proj.weight, b.attn.c_proj.bias, (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps),
                        b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in model.h]
        first = self.blocks[0]
        super().__init__(model, (self.wte, self.wpe, *first[0][:2], first[1], first[2]))  # the QKV table's inputs
        self.qkv0 = self._qkv_table() if self.table_bytes(cfg) <= self.table_limit_bytes else None
        self.slot_index = torch.arange(self.window, device=self.wte.device)

    @classmethod
    def table_bytes(cls, cfg: SelectorConfig) -> int:
        """Size of the first block's (token, slot) → QKV table in float32."""
        return cfg.vocab_size * cfg.window * 3 * cfg.n_embd * 4

    @classmethod
    def build(cls, model: nn.Module | None) -> FastScorer | None:
        """The fast path for ``model`` when it is a plain SelectorModel, else None."""
        if type(model) is not SelectorModel or model.config.positions != "slot" or model.config.attn_span:
            return None
        return cls(model) if cls.plain(model) else None

    def _qkv_table(self) -> torch.Tensor:
        """[V, k, 3d]: the first block's QKV projection of token embedding + slot embedding, after its layer norm."""
        ln1, attn_w, attn_b = self.blocks[0][:3]
        with torch.inference_mode():
            x = self.wte[:, None, :] + self.wpe[None, : self.window, :]
            return F.linear(F.layer_norm(x, (self.n_embd,), *ln1), attn_w, attn_b).contiguous()

    def __call__(self, windows: torch.Tensor, cands: torch.Tensor, has_pad: bool = True) -> torch.Tensor:
        """Candidate logits [B,K] for full, PAD-free windows [B,k] and candidates [B,K]; PAD candidates are masked
        as ``model.score`` does (``has_pad=False`` says there are none, which saves the masking)."""
        b, t = windows.shape
        c, h = self.n_embd, self.n_head
        with torch.inference_mode():
            x = F.embedding(windows, self.wte) + self.wpe[self.window - t:]
            last = len(self.blocks) - 1
            for i, (ln1, attn_w, attn_b, proj_w, proj_b, ln2, fc_w, fc_b, out_w, out_b) in enumerate(self.blocks):
                if i == 0 and self.qkv0 is not None:
                    qkv = self.qkv0[windows, self.slot_index[self.window - t:]]
                else:
                    qkv = F.linear(F.layer_norm(x, (c,), *ln1), attn_w, attn_b)
                q, k, v = qkv.view(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
                if i < last:
                    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
                    x = x + F.linear(y, proj_w, proj_b)
                else:  # only the last position is scored: it attends to the whole window
                    y = F.scaled_dot_product_attention(q[:, :, -1:], k, v).reshape(b, c)
                    x = x[:, -1] + F.linear(y, proj_w, proj_b)
                x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (c,), *ln2), fc_w, fc_b)), out_w, out_b)
            final = F.layer_norm(x, (c,), *self.ln_f)
            logits = torch.bmm(F.embedding(cands, self.out).to(final.dtype), final.unsqueeze(-1)).squeeze(-1)
            return logits.masked_fill(cands == self.pad, torch.finfo(logits.dtype).min) if has_pad else logits


class KVCache:
    """One chain's state for ``CachedScorer``: per block the keys and values of its last ``attn_span`` tokens, in
    a ring (slot = tokens pushed modulo the span)."""

    def __init__(self, n_layer: int, n_head: int, span: int, head_dim: int) -> None:
        self.keys = np.zeros((n_layer, n_head, span, head_dim), np.float32)
        self.values = np.zeros((n_layer, n_head, span, head_dim), np.float32)
        self.reset(0)

    def reset(self, consumed: int) -> None:
        """Forget every token; the chain's first ``consumed`` ids count as seen (they are out of reach)."""
        self.pushed, self.consumed = 0, consumed


class CachedScorer(_DecodeView):
    """Decoding for a ``positions="alibi"`` selector with ``attn_span``: a token's keys and values never change
    once computed, so each chain keeps them (``KVCache``) and a new token costs one row per block, whatever the
    window. NumPy float32 on the CPU (at one row, torch's per-op cost dominates), layer-norm scales and shifts
    folded into the matrices that follow them, GELU as x·(1 + erf(x/√2))/2 with torch's erf. Scores equal
    ``model.score`` on the chain's last ``window`` tokens.
    """

    def __init__(self, model: SelectorModel) -> None:
        super().__init__(model, tuple(model.parameters()))
        cfg = model.config
        self.n_layer, self.n_head, self.span, self.pad = cfg.n_layer, cfg.n_head, cfg.attn_span, cfg.pad_token_id
        self.head_dim = cfg.n_embd // cfg.n_head
        self.receptive_field = cfg.receptive_field
        self.inv_n = np.full(cfg.n_embd, 1 / cfg.n_embd, np.float32)

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().double().cpu().numpy()

        def folded(ln: nn.LayerNorm, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
            """(W', b', eps) with LayerNorm(x) @ W + b == whiten(x) @ W' + b' (weight is [in, out])."""
            w, b = arr(ln.weight), arr(ln.bias)
            return (np.ascontiguousarray(w[:, None] * weight, np.float32), (b @ weight + bias).astype(np.float32), ln.eps)

        self.wte = arr(model.wte.weight).astype(np.float32)
        out = arr(model.output_weight)
        self.out_w, self.out_b, self.eps_f = folded(model.ln_f, out.T, np.zeros(len(out)))
        self.out_w = np.ascontiguousarray(self.out_w.T)
        self.blocks = [(folded(b.ln_1, arr(b.attn.c_attn.weight).T, arr(b.attn.c_attn.bias)),
                        np.ascontiguousarray(arr(b.attn.c_proj.weight).T, np.float32), arr(b.attn.c_proj.bias).astype(np.float32),
                        folded(b.ln_2, arr(b.mlp.c_fc.weight).T, arr(b.mlp.c_fc.bias)),
                        np.ascontiguousarray(arr(b.mlp.c_proj.weight).T, np.float32), arr(b.mlp.c_proj.bias).astype(np.float32))
                       for b in model.h]
        slopes = alibi_slopes(cfg.n_head).numpy().astype(np.float32)
        slot = np.arange(self.span)
        # bias[s][h, j]: penalty for ring slot j when the newest token sits in slot s (distance (s - j) mod span)
        self.bias = -slopes[None, :, None] * ((slot[:, None] - slot[None, :]) % self.span)[:, None, :].astype(np.float32)
        self.scale = np.float32(1 / math.sqrt(self.head_dim))

    @classmethod
    def build(cls, model: nn.Module | None) -> CachedScorer | None:
        """The cached path for a plain CPU SelectorModel with ALiBi positions and an attention span, else None."""
        if type(model) is not SelectorModel or model.config.positions != "alibi" or model.wte.weight.device.type != "cpu":
            return None
        return cls(model) if cls.plain(model) else None

    def new_cache(self) -> KVCache:
        """An empty cache for a new chain."""
        return KVCache(self.n_layer, self.n_head, self.span, self.head_dim)

    def _whiten(self, x: np.ndarray, eps: float) -> np.ndarray:
        """Layer norm without its scale and shift (those are folded into the next matrix)."""
        d = x - x @ self.inv_n
        return d * np.float32(1 / math.sqrt(float(d @ d) / len(d) + eps))

    def _push(self, cache: KVCache, token: int) -> np.ndarray:
        """Run one token through every block against the cached keys/values; returns its final residual [d]."""
        x = self.wte[token]
        slot = cache.pushed % self.span
        n = min(cache.pushed + 1, self.span)
        bias = self.bias[slot][:, :n]
        h, hd = self.n_head, self.head_dim
        for layer, ((attn_w, attn_b, eps1), proj_w, proj_b, (fc_w, fc_b, eps2), out_w, out_b) in enumerate(self.blocks):
            q, k, v = (self._whiten(x, eps1) @ attn_w + attn_b).reshape(3, h, hd)
            keys, values = cache.keys[layer], cache.values[layer]
            keys[:, slot], values[:, slot] = k, v
            att = np.einsum("hd,hkd->hk", q, keys[:, :n]) * self.scale + bias
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            x = x + np.einsum("hk,hkd->hd", att, values[:, :n]).reshape(-1) @ proj_w + proj_b
            u = self._whiten(x, eps2) @ fc_w + fc_b
            erf = torch.erf(torch.from_numpy(u * SQRT_HALF)).numpy()  # exact GELU; torch's own kernel is 4× slower here
            x = x + (u * (erf + 1) * np.float32(0.5)) @ out_w + out_b
        cache.pushed += 1
        cache.consumed += 1
        return x

    def scores(self, cache: KVCache, ids: list[int], candidates: list[int]) -> np.ndarray:
        """Candidate logits after the chain ``ids``: feeds the ids the cache has not seen yet (all of them again,
        from its last ``receptive_field`` tokens, when there are more than that), then scores the candidates."""
        pending = ids[cache.consumed:]
        if not pending:
            raise ValueError("the cache has already consumed every id: scores need at least one new token")
        if len(pending) > self.receptive_field:
            cache.reset(len(ids) - self.receptive_field)
            pending = ids[cache.consumed:]
        for token in pending:
            x = self._push(cache, token)
        cands = np.asarray(candidates)
        logits = self.out_w[cands] @ self._whiten(x, self.eps_f) + self.out_b[cands]
        logits[cands == self.pad] = np.finfo(np.float32).min
        return logits


class HFCausalSelector(nn.Module):
    """A user's local Hugging Face causal LM used as the selector, scoring candidates the same way."""

    def __init__(self, model: str | Path | PreTrainedModel, pad_token_id: int = PAD_ID) -> None:
        super().__init__()
        if isinstance(model, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True,
                                                         attn_implementation="eager")
        if model.get_output_embeddings() is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings to score candidates against")
        self.model = model
        self.config = model.config
        self.pad_token_id = pad_token_id

    def _base(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              output_hidden_states: bool = False, output_attentions: bool = False) -> ModelOutput:
        """Run the LM's base model (no LM head, so no full-vocabulary logits) with left padding masked."""
        mask = key_mask(input_ids, attention_mask, self.pad_token_id).long()
        return self.model.base_model(input_ids=input_ids, attention_mask=mask,
                                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                                     output_hidden_states=output_hidden_states, output_attentions=output_attentions)

    def forward(
        self,
        input_ids: torch.Tensor,
        candidate_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        full_vocab_weight: float = 0.0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        attention_mask: torch.Tensor | None = None,
        **_: object,
    ) -> SelectorOutput:
        """Same contract as SelectorModel.forward; left padding is masked and positions start at the first real token."""
        out = self._base(input_ids, attention_mask, output_hidden_states, output_attentions)
        last = out.last_hidden_state[:, -1]
        head = self.model.get_output_embeddings()
        loss, logits, full = candidate_head(last, head.weight, candidate_ids, labels, full_vocab_weight,
                                            bias=getattr(head, "bias", None), pad_id=self.pad_token_id)
        return SelectorOutput(loss=loss, logits=logits,
                              hidden_states=out.hidden_states if output_hidden_states else None,
                              attentions=out.attentions if output_attentions else None, full_logits=full)

    def score(self, input_ids: torch.Tensor, candidate_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode-path scores [B,K] for the given candidates, without autograd."""
        with torch.inference_mode():
            return self(input_ids, candidate_ids, attention_mask=attention_mask).logits

    def full_vocab_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits over the whole vocabulary [B,V]: for the evaluation baseline only."""
        with torch.inference_mode():
            last = self._base(input_ids, attention_mask).last_hidden_state[:, -1]
            head = self.model.get_output_embeddings()
            full = last @ head.weight.T
            return full if getattr(head, "bias", None) is None else full + head.bias

    def save_pretrained(self, folder: str | Path, **kwargs: object) -> None:
        """Save the wrapped causal LM the Hugging Face way (config.json + safetensors)."""
        self.model.save_pretrained(str(folder), **kwargs)


Selector = SelectorModel | HFCausalSelector


def replace_dir(tmp: Path, folder: Path) -> None:
    """Swap a completed ``tmp`` folder in for ``folder``; the previous folder survives until the swap is done."""
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def save_selector(model: Selector, tokenizer: PreTrainedTokenizerFast | str | Path, folder: str | Path) -> Path:
    """Write config.json, model.safetensors and tokenizer.json (an object, or a path to copy) atomically.

    Entries of an existing folder that the new save does not write (adapters/, checkpoint/, train_result.json)
    are carried over, so saving a model never loses its adapters or checkpoints.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(str(tmp))
        if isinstance(tokenizer, (str, Path)):
            src = Path(tokenizer)
            shutil.copy2(src / TOKENIZER_FILE if src.is_dir() else src, tmp / TOKENIZER_FILE)
        else:
            tokenizer.save_pretrained(str(tmp))
        if folder.is_dir():
            for entry in folder.iterdir():
                if not (tmp / entry.name).exists():
                    os.replace(entry, tmp / entry.name)
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_model_folder(folder: str | Path, tokenizer: bool = True) -> Path:
    """Raise FileNotFoundError naming the folder and each missing file (config, weights, tokenizer if asked)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is a LoRA adapter folder, not a model: load it with "
                                "overlay.train.load_adapters(<model folder>, [<adapter name>])")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    wanted = (CONFIG_FILE, TOKENIZER_FILE) if tokenizer else (CONFIG_FILE,)
    missing = [name for name in wanted if not (folder / name).is_file()]
    if not ((folder / WEIGHTS_FILE).is_file() or (folder / WEIGHTS_INDEX).is_file()):
        missing.insert(1, WEIGHTS_FILE)
    if missing:
        raise FileNotFoundError(f"selector folder {folder} is missing {', '.join(missing)}")
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> Selector:
    """Load the weights of a model folder: a SelectorModel, or any local causal LM wrapped as HFCausalSelector."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"model folder {folder} is missing {CONFIG_FILE}")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if isinstance(config, SelectorConfig):
        model: Selector = SelectorModel.from_pretrained(str(folder), local_files_only=True)
    else:
        model = HFCausalSelector(folder)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval()


def load_selector(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Selector, PreTrainedTokenizerFast]:
    """Check the folder holds config.json, model.safetensors and tokenizer.json, then load (model, tokenizer)."""
    folder = check_model_folder(folder)
    return load_model(folder, device), load_tokenizer(folder)


AutoConfig.register(SelectorConfig.model_type, SelectorConfig, exist_ok=True)
AutoModel.register(SelectorConfig, SelectorModel, exist_ok=True)
