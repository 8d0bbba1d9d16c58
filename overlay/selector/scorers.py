"""Decode-time fast paths of the window selectors: the same weights and math as ``model.score`` without
module-call overhead (``FastScorer``), or with a per-chain key/value cache (``CachedScorer``)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from overlay.selector.model import SQRT_HALF, SelectorConfig, SelectorModel, alibi_slopes


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

