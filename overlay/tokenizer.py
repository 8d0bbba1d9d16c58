"""Train, save, load and fingerprint the local BPE tokenizer whose chain tags are atomic special tokens."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from overlay.chains import ANSWER, BOS, CHECK, EOS, PAD, RESULT, SPECIAL_TOKENS, THOUGHT, UNK, ACTION, Q

META = "\u2581"  # "▁": stands for a space inside tokens (SentencePiece convention); decoded back to " "
# Byte fallback: a character never seen in training encodes as its UTF-8 bytes, one `<0xNN>` token each, never <UNK>.
BYTE_TOKENS: list[str] = [f"<0x{b:02X}>" for b in range(256)]
# Math symbols that are not Unicode punctuation (×, ÷, −); ASCII operators are covered by Punctuation().
_MATH = Regex("[\u00d7\u00f7\u2212]")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Spaces → ▁ word starts; punctuation and operators (+-*/=()$%.,) isolated; numbers split digit by digit."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=META, prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Split(_MATH, behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])


def _wrap(tk: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw tokenizers.Tokenizer as a transformers tokenizer with pad/unk/bos/eos and tags set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=[Q, THOUGHT, ACTION, RESULT, CHECK, ANSWER],
        clean_up_tokenization_spaces=False,
    )


def _with_byte_tokens(tk: Tokenizer) -> Tokenizer:
    """The trained tokenizer with BYTE_TOKENS at ids 10..265 (trained tokens shifted after them) and byte fallback on."""
    data = json.loads(tk.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    learnt = sorted((t for t in vocab if t not in SPECIAL_TOKENS), key=vocab.__getitem__)
    data["model"]["vocab"] = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *BYTE_TOKENS, *learnt])}
    data["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(data))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-fallback BPE tokenizer of vocab_size tokens in all on chain texts: specials get ids 0..9 in
    SPECIAL_TOKENS order, the 256 byte tokens the next ids, the learnt tokens the rest."""
    tk = Tokenizer(models.BPE(unk_token=UNK))
    tk.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - len(BYTE_TOKENS), 0), min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tk.train_from_iterator((t for t in texts if isinstance(t, str)), trainer=trainer)
    tk = _with_byte_tokens(tk)
    tk.decoder = decoders.Sequence([decoders.ByteFallback(),
                                    decoders.Metaspace(replacement=META, prepend_scheme="never", split=True)])
    for i, s in enumerate(SPECIAL_TOKENS):
        if tk.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tk.token_to_id(s)}, expected {i}")
    return _wrap(tk)


def save_tokenizer(tok: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    """Write tokenizer.json (+ save_pretrained files) into folder atomically, file by file; returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-tmp-", dir=folder))
    try:
        tok.save_pretrained(str(tmp))
        tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        # tokenizer.json goes last so its presence means the other files are already in place.
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        names.sort(key=lambda n: n == "tokenizer.json")
        for name in names:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load from a folder (save_tokenizer / save_pretrained output) or a tokenizer.json file."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        where = f"folder {p} has no tokenizer.json" if p.is_dir() else f"no such file: {p}"
        raise FileNotFoundError(f"cannot load tokenizer: {where}")
    return _wrap(Tokenizer.from_file(str(file)))


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """Rebuild a tokenizer from its tokenizer.json text (tables keep theirs in the Redis meta hash)."""
    return _wrap(Tokenizer.from_str(text))


def tokenizer_hash(tok: PreTrainedTokenizerFast | Tokenizer) -> str:
    """First 16 hex chars of sha256 over the canonical tokenizer.json, to check tables/datasets/models match."""
    backend = tok if isinstance(tok, Tokenizer) else tok.backend_tokenizer
    data = json.loads(backend.to_str())
    data["truncation"] = data["padding"] = None  # runtime settings, not part of the vocabulary contract
    canon = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def encode(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of text without BOS/EOS; unseen characters become byte tokens (<UNK>, id 1, only with a tokenizer
    trained before byte fallback)."""
    if not text:
        return []
    return tok.backend_tokenizer.encode(str(text), add_special_tokens=False).ids


def decode(tok: PreTrainedTokenizerFast, ids: Sequence[int]) -> str:
    """Text of ids with special tokens kept visible; out-of-range ids decode as <UNK>."""
    n = tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    unk = SPECIAL_TOKENS.index(UNK)
    clean = [int(i) if 0 <= int(i) < n else unk for i in ids]
    return tok.backend_tokenizer.decode(clean, skip_special_tokens=False)


class TokenizerMismatch(ValueError):
    """Parts that must share one tokenizer (table, dataset, model, tokenizer) were made with different ones."""


def check_tokenizers(parts: dict[str, PreTrainedTokenizerFast | Tokenizer | str | None]) -> str:
    """The one compatibility check: every part (description → tokenizer or tokenizer_hash; None or "" = not recorded,
    skipped) must have the first recorded part's fingerprint. Returns it ("" if none); else raises TokenizerMismatch."""
    hashes = {what: p if isinstance(p, str) else tokenizer_hash(p) for what, p in parts.items() if p not in (None, "")}
    if not hashes:
        return ""
    (first, expected), *rest = hashes.items()
    odd = [f"{what} ({h})" for what, h in rest if h != expected]
    if odd:
        verb = "uses" if len(odd) == 1 else "use"
        raise TokenizerMismatch(f"{' and '.join(odd)} {verb} another tokenizer than {first} ({expected})")
    return expected
