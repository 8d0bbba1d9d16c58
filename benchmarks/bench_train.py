"""Selector training speed: rows (target tokens) per second and time to reach a stated validation accuracy.

Builds the table and the token-level dataset of the first ``--chains`` chains (reused with ``--home``), then
trains the default selector (2 layers × 128) and, on the same chains, an ALiBi selector of that shape
(``--attn-span``; its dataset windows are as long as its receptive field), and records, at every evaluation,
the held-out accuracy@1 over the K candidates and the seconds since the start. CPU here; on a machine with CUDA it also trains on the GPU
(bf16 autocast, as ``overlay train`` does) and names the GPU.

    python benchmarks/bench_train.py --data ../shared/data/gsm8k/train.jsonl --chains 2000 --steps 600 --target 0.45
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common


def train_once(data_dir, out, device: str, args, attn_span: int = 0) -> dict:
    """One training run (slot selector, or ALiBi with ``attn_span``); returns speed and the time the held-out
    accuracy first reached the target."""
    import torch

    from overlay.train import TrainConfig, train

    reached: dict = {}
    start = time.perf_counter()

    def on_step(step: int, metrics: dict) -> None:
        acc = metrics.get("eval_accuracy")
        if acc is not None and acc >= args.target and not reached:
            reached.update(step=step, seconds=time.perf_counter() - start, accuracy=acc)

    cfg = TrainConfig(data=str(data_dir), out=str(out), arch="window", steps=args.steps, batch_size=args.batch_size, device=device,
                      threads=args.threads if device == "cpu" else 0, eval_every=args.eval_every, eval_rows=args.eval_rows,
                      save_every=0, warmup=min(100, args.steps // 5), positions="alibi" if attn_span else "slot",
                      attn_span=attn_span)
    result = train(cfg, progress=False, on_step=on_step)
    k = json.loads((Path(data_dir) / "manifest.json").read_text())["k"]
    return {"device": device if device == "cpu" else torch.cuda.get_device_name(0),
            "selector": f"ALiBi, span {attn_span}, k={k}" if attn_span else f"slot, k={k}", "steps": result.step,
            "batch_size": args.batch_size, "rows_per_s": result.tokens_per_s, "window_tokens_per_s": result.tokens_per_s * k,
            "train_s": result.seconds, "final_eval_accuracy": result.eval_accuracy, "params": result.params,
            "target_accuracy": args.target, "reached_at_step": reached.get("step"),
            "reached_after_s": reached.get("seconds"), "history": result.history}


def run(args) -> dict:
    import torch

    from overlay.chains import load_chains
    from overlay.dataset import DatasetConfig, build_dataset
    from overlay.selector import alibi_window
    from overlay.train import TrainConfig

    with common.overlay_home(args.home) as home:
        _, table = common.setup_table(home, args.data)
        chains = load_chains(args.data, "gsm8k", limit=args.chains).chains
        spans = [0] + ([args.attn_span] if args.attn_span else [])
        start = time.perf_counter()
        datasets = {}
        for span in spans:  # an ALiBi selector reads windows as long as its receptive field
            window = alibi_window(TrainConfig().n_layer, span) if span else DatasetConfig().window
            datasets[span] = home / "datasets" / f"train-bench-{args.chains}-k{window}"
            if not (datasets[span] / "manifest.json").exists():
                build_dataset(table, table.tokenizer(), chains, datasets[span], DatasetConfig(window=window))
        dataset_s = time.perf_counter() - start
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        runs = [train_once(datasets[span], home / "models" / f"train-bench-{d}-{span}", d, args, span)
                for d in devices for span in spans]
    rows = [{k: v for k, v in r.items() if k != "history"} for r in runs]
    common.table(rows, ["device", "selector", "steps", "batch_size", "rows_per_s", "window_tokens_per_s", "train_s",
                        "final_eval_accuracy", "target_accuracy", "reached_at_step", "reached_after_s"],
                 f"Selector training ({args.chains} chains, 2 layers × 128; rows = target tokens)")
    if not torch.cuda.is_available():
        print("no CUDA device here: GPU training not measured")
    return {"chains": args.chains, "dataset_build_s": dataset_s, "runs": runs}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--chains", type=int, default=1000, help="chains in the training dataset")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="rows per step")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps")
    p.add_argument("--eval-rows", type=int, default=2000, help="held-out rows per evaluation")
    p.add_argument("--target", type=float, default=0.40, help="validation accuracy@1 over the candidates to reach")
    p.add_argument("--attn-span", type=int, default=8,
                   help="also train an ALiBi selector with this attention span on the same chains; 0 = skip")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 oversubscribes a shared 2-core machine)")
    args = p.parse_args()
    common.write_json("train", run(args), not args.no_json)


if __name__ == "__main__":
    main()
