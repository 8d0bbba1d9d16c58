"""The IT-LM selector: the question-aware model (``qa``), the window models (``model``), their decode-time scorers,
the wrapper for any local Hugging Face causal LM (``hf``) and folder I/O (``io``)."""

from overlay.selector.hf import HFCausalSelector
from overlay.selector.io import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    Selector,
    check_model_folder,
    load_model,
    load_selector,
    replace_dir,
    resolve_device,
    save_selector,
)
from overlay.selector.model import (
    IGNORE_INDEX,
    LORA_TARGETS,
    PAD_ID,
    SQRT_HALF,
    Attention,
    Block,
    SelectorConfig,
    SelectorModel,
    SelectorOutput,
    alibi_slopes,
    alibi_window,
    candidate_head,
    key_mask,
    unwrap,
)
from overlay.selector.qa import QAOutput, QASelector, QASelectorConfig, attention_plan
from overlay.selector.qa_scorer import ChainMemory, QAScorer
from overlay.selector.scorers import CachedScorer, FastScorer, KVCache

__all__ = [
    "CONFIG_FILE", "IGNORE_INDEX", "LORA_TARGETS", "PAD_ID", "SQRT_HALF", "TOKENIZER_FILE", "WEIGHTS_FILE",
    "WEIGHTS_INDEX", "Attention", "Block", "CachedScorer", "ChainMemory", "FastScorer", "HFCausalSelector", "KVCache",
    "QAOutput", "QAScorer", "QASelector", "QASelectorConfig", "Selector", "SelectorConfig", "SelectorModel",
    "SelectorOutput", "alibi_slopes", "alibi_window", "attention_plan", "candidate_head", "check_model_folder",
    "key_mask", "load_model", "load_selector", "replace_dir", "resolve_device", "save_selector", "unwrap",
]
