"""Decode cost per token at chain positions 16…2000: the overlay against Hugging Face ``generate()``.

The overlay (embedded Redis table + selector + router + accumulator, batch 1, CPU) and a GPT-2-shaped model
with the same layers and width decoding over the full context with its KV cache are timed in the same run,
interleaved, on the same token ids. To time the token at chain position P, a chain is forced through P
tokens of real GSM8K reasoning (fed through the decoder's own emit path, so the router and accumulator hold
a P-token chain), then the next tokens are decoded and each step is timed. The overlay is measured with the
table's client-side cache on (the default) and off (one Redis round trip per token), and with an ALiBi
selector of the same shape (``--attn-span``, trained like the default one), which keeps each chain's keys and
values and computes one new row per block per token. A second pass with the decoder's stage counters on gives
the breakdown: table lookup, selector forward, choice, accumulator, router.

    python benchmarks/bench_decode.py --data ../shared/data/gsm8k/train.jsonl
    python benchmarks/bench_decode.py --shapes 2x128,4x256 --positions 16,256,1000,2000 --samples 16 --tokens 64
"""

from __future__ import annotations

import collections
import statistics
import time
from pathlib import Path

import common

TARGET_MS, TARGET_FLAT, TARGET_SPEEDUP = 1.0, 1.15, 10.0
CACHED = "overlay, ALiBi + KV cache"


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


def stage_samples(decoder, state, tokens: int, warmup: int = 2) -> list[dict[str, float]]:
    """Per decode step, seconds per stage from the decoder's counters (plus the step's total)."""
    out = []
    for i in range(warmup + tokens):
        if state.acc.stop_reason:
            break
        decoder.stage_seconds.clear()
        start = time.perf_counter()
        decoder.step([state])
        total = time.perf_counter() - start
        if i >= warmup:
            out.append(dict(decoder.stage_seconds) | {"total": total})
    return out


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


def selector_for(shape: tuple[int, int], trained, attn_span: int = 0):
    """The trained selector when it has this shape, else a randomly initialised one of that shape and kind
    (question-aware, or a window selector with ALiBi and ``attn_span``); a step's cost does not depend on the
    weights' values."""
    from overlay.selector import QASelector, QASelectorConfig, SelectorConfig, SelectorModel, alibi_window

    cfg = trained.config
    if (cfg.n_layer, cfg.n_embd) == shape:
        return trained
    import torch

    torch.manual_seed(0)
    n_layer, n_embd = shape
    if isinstance(trained, QASelector):
        return QASelector(QASelectorConfig(vocab_size=cfg.vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=4)).eval()
    extra = {"positions": "alibi", "attn_span": attn_span, "window": alibi_window(n_layer, attn_span)} if attn_span else {}
    return SelectorModel(SelectorConfig(**({"vocab_size": cfg.vocab_size, "window": cfg.window, "n_layer": n_layer,
                                            "n_embd": n_embd, "n_head": 4} | extra))).eval()


def run(args) -> dict:
    import torch

    from overlay.decode import DecodeConfig, OverlayDecoder

    torch.set_num_threads(args.threads)
    positions = [int(p) for p in args.positions.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    with common.overlay_home(args.home) as home:
        setup = common.setup_overlay(home, args.data)
        alibi = common.setup_overlay(home, args.data, attn_span=args.attn_span).model if args.attn_span else None
        questions, stream = forced_stream(args.data, setup.tokenizer, max(positions) * 3 + 1000)
        vocab = setup.table.vocab_size
        config = DecodeConfig(max_tokens=max(positions) * 2 + 10_000, max_step_repeats=10**9)
        times: dict[tuple, list[float]] = collections.defaultdict(list)
        stages: dict[tuple, list[dict[str, float]]] = collections.defaultdict(list)
        for shape in shapes:
            selector = selector_for(shape, setup.model)
            decoder = OverlayDecoder(setup.table, selector, setup.tokenizer, config)
            cached = OverlayDecoder(setup.table, selector_for(shape, alibi, args.attn_span), setup.tokenizer,
                                    config) if alibi is not None else None
            hf = gpt2(vocab, shape[0], shape[1], selector.config.n_head, max(positions) + 512 + args.tokens)
            label = f"{shape[0]}x{shape[1]}"
            for d in (decoder, cached):  # warm caches and the lookup script
                if d is not None:
                    time_overlay(d, overlay_state(d, questions[0], stream, 0, 16), 8)
            for rep in range(args.repeats):
                for p in positions:
                    for s in range(args.samples):
                        q = questions[(s * 7 + rep) % len(questions)]
                        offset = (s * 997 + rep * 131) % len(stream)
                        context = None
                        for cache in (True, False):
                            setup.table.cache_size = common_cache(cache)
                            state = overlay_state(decoder, q, stream, offset, p)
                            context = context or list(state.ids)
                            times[(label, "overlay" if cache else "overlay (no cache)", p)] += time_overlay(
                                decoder, state, args.tokens)
                        if cached is not None:
                            setup.table.cache_size = common_cache(True)
                            times[(label, CACHED, p)] += time_overlay(
                                cached, overlay_state(cached, q, stream, offset, p), args.tokens)
                        if not args.no_hf:  # the same context: question prompt + p forced tokens
                            times[(label, "HF generate()", p)] += time_generate(hf, context, args.tokens)
                    # breakdown pass (counters on), cache on
                    setup.table.cache_size = common_cache(True)
                    for name, d in (("overlay", decoder), (CACHED, cached)):
                        if d is None:
                            continue
                        d.stage_seconds = collections.defaultdict(float)
                        for s in range(max(1, args.samples // 2)):
                            state = overlay_state(d, questions[s], stream, s * 389 + rep, p)
                            stages[(label, name, p)] += stage_samples(d, state, args.tokens)
                        d.stage_seconds = None
            setup.table.cache_size = common_cache(True)
        e2e = end_to_end(setup, questions[:args.e2e_questions], args.threads)

    rows, results = [], []
    for shape in shapes:
        label = f"{shape[0]}x{shape[1]}"
        for method in ("overlay", "overlay (no cache)", CACHED, "HF generate()"):
            for p in positions:
                xs = times.get((label, method, p))
                if not xs:
                    continue
                s = common.summary([x * 1e3 for x in xs])
                results.append({"shape": label, "method": method, "position": p, "median_ms": s["median"],
                                "p99_ms": s["p99"], "mean_ms": s["mean"], "n": s["n"]})
    by = {(r["shape"], r["method"], r["position"]): r for r in results}
    for r in results:
        hf = by.get((r["shape"], "HF generate()", r["position"]))
        r["speedup_vs_hf"] = hf["median_ms"] / r["median_ms"] if hf and r["method"] != "HF generate()" else None
        first = by.get((r["shape"], r["method"], positions[0]))
        r["vs_first_position"] = r["median_ms"] / first["median_ms"] if first else None
        rows.append(r)
    common.table(rows, ["shape", "method", "position", "median_ms", "p99_ms", "n", "vs_first_position", "speedup_vs_hf"],
                 "Per-token decode time, batch 1, CPU")
    breakdown = []
    names = ["lookup", "selector", "choose", "accumulator", "router", "stop_rules"]
    for (label, method, p), samples in sorted(stages.items()):
        for stat, fn in (("median", statistics.median), ("mean", statistics.fmean)):
            row = {"shape": label, "method": method, "position": p, "stat": stat, "steps": len(samples)}
            row |= {k: fn([x.get(k, 0.0) for x in samples]) * 1e6 for k in names + ["total"]}
            row["unaccounted"] = row["total"] - sum(row[k] for k in names) if stat == "mean" else None
            breakdown.append(row)
    common.table(breakdown, ["shape", "method", "position", "stat", *names, "unaccounted", "total", "steps"],
                 "Overlay breakdown per token (µs per stage; table cache on; stage counters on)")
    common.table([e2e], list(e2e), "Overlay generate() end to end (greedy, default selector)")
    targets = check_targets(by, shapes[0], positions)
    common.table(targets, ["target", "measured", "met"], "Targets")
    return {"positions": positions, "shapes": [f"{a}x{b}" for a, b in shapes], "threads": args.threads,
            "samples": args.samples, "tokens": args.tokens, "repeats": args.repeats, "results": results,
            "breakdown_us": breakdown, "end_to_end": e2e, "targets": targets, "setup": setup.info}


def common_cache(on: bool) -> int:
    """The table cache size for the with/without runs."""
    from overlay.table import SemanticTable

    return SemanticTable.cache_size if on else 0


def end_to_end(setup: common.Setup, questions: list[str], threads: int) -> dict:
    """Whole-chain ``generate()`` on held questions: tokens per second including the trace and result."""
    from overlay.decode import DecodeConfig, OverlayDecoder

    decoder = OverlayDecoder(setup.table, setup.model, setup.tokenizer, DecodeConfig(max_tokens=256))
    decoder.generate(questions[0])
    results = [decoder.generate(q) for q in questions]
    tokens, seconds = sum(r.tokens for r in results), sum(r.seconds for r in results)
    return {"questions": len(results), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ms_per_token": seconds / tokens * 1e3, "threads": threads}


def check_targets(by: dict, shape: tuple[int, int], positions: list[int]) -> list[dict]:
    """The three decode targets for the default selector shape, for each selector kind that was timed."""
    label = f"{shape[0]}x{shape[1]}"
    out = []
    for method, kind in (("overlay", "slot selector"), (CACHED, "ALiBi selector, KV cache")):
        med = [by[(label, method, p)]["median_ms"] for p in positions if (label, method, p) in by]
        if med:
            out.append({"target": f"median ≤ {TARGET_MS} ms/token (all positions, {label}, {kind})",
                        "measured": f"{max(med):.3f} ms (worst position)", "met": max(med) <= TARGET_MS})
        lo, hi = (label, method, positions[0]), (label, method, positions[-1])
        if lo in by and hi in by:
            ratio = by[hi]["median_ms"] / by[lo]["median_ms"]
            out.append({"target": f"flat: pos {positions[-1]} / pos {positions[0]} ≤ {TARGET_FLAT} ({kind})",
                        "measured": f"{ratio:.3f}", "met": ratio <= TARGET_FLAT})
        p = 1000 if 1000 in positions else positions[len(positions) // 2]
        key = (label, method, p)
        if key in by and by[key].get("speedup_vs_hf"):
            sp = by[key]["speedup_vs_hf"]
            out.append({"target": f"≥ {TARGET_SPEEDUP:.0f}× faster than generate() at pos {p} ({kind})",
                        "measured": f"{sp:.1f}×", "met": sp >= TARGET_SPEEDUP})
    return out


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--positions", default="16,256,1000,2000", help="chain positions to time, comma-separated")
    p.add_argument("--shapes", default="2x128", help="LAYERSxWIDTH of selector and GPT-2 peer, e.g. 2x128,4x256")
    p.add_argument("--samples", type=int, default=8, help="chains per position and repeat")
    p.add_argument("--tokens", type=int, default=32, help="timed tokens per chain")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both (batch 1: one is fastest)")
    p.add_argument("--no-hf", action="store_true", help="skip the generate() peer")
    p.add_argument("--attn-span", type=int, default=8,
                   help="also time an ALiBi selector with this attention span decoded with its KV cache; 0 = skip")
    p.add_argument("--e2e-questions", type=int, default=8, help="questions for the end-to-end generate() figure")
    args = p.parse_args()
    common.write_json("decode", run(args), not args.no_json)


if __name__ == "__main__":
    main()
