"""The same-size full-context peer: a GPT-2 built from a ``transformers`` config and trained from scratch here on
the same chains, decoded by the same loop (same router, tool injection and stop rules) over the whole vocabulary
with its KV cache, so its per-token cost grows with the context where the overlay's does not."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from overlay.table import Neighbours


def peer_model(vocab_size: int, n_layer: int, n_head: int, n_embd: int, n_positions: int = 1024,
               tokenizer_hash: str = "", dropout: float = 0.0) -> GPT2LMHeadModel:
    """A fresh GPT-2 of the given shape; its config says ``overlay_peer`` so loaders decode it as the peer."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=2, eos_token_id=3,
                        pad_token_id=0, overlay_peer=True, tokenizer_hash=tokenizer_hash)
    return GPT2LMHeadModel(config)


def peer_batch(chains: list[tuple[list[int], list[bool]]], max_len: int, device: torch.device | str = "cpu") -> dict:
    """Right-padded input_ids, attention_mask and labels (-100 except on the chains' target tokens)."""
    t = min(max_len, max(len(ids) for ids, _ in chains))
    ids = torch.zeros((len(chains), t), dtype=torch.long)
    labels = torch.full((len(chains), t), -100, dtype=torch.long)
    for i, (seq, targets) in enumerate(chains):
        seq, targets = seq[:t], targets[:t]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, :len(seq)] = torch.where(torch.tensor(targets), torch.tensor(seq), torch.tensor(-100))
    return {"input_ids": ids.to(device), "attention_mask": (ids != 0).long().to(device), "labels": labels.to(device)}


def peer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, scored) next-token predictions over the target positions."""
    pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
    scored = gold != -100
    return int(((pred == gold) & scored).sum()), int(scored.sum())


class PeerScorer:
    """Full-vocabulary log-probabilities for one chain at a time, feeding only the tokens its cache has not seen."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        self.lm = getattr(model, "model", model)
        self.context = int(getattr(self.lm.config, "n_positions", 1024))  # the chain stops before its positions end
        ids = list(range(vocab_size))
        self.vocabulary = Neighbours(ids, [0.0] * vocab_size, [0] * vocab_size, [0] * vocab_size, 0)

    def log_probs(self, state: Any) -> torch.Tensor:
        """Next-token log-probabilities over the vocabulary after ``state.ids`` (KV cache kept in ``state.kv``)."""
        past, seen = (state.kv[1], state.kv[2]) if state.kv is not None and state.kv[0] is self else (None, 0)
        device = self.lm.device
        with torch.inference_mode():
            out = self.lm(input_ids=torch.tensor([state.ids[seen:]], device=device), past_key_values=past, use_cache=True)
        state.kv = (self, out.past_key_values, len(state.ids))
        return torch.log_softmax(out.logits[0, -1].float().cpu(), -1)
