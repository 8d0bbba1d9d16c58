"""The IT-LM selector models: the window selectors (slot / ALiBi) and their shared building blocks.

Scoring gathers the candidates' rows of the (tied) output embedding and dots them with the last hidden
state, so a decode step costs one forward over k tokens plus K dot products: independent of chain length
and of vocabulary size. Full-vocabulary logits exist only for training (optional extra loss term) and for
the evaluation baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

PAD_ID = 0
SQRT_HALF = np.float32(math.sqrt(0.5))
IGNORE_INDEX = -100
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")

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

    def fused(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The same attention through PyTorch's fused kernel, with ``mask`` [B,h,T,T] additive (-inf: not
        allowed); no probabilities are kept, so training runs faster and leaner."""
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


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

    def fused(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``forward`` through the fused attention kernel (additive mask), without attention probabilities."""
        x = x + self.attn.fused(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The selector under a peft wrapper (``PeftModel.get_base_model``), else the model itself: the one way every
    caller reaches the architecture and its config, whatever adapters sit on it."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


class SelectorWeights:
    """What both selectors (window and question-aware) share as Hugging Face models: GPT-2 initialisation and the
    token embedding ``wte`` as the input embedding. Mixed in before ``PreTrainedModel``."""

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, 0.02) everywhere; residual projections scaled by 1/sqrt(2·n_layer) (GPT-2 scheme)."""
        super()._init_weights(module)
        if getattr(module, "residual_proj", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (candidates are scored against it too when tied)."""
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.wte = value


class SelectorModel(SelectorWeights, PreTrainedModel):
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

