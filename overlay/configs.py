"""The dataset and training options, in a module without torch or pyarrow, so the CLI starts fast.

The ``overlay dataset build`` and ``overlay train`` flags are generated from these dataclasses' fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DISTRACTORS = ("table", "frequency", "cluster")
ARCHS = ("qa", "peer", "window")


@dataclass
class DatasetConfig:
    """How chains are cut into rows (one config per entry point, TRL style; the CLI is built from it)."""

    window: int = field(default=8, metadata={
        "help": "k: how many previous tokens the selector reads (left-padded with <PAD>=0)."})
    candidates: int = field(default=32, metadata={
        "help": "K: candidates per row (the table's neighbours, true token included)."})
    distractors: str = field(default="table", metadata={
        "help": "How to fill rows the table cannot fill to K (it returned fewer, i.e. it knows fewer tokens): "
                "'table' (uniform over the tokens it never saw), 'frequency' (sample by unigram frequency in the "
                "chains) or 'cluster' (tokens frequent in other step types than the target's)."})
    shard_rows: int = field(default=100_000, metadata={"help": "Rows per Parquet shard (memory stays bounded by this)."})
    seed: int = field(default=0, metadata={"help": "Seed for the train/dev split and distractor sampling."})
    dev_fraction: float = field(default=0.05, metadata={"help": "Fraction of chains (by chain id) put in the dev split."})
    batch: int = field(default=512, metadata={"help": "Contexts per GetNeighbours pipeline round trip."})
    cache_contexts: int = field(default=100_000, metadata={
        "help": "Distinct table contexts whose neighbours are kept in memory (contexts repeat across chains)."})

    def __post_init__(self) -> None:
        """Reject settings that cannot make a usable dataset before any work is done."""
        if self.window < 1:
            raise ValueError(f"window k must be ≥ 1, got {self.window}")
        if not 2 <= self.candidates <= np.iinfo(np.int16).max:
            raise ValueError(f"candidates K must be ≥ 2 (the target and at least one distractor) and fit the int16 "
                             f"label, got {self.candidates}")
        if self.distractors not in DISTRACTORS:
            raise ValueError(f"distractors must be one of {DISTRACTORS}, got {self.distractors!r}")
        if self.shard_rows < 1 or self.batch < 1 or self.cache_contexts < 0:
            raise ValueError(f"shard_rows and batch must be ≥ 1 and cache_contexts ≥ 0, got "
                             f"{self.shard_rows}, {self.batch}, {self.cache_contexts}")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")



@dataclass
class TrainConfig:
    """Every option of a selector training run; the CLI is generated from these fields."""

    data: str = field(default="", metadata={"help": "Dataset folder (manifest.json, shard-*.parquet, tokenizer.json)."})
    out: str = field(default="selector", metadata={"help": "Model folder to write (adapters go to OUT/adapters/DOMAIN)."})
    arch: str = field(default="qa", metadata={
        "help": "qa: question-aware selector trained on whole chains (question memory, step state, copy candidates); "
                "peer: same-size full-context GPT-2 on the same chains (the baseline); window: the older k-token "
                "window selector (--positions slot|alibi)."})
    question_len: int = field(default=256, metadata={"help": "qa: question tokens kept in memory (new model only)."})
    chain_span: int = field(default=16, metadata={"help": "qa: chain tokens each token attends to (new model only)."})
    result_tokens: int = field(default=64, metadata={"help": "qa: tool-result tokens kept in memory (new model only)."})
    chains_per_batch: int = field(default=16, metadata={"help": "qa/peer: whole chains per batch."})
    max_chain: int = field(default=384, metadata={"help": "qa/peer: chain tokens trained on per chain (longer are cut)."})
    n_layer: int = field(default=2, metadata={"help": "Transformer blocks (new model only)."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (new model only)."})
    n_embd: int = field(default=128, metadata={"help": "Embedding width (new model only)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability (new model only)."})
    positions: str = field(default="slot", metadata={
        "help": "slot: learned window-slot embeddings; alibi: distance penalties with --attn-span, decoded with a "
                "KV cache (new model only)."})
    attn_span: int = field(default=0, metadata={
        "help": "Tokens each token attends to (alibi); needs dataset window ≥ n_layer·(span−1)+1; 0 = whole window."})
    base: str = field(default="", metadata={"help": "Start from this selector folder or local HF causal LM folder."})
    steps: int = field(default=2000, metadata={"help": "Optimizer steps (ignored when epochs > 0)."})
    epochs: int = field(default=0, metadata={"help": "Passes over the training rows; 0 = use steps."})
    batch_size: int = field(default=256, metadata={"help": "Windows per batch."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices (not biases/norms)."})
    warmup: int = field(default=100, metadata={"help": "Linear warmup steps before the cosine decay."})
    min_lr: float = field(default=0.1, metadata={"help": "Final learning rate as a fraction of lr."})
    full_vocab_weight: float = field(default=0.0, metadata={"help": "Weight of the extra full-vocabulary loss term."})
    eval_every: int = field(default=200, metadata={"help": "Evaluate on held-out rows every N steps; 0 = at the end only."})
    eval_rows: int = field(default=20000, metadata={"help": "Held-out rows per evaluation (seeded sample); 0 = all."})
    save_every: int = field(default=500, metadata={"help": "Write OUT/checkpoint every N steps and at the end; 0 = never."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and the eval sample."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA with bf16 autocast if present), cpu, cuda, cuda:N."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default."})
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter on a frozen base instead of the model."})
    domain: str = field(default="", metadata={"help": "Adapter name (default: the dataset's table domain)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    target_modules: str = field(default="", metadata={"help": "LoRA module names, comma-separated; empty = c_attn,c_proj,c_fc."})
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoint in OUT with the same settings."})
    max_rows: int = field(default=0, metadata={"help": "Load at most this many rows (quick runs); 0 = all."})

    def __post_init__(self) -> None:
        """Reject values that cannot train, naming the option."""
        checks = [
            (self.steps >= 1 or self.epochs >= 1, "steps or epochs must be ≥ 1"),
            (self.epochs >= 0, "epochs must be ≥ 0"),
            (self.batch_size >= 1, "batch_size must be ≥ 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be ≥ 0"),
            (self.warmup >= 0, "warmup must be ≥ 0"),
            (0 <= self.min_lr <= 1, "min_lr is a ratio of lr and must be in [0, 1]"),
            (self.full_vocab_weight >= 0, "full_vocab_weight must be ≥ 0"),
            (min(self.eval_every, self.eval_rows, self.save_every, self.threads, self.max_rows) >= 0,
             "eval_every, eval_rows, save_every, threads and max_rows must be ≥ 0"),
            (min(self.n_layer, self.n_head, self.n_embd, self.lora_r) >= 1, "n_layer, n_head, n_embd, lora_r must be ≥ 1"),
            (self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (0 <= self.dropout < 1 and 0 <= self.lora_dropout < 1, "dropout and lora_dropout must be in [0, 1)"),
            (self.positions in ("slot", "alibi"), f"positions must be slot or alibi, got {self.positions!r}"),
            (self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}"),
            (min(self.question_len, self.chain_span, self.result_tokens, self.chains_per_batch, self.max_chain) >= 1,
             "question_len, chain_span, result_tokens, chains_per_batch and max_chain must be ≥ 1"),
            (self.attn_span >= 0 and (self.positions == "slot" or self.attn_span >= 1),
             "attn_span must be ≥ 0, and ≥ 1 with positions=alibi"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))


@dataclass
class ImproveConfig:
    """One self-improvement run (the CLI options are its fields)."""

    rounds: int = field(default=3, metadata={"help": "Rounds to reach (a resumed run continues up to this)."})
    questions: int = field(default=200, metadata={"help": "Training questions decoded per round (0 = all)."})
    samples: int = field(default=4, metadata={"help": "Chains decoded per question (chain 0 greedy, the rest sampled)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of chains 1..n-1."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus (top-p) of the sampled chains."})
    max_tokens: int = field(default=256, metadata={"help": "Token limit of each decoded chain."})
    steps: int = field(default=200, metadata={"help": "Selector training steps per round."})
    replay: float = field(default=1.0, metadata={
        "help": "Original training chains mixed in per kept chain (keeps the selector from forgetting them)."})
    chains_per_batch: int = field(default=8, metadata={"help": "Chains per training batch."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of each round's training."})
    test_limit: int = field(default=200, metadata={"help": "Test questions decoded after each round (with --test)."})
    live: int = field(default=2, metadata={
        "help": "Held-out variants per learned question, decoded before and after the table update (0: skip)."})
    seed: int = field(default=0, metadata={"help": "Seed of question order, sampling and replay."})
    threads: int = field(default=2, metadata={"help": "CPU threads for training."})

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.samples < 1 or self.questions < 0 or self.steps < 1 or self.max_tokens < 1 or self.replay < 0:
            raise ValueError("need rounds ≥ 1, samples ≥ 1, questions ≥ 0, steps ≥ 1, max_tokens ≥ 1 and replay ≥ 0")
