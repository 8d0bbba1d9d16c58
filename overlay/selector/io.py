"""Saving, checking and loading selector folders the Hugging Face way (config, safetensors, tokenizer.json)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

from overlay.selector.hf import HFCausalSelector
from overlay.selector.model import SelectorConfig, SelectorModel
from overlay.selector.qa import QASelector, QASelectorConfig
from overlay.tokenizer import load_tokenizer

CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX, TOKENIZER_FILE = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json")


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" / "cpu" / "cuda[:n]" to a torch.device; asking for CUDA without it is an error, not a fallback."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"CUDA was requested but torch.cuda.is_available() is False (device {name!r}); "
            "use device='cpu' or 'auto', or install a CUDA build of torch on a machine with a GPU")
    return device


Selector = QASelector | SelectorModel | HFCausalSelector


def replace_dir(tmp: Path, folder: Path) -> None:
    """Swap a completed ``tmp`` folder in for ``folder``; the previous folder survives until the swap is done."""
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def save_selector(model: Selector, tokenizer: PreTrainedTokenizerFast | str | Path, folder: str | Path) -> Path:
    """Write config.json, model.safetensors and tokenizer.json (an object, or a path to copy) atomically.

    Entries of an existing folder that the new save does not write (adapters/, checkpoint/, train_result.json)
    are carried over, so saving a model never loses its adapters or checkpoints.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(str(tmp))
        if isinstance(tokenizer, (str, Path)):
            src = Path(tokenizer)
            shutil.copy2(src / TOKENIZER_FILE if src.is_dir() else src, tmp / TOKENIZER_FILE)
        else:
            tokenizer.save_pretrained(str(tmp))
        if folder.is_dir():
            for entry in folder.iterdir():
                if not (tmp / entry.name).exists():
                    os.replace(entry, tmp / entry.name)
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_model_folder(folder: str | Path, tokenizer: bool = True) -> Path:
    """Raise FileNotFoundError naming the folder and each missing file (config, weights, tokenizer if asked)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is a LoRA adapter folder, not a model: load it with "
                                "overlay.train.load_adapters(<model folder>, [<adapter name>])")
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    wanted = (CONFIG_FILE, TOKENIZER_FILE) if tokenizer else (CONFIG_FILE,)
    missing = [name for name in wanted if not (folder / name).is_file()]
    if not ((folder / WEIGHTS_FILE).is_file() or (folder / WEIGHTS_INDEX).is_file()):
        missing.insert(1, WEIGHTS_FILE)
    if missing:
        raise FileNotFoundError(f"selector folder {folder} is missing {', '.join(missing)}")
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> Selector:
    """Load the weights of a model folder: a QASelector, a window SelectorModel, or any local causal LM wrapped as
    HFCausalSelector (the full-context peer included: its config says ``overlay_peer``)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"model folder {folder} is missing {CONFIG_FILE}")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if isinstance(config, QASelectorConfig):
        model: Selector = QASelector.from_pretrained(str(folder), local_files_only=True)
    elif isinstance(config, SelectorConfig):
        model = SelectorModel.from_pretrained(str(folder), local_files_only=True)
    else:
        model = HFCausalSelector(folder)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval()


def load_selector(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Selector, PreTrainedTokenizerFast]:
    """Check the folder holds config.json, model.safetensors and tokenizer.json, then load (model, tokenizer)."""
    folder = check_model_folder(folder)
    return load_model(folder, device), load_tokenizer(folder)


AutoConfig.register(SelectorConfig.model_type, SelectorConfig, exist_ok=True)
AutoModel.register(SelectorConfig, SelectorModel, exist_ok=True)
AutoConfig.register(QASelectorConfig.model_type, QASelectorConfig, exist_ok=True)
AutoModel.register(QASelectorConfig, QASelector, exist_ok=True)
