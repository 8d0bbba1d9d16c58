"""How to compute the question-aware selector's per-token step, picked by measurement.

The step (step-state embedding, attention bias, every block against the chain's memory, the final layer norm) is
timed per implementation on the same token stream and the same memory shape, and each one's final hidden states
are compared with the NumPy fallback's: the NumPy path of ``QAScorer`` (many small operations), the compiled C
kernel (``overlay/selector/qa_kernel.py``, the default), the same math in eager torch, and that function through
``torch.compile`` (inductor's C++ backend). ONNX Runtime and Cython are reported with why they were not timed
when their tools are missing. Untrained weights of each shape: a step's cost does not depend on their values.

    python benchmarks/bench_step.py --shapes 2x128,4x256,6x384
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import common

QUESTION = 60  # question tokens in memory (a typical GSM8K question)


def torch_step(scorer):
    """The kernel's math in torch ops on the scorer's weights: (feats, idx, keys, values, bias, pin_pos, question
    length) → final hidden state, writing the token's keys/values and the bias into the memory tensors like the other paths."""
    import torch

    from overlay.selector.model import SQRT_HALF

    t = torch.from_numpy
    emb = [t(a) for a in (scorer.wte, scorer.tag, scorer.step, scorer.res)]
    blocks = [(t(aw), t(ab), e1, t(pw), t(pb), t(fw), t(fb), e2, t(ow), t(ob))
              for (aw, ab, e1), pw, pb, (fw, fb, e2), ow, ob in scorer.blocks]
    lnf_w, lnf_b, lnf_eps = t(scorer.ln_f[0]), t(scorer.ln_f[1]), scorer.ln_f[2]
    ring_bias, pin_bias = t(scorer.ring_bias), t(scorer.pin_bias)
    h, hd, span, scale = scorer.n_head, scorer.hd, scorer.span, float(scorer.scale)
    sqrt_half = float(SQRT_HALF)

    def whiten(x, eps):
        d = x - x.mean()
        return d / torch.sqrt((d * d).mean() + eps)

    def step(feats, idx, keys, values, bias, pin_pos, nq: int):
        slot, p, pin_row = idx[0], idx[1], idx[2]
        x = sum(table.index_select(0, feats[i:i + 1])[0] for i, table in enumerate(emb))
        ring = torch.arange(span)
        valid = (p + 1 >= span) | (ring <= p)
        bias[:, nq:nq + span] = torch.where(valid, ring_bias.index_select(0, idx[0:1])[0], float("-inf"))
        seen = (pin_pos >= 0) & (pin_pos <= p - span)
        bias[:, nq + span:] = torch.where(seen, pin_bias, float("-inf"))
        rows = torch.stack([nq + slot, torch.where(pin_row >= 0, pin_row, nq + slot)])
        for layer, (aw, ab, e1, pw, pb, fw, fb, e2, ow, ob) in enumerate(blocks):
            q, k, v = (whiten(x, e1) @ aw + ab).view(3, h, hd)
            kk, vv = keys[layer], values[layer]
            kk.index_copy_(1, rows, torch.stack([k, k], 1))
            vv.index_copy_(1, rows, torch.stack([v, v], 1))
            att = torch.softmax(torch.einsum("hd,hkd->hk", q, kk) * scale + bias, -1)
            x = x + torch.einsum("hk,hkd->hd", att, vv).reshape(-1) @ pw + pb
            u = whiten(x, e2) @ fw + fb
            x = x + (u * (torch.erf(u * sqrt_half) + 1) * 0.5) @ ow + ob
        return whiten(x, lnf_eps) * lnf_w + lnf_b

    return step


def drive(scorer, tokens: list[int], warm: int, fn=None) -> tuple[list[float], list]:
    """Seconds per step over ``tokens`` after ``warm`` untimed ones, and the final hidden states. ``fn`` None: the
    scorer's own push (kernel or NumPy); else a torch step function over the same memory arrays."""
    import numpy as np
    import torch

    mem = scorer.start(list(range(50, 50 + QUESTION)))
    times, finals = [], []
    if fn is not None:
        keys, values, bias, pin_pos = (torch.from_numpy(a) for a in (mem.keys, mem.values, mem.bias, mem.pin_pos))
    for i, token in enumerate(tokens):
        start = time.perf_counter()
        if fn is None:
            scorer.push(mem, token)
            final = mem.last
        else:
            state = mem.state.after(token)
            p = mem.consumed
            pin = scorer.span + mem.pinned % scorer.result_tokens
            if state.in_result:
                mem.pin_pos[pin - scorer.span] = p
            feats = torch.tensor([token, *state.features(scorer.max_steps, scorer.max_results)])
            idx = torch.tensor([p % scorer.span, p, mem.n_question + pin if state.in_result else -1])
            with torch.inference_mode():
                final = fn(feats, idx, keys, values, bias, pin_pos, mem.n_question).numpy()
            mem.pinned += state.in_result
            mem.state, mem.consumed = state, p + 1
        if i >= warm:
            times.append(time.perf_counter() - start)
            finals.append(np.array(final))
    return times, finals


def stream(vocab: int, n: int, numbers: list[int], result: int) -> list[int]:
    """A chain-like token stream: words, a <RESULT> with digits every 40 tokens (so result slots fill up)."""
    import random

    rng = random.Random(0)
    out = []
    while len(out) < n:
        out += [rng.randrange(40, vocab) for _ in range(30)] + [result] + [rng.choice(numbers) for _ in range(4)]
    return out[:n]


def run(args) -> dict:
    import numpy as np
    import torch

    from overlay.selector import QAScorer, QASelector, QASelectorConfig, qa_kernel
    from overlay.selector.state import RESULT_ID, NumberSpans

    torch.set_num_threads(args.threads)
    texts = [f"w{i}" for i in range(args.vocab)]
    digits = list(range(20, 30))
    for i, d in zip(digits, "0123456789"):
        texts[i] = d
    numbers = NumberSpans(texts)
    tokens = stream(args.vocab, args.warm + args.tokens, digits, RESULT_ID)
    onnx = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
    skipped = {
        "ONNX Runtime": None if onnx else "not timed: exporting a graph needs the onnx package, which is not installed "
                                          "(onnxruntime is here only as a dependency of another package)",
        "Cython": None if importlib.util.find_spec("Cython") else "not timed: Cython is not installed (the C kernel "
                                                                   "needs only a C compiler and ctypes)",
    }
    rows = []
    for shape in args.shapes.split(","):
        n_layer, n_embd = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        model = QASelector(QASelectorConfig(vocab_size=args.vocab, n_layer=n_layer, n_embd=n_embd, n_head=4)).eval()
        fallback = QAScorer(model, numbers, compiled=False)
        kernel = QAScorer(model, numbers)
        methods = {"NumPy (fallback)": (fallback, None), "C kernel (default)": (kernel, None),
                   "torch eager": (fallback, torch_step(fallback))}
        if not args.no_compile:
            start = time.perf_counter()
            compiled = torch.compile(torch_step(fallback), dynamic=False, fullgraph=True)
            drive(fallback, tokens[:3], 0, compiled)
            print(f"torch.compile {shape}: first calls {time.perf_counter() - start:.1f} s")
            methods["torch.compile (inductor)"] = (fallback, compiled)
        times: dict[str, list[float]] = {m: [] for m in methods}
        finals: dict[str, list] = {}
        for _ in range(args.repeats):  # interleaved, so drift hits every method alike
            for name, (scorer, fn) in methods.items():
                xs, fs = drive(scorer, tokens, args.warm, fn)
                times[name] += xs
                finals[name] = fs
        ref = finals["NumPy (fallback)"]
        base = statistics.median(times["NumPy (fallback)"])
        for name in methods:
            med = statistics.median(times[name])
            diff = max(float(np.abs(a - b).max()) for a, b in zip(finals[name], ref))
            rows.append({"shape": shape, "method": name, "median_us": med * 1e6, "p10_us": common.percentile(times[name], 10) * 1e6,
                         "speedup_vs_numpy": base / med, "max_abs_diff_vs_numpy": diff, "n": len(times[name])})
    common.table(rows, ["shape", "method", "median_us", "p10_us", "speedup_vs_numpy", "max_abs_diff_vs_numpy", "n"],
                 "Selector step per token (batch 1, CPU): implementations")
    for name, why in skipped.items():
        if why:
            print(f"{name}: {why}")
    return {"threads": args.threads, "tokens": args.tokens, "repeats": args.repeats, "question_tokens": QUESTION,
            "kernel": qa_kernel.reason() or "in use", "kernel_flags": " ".join(qa_kernel.FLAGS), "rows": rows,
            "not_timed": {k: v for k, v in skipped.items() if v}}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2x128,4x256,6x384", help="LAYERSxWIDTH of the selectors to time")
    p.add_argument("--tokens", type=int, default=400, help="timed steps per implementation and repeat")
    p.add_argument("--warm", type=int, default=100, help="untimed steps first (fills the ring and result slots)")
    p.add_argument("--vocab", type=int, default=2000, help="vocabulary size")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its first call compiles for minutes)")
    args = p.parse_args()
    common.write_json("step", run(args), not args.no_json)


if __name__ == "__main__":
    main()
