"""Learning new table versions from weighted chains: people's feedback, and self-improvement rounds.

A learned version is the active version copied server-side plus weighted n-gram count deltas (weight +1 adds a
chain's n-grams once, -1 takes them away, counts floored at 0). Like a build, it is marked ``building`` until
complete and the active pointer moves only then, with the same compare-and-set. Needs Redis ≥ 6.2 (COPY, ZMSCORE).

Feedback keys, besides the table's (see ``overlay.table``)::

    ovl:<domain>:feedback                                  stream: verdict, text, chain_id, answer per item
    ovl:<domain>:feedback:applied:{ovl:<domain>:active}    hash stream id → version the item went into, written in
                                                           the transaction that moves the pointer (hence its slot)
    ovl:<domain>:v<N>:meta  feedback_last_id               the last stream id version N includes

Items are appended first and applied later, in order: the pending ones are those after the active version's
``feedback_last_id``, so a process killed between append and apply, or during apply, loses none and applies none
twice. A version built from a dataset records no feedback, so the next apply carries all of it into that version.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from overlay.table import (TOTAL, SemanticTable, TableNotFound, _activate, _adopt_legacy_counter,
                           _counter_key, _delete_matching, _dkey, _text, _vkey, active_version, check_domain,
                           context_key, count_ngrams, drop_abandoned, lease, no_table_message)

VERDICTS = {"correct": 1.0, "wrong": -1.0}
MAX_TEXT_CHARS = 20_000
MAX_ANSWER_CHARS = 1_000
PER_VERSION_META = ("feedback_after", "feedback_items")  # what one learn did; not inherited by the next version


def _whole(value: float) -> int:
    """A weighted count change as whole counts (the table stores counts), rounding halves away from zero."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


@dataclass
class Deltas:
    """Weighted count changes: per context (orders 1..N) and for unigrams, with how many chains went each way."""

    contexts: dict[tuple[int, ...], dict[int, int]]
    unigrams: dict[int, int]
    raised: int = 0
    lowered: int = 0


def weighted_counts(sequences: Iterable[tuple[Sequence[int], float]], max_order: int, vocab_size: int) -> Deltas:
    """Sum each chain's n-gram counts (``count_ngrams``) times its weight, checking ids and weights on the way."""
    contexts: dict[tuple[int, ...], defaultdict[int, float]] = defaultdict(lambda: defaultdict(float))
    unigrams: defaultdict[int, float] = defaultdict(float)
    raised = lowered = 0
    for i, item in enumerate(sequences):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"sequence {i}: expected a (token ids, weight) pair, got {type(item).__name__}")
        seq, weight = item
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"sequence {i}: the weight must be a finite number, got {weight!r}")
        try:
            ids = [int(t) for t in seq]
        except (TypeError, ValueError):
            raise ValueError(f"sequence {i}: token ids must be integers, got {str(seq)[:60]}") from None
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"sequence {i}: token id {bad} is outside the vocabulary of size {vocab_size}")
        if not ids or weight == 0:
            continue
        raised, lowered = raised + (weight > 0), lowered + (weight < 0)
        orders, counts, _, _ = count_ngrams([ids], max_order)
        for by_context in orders[1:]:
            for ctx, nexts in by_context.items():
                for tok, c in nexts.items():
                    contexts[ctx][tok] += weight * c
        for tok, c in counts.items():
            unigrams[tok] += weight * c
    whole = {ctx: {t: _whole(d) for t, d in nexts.items() if _whole(d)} for ctx, nexts in contexts.items()}
    return Deltas({ctx: d for ctx, d in whole.items() if d},
                  {t: _whole(d) for t, d in unigrams.items() if _whole(d)}, raised, lowered)


@dataclass
class Plan:
    """The writes that turn a copy of the base version into the learned one, and the meta counts they change."""

    zadds: list[tuple[tuple[int, ...], dict[str, int]]] = field(default_factory=list)
    zrems: list[tuple[tuple[int, ...], list[str]]] = field(default_factory=list)
    deletes: list[tuple[int, ...]] = field(default_factory=list)
    per_order: dict[int, int] = field(default_factory=dict)
    entries: int = 0


def plan_writes(client, domain: str, base: int, deltas: Deltas, meta: dict[str, str], batch: int) -> Plan:
    """Read the base version's counts for every changed context (pipelined) and work out the learned values."""
    plan = Plan(per_order={int(n): int(c) for n, c in (p.split(":") for p in meta.get("per_order", "").split(",") if p)},
                entries=int(meta.get("entries", 0)))
    items = list(deltas.contexts.items())
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        pipe = client.pipeline(transaction=False)
        for ctx, d in chunk:
            pipe.zmscore(context_key(domain, base, ctx), [*map(str, d), TOTAL])
        for (ctx, d), scores in zip(chunk, pipe.execute()):
            *olds, before = (int(s or 0) for s in scores)
            total = before
            sets: dict[str, int] = {}
            removed: list[str] = []
            for (tok, change), old in zip(d.items(), olds):
                new = max(0, old + change)
                if new == old:
                    continue
                total += new - old
                plan.entries += (new > 0) - (old > 0)
                if new:
                    sets[str(tok)] = new
                else:
                    removed.append(str(tok))
            n = len(ctx)
            if total <= 0:
                if before > 0:
                    plan.deletes.append(ctx)
                    plan.per_order[n] = plan.per_order.get(n, 0) - 1
                continue
            if before == 0:
                plan.per_order[n] = plan.per_order.get(n, 0) + 1
            if sets or removed:
                plan.zadds.append((ctx, sets | {TOTAL: total}))
            if removed:
                plan.zrems.append((ctx, removed))
    return plan


def learn_version(
    client,
    domain: str,
    sequences: Iterable[tuple[Sequence[int], float]],
    *,
    source: str,
    extra_meta: dict[str, str | int | float] | None = None,
    base: int | None = None,
    batch: int = 1000,
    on_flush: Callable[[int, int], None] | None = None,
    on_activate: Callable[[Any, int], None] | None = None,
    tracks: Sequence[Any] = (),
) -> int:
    """Write a new version: the active one (or ``base``) plus each (token ids, weight) chain's n-gram counts times its
    weight.

    Counts are floored at 0 and entries at 0 removed; context totals, unigrams and meta counts stay consistent.
    Context keys are copied server-side (COPY within their hash slot), the changes applied on top, and the pointer
    moved only once the version is complete; ``on_activate(pipe, version)`` queues writes in that same transaction.
    An exception removes the partial version; a killed process leaves it ``building``, never active. ``on_flush``
    is called with (written, total) after each pipelined batch. The base's track memory is copied too, with
    ``tracks`` (``overlay.tracks.Track``, e.g. the verified chains) added: learning without retraining. Returns the new
    version (active unless a newer one finished first).
    """
    check_domain(domain)
    start = time.perf_counter()
    base = active_version(client, domain) if base is None else base
    if base is None:
        raise TableNotFound(no_table_message(client, domain, " to learn from"))
    meta = {_text(k): _text(v) for k, v in client.hgetall(_vkey(domain, base, "meta")).items()}
    if meta.get("status") != "complete":
        raise TableNotFound(f"version {base} of {domain!r} is {meta.get('status', 'missing')}, not complete")
    deltas = weighted_counts(sequences, int(meta["max_order"]), int(meta["vocab_size"]))
    if not deltas.raised + deltas.lowered:
        raise ValueError("nothing to learn: no non-empty sequence with a non-zero weight was given")
    plan = plan_writes(client, domain, base, deltas, meta, batch)
    unigrams = {int(m): int(c) for m, c in client.zrange(_vkey(domain, base, "o0"), 0, -1, withscores=True)}
    for tok, change in deltas.unigrams.items():
        unigrams[tok] = max(0, unigrams.get(tok, 0) + change)
    unigrams = {t: c for t, c in unigrams.items() if c}
    if not unigrams:
        raise ValueError(f"learning would leave domain {domain!r} without any token: every count would drop to 0")
    _adopt_legacy_counter(client, domain)
    drop_abandoned(client, domain)
    version = int(client.incr(_counter_key(domain)))
    meta_key = _vkey(domain, version, "meta")
    inherited = {k: v for k, v in meta.items() if k not in PER_VERSION_META}
    lease(client, domain, version)
    client.hset(meta_key, mapping=inherited | {"status": "building", "created": time.time(), "source": source,
                                          "based_on": base, "learned": f"+{deltas.raised} -{deltas.lowered} chains"})
    try:
        total = int(meta.get("contexts", 0)) + len(plan.zadds) + len(plan.zrems) + len(plan.deletes) + 1
        _copy_contexts(client, domain, base, version, batch, total, on_flush)
        from overlay.tracks import carry_tracks

        track_meta = carry_tracks(client, domain, base, version, tracks, batch)
        pipe = client.pipeline(transaction=False)
        members = list(unigrams.items())
        for i in range(0, len(members), batch):
            pipe.zadd(_vkey(domain, version, "o0"), {str(t): c for t, c in members[i : i + batch]})
        for ctx in plan.deletes:
            pipe.unlink(context_key(domain, version, ctx))
        for ctx, mapping in plan.zadds:
            pipe.zadd(context_key(domain, version, ctx), mapping)
        for ctx, removed in plan.zrems:
            pipe.zrem(context_key(domain, version, ctx), *removed)
        lease(pipe, domain, version)
        pipe.execute()
        if on_flush:
            on_flush(total, total)
        client.hset(meta_key, mapping=(extra_meta or {}) | track_meta | {
            "status": "complete",
            "tokens": sum(unigrams.values()),
            "sequences": max(0, int(meta.get("sequences", 0)) + deltas.raised - deltas.lowered),
            "contexts": sum(plan.per_order.values()),
            "entries": plan.entries,
            "per_order": ",".join(f"{n}:{c}" for n, c in sorted(plan.per_order.items())),
            "build_seconds": round(time.perf_counter() - start, 3),
        })
        client.unlink(_vkey(domain, version, "lease"))
        also = (lambda pipe: on_activate(pipe, version)) if on_activate else None
        active = _activate(client, domain, version, also)
    except BaseException:
        _discard(client, domain, version)
        raise
    if not active:
        _delete_matching(client, _vkey(domain, version, "*"))
        raise TableNotFound(f"domain {domain!r} was dropped while version {version} was being learned; nothing activated")
    return version


def _copy_contexts(client, domain: str, base: int, version: int, batch: int, total: int,
                   on_flush: Callable[[int, int], None] | None) -> None:
    """COPY every context key of ``base`` to ``version`` (SCAN, pipelined); source and copy share a hash tag."""
    src, dst = _vkey(domain, base, ""), _vkey(domain, version, "")
    queued = copied = 0
    pipe = client.pipeline(transaction=False)

    def flush() -> None:
        nonlocal copied
        lease(pipe, domain, version)
        copied += sum(pipe.execute()[:-1])
        if copied != queued:
            raise TableNotFound(f"version {base} of {domain!r} lost keys while it was being copied (dropped?)")
        if on_flush:
            on_flush(copied, total)

    for key in client.scan_iter(match=f"{src}o[1-9]*", count=batch):
        key = _text(key)
        pipe.copy(key, dst + key[len(src):], replace=True)
        queued += 1
        if len(pipe) >= batch:
            flush()
    if len(pipe):
        flush()


def _discard(client, domain: str, version: int) -> None:
    """Best effort: remove a learned version that did not complete (never the active one)."""
    with suppress(Exception):
        if active_version(client, domain) != version:
            _delete_matching(client, _vkey(domain, version, "*"))


def learn_chains(client, domain: str, chains: Iterable[Any], weight: float = 1.0, source: str = "chains") -> int:
    """Learn chain texts (or ``Chain`` objects) with one weight, tokenized with the active table's own tokenizer."""
    from overlay.tokenizer import encode

    from overlay.chains import Chain
    from overlay.tracks import make_tracks

    tok = SemanticTable(client, domain).tokenizer()
    chains = [c if hasattr(c, "to_text") else Chain.from_text(str(c)) for c in chains]
    return learn_version(client, domain, ((encode(tok, c.to_text()), weight) for c in chains), source=source,
                         tracks=make_tracks(chains) if weight > 0 else ())


# --- people's feedback -----------------------------------------------------------------------------------------


def feedback_key(domain: str) -> str:
    """The domain's feedback stream."""
    return _dkey(check_domain(domain), "feedback")


def applied_key(domain: str) -> str:
    """Hash stream id → version, hash-tagged into the active pointer's slot so activation writes it atomically."""
    return f"{_dkey(check_domain(domain), 'feedback:applied')}:{{{_dkey(domain, 'active')}}}"


@dataclass
class FeedbackItem:
    """One verdict from the feedback stream; ``version`` is the table version it went into (None: pending)."""

    id: str
    verdict: str
    text: str
    chain_id: str | None = None
    answer: str | None = None
    version: int | None = None

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: dict) -> FeedbackItem:
        """Read a stream entry, refusing one that append_feedback would not have written."""
        data = {_text(k): _text(v) for k, v in fields.items()}
        if data.get("verdict") not in VERDICTS or not data.get("text"):
            raise ValueError(f"feedback entry {_text(entry_id)} is malformed ({sorted(data)}); remove it with XDEL")
        return cls(_text(entry_id), data["verdict"], data["text"], data.get("chain_id") or None,
                   data.get("answer") or None)


@dataclass
class FeedbackReport:
    """What apply_feedback did: the items applied, the version they went into, the versions active before and after."""

    domain: str
    items: list[FeedbackItem]
    version: int | None
    previous: int
    active: int

    def summary(self) -> str:
        """One line for the CLI and the node."""
        if not self.items:
            return f"no pending feedback for {self.domain} (v{self.active} is active)"
        correct = sum(i.verdict == "correct" for i in self.items)
        line = (f"applied {len(self.items)} feedback item(s) to {self.domain}: {correct} correct (raised), "
                f"{len(self.items) - correct} wrong (lowered) → v{self.version} (was v{self.previous})")
        if self.active != self.version:
            line += f"; a newer v{self.active} finished first and stays active"
        return line


def _applied_through(client, domain: str) -> tuple[int, str | None]:
    """The active version and the last feedback stream id it includes (None: none)."""
    version = active_version(client, domain)
    if version is None:
        raise TableNotFound(no_table_message(client, domain))
    last = client.hget(_vkey(domain, version, "meta"), "feedback_last_id")
    return version, _text(last) if last else None


def _items_after(client, domain: str, last: str | None) -> list[FeedbackItem]:
    """Feedback items after stream id ``last`` (all of them when None), oldest first."""
    entries = client.xrange(feedback_key(domain), min=f"({last}" if last else "-", max="+")
    return [FeedbackItem.from_entry(i, f) for i, f in entries]


def chain_text(client, tokenizer: Any, chain_id: str) -> str:
    """The text of the chain a decoder saved under ``chain_id`` (its session id), decoded with ``tokenizer``."""
    from overlay.accumulator import SessionStore
    from overlay.tokenizer import decode

    saved = SessionStore(client).load_chain(chain_id)
    if saved is None:
        raise ValueError(f"unknown chain id {chain_id!r}: no decoded chain is saved under it (never decoded with "
                         "that id, or its saved state expired); give the chain's text instead")
    return decode(tokenizer, saved[1])


def append_feedback(client, domain: str, *, chain_id: str | None = None, text: str | None = None, verdict: str,
                    answer: str | None = None) -> str:
    """Record a verdict on a chain (by chain id, resolved to its text now, or by text) in the domain's feedback
    stream; returns the stream id. Nothing is learned until apply_feedback."""
    kind = (verdict or "").strip().lower()
    if kind not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}: use 'correct' or 'wrong'")
    chain_id = (chain_id or "").strip() or None
    if chain_id and text is not None and text.strip():
        raise ValueError("give either a chain id or a chain text, not both")
    if not chain_id and text is None:
        raise ValueError("give the chain id of a decoded chain or the chain's text")
    answer = " ".join((answer or "").split()) or None
    if answer and kind == "correct":
        raise ValueError("a right answer goes with verdict 'wrong' (the answer the wrong chain should have given)")
    if answer and len(answer) > MAX_ANSWER_CHARS:
        raise ValueError(f"the answer has {len(answer)} characters; the limit is {MAX_ANSWER_CHARS}")
    table = SemanticTable(client, domain)
    if not table.meta.get("tokenizer"):
        raise TableNotFound(f"table {domain!r} v{table.version} was built without a tokenizer: feedback cannot be "
                            "learned into it; rebuild it with `overlay table build`")
    text = " ".join((chain_text(client, table.tokenizer(), chain_id) if chain_id else text).split())
    if not text:
        raise ValueError("the chain text is empty: give the chain that was judged")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"the chain text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    fields = {"verdict": kind, "text": text, "chain_id": chain_id or "", "answer": answer or ""}
    return _text(client.xadd(feedback_key(domain), fields))


def pending_feedback(client, domain: str) -> list[FeedbackItem]:
    """Feedback items the active version does not include yet, oldest first."""
    _, last = _applied_through(client, domain)
    return _items_after(client, domain, last)


def apply_feedback(client, domain: str, *, batch: int = 1000,
                   on_flush: Callable[[int, int], None] | None = None) -> FeedbackReport:
    """Learn every pending item into ONE new version: correct chains weight +1, wrong ones -1 (a given right answer
    is recorded, not turned into an invented chain). The version's meta records the last stream id it includes and
    the pointer's transaction records item → version, so a kill at any point loses or repeats nothing."""
    previous, last = _applied_through(client, domain)
    items = _items_after(client, domain, last)
    if not items:
        return FeedbackReport(domain, [], None, previous, previous)
    from overlay.tokenizer import encode

    tok = SemanticTable(client, domain, previous).tokenizer()
    ids = [it.id for it in items]

    def record(pipe, version: int) -> None:
        pipe.hset(applied_key(domain), mapping=dict.fromkeys(ids, version))

    from overlay.chains import Chain
    from overlay.tracks import make_tracks

    accepted = [Chain.from_text(it.text) for it in items if VERDICTS[it.verdict] > 0]
    version = learn_version(
        client, domain, [(encode(tok, it.text), VERDICTS[it.verdict]) for it in items],
        source=f"feedback {ids[0]}..{ids[-1]}", base=previous, batch=batch, on_flush=on_flush, on_activate=record,
        tracks=make_tracks(accepted, [f"feedback-{it.id}" for it in items if VERDICTS[it.verdict] > 0]),
        extra_meta={"feedback_last_id": ids[-1], "feedback_after": last or "", "feedback_items": len(items)})
    active = active_version(client, domain) or version
    for it in items:
        it.version = version if active == version else None
    return FeedbackReport(domain, items, version, previous, active)


def _stream_id(value: str) -> tuple[int, int]:
    """A stream id as a comparable (milliseconds, sequence) pair."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def feedback_version(client, domain: str, entry_id: str) -> int | None:
    """The table version a feedback item went into, or None while it is pending (or unknown)."""
    _, last = _applied_through(client, domain)
    if last is None or _stream_id(entry_id) > _stream_id(last):
        return None
    version = client.hget(applied_key(domain), entry_id)
    return int(version) if version is not None else None

