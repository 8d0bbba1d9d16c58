"""Seconds per answer: GSM8K test questions decoded end to end in process, the overlay against the full-context peer.

For each question the overlay decodes a whole chain with ``OverlayDecoder.generate`` (greedy, tools called and
CHECKs verified, at most ``--max-tokens`` tokens, the default question-aware selector with its compiled step); the
peer, a GPT-2 of the same layers and width through ``generate()`` with its KV cache, then decodes a chain of the
same length from the same prompt (its cost does not depend on which tokens it picks), so both answer the same
questions with chains of the same length, interleaved in one run. Reported: seconds per answer (median and mean),
answers per second one after another, tokens per answer, and the peer ÷ overlay ratio.

    python benchmarks/bench_answers.py --questions ../shared/data/gsm8k/test.jsonl --count 16
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import common


def peer_answer(model, prompt: list[int], tokens: int) -> float:
    """Seconds for ``generate()`` to decode ``tokens`` tokens after ``prompt`` (prefill included), KV cache on."""
    import torch

    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, use_cache=True, pad_token_id=0)
    return time.perf_counter() - start


def run(args) -> dict:
    import torch

    from bench_decode import gpt2
    from overlay.chains import load_chains
    from overlay.decode import DecodeConfig, OverlayDecoder

    torch.set_num_threads(args.threads)
    questions = [c.question for c in load_chains(args.questions, "gsm8k", limit=args.count + 1).chains]
    with common.overlay_home(args.home) as home:
        setup = common.setup_overlay(home, args.data)
        decoder = OverlayDecoder(setup.table, setup.model, setup.tokenizer, DecodeConfig(max_tokens=args.max_tokens))
        cfg = setup.model.config
        peer = gpt2(setup.table.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, 1024)
        warm = decoder.generate(questions[-1])  # first call builds the scorer and loads the lookup script
        peer_answer(peer, decoder.new_state(questions[-1]).ids, warm.tokens)
        rows = []
        for q in questions[:args.count]:
            result = decoder.generate(q)
            prompt = decoder.new_state(q).ids
            rows.append({"tokens": result.tokens, "prompt_tokens": len(prompt), "overlay_s": result.seconds,
                         "peer_s": peer_answer(peer, prompt, result.tokens), "stop_reason": result.stop_reason,
                         "well_formed": result.well_formed})
    overlay, peer_s = [r["overlay_s"] for r in rows], [r["peer_s"] for r in rows]
    summary = [
        {"decoder": "overlay (in process)", "answers": len(rows), "median_s": statistics.median(overlay),
         "mean_s": statistics.fmean(overlay), "answers_per_s": len(rows) / sum(overlay),
         "ms_per_token": sum(overlay) / sum(r["tokens"] for r in rows) * 1e3},
        {"decoder": "full-context peer, generate() (in process)", "answers": len(rows),
         "median_s": statistics.median(peer_s), "mean_s": statistics.fmean(peer_s),
         "answers_per_s": len(rows) / sum(peer_s), "ms_per_token": sum(peer_s) / sum(r["tokens"] for r in rows) * 1e3},
    ]
    ratio = sum(peer_s) / sum(overlay)
    common.table(summary, ["decoder", "answers", "median_s", "mean_s", "answers_per_s", "ms_per_token"],
                 f"Seconds per answer, {Path(args.questions).name} ({statistics.fmean(r['tokens'] for r in rows):.0f} "
                 f"tokens per answer on average; peer ÷ overlay {ratio:.1f}×)")
    return {"questions": str(Path(args.questions).name), "count": len(rows), "max_tokens": args.max_tokens,
            "threads": args.threads, "mean_tokens": statistics.fmean(r["tokens"] for r in rows),
            "shape": f"{cfg.n_layer}x{cfg.n_embd}", "summary": summary, "peer_over_overlay": ratio, "answers": rows}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=Path, default=common.default_questions(), help="GSM8K-style JSONL to answer")
    p.add_argument("--count", type=int, default=16, help="questions to answer")
    p.add_argument("--max-tokens", type=int, default=256, help="token limit per chain (the decoder's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both")
    args = p.parse_args()
    common.write_json("answers", run(args), not args.no_json)


if __name__ == "__main__":
    main()
