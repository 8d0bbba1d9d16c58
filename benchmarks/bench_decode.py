"""Decode cost per token at chain positions 16…2,000: the overlay's default selector against ``generate()``.

The overlay (embedded Redis table + the question-aware selector with its question memory and copy candidates +
router + accumulator, batch 1, CPU) and a GPT-2-shaped model with the same layers and width decoding over the
full context with its KV cache are timed in the same run, interleaved, on the same token ids. To time the token
at chain position P, a chain is forced through P tokens of real GSM8K reasoning (fed through the decoder's own
emit path, so the router, the accumulator and the selector's memory hold a P-token chain), then the next tokens
are decoded and each step is timed. The overlay is timed with its compiled step (``qa_kernel``, the default),
with the NumPy fallback, and without the table's client-side cache (one Redis round trip per token). A second
pass with the decoder's stage counters on, and the kernel's calls timed apart, gives the breakdown: table lookup,
the selector's arithmetic (the compiled call) and its Python, choice, accumulator, router, stop rules.

    python benchmarks/bench_decode.py --data ../shared/data/gsm8k/train.jsonl
    python benchmarks/bench_decode.py --shapes 2x128,4x256,6x384 --positions 16,1000,2000 --samples 8 --tokens 32
"""

from __future__ import annotations

import collections
import statistics
import time
from pathlib import Path

import common

TARGET_MS, TARGET_FLAT, TARGET_SPEEDUP = 1.0, 1.15, 10.0
OVERLAY, NUMPY, NO_CACHE, HF = "overlay", "overlay, NumPy step", "overlay, no table cache", "HF generate()"
STAGES = ["lookup", "kernel", "selector_python", "choose", "accumulator", "router", "stop_rules"]


def forced_stream(data: Path, tokenizer, length: int) -> tuple[list[str], list[int]]:
    """Questions, and ≥ ``length`` ids of reasoning (THOUGHT/ACTION/RESULT/CHECK steps of consecutive chains).

    ANSWER and EOS are left out (they end a chain) and so are RESULT contents (the router injects them).
    """
    from overlay.chains import ANSWER, RESULT, load_chains
    from overlay.tokenizer import encode

    chains = load_chains(data, "gsm8k").chains
    questions, ids = [], []
    for chain in chains:
        questions.append(chain.question)
        ids += encode(tokenizer, "".join(f"{s.tag} " if s.tag == RESULT else f"{s.tag} {s.text} "
                                         for s in chain.steps if s.tag != ANSWER))
        if len(ids) >= length and len(questions) >= 64:
            break
    return questions, ids


def overlay_state(decoder, question: str, stream: list[int], offset: int, position: int):
    """A decoder state whose chain already holds ``position`` generated tokens (forced from ``stream``)."""
    state = decoder.new_state(question)
    start = offset % max(1, len(stream) - position)
    for t in stream[start:]:
        if len(state.ids) - state.prompt_len >= position:
            break
        decoder.force(state, [t])
    return state


def time_overlay(decoder, state, tokens: int, warmup: int = 2) -> list[float]:
    """Seconds per decode step for up to ``tokens`` steps after ``warmup`` untimed ones (fewer if the chain stops)."""
    out = []
    for i in range(warmup + tokens):
        if state.acc.stop_reason:
            break
        start = time.perf_counter()
        decoder.step([state])
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


class KernelClock:
    """Wraps a QA scorer's compiled call so the breakdown can tell the arithmetic from the Python around it."""

    def __init__(self, kernel) -> None:
        self.kernel, self.fn, self.seconds = kernel, kernel.fn, 0.0

    def __call__(self, *args) -> None:
        start = time.perf_counter()
        self.fn(*args)
        self.seconds += time.perf_counter() - start

    def __enter__(self) -> KernelClock:
        self.kernel.fn = self
        return self

    def __exit__(self, *exc) -> None:
        self.kernel.fn = self.fn


def stage_samples(decoder, state, tokens: int, warmup: int = 2) -> list[dict[str, float]]:
    """Per decode step, seconds per stage from the decoder's counters, the kernel's share of the selector stage,
    and the step's total."""
    out = []
    kernel = qa_scorer(decoder).kernel
    with KernelClock(kernel) as clock:
        for i in range(warmup + tokens):
            if state.acc.stop_reason:
                break
            decoder.stage_seconds.clear()
            clock.seconds = 0.0
            start = time.perf_counter()
            decoder.step([state])
            total = time.perf_counter() - start
            if i >= warmup:
                stages = dict(decoder.stage_seconds)
                stages["kernel"] = clock.seconds
                stages["selector_python"] = stages.pop("selector", 0.0) - clock.seconds
                out.append(stages | {"total": total})
    return out


def qa_scorer(decoder):
    """The decoder's question-aware scorer (built on first use)."""
    return decoder._scorers()[2]


class _Clock:
    """A generate() streamer that records when each token arrives (the first call carries the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def gpt2(vocab: int, n_layer: int, n_embd: int, n_head: int, n_positions: int):
    """A randomly initialised GPT-2-shaped causal LM (cost does not depend on the weights' values)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def time_generate(model, context: list[int], tokens: int, warmup: int = 2) -> list[float]:
    """Seconds per generated token after the prompt (prefill and ``warmup`` tokens not counted), KV cache on."""
    import torch

    clock = _Clock()
    ids = torch.tensor([context])
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens + warmup + 1,
                       min_new_tokens=tokens + warmup + 1, do_sample=False, use_cache=True, streamer=clock,
                       pad_token_id=0)
    stamps = clock.stamps[2 + warmup:]  # [0] prompt, [1] first token (includes prefill)
    return [b - a for a, b in zip(clock.stamps[1 + warmup:], stamps)]


def selector_for(shape: tuple[int, int], trained):
    """The trained selector when it has this shape, else a randomly initialised question-aware selector of that
    shape (a step's cost does not depend on the weights' values)."""
    import torch

    from overlay.selector import QASelector, QASelectorConfig

    cfg = trained.config
    if (cfg.n_layer, cfg.n_embd) == shape:
        return trained
    torch.manual_seed(0)
    return QASelector(QASelectorConfig(vocab_size=cfg.vocab_size, n_layer=shape[0], n_embd=shape[1], n_head=4)).eval()


def run(args) -> dict:
    import torch

    from overlay.decode import DecodeConfig, OverlayDecoder
    from overlay.selector import qa_kernel
    from overlay.table import SemanticTable

    torch.set_num_threads(args.threads)
    positions = [int(p) for p in args.positions.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    times: dict[tuple, list[float]] = collections.defaultdict(list)
    stages: dict[tuple, list[dict[str, float]]] = collections.defaultdict(list)
    with common.overlay_home(args.home) as home:
        setup = common.setup_overlay(home, args.data)
        questions, stream = forced_stream(args.data, setup.tokenizer, max(positions) * 3 + 1000)
        table = setup.table
        config = DecodeConfig(max_tokens=max(positions) * 2 + 10_000, max_step_repeats=10**9)
        for shape in shapes:
            selector = selector_for(shape, setup.model)
            decoder = OverlayDecoder(table, selector, setup.tokenizer, config)
            fallback = OverlayDecoder(table, selector, setup.tokenizer, config)
            qa_scorer(fallback).kernel = None  # the same scorer class on its NumPy path
            if qa_scorer(decoder).kernel is None:
                raise SystemExit(f"the compiled step is not available here: {qa_kernel.reason()}")
            hf = gpt2(table.vocab_size, shape[0], shape[1], selector.config.n_head, max(positions) + 512 + args.tokens)
            label = f"{shape[0]}x{shape[1]}"
            for d in (decoder, fallback):  # warm caches and the lookup script
                time_overlay(d, overlay_state(d, questions[0], stream, 0, 16), 8)
            for rep in range(args.repeats):
                for p in positions:
                    for s in range(args.samples):
                        q = questions[(s * 7 + rep) % len(questions)]
                        offset = (s * 997 + rep * 131) % len(stream)
                        context = None
                        for method, d, cache in ((OVERLAY, decoder, True), (NUMPY, fallback, True),
                                                 (NO_CACHE, decoder, False)):
                            table.cache_size = SemanticTable.cache_size if cache else 0
                            state = overlay_state(d, q, stream, offset, p)
                            context = context or list(state.ids)
                            times[(label, method, p)] += time_overlay(d, state, args.tokens)
                        table.cache_size = SemanticTable.cache_size
                        if not args.no_hf:  # the same context: question prompt + p forced tokens
                            times[(label, HF, p)] += time_generate(hf, context, args.tokens)
                    decoder.stage_seconds = collections.defaultdict(float)
                    for s in range(max(1, args.samples // 2)):
                        state = overlay_state(decoder, questions[s], stream, s * 389 + rep, p)
                        stages[(label, p)] += stage_samples(decoder, state, args.tokens)
                    decoder.stage_seconds = None

    results = []
    for shape in shapes:
        label = f"{shape[0]}x{shape[1]}"
        for method in (OVERLAY, NUMPY, NO_CACHE, HF):
            for p in positions:
                xs = times.get((label, method, p))
                if xs:
                    s = common.summary([x * 1e3 for x in xs])
                    results.append({"shape": label, "method": method, "position": p, "median_ms": s["median"],
                                    "p99_ms": s["p99"], "mean_ms": s["mean"], "n": s["n"]})
    by = {(r["shape"], r["method"], r["position"]): r for r in results}
    for r in results:
        hf = by.get((r["shape"], HF, r["position"]))
        r["speedup_vs_hf"] = hf["median_ms"] / r["median_ms"] if hf and r["method"] != HF else None
        first = by.get((r["shape"], r["method"], positions[0]))
        r["vs_first_position"] = r["median_ms"] / first["median_ms"] if first else None
    common.table(results, ["shape", "method", "position", "median_ms", "p99_ms", "n", "vs_first_position",
                           "speedup_vs_hf"], "Per-token decode time, batch 1, CPU")
    breakdown = []
    for (label, p), samples in sorted(stages.items()):
        for stat, fn in (("median", statistics.median), ("mean", statistics.fmean)):
            row = {"shape": label, "position": p, "stat": stat, "steps": len(samples)}
            row |= {k: fn([x.get(k, 0.0) for x in samples]) * 1e6 for k in STAGES + ["total"]}
            row["unaccounted"] = row["total"] - sum(row[k] for k in STAGES) if stat == "mean" else None
            breakdown.append(row)
    common.table(breakdown, ["shape", "position", "stat", *STAGES, "unaccounted", "total", "steps"],
                 "Overlay per token by stage (µs; table cache on; stage counters on)")
    targets = check_targets(by, shapes[0], positions)
    common.table(targets, ["target", "measured", "met"], "Targets")
    return {"positions": positions, "shapes": [f"{a}x{b}" for a, b in shapes], "threads": args.threads,
            "samples": args.samples, "tokens": args.tokens, "repeats": args.repeats, "selector": "question-aware",
            "kernel_flags": " ".join(qa_kernel.FLAGS), "results": results, "breakdown_us": breakdown,
            "targets": targets, "setup": setup.info}


def check_targets(by: dict, shape: tuple[int, int], positions: list[int]) -> list[dict]:
    """The three per-token targets for the default selector's shape."""
    label = f"{shape[0]}x{shape[1]}"
    out = []
    med = [by[(label, OVERLAY, p)]["median_ms"] for p in positions if (label, OVERLAY, p) in by]
    if med:
        out.append({"target": f"median ≤ {TARGET_MS:g} ms per token at every position ({label})",
                    "measured": f"{max(med):.3f} ms (worst position)", "met": max(med) <= TARGET_MS})
    lo, hi = (label, OVERLAY, positions[0]), (label, OVERLAY, positions[-1])
    if lo in by and hi in by:
        ratio = by[hi]["median_ms"] / by[lo]["median_ms"]
        out.append({"target": f"flat: position {positions[-1]:,} ÷ position {positions[0]} ≤ {TARGET_FLAT}",
                    "measured": f"{ratio:.3f}", "met": ratio <= TARGET_FLAT})
    p = 1000 if 1000 in positions else positions[len(positions) // 2]
    key = (label, OVERLAY, p)
    if key in by and by[key].get("speedup_vs_hf"):
        sp = by[key]["speedup_vs_hf"]
        out.append({"target": f"≥ {TARGET_SPEEDUP:.0f}× faster than generate() at position {p:,}",
                    "measured": f"{sp:.1f}×", "met": sp >= TARGET_SPEEDUP})
    return out


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--positions", default="16,1000,2000", help="chain positions to time, comma-separated")
    p.add_argument("--shapes", default="2x128", help="LAYERSxWIDTH of selector and GPT-2 peer, e.g. 2x128,4x256")
    p.add_argument("--samples", type=int, default=8, help="chains per position and repeat")
    p.add_argument("--tokens", type=int, default=32, help="timed tokens per chain")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both (batch 1: one is fastest)")
    p.add_argument("--no-hf", action="store_true", help="skip the generate() peer")
    args = p.parse_args()
    common.write_json("decode", run(args), not args.no_json)


if __name__ == "__main__":
    main()
