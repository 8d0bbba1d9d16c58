"""Lithography: cut each chain into one training row per target token (window, target, K candidates) as Parquet."""

from __future__ import annotations

import json
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from overlay.configs import DatasetConfig
from overlay.chains import ACTION, ANSWER, CHECK, EOS, PAD, RESULT, SPECIAL_TOKENS, THOUGHT, Chain
from overlay.table import SemanticTable
from overlay.tokenizer import check_tokenizers, encode, save_tokenizer

PAD_ID = SPECIAL_TOKENS.index(PAD)
EOS_ID = SPECIAL_TOKENS.index(EOS)
RESULT_ID = SPECIAL_TOKENS.index(RESULT)
STEP_TAG_IDS = frozenset(SPECIAL_TOKENS.index(t) for t in (THOUGHT, ACTION, RESULT, CHECK, ANSWER))
# Codes of the `tag` column; a <RESULT> tag token is a target but belongs to none of the four (code 0).
TAG_CODES = {SPECIAL_TOKENS.index(t): code for t, code in ((THOUGHT, 1), (ACTION, 2), (CHECK, 3), (ANSWER, 4))}
TAG_NAMES = {0: "NONE", 1: "THOUGHT", 2: "ACTION", 3: "CHECK", 4: "ANSWER"}
MISSING_WEIGHT = -30.0
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.parquet"
CHAINS_FILE = "chains.parquet"
CHAINS_SCHEMA = pa.schema([("chain", pa.int32()), ("ids", pa.list_(pa.int32())), ("prompt_len", pa.int32()),
                           ("split", pa.string())])


@dataclass
class Manifest:
    """What a finished build holds; its file is written last, so its presence means the build completed."""

    rows: int
    shards: list[str]
    config: dict
    k: int
    K: int
    vocab_size: int
    tokenizer_hash: str
    table: dict
    splits: dict
    present_rate: float
    chains: int = 0
    chains_file: str = ""

    def to_dict(self) -> dict:
        """Plain dict for manifest.json."""
        return asdict(self)


SCHEMA = pa.schema([
    ("window", pa.list_(pa.int32())),
    ("target", pa.int32()),
    ("candidates", pa.list_(pa.int32())),
    ("label", pa.int16()),
    ("present", pa.bool_()),
    ("table_weights", pa.list_(pa.float32())),
    ("order", pa.int8()),
    ("tag", pa.int8()),
    ("position", pa.int32()),
    ("chain", pa.int32()),
    ("split", pa.string()),
])


def target_mask(ids: Sequence[int]) -> list[bool]:
    """Which positions are training targets: from the first step tag on, except the contents of <RESULT> steps."""
    mask: list[bool] = []
    started = in_result = False
    for t in ids:
        if t in STEP_TAG_IDS or t == EOS_ID:
            started = started or t in STEP_TAG_IDS
            in_result = t == RESULT_ID
            mask.append(started)
        else:
            mask.append(started and not in_result)
    return mask


def token_tags(ids: Sequence[int]) -> list[int]:
    """Tag code (0 none, 1 THOUGHT, 2 ACTION, 3 CHECK, 4 ANSWER) of the step each token belongs to; a tag is its own step."""
    tags: list[int] = []
    current = 0
    for t in ids:
        if t in STEP_TAG_IDS:
            current = TAG_CODES.get(t, 0)
        tags.append(current)
    return tags


def window_of(ids: Sequence[int], pos: int, k: int) -> list[int]:
    """The last k ids before pos, left-padded with <PAD>=0."""
    ctx = list(ids[max(0, pos - k) : pos])
    return [PAD_ID] * (k - len(ctx)) + ctx


def split_chains(n: int, dev_fraction: float, seed: int) -> set[int]:
    """Seeded choice of dev chain ids (at least one when dev_fraction > 0 and there are ≥ 2 chains)."""
    n_dev = int(round(n * dev_fraction))
    if dev_fraction > 0 and n >= 2:
        n_dev = max(1, n_dev)
    return {int(i) for i in np.random.default_rng(seed).permutation(n)[:n_dev]}


class _Distractors:
    """Fills a candidate list up to K with distinct ids by the configured strategy (seeded per chain)."""

    def __init__(self, strategy: str, vocab_size: int, encoded: list[list[int]]):
        self.strategy = strategy
        self.uniform = np.ones(vocab_size)
        self.uniform[PAD_ID] = 0.0
        self.frequency = self.uniform.copy()
        self.by_tag = np.zeros((len(TAG_NAMES), vocab_size))
        for seq in encoded:
            ids = np.asarray(seq, dtype=np.int64)
            np.add.at(self.frequency, ids, 1.0)
            mask = np.array(target_mask(seq), dtype=bool)
            np.add.at(self.by_tag, (np.array(token_tags(seq))[mask], ids[mask]), 1.0)
        self.frequency[PAD_ID] = 0.0

    @staticmethod
    def _sample(weights: np.ndarray, taken: set[int], n: int, rng: np.random.Generator) -> list[int]:
        """n distinct ids drawn with probability ∝ weights (Gumbel top-n), skipping ids already taken."""
        w = weights.copy()
        w[list(taken)] = 0.0
        n = min(n, int(np.count_nonzero(w)))
        if n <= 0:
            return []
        keys = np.where(w > 0, np.log(np.where(w > 0, w, 1.0)) + rng.gumbel(size=w.shape), -np.inf)
        return [int(i) for i in np.argsort(-keys, kind="stable")[:n]]

    def fill(self, cands: list[int], K: int, tag: int, rng: np.random.Generator) -> list[int]:
        """Extra ids so that cands grows to K distinct ids (fewer only when the vocabulary is exhausted)."""
        if self.strategy == "table":
            pools = [self.uniform]
        elif self.strategy == "frequency":
            pools = [self.frequency]
        else:
            pools = [self.by_tag[[c for c in range(1, len(TAG_NAMES)) if c != tag]].sum(axis=0), self.frequency]
        taken = set(cands)
        extra: list[int] = []
        for pool in pools:
            got = self._sample(pool, taken, K - len(cands) - len(extra), rng)
            taken.update(got)
            extra += got
        return extra


class NeighbourCache:
    """GetNeighbours through an LRU cache keyed on the last max_order ids (contexts repeat a lot across chains)."""

    def __init__(self, table: SemanticTable, K: int, capacity: int):
        self.table = table
        self.K = K
        self.capacity = capacity
        self.cache: OrderedDict[tuple[int, ...], tuple[array, array, int]] = OrderedDict()

    def batch(self, contexts: list[tuple[int, ...]]) -> list[tuple[array, array, int]]:
        """(ids, weights, order) per context; one pipeline round trip for the contexts not cached."""
        found = {c: self.cache[c] for c in dict.fromkeys(contexts) if c in self.cache}
        missing = [c for c in dict.fromkeys(contexts) if c not in found]
        for c, nb in zip(missing, self.table.neighbours_batch(missing, self.K) if missing else []):
            found[c] = (array("i", nb.ids), array("f", nb.weights), nb.order)
        for c in found:
            self.cache[c] = found[c]
            self.cache.move_to_end(c)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return [found[c] for c in contexts]


class _ShardWriter:
    """Buffers rows column-wise and writes a Parquet shard every shard_rows rows (bounded memory)."""

    def __init__(self, out: Path, shard_rows: int):
        self.out = out
        self.shard_rows = shard_rows
        self.shards: list[str] = []
        self.rows = 0
        self.columns: dict[str, list] = {name: [] for name in SCHEMA.names}

    def add(self, row: dict) -> None:
        """Append one row; flush when the shard is full."""
        for name, value in row.items():
            self.columns[name].append(value)
        if len(self.columns["target"]) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as the next shard (atomically: temp file then rename)."""
        n = len(self.columns["target"])
        if not n:
            return
        name = f"shard-{len(self.shards):05d}.parquet"
        tmp = self.out / f".{name}.tmp"
        pq.write_table(pa.table(self.columns, schema=SCHEMA), tmp)
        os.replace(tmp, self.out / name)
        self.shards.append(name)
        self.rows += n
        self.columns = {name: [] for name in SCHEMA.names}


def prompt_length(ids: Sequence[int]) -> int:
    """Length of the prompt ``<Q> question`` (the selector's question memory): ids before the first step tag."""
    return next((i for i, t in enumerate(ids) if t in STEP_TAG_IDS), len(ids))


def write_chains(out: Path, encoded: list[list[int]], dev: set[int]) -> None:
    """Write every chain's ids and prompt length (whole-chain training reads them with the rows), atomically."""
    table = pa.table({"chain": list(range(len(encoded))), "ids": encoded,
                      "prompt_len": [prompt_length(ids) for ids in encoded],
                      "split": ["dev" if i in dev else "train" for i in range(len(encoded))]}, schema=CHAINS_SCHEMA)
    tmp = out / f".{CHAINS_FILE}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / CHAINS_FILE)


def _clear(out: Path) -> None:
    """Remove a previous build's manifest (first, so the folder reads as incomplete) and shards."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / CHAINS_FILE).unlink(missing_ok=True)
    for old in [*out.glob(SHARD_GLOB), *out.glob(".shard-*.tmp")]:
        old.unlink()


def build_dataset(table: SemanticTable, tokenizer, chains: Iterable[Chain], out: str | Path,
                  config: DatasetConfig | None = None) -> Manifest:
    """Write one row per target token of every chain into Parquet shards under out, then manifest.json."""
    config = config or DatasetConfig()
    out = Path(out)
    tok_hash = check_tokenizers({"tokenizer": tokenizer,
                                 f"table {table.domain} v{table.version}": table.meta.get("tokenizer_hash", "")})
    vocab_size = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    k, K = config.window, config.candidates
    encoded = [encode(tokenizer, c.to_text()) for c in chains]
    dev = split_chains(len(encoded), config.dev_fraction, config.seed)
    distractors = _Distractors(config.distractors, vocab_size, encoded)
    lookup = NeighbourCache(table, K, config.cache_contexts)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    writer = _ShardWriter(out, config.shard_rows)
    counts = {"train": 0, "dev": 0}
    present_total = 0
    pending: list[tuple] = []

    def process() -> None:
        nonlocal present_total
        contexts = [tuple(ids[max(0, pos - table.max_order) : pos]) for _, ids, pos, _, _ in pending]
        for (cid, ids, pos, tag, rng), (nb_ids, nb_weights, order) in zip(pending, lookup.batch(contexts)):
            target = ids[pos]
            cands, weights = nb_ids.tolist(), nb_weights.tolist()
            present = target in cands
            if not present:
                if len(cands) == K:
                    cands.pop()
                    weights.pop()
                cands.append(target)
                weights.append(MISSING_WEIGHT)
            extra = distractors.fill(cands, K, tag, rng) if len(cands) < K else []
            cands += extra
            weights += [MISSING_WEIGHT] * len(extra)
            split = "dev" if cid in dev else "train"
            counts[split] += 1
            present_total += present
            writer.add({
                "window": window_of(ids, pos, k), "target": target, "candidates": cands,
                "label": cands.index(target), "present": present, "table_weights": weights,
                "order": order, "tag": tag, "position": pos, "chain": cid, "split": split,
            })
        pending.clear()

    for cid, ids in enumerate(tqdm(encoded, desc="lithography", unit="chain", disable=None)):
        rng = np.random.default_rng((config.seed, cid))
        tags = token_tags(ids)
        for pos, is_target in enumerate(target_mask(ids)):
            if is_target and pos > 0:
                pending.append((cid, ids, pos, tags[pos], rng))
                if len(pending) >= config.batch:
                    process()
    if pending:
        process()
    writer.flush()
    write_chains(out, encoded, dev)
    save_tokenizer(tokenizer, out)
    manifest = Manifest(
        rows=writer.rows, shards=writer.shards, config=asdict(config), k=k, K=K, vocab_size=vocab_size,
        tokenizer_hash=tok_hash, table={"domain": table.domain, "version": int(table.version)}, splits=counts,
        present_rate=present_total / writer.rows if writer.rows else 0.0, chains=len(encoded), chains_file=CHAINS_FILE,
    )
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest


def _expected_table(expect: SemanticTable | Mapping | None) -> dict | None:
    """Normalise the table a caller expects to {domain, version (or None)}."""
    if expect is None:
        return None
    if isinstance(expect, SemanticTable):
        return {"domain": expect.domain, "version": int(expect.version)}
    return {"domain": expect.get("domain"), "version": expect.get("version")}


def load_dataset(folder: str | Path, expect_tokenizer_hash: str | None = None,
                 expect_table: SemanticTable | Mapping | None = None) -> tuple[Manifest, pa.Table]:
    """Read a finished build (manifest + all shards), refusing incomplete, empty or mismatched ones."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"incomplete build: {folder} has no {MANIFEST} (the build did not finish; rebuild it)")
    manifest = Manifest(**json.loads(path.read_text()))
    if manifest.K < 2 or manifest.k < 1:
        raise ValueError(f"dataset {folder} has k={manifest.k}, K={manifest.K}: need k ≥ 1 and K ≥ 2")
    if manifest.rows == 0:
        raise ValueError(f"empty dataset: {folder} has 0 rows (no chain had a target token)")
    check_tokenizers({"expected": expect_tokenizer_hash, f"dataset {folder}": manifest.tokenizer_hash})
    want = _expected_table(expect_table)
    if want is not None:
        have = manifest.table
        if want["domain"] != have["domain"] or (want["version"] is not None and int(want["version"]) != have["version"]):
            raise ValueError(f"table mismatch: dataset {folder} was built from {have['domain']} v{have['version']}, "
                             f"expected {want['domain']} v{want['version']}")
    missing = [s for s in manifest.shards if not (folder / s).is_file()]
    if missing:
        raise FileNotFoundError(f"incomplete build: {folder} lacks shards {missing}")
    data = pa.concat_tables([pq.read_table(folder / s, schema=SCHEMA) for s in manifest.shards])
    if data.num_rows != manifest.rows:
        raise ValueError(f"dataset {folder} has {data.num_rows} rows but its manifest says {manifest.rows}")
    return manifest, data


def with_variants(chains: Sequence[Chain], variants: int, seed: int = 0) -> tuple[list[Chain], list[str]]:
    """Every source chain plus up to ``variants`` stellator variants of each chain that can become a track, and the
    lines that say what was added and why the other chains have none (no source chain is ever dropped)."""
    from overlay.variants import VariantConfig, VariantError, stellator

    try:
        vset, stats = stellator(chains, VariantConfig(variants=variants, heldout=0, seed=seed))
    except VariantError as exc:
        return list(chains), [f"stellator: no variants ({exc}); training on the {len(chains)} source chains alone"]
    added = [v.chain for v in vset.train if v.index]
    lines = [f"stellator: {stats['tracks']} of {stats['chains']} chains became tracks and gained {len(added)} "
             f"variants ({stats['verified']} of {len(vset.variants)} sources and variants verify); training on all "
             f"{len(chains)} source chains + {len(added)} variants"]
    if stats["chains_skipped"]:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in stats["chains_skipped"].items())
        lines.append(f"{stats['chains'] - stats['tracks']} chains kept without variants — {reasons}")
    return [*chains, *added], lines


def answer_warning(chains: Sequence[Chain], noisy: int, answer_field: str) -> str | None:
    """One line when a field mapping looks wrong: most gold answers are not numbers, or most records are noisy (their
    CHECK could not be derived from the steps), so exact-match would score 0 without saying why; else None."""
    from overlay.router import extract_answer

    words = [c.answer for c in chains if extract_answer(c.answer) is None]
    parts = []
    if 2 * len(words) > len(chains):
        parts.append(f"{len(words)} of {len(chains)} gold answers are not numbers (e.g. {words[0]!r})")
    if 2 * noisy > len(chains):
        parts.append(f"{noisy} of {len(chains)} records are noisy (their CHECK is not derived from the steps)")
    if not parts:
        return None
    return (f"{' and '.join(parts)}: is --answer-field {answer_field!r} the field with the numeric answer? "
            "Exact-match against these answers would score 0")
