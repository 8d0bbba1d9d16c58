"""Selector training speed: rows (target tokens) per second and time to reach a stated validation accuracy.

Builds the table and the token-level dataset of the first ``--chains`` chains (reused with ``--home``), then
trains the default selector (2 layers × 128) and records, at every evaluation, the held-out accuracy@1 over
the K candidates and the seconds since the start. CPU here; on a machine with CUDA it also trains on the GPU
(bf16 autocast, as ``overlay train`` does) and names the GPU.

    python benchmarks/bench_train.py --data ../shared/data/gsm8k/train.jsonl --chains 2000 --steps 600 --target 0.45
"""

from __future__ import annotations

import time

import common


def train_once(data_dir, out, device: str, args) -> dict:
    """One training run; returns speed and the time the held-out accuracy first reached the target."""
    import torch

    from overlay.train import TrainConfig, train

    reached: dict = {}
    start = time.perf_counter()

    def on_step(step: int, metrics: dict) -> None:
        acc = metrics.get("eval_accuracy")
        if acc is not None and acc >= args.target and not reached:
            reached.update(step=step, seconds=time.perf_counter() - start, accuracy=acc)

    cfg = TrainConfig(data=str(data_dir), out=str(out), steps=args.steps, batch_size=args.batch_size, device=device,
                      threads=args.threads if device == "cpu" else 0, eval_every=args.eval_every, eval_rows=args.eval_rows,
                      save_every=0, warmup=min(100, args.steps // 5))
    result = train(cfg, progress=False, on_step=on_step)
    k = 8
    return {"device": device if device == "cpu" else torch.cuda.get_device_name(0), "steps": result.step,
            "batch_size": args.batch_size, "rows_per_s": result.tokens_per_s, "window_tokens_per_s": result.tokens_per_s * k,
            "train_s": result.seconds, "final_eval_accuracy": result.eval_accuracy, "params": result.params,
            "target_accuracy": args.target, "reached_at_step": reached.get("step"),
            "reached_after_s": reached.get("seconds"), "history": result.history}


def run(args) -> dict:
    import torch

    from overlay.chains import load_chains
    from overlay.dataset import DatasetConfig, build_dataset

    with common.overlay_home(args.home) as home:
        _, table = common.setup_table(home, args.data)
        data_dir = home / "datasets" / f"train-bench-{args.chains}"
        start = time.perf_counter()
        if not (data_dir / "manifest.json").exists():
            build_dataset(table, table.tokenizer(), load_chains(args.data, "gsm8k", limit=args.chains).chains, data_dir,
                          DatasetConfig())
        dataset_s = time.perf_counter() - start
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        runs = [train_once(data_dir, home / "models" / f"train-bench-{d}", d, args) for d in devices]
    rows = [{k: v for k, v in r.items() if k != "history"} for r in runs]
    common.table(rows, ["device", "steps", "batch_size", "rows_per_s", "window_tokens_per_s", "train_s",
                        "final_eval_accuracy", "target_accuracy", "reached_at_step", "reached_after_s"],
                 f"Selector training ({args.chains} chains; rows = target tokens, each read through a k=8 window)")
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
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 oversubscribes a shared 2-core machine)")
    args = p.parse_args()
    common.write_json("train", run(args), not args.no_json)


if __name__ == "__main__":
    main()
