"""Whole-chain training examples for the question-aware selector, built from the token-level rows.

A chain's rows (position, table candidates, label) stay the unit of the dataset; here they are grouped per chain
so training runs one forward per chain. Copy candidates are added the way decoding adds them: the whole numbers
of the question, and of tool results still in memory. Where the next tokens spell a number that is visible,
the label is that copy value (the number is emitted whole) and the positions inside it are not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from overlay.chains import BOS, SPECIAL_TOKENS
from overlay.selector.model import PAD_ID
from overlay.selector.qa import QASelectorConfig
from overlay.selector.state import NumberSpans, step_states

BOS_ID = SPECIAL_TOKENS.index(BOS)
NEVER = 1 << 30


@dataclass
class ChainExample:
    """One chain ready for a forward: memory, stream, state, scored positions and copy occurrences."""

    question: list[int]
    stream: list[int]
    states: list[tuple[int, int, int]]
    pinned: list[bool]
    at: list[int]
    candidates: list[list[int]]
    labels: list[int]
    occurrences: list[tuple[bool, int, int, int, int]]  # (in question, index, value, from, until)
    values: list[str]


def occurrences(question: Sequence[int], stream: Sequence[int], pinned: Sequence[bool], numbers: NumberSpans,
                result_tokens: int) -> tuple[list[tuple[bool, int, int, int, int]], list[str]]:
    """Copyable numbers: the question's (always visible) and the tool results' (visible once the token after them
    is read, as decoding knows a number has ended, until ``result_tokens`` later pinned tokens have pushed its
    first token out of memory)."""
    values: dict[str, int] = {}
    occ = []
    for first, _, value in numbers.spans(question):
        occ.append((True, first, values.setdefault(value, len(values)), 0, NEVER))
    cum, total = [], 0
    for p in pinned:
        total += p
        cum.append(total)
    for first, end, value in numbers.spans(stream):
        if not pinned[first]:
            continue
        until = next((p for p in range(first, len(stream)) if cum[p] - cum[first] >= result_tokens), NEVER)
        occ.append((False, first, values.setdefault(value, len(values)), end, until))
    return occ, list(values)


def make_example(ids: Sequence[int], prompt_len: int, positions: Sequence[int], candidates: Sequence[Sequence[int]],
                 labels: Sequence[int], numbers: NumberSpans, config: QASelectorConfig, max_chain: int) -> ChainExample:
    """Group one chain's rows (absolute positions in ids, table candidates, labels into them) into an example."""
    question = list(ids[:min(prompt_len, config.question_len)])
    stream = [BOS_ID, *ids[prompt_len:]][:max_chain]
    states = step_states(stream)
    pinned = [s.in_result for s in states]
    feats = [s.features(config.max_steps, config.max_results) for s in states]
    occ, values = occurrences(question, stream, pinned, numbers, config.result_tokens)
    k = len(candidates[0]) if len(candidates) else 0
    at, cands, labs, skip_until = [], [], [], -1
    for pos, cand, label in zip(positions, candidates, labels):
        p = pos - prompt_len
        if pos < skip_until or p < 0 or p >= len(stream) - 1:
            continue
        found = numbers.number_at(ids, pos)
        if found is not None:
            end, value = found
            if value in values and any(v == values.index(value) and f <= p < u for _, _, v, f, u in occ):
                label = k + values.index(value)
                skip_until = end
        at.append(p)
        cands.append(list(cand))
        labs.append(int(label))
    return ChainExample(question, stream, feats, pinned, at, cands, labs, occ, values)


def collate(examples: Sequence[ChainExample], device: torch.device | str = "cpu") -> dict:
    """Pad a batch of examples into the keyword arguments of ``QASelector.forward``."""
    b = len(examples)
    lq = max(len(e.question) for e in examples)
    t = max(len(e.stream) for e in examples)
    j = max(1, max(len(e.occurrences) for e in examples))
    question = torch.full((b, lq), PAD_ID, dtype=torch.long)
    chain = torch.full((b, t), PAD_ID, dtype=torch.long)
    states = torch.zeros((b, t, 3), dtype=torch.long)
    pinned = torch.zeros((b, t), dtype=torch.bool)
    occ_pos = torch.zeros((b, j), dtype=torch.long)
    occ_value = torch.full((b, j), -1, dtype=torch.long)
    occ_from = torch.full((b, j), NEVER, dtype=torch.long)
    occ_until = torch.full((b, j), NEVER, dtype=torch.long)
    rows, at, cands, labels = [], [], [], []
    for i, e in enumerate(examples):
        question[i, :len(e.question)] = torch.tensor(e.question)
        chain[i, :len(e.stream)] = torch.tensor(e.stream)
        states[i, :len(e.stream)] = torch.tensor(e.states)
        pinned[i, :len(e.stream)] = torch.tensor(e.pinned)
        for n, (in_q, index, value, start, until) in enumerate(e.occurrences):
            occ_pos[i, n] = index if in_q else lq + index
            occ_value[i, n], occ_from[i, n], occ_until[i, n] = value, start, until
        rows += [i] * len(e.at)
        at += e.at
        cands += e.candidates
        labels += e.labels
    batch = {"question_ids": question, "chain_ids": chain, "states": states, "pinned": pinned,
             "rows": torch.tensor(rows, dtype=torch.long), "at": torch.tensor(at, dtype=torch.long),
             "candidate_ids": torch.tensor(cands, dtype=torch.long).reshape(len(at), -1),
             "labels": torch.tensor(labels, dtype=torch.long), "occ_pos": occ_pos, "occ_value": occ_value,
             "occ_from": occ_from, "occ_until": occ_until}
    batch = {name: v.to(device) for name, v in batch.items()}
    batch["n_values"] = max(len(e.values) for e in examples)
    return batch


def load_chains_with_rows(folder: Path, manifest: dict, max_rows: int = 0) -> list[tuple[list[int], int, bool, tuple]]:
    """Every chain of a dataset folder: (ids, prompt length, in the dev split, (positions, candidates, labels))."""
    from overlay.dataset import CHAINS_FILE

    path = folder / CHAINS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dataset {folder} has no {CHAINS_FILE}: rebuild it with `overlay dataset build` "
                                "(whole-chain training needs each chain's ids)")
    chains = pq.read_table(path).to_pydict()
    parts, total = [], 0
    for name in manifest.get("shards") or sorted(p.name for p in folder.glob("shard-*.parquet")):
        table = pq.read_table(folder / name, columns=["chain", "position", "candidates", "label"])
        parts.append(table)
        total += len(table)
        if max_rows and total >= max_rows:
            break
    rows = pa.concat_tables(parts)
    chain = rows.column("chain").to_numpy()
    position = rows.column("position").to_numpy()
    k = int(manifest["K"])
    cands = rows.column("candidates").combine_chunks().flatten().to_numpy().reshape(-1, k)
    label = rows.column("label").to_numpy()
    order = np.lexsort((position, chain))
    bounds = np.flatnonzero(np.diff(chain[order])) + 1
    out = []
    for group in np.split(order, bounds):
        if not len(group):
            continue
        cid = int(chain[group[0]])
        out.append((list(chains["ids"][cid]), int(chains["prompt_len"][cid]), chains["split"][cid] == "dev",
                    (position[group].tolist(), cands[group].tolist(), label[group].tolist())))
    return out


class ChainSource:
    """Batches of whole chains of similar length (less padding), in an order seeded per epoch: the batches of a
    step depend on the step alone, so a resumed run replays what an uninterrupted one would have done."""

    pool = 50

    def __init__(self, train: list, held: list, collate_fn: Callable[[list], dict], per_batch: int, seed: int) -> None:
        self.train, self.held, self.collate_fn, self.per_batch, self.seed = train, held, collate_fn, per_batch, seed
        self.lengths = [self._length(e) for e in train]
        self._epoch: tuple[int, list[list[int]]] = (-1, [])

    @staticmethod
    def _length(example: Any) -> int:
        return len(example.question) + len(example.stream) if isinstance(example, ChainExample) else len(example[0])

    def __len__(self) -> int:
        return len(self.train)

    def _batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches: a seeded permutation cut into pools, each sorted by length and cut into batches,
        the batches shuffled."""
        if self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.train), generator=gen).tolist()
            size = self.per_batch * self.pool
            batches = []
            for start in range(0, len(order), size):
                pool = sorted(order[start:start + size], key=self.lengths.__getitem__)
                batches += [pool[i:i + self.per_batch] for i in range(0, len(pool), self.per_batch)
                            if len(pool[i:i + self.per_batch]) == self.per_batch]
            shuffled = torch.randperm(len(batches), generator=gen).tolist()
            self._epoch = (epoch, [batches[i] for i in shuffled])
        return self._epoch[1]

    def batch(self, step: int) -> dict:
        """The chains of one training step."""
        epoch, j = divmod(step, max(1, len(self.train) // self.per_batch))
        batches = self._batches(epoch)
        return self.collate_fn([self.train[i] for i in batches[j % len(batches)]])

    def held_out(self) -> Iterator[dict]:
        """The held-out chains in batches."""
        for start in range(0, len(self.held), self.per_batch):
            yield self.collate_fn(self.held[start:start + self.per_batch])
