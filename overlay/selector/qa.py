"""The question-aware IT-LM selector: question memory + a sliding window over the chain + step state + copying.

The question (the prompt ``<Q> …``) is encoded once per chain with bidirectional attention; its keys and values
stay in memory. Each chain token attends to the question, to the last ``attn_span`` chain tokens (ALiBi distance
penalty), and to the tokens of the last tool results (``result_tokens`` of them), so its cost is bounded by the
question limit and never grows with the chain. Its embedding adds the step state (tag, step index, results so far).

Candidates are the table's K tokens, scored against the output embedding, plus whole numbers of the question and
of earlier results (copy candidates), scored by a pointer from the chain token to the number's first token;
the occurrences of one value are merged by log-sum-exp. Training runs one forward per chain with exactly the
attention decoding uses (``attention_plan``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from overlay.selector.model import IGNORE_INDEX, PAD_ID, Block, SelectorWeights, alibi_slopes
from overlay.selector.state import N_TAGS


class QASelectorConfig(PretrainedConfig):
    """Shape of the question-aware selector; PAD (id 0) is masked out everywhere."""

    model_type = "overlay-qa-selector"

    vocab_size: int = 2000
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    initializer_range: float = 0.02
    question_len: int = 256
    attn_span: int = 16
    result_tokens: int = 64
    max_steps: int = 32
    max_results: int = 16
    candidates: int = 32
    tie_word_embeddings: bool = True
    pad_token_id: int | None = PAD_ID
    tokenizer_hash: str = ""

    def check(self) -> None:
        """Reject shapes that cannot work, naming the field."""
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("question_len", "attn_span", "result_tokens", "max_steps", "max_results"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")


@dataclass
class QAOutput(ModelOutput):
    """Loss, logits [N, K + V] over the scored positions (token candidates then copy values), final hidden states."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def attention_plan(question_ids: torch.Tensor, chain_ids: torch.Tensor, pinned: torch.Tensor, span: int,
                   result_tokens: int, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed [B,1,S,S], bias [B,h,S,S]) over the sequence question ++ chain, S = Lq + T: exactly what decoding
    sees. Question tokens see the real question tokens; chain token t sees the question, chain tokens u ≤ t with
    t − u < span (penalty slope·(t − u)), and pinned (tool result) tokens among the last ``result_tokens`` pinned
    ones (penalty slope·span)."""
    device = chain_ids.device
    b, lq = question_ids.shape
    t = chain_ids.shape[1]
    qreal = question_ids != PAD_ID
    creal = chain_ids != PAD_ID
    pos = torch.arange(t, device=device)
    dist = pos[:, None] - pos[None, :]
    cum = pinned.long().cumsum(1)
    recent_pin = pinned[:, None, :] & ((cum[:, :, None] - cum[:, None, :]) < result_tokens)
    chain_chain = (dist >= 0) & ((dist < span)[None] | recent_pin) & creal[:, None, :]
    chain_chain = chain_chain | torch.eye(t, dtype=torch.bool, device=device)[None]
    top = torch.cat([qreal[:, None, :].expand(b, lq, lq) | torch.eye(lq, dtype=torch.bool, device=device)[None],
                     torch.zeros(b, lq, t, dtype=torch.bool, device=device)], 2)
    bottom = torch.cat([qreal[:, None, :].expand(b, t, lq), chain_chain], 2)
    allowed = torch.cat([top, bottom], 1)[:, None]
    slopes = alibi_slopes(n_head).to(device)
    penalty = -slopes[:, None, None] * dist.clamp(min=0, max=span).float()[None]
    bias = torch.zeros(1, n_head, lq + t, lq + t, device=device)
    bias[:, :, lq:, lq:] = penalty
    return allowed, bias


class QASelector(SelectorWeights, PreTrainedModel):
    """Question memory + chain window + step state; scores table candidates and copy values."""

    config_class = QASelectorConfig
    base_model_prefix = "selector"
    main_input_name = "chain_ids"

    def __init__(self, config: QASelectorConfig) -> None:
        config.check()
        super().__init__(config)
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe_q = nn.Embedding(config.question_len, d)
        self.tag_emb = nn.Embedding(N_TAGS, d)
        self.step_emb = nn.Embedding(config.max_steps, d)
        self.res_emb = nn.Embedding(config.max_results, d)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.ptr_q = nn.Linear(d, d, bias=False)
        self.ptr_k = nn.Linear(d, d, bias=False)
        self.post_init()

    def encode(self, question_ids: torch.Tensor, chain_ids: torch.Tensor, states: torch.Tensor,
               pinned: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after ln_f) [B, Lq + T, d] of question ++ chain under the decode-time attention."""
        cfg = self.config
        lq = question_ids.shape[1]
        if lq > cfg.question_len:
            raise ValueError(f"question of {lq} tokens is longer than the model's question_len={cfg.question_len}")
        pos = torch.arange(lq, device=question_ids.device)
        xq = self.wte(question_ids) + self.wpe_q(pos)[None]
        xc = (self.wte(chain_ids) + self.tag_emb(states[..., 0]) + self.step_emb(states[..., 1])
              + self.res_emb(states[..., 2]))
        x = self.drop(torch.cat([xq, xc], 1))
        allowed, bias = attention_plan(question_ids, chain_ids, pinned, cfg.attn_span, cfg.result_tokens, cfg.n_head)
        mask = bias.to(x.dtype).masked_fill(~allowed, float("-inf"))
        for block in self.h:
            x = block.fused(x, mask)
        return self.ln_f(x)

    def copy_logits(self, hidden: torch.Tensor, lq: int, rows: torch.Tensor, at: torch.Tensor, occ_pos: torch.Tensor,
                    occ_value: torch.Tensor, occ_from: torch.Tensor, occ_until: torch.Tensor, n_values: int) -> torch.Tensor:
        """Copy-value logits [N, n_values] for the chain positions ``at`` of chains ``rows``.

        Occurrence j of chain b sits at sequence index occ_pos[b, j], spells value occ_value[b, j] (-1: padding)
        and can be copied from chain positions occ_from[b, j] ≤ p < occ_until[b, j] (a result leaves memory); a value's logit is the log-sum-exp of its
        visible occurrences' pointer scores (the dtype's minimum when none is visible).
        """
        keys = self.ptr_k(hidden.gather(1, occ_pos.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])))
        query = self.ptr_q(hidden[rows, at + lq])
        scores = torch.einsum("nd,njd->nj", query, keys[rows]) / math.sqrt(hidden.shape[-1])
        visible = (occ_value[rows] >= 0) & (occ_from[rows] <= at[:, None]) & (at[:, None] < occ_until[rows])
        onehot = occ_value[rows][..., None] == torch.arange(n_values, device=hidden.device)
        merged = scores[..., None].masked_fill(~(onehot & visible[..., None]), float("-inf")).logsumexp(1)
        return merged.masked_fill(torch.isinf(merged), torch.finfo(merged.dtype).min)

    def forward(self, question_ids: torch.Tensor, chain_ids: torch.Tensor, states: torch.Tensor, pinned: torch.Tensor,
                rows: torch.Tensor, at: torch.Tensor, candidate_ids: torch.Tensor, occ_pos: torch.Tensor,
                occ_value: torch.Tensor, occ_from: torch.Tensor, occ_until: torch.Tensor, n_values: int, labels: torch.Tensor | None = None,
                **_: object) -> QAOutput:
        """Scores [N, K + n_values] at chain positions ``at`` of chains ``rows`` (each predicts the next token):
        candidate_ids [N, K] dotted with the output embedding, then the copy values; cross-entropy with labels."""
        lq = question_ids.shape[1]
        hidden = self.encode(question_ids, chain_ids, states, pinned)
        last = hidden[rows, at + lq]
        token = torch.einsum("nd,nkd->nk", last, self.wte.weight[candidate_ids].to(last.dtype))
        token = token.masked_fill(candidate_ids == PAD_ID, torch.finfo(token.dtype).min)
        logits = token
        if n_values:
            logits = torch.cat([token, self.copy_logits(hidden, lq, rows, at, occ_pos, occ_value, occ_from, occ_until, n_values)],
                               1)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return QAOutput(loss=loss, logits=logits, hidden=hidden)
