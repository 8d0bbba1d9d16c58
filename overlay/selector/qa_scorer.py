"""Decoding with the question-aware selector: the question's keys/values once per chain, then one row per block
per token, float32 on the CPU: one compiled call per token (``qa_kernel``), or NumPy where it cannot be built.

Per token the work is attention over the question (≤ question_len keys), the ring of the last ``attn_span``
chain tokens and the last ``result_tokens`` tool-result tokens: bounded, whatever the chain's length. Scores equal
``QASelector.forward`` on the whole chain (tested).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from overlay.selector import qa_kernel
from overlay.selector.model import SQRT_HALF, alibi_slopes, unwrap
from overlay.selector.state import NumberSpans, StepState

_VERSION = operator.attrgetter("_version")


class CopyPlan(NamedTuple):
    """The copy values a chain can choose and how its occurrences map to them: the occurrences' pointer keys
    stacked, each one's value index (-1: no longer visible), (value, source) per value in first-seen order, and
    the two arrays' addresses for the compiled scorer."""

    keys: np.ndarray | None
    groups: np.ndarray
    copies: list[tuple[str, str]]
    keys_at: int | None
    groups_at: int


@dataclass
class Occurrence:
    """A copyable whole number: its value, pointer key, where it came from, and the pinned count at its start."""

    value: str
    key: np.ndarray
    source: str
    pin_index: int = 0


@dataclass
class ChainMemory:
    """One chain's decode state. Per block, keys/values [h, Lq + span + R, hd]: the question's, a ring of the last
    ``attn_span`` chain tokens, and R slots for the last tool-result tokens; ``bias`` holds the attention penalty
    of each slot (-inf where empty)."""

    keys: np.ndarray
    values: np.ndarray
    bias: np.ndarray
    n_question: int
    pin_pos: np.ndarray
    occurrences: list[Occurrence]
    state: StepState = field(default_factory=StepState)
    consumed: int = 0
    pinned: int = 0
    last: np.ndarray | None = None
    open_number: tuple[int, np.ndarray, list[str]] | None = None
    previous_in_number: bool = False
    bound: qa_kernel.Bound | None = field(default=None, repr=False)  # the compiled kernel's view of these arrays
    copy_plan: tuple | None = field(default=None, repr=False)  # ``QAScorer._copy_plan``'s cache

    def nbytes(self) -> int:
        """Bytes held by the arrays: bounded by the model's shape and the question, not the chain."""
        return (self.keys.nbytes + self.values.nbytes + self.bias.nbytes + self.pin_pos.nbytes
                + sum(o.key.nbytes for o in self.occurrences))


def effective(linear: torch.nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a Linear, with a LoRA adapter's update added when the layer carries that adapter."""
    base = getattr(linear, "base_layer", linear)
    weight = base.weight.detach()
    if adapter and adapter in getattr(linear, "lora_A", {}):
        weight = weight + linear.get_delta_weight(adapter).detach()
    return weight, base.bias.detach()


class QAScorer:
    """The written-out per-token forward of a ``QASelector`` (eval mode, CPU), optionally with one LoRA adapter's
    update folded into the weights: one base in memory serves every domain, each decoder with its own adapter."""

    def __init__(self, model: torch.nn.Module, numbers: NumberSpans, adapter: str = "", compiled: bool = True) -> None:
        owner = model
        model = unwrap(model)
        cfg = model.config
        self.model, self.numbers, self.adapter = owner, numbers, adapter
        self.params = list(model.parameters())
        self.versions = tuple(map(_VERSION, self.params))
        self.n_layer, self.n_head, self.span = cfg.n_layer, cfg.n_head, cfg.attn_span
        self.result_tokens, self.d = cfg.result_tokens, cfg.n_embd
        self.hd = cfg.n_embd // cfg.n_head
        self.max_steps, self.max_results = cfg.max_steps, cfg.max_results

        def arr(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().float().cpu().numpy())

        self.wte, self.wpe_q, self.tag, self.step, self.res = (
            arr(m.weight) for m in (model.wte, model.wpe_q, model.tag_emb, model.step_emb, model.res_emb))
        self.ln_f = (arr(model.ln_f.weight), arr(model.ln_f.bias), model.ln_f.eps)
        self.ptr_q, self.ptr_k = arr(model.ptr_q.weight).T.copy(), arr(model.ptr_k.weight).T.copy()
        def folded(ln: torch.nn.LayerNorm, linear: torch.nn.Module) -> tuple[np.ndarray, np.ndarray, float]:
            """(W', b', eps) with linear(ln(x)) == whiten(x) @ W' + b'."""
            w, b = ln.weight.detach().double(), ln.bias.detach().double()
            weight, bias = (x.double() for x in effective(linear, adapter))
            return (np.ascontiguousarray((w[:, None] * weight.T).numpy(), np.float32),
                    (b @ weight.T + bias).numpy().astype(np.float32), ln.eps)

        def plain(linear: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
            weight, bias = effective(linear, adapter)
            return arr(weight).T.copy(), arr(bias)

        blocks = [(folded(b.ln_1, b.attn.c_attn), *plain(b.attn.c_proj), folded(b.ln_2, b.mlp.c_fc),
                   *plain(b.mlp.c_proj)) for b in model.h]
        # every weight a step streams, in reading order, in one buffer on huge pages (fewer TLB misses per token)
        self.buffer, views = qa_kernel.pack([a for (aw, ab, _), pw, pb, (fw, fb, _), ow, ob in blocks
                                             for a in (aw, ab, pw, pb, fw, fb, ow, ob)] + [self.ptr_q])
        *flat, self.ptr_q = views
        self.blocks = [((flat[8 * i], flat[8 * i + 1], e1), flat[8 * i + 2], flat[8 * i + 3],
                        (flat[8 * i + 4], flat[8 * i + 5], e2), flat[8 * i + 6], flat[8 * i + 7])
                       for i, ((_, _, e1), _, _, (_, _, e2), _, _) in enumerate(blocks)]
        self.inv_n = np.full(self.d, 1 / self.d, np.float32)
        self.slopes = alibi_slopes(cfg.n_head).numpy().astype(np.float32)
        slot = np.arange(self.span)
        # ring_bias[s][h, j]: penalty of ring slot j when the newest token sits in slot s (distance (s - j) mod span)
        self.ring_bias = (-self.slopes[None, :, None] * ((slot[:, None] - slot[None, :]) % self.span)[:, None, :]
                          ).astype(np.float32)
        self.pin_bias = (-self.slopes * self.span).astype(np.float32)[:, None]
        self.scale = np.float32(1 / math.sqrt(self.hd))
        self.ptr_scale = np.float32(1 / math.sqrt(self.d))
        dll = qa_kernel.load() if compiled else None
        self.kernel = qa_kernel.Kernel(dll, self) if dll is not None else None

    def usable(self, model: torch.nn.Module | None) -> bool:
        """Still the same model, in eval mode, with no weight changed since the copy."""
        return (model is self.model and not model.training
                and tuple(map(_VERSION, self.params)) == self.versions)

    def _whiten(self, x: np.ndarray, eps: float) -> np.ndarray:
        """Layer norm of the last axis without its scale and shift (folded into the next matrix)."""
        d = x - (x @ self.inv_n)[..., None]
        return d / np.sqrt((d * d) @ self.inv_n + eps)[..., None]

    @staticmethod
    def _gelu(u: np.ndarray) -> np.ndarray:
        return u * (torch.erf(torch.from_numpy(u * SQRT_HALF)).numpy() + 1) * np.float32(0.5)

    def start(self, question: list[int]) -> ChainMemory:
        """Encode the question (bidirectional, once per chain) and return an empty chain memory over it."""
        question = question[:self.model.config.question_len]
        x = self.wte[question] + self.wpe_q[:len(question)]
        h, hd, n = self.n_head, self.hd, len(question)
        m = n + self.span + self.result_tokens
        keys = np.zeros((self.n_layer, h, m, hd), np.float32)
        values = np.zeros_like(keys)
        for layer, ((attn_w, attn_b, eps1), proj_w, proj_b, (fc_w, fc_b, eps2), out_w, out_b) in enumerate(self.blocks):
            q, k, v = (self._whiten(x, eps1) @ attn_w + attn_b).reshape(n, 3, h, hd).transpose(1, 2, 0, 3)
            keys[layer, :, :n], values[layer, :, :n] = k, v
            att = np.einsum("hqd,hkd->hqk", q, k) * self.scale
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            x = x + np.einsum("hqk,hkd->qhd", att, v).reshape(n, -1) @ proj_w + proj_b
            x = x + self._gelu(self._whiten(x, eps2) @ fc_w + fc_b) @ out_w + out_b
        final = self._whiten(x, self.ln_f[2]) * self.ln_f[0] + self.ln_f[1]
        occ = [Occurrence(value, final[first] @ self.ptr_k, "question") for first, _, value in self.numbers.spans(question)]
        bias = np.full((h, m), -np.inf, np.float32)
        bias[:, :n] = 0.0
        return ChainMemory(keys, values, bias, n, np.full(self.result_tokens, -1, np.int64), occ)

    def push(self, mem: ChainMemory, token: int) -> None:
        """Run one chain-stream token through every block against the memory; keeps its final hidden state."""
        state = mem.state.after(token)
        p = mem.consumed
        pin = self.span + mem.pinned % self.result_tokens
        if state.in_result:
            mem.pin_pos[pin - self.span] = p
        if self.kernel is not None:
            if mem.bound is None:
                mem.bound = self.kernel.bind(mem)
            self.kernel.push(mem.bound, token, *state.features(self.max_steps, self.max_results), p,
                             mem.n_question + pin if state.in_result else -1)
        else:
            self._push_numpy(mem, token, state, p, mem.n_question + pin)
        self._track_number(mem, token, state, p)
        mem.pinned += state.in_result
        mem.state, mem.consumed = state, p + 1

    def _push_numpy(self, mem: ChainMemory, token: int, state: StepState, p: int, pin: int) -> None:
        """``push``'s arithmetic in NumPy: the fallback where the compiled kernel is not available."""
        tag, step, res = state.features(self.max_steps, self.max_results)
        x = self.wte[token] + self.tag[tag] + self.step[step] + self.res[res]
        nq, span = mem.n_question, self.span
        slot = p % span
        ring = slice(nq, nq + span)
        if p + 1 >= span:
            mem.bias[:, ring] = self.ring_bias[slot]
        else:
            mem.bias[:, nq:nq + p + 1] = self.ring_bias[slot][:, :p + 1]
        mem.bias[:, nq + span:] = np.where((mem.pin_pos >= 0) & (mem.pin_pos <= p - span), self.pin_bias, -np.inf)
        h, hd = self.n_head, self.hd
        for layer, ((attn_w, attn_b, eps1), proj_w, proj_b, (fc_w, fc_b, eps2), out_w, out_b) in enumerate(self.blocks):
            q, k, v = (self._whiten(x, eps1) @ attn_w + attn_b).reshape(3, h, hd)
            keys, values = mem.keys[layer], mem.values[layer]
            keys[:, nq + slot], values[:, nq + slot] = k, v
            if state.in_result:
                keys[:, pin], values[:, pin] = k, v
            att = np.einsum("hd,hkd->hk", q, keys) * self.scale + mem.bias
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            x = x + np.einsum("hk,hkd->hd", att, values).reshape(-1) @ proj_w + proj_b
            x = x + self._gelu(self._whiten(x, eps2) @ fc_w + fc_b) @ out_w + out_b
        mem.last = self._whiten(x, self.ln_f[2]) * self.ln_f[0] + self.ln_f[1]

    def _track_number(self, mem: ChainMemory, token: int, state: StepState, p: int) -> None:
        """Open, extend or close the tool-result number being read, adding it as a copy value once closed."""
        numbers = self.numbers
        joins = numbers.in_number(token) and state.in_result
        if mem.open_number is not None and not (joins and mem.previous_in_number):
            pin_index, key, text = mem.open_number
            value = "".join(text).rstrip(".,").replace(",", "")
            if value:
                mem.occurrences.append(Occurrence(value, key, "result", pin_index))
            mem.occurrences = [o for o in mem.occurrences  # results pushed out of memory cannot be copied any more
                               if o.source == "question" or mem.pinned - o.pin_index <= self.result_tokens]
            mem.open_number = None
        if state.in_result and numbers.digit[token] and mem.open_number is None and not mem.previous_in_number:
            mem.open_number = (mem.pinned, mem.last @ self.ptr_k, [])
        if mem.open_number is not None:
            mem.open_number[2].append(numbers.text[token])
        mem.previous_in_number = numbers.in_number(token)

    def feed(self, mem: ChainMemory, stream: list[int]) -> None:
        """Push the stream tokens the memory has not read yet."""
        for token in stream[mem.consumed:]:
            self.push(mem, token)

    def _copy_plan(self, mem: ChainMemory) -> CopyPlan:
        """The copy values and how occurrences map to them, rebuilt only when the occurrences or the visible
        results change, not every token."""
        occurrences, limit = mem.occurrences, mem.pinned - self.result_tokens
        cached = mem.copy_plan
        if cached is not None and cached[0] is occurrences and cached[1] == len(occurrences) and cached[2] == limit:
            return cached[3]
        index: dict[str, int] = {}
        groups, copies = [], []
        for occ in occurrences:
            if occ.source == "result" and occ.pin_index < limit:  # pushed out of the result memory
                groups.append(-1)
                continue
            if occ.value not in index:
                index[occ.value] = len(copies)
                copies.append((occ.value, occ.source))
            groups.append(index[occ.value])
        keys = np.stack([o.key for o in occurrences]) if occurrences else None
        index_of = np.asarray(groups, np.int64)
        plan = CopyPlan(keys, index_of, copies, keys.ctypes.data if keys is not None else None, index_of.ctypes.data)
        mem.copy_plan = (occurrences, len(occurrences), limit, plan)
        return plan

    def scores(self, mem: ChainMemory, candidates: list[int]) -> tuple[np.ndarray, list[tuple[str, float, str]]]:
        """Token-candidate logits, and (value, logit, source) per visible copy value (occurrences merged)."""
        final = mem.last
        logits = self.wte[candidates] @ final
        plan = self._copy_plan(mem)
        if not plan.copies:
            return logits, []
        raw = (plan.keys @ (final @ self.ptr_q)).tolist()  # one product for every occurrence
        scale = float(self.ptr_scale)
        merged: list[float | None] = [None] * len(plan.copies)
        for g, s in zip(plan.groups.tolist(), raw):
            if g < 0:
                continue
            s *= scale
            prev = merged[g]
            if prev is None:
                merged[g] = s
            else:
                top = max(prev, s)
                merged[g] = top + math.log(math.exp(prev - top) + math.exp(s - top))
        return logits, [(value, s, source) for (value, source), s in zip(plan.copies, merged)]

    def log_probs(self, mem: ChainMemory, candidates: list[int]) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Log-probabilities (float32) over the table candidates then the visible copy values, one softmax over both,
        and (value, source) per copy value: what the decoder chooses among. One compiled call with the kernel."""
        if self.kernel is not None and mem.bound is not None:
            plan = self._copy_plan(mem)
            return self.kernel.log_probs(mem.bound, candidates, plan), plan.copies
        logits, copies = self.scores(mem, candidates)
        row = np.concatenate([logits, np.asarray([c[1] for c in copies], np.float32)])
        row = row - row.max()
        return row - np.log(np.exp(row).sum()), [(value, source) for value, _, source in copies]
