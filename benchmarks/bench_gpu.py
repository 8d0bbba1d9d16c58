"""Batch decoding on a GPU: tokens per second at batch 1, 64 and 256 (fp32 and bf16), when CUDA is present.

``OverlayDecoder.generate_batch`` decodes B questions at once: per token position one pipelined table
lookup for all B chains and one batched selector forward on the GPU. Reported per batch size: decoded
tokens per second end to end, the share of time in table lookups vs the selector (the decoder's stage
counters), and the selector forward alone (CUDA-synchronised) for reference. Without CUDA it says so and
exits cleanly.

    python benchmarks/bench_gpu.py --data ../shared/data/gsm8k/train.jsonl --batches 1,64,256 --tokens 128
"""

from __future__ import annotations

import collections
import copy
import time

import common


def selector_only(model, batch: int, k: int, K: int, vocab: int, device, iters: int = 50) -> float:
    """Windows scored per second by the selector forward alone (random ids, synchronised timing)."""
    import torch

    windows = torch.randint(10, vocab, (batch, k), device=device)
    cands = torch.randint(10, vocab, (batch, K), device=device)
    for _ in range(5):
        model.score(windows, cands)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        model.score(windows, cands)
    torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def run(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA device: torch.cuda.is_available() is False on this machine; GPU batch decoding skipped"
        print(reason)
        return {"skipped": reason}
    from overlay.chains import load_chains
    from overlay.decode import DecodeConfig, OverlayDecoder

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(0)
    dtypes = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    batches = [int(b) for b in args.batches.split(",")]
    questions = [c.question for c in load_chains(args.data, "gsm8k", limit=max(batches)).chains]
    rows = []
    with common.overlay_home(args.home) as home:
        setup = common.setup_overlay(home, args.data)
        for dtype in dtypes:
            model = copy.deepcopy(setup.model).to(device=device, dtype=dtype).eval()
            config = DecodeConfig(max_tokens=args.tokens, max_step_repeats=10**9)
            decoder = OverlayDecoder(setup.table, model, setup.tokenizer, config)
            decoder.generate_batch(questions[:2])  # warm up CUDA kernels and the lookup script
            for batch in batches:
                qs = [questions[i % len(questions)] for i in range(batch)]
                rates = []
                decoder.stage_seconds = None
                for _ in range(args.repeats):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    results = decoder.generate_batch(qs)
                    torch.cuda.synchronize()
                    rates.append(sum(r.tokens for r in results) / (time.perf_counter() - start))
                decoder.stage_seconds = collections.defaultdict(float)
                decoder.generate_batch(qs)
                stages = dict(decoder.stage_seconds)
                decoder.stage_seconds = None
                total = sum(stages.values()) or 1.0
                rows.append({"gpu": gpu, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                             "tokens_per_s": sorted(rates)[len(rates) // 2], "best_tokens_per_s": max(rates),
                             "lookup_share": stages.get("lookup", 0) / total,
                             "selector_share": stages.get("selector", 0) / total,
                             "selector_only_windows_per_s": selector_only(model, batch, model.config.window, 32,
                                                                          setup.table.vocab_size, device)})
    common.table(rows, ["gpu", "dtype", "batch", "tokens_per_s", "lookup_share", "selector_share",
                        "selector_only_windows_per_s"], "GPU batch decoding (generate_batch, greedy)")
    return {"gpu": gpu, "tokens_per_chain": args.tokens, "rows": rows}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,64,256", help="batch sizes, comma-separated")
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded per chain")
    args = p.parse_args()
    common.write_json("gpu", run(args), not args.no_json)


if __name__ == "__main__":
    main()
