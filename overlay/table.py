"""The semantic-weight table: context n-grams (orders 1..N) → weighted next tokens, in Redis.

Key layout (one domain, one version ``N``)::

    ovl:domains                         set of domain names
    ovl:<domain>:active                 version readers use; set only when a build completed, only forward
    ovl:<domain>:next:{ovl:<domain>:active}  version counter, hash-tagged into the active pointer's slot
    ovl:<domain>:v<N>:meta              hash: status, orders, alpha, vocab size, counts, tokenizer
    ovl:<domain>:v<N>:o0                zset token id → count (unigrams, the fallback)
    ovl:<domain>:v<N>:o<n>:{<last>}:<ids>  zset token id → count for the context ``ids`` of length n,
                                        plus the member ``t`` holding the context's total count

The hash tag is the context's *last* token id, so every order of one lookup lives in one slot (one
round trip, also on Redis Cluster) while the table as a whole spreads over thousands of slots. The version
counter shares the active pointer's slot so that a build can compare-and-set the pointer against it in one
transaction; releases before that kept the counter at ``ovl:<domain>:next``, which the next build adopts.

Weight of token ``w`` after context ``c`` of order n: the Lidstone-smoothed log-probability
``ln((count(c, w) + alpha) / (count(c) + alpha * V))`` with V the vocabulary size. Candidates filled in
from lower orders ("backoff") get their own order's weight plus ``ln(0.4)`` per order backed off
(stupid backoff, Brants et al. 2007), so weights stay comparable across the merged list.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from collections import OrderedDict
from dataclasses import dataclass, field

import psutil
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

TOTAL = "t"
BACKOFF = math.log(0.4)
PREFIX = "ovl"
DOMAIN_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
UNIGRAM_CACHE = 256
# A version being built or learned holds a lease (its owner: host, pid, process start), renewed with every batch; a
# "building" version whose owner is gone (or whose lease ran out) is abandoned and removed by the next build or learn.
LEASE_S = 600
# GetNeighbours on the server: every order's top k+1 members and counts (the total ``t`` among them) as one
# compact string, orders separated by ';' (see SemanticTable._parse): cheap to parse, unlike nested RESP replies.
LOOKUP_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = table.concat(redis.call('ZREVRANGE', key, 0, tonumber(ARGV[1]), 'WITHSCORES'), ',')
end
return table.concat(out, ';')
"""
LOOKUP_SHA = hashlib.sha1(LOOKUP_SCRIPT.encode()).hexdigest()


class TableNotFound(LookupError):
    """The domain or version asked for does not exist or is not complete."""


def check_domain(domain: str) -> str:
    """Validate a domain name (it becomes part of Redis keys, so no braces, spaces or colons)."""
    if not DOMAIN_RE.match(domain or ""):
        raise ValueError(f"invalid domain name {domain!r}: use 1-64 characters of letters, digits, '_', '.', '-'")
    return domain


def _dkey(domain: str, suffix: str) -> str:
    return f"{PREFIX}:{domain}:{suffix}"


def _vkey(domain: str, version: int, suffix: str) -> str:
    return f"{PREFIX}:{domain}:v{version}:{suffix}"


def _counter_key(domain: str) -> str:
    """The version counter, hash-tagged with the active pointer's name so both live in one cluster slot."""
    return f"{_dkey(domain, 'next')}:{{{_dkey(domain, 'active')}}}"


def context_key(domain: str, version: int, context: Sequence[int]) -> str:
    """Key of the zset for one context (order = len(context) ≥ 1), hash-tagged on its last token."""
    ids = ",".join(map(str, context))
    return _vkey(domain, version, f"o{len(context)}:{{{context[-1]}}}:{ids}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Neighbours:
    """Candidates for one context: ids best first, their weights and counts, the order each came from."""

    ids: list[int]
    weights: list[float]
    counts: list[int]
    orders: list[int]
    order: int

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class BuildStats:
    """What a build wrote, for the meta hash and the CLI."""

    version: int
    tokens: int = 0
    sequences: int = 0
    contexts: int = 0
    entries: int = 0
    seconds: float = 0.0
    per_order: dict[int, int] = field(default_factory=dict)
    active: int = 0  # the version active once this build finished: a newer one may have finished first


def count_ngrams(sequences: Iterable[Sequence[int]], max_order: int) -> tuple[list[dict], Counter, int, int]:
    """Count next tokens per context for orders 1..max_order, and unigrams; returns (orders, unigrams, tokens, seqs)."""
    orders: list[dict[tuple[int, ...], Counter]] = [defaultdict(Counter) for _ in range(max_order + 1)]
    unigrams: Counter = Counter()
    tokens = seqs = 0
    for seq in sequences:
        seq = list(seq)
        seqs += 1
        tokens += len(seq)
        unigrams.update(seq)
        for i in range(1, len(seq)):
            target = seq[i]
            for n in range(1, min(max_order, i) + 1):
                orders[n][tuple(seq[i - n : i])][target] += 1
    return orders, unigrams, tokens, seqs


def build_table(
    client,
    domain: str,
    sequences: Iterable[Sequence[int]],
    *,
    vocab_size: int,
    tokenizer_json: str = "",
    tokenizer_hash: str = "",
    max_order: int = 3,
    alpha: float = 0.1,
    source: str = "",
    batch: int = 1000,
    on_flush: Callable[[int, int], None] | None = None,
    tracks: Sequence | None = None,
) -> BuildStats:
    """Count n-grams and write them as a new version; the active pointer moves only once all is written.

    ``tracks`` (``overlay.tracks.Track``) are written into the same version before it is marked complete, so the
    track memory is activated with the table.

    ``on_flush(written, total)`` is called after each pipelined batch (progress bars use it). If the
    build stops for any reason, the new version stays marked ``building`` and the previous active
    version is untouched; once its process is gone the next build or learn (or ``drop_table``) removes it.
    """
    check_domain(domain)
    if max_order < 1:
        raise ValueError(f"max_order must be ≥ 1, got {max_order}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    start = time.perf_counter()
    orders, unigrams, tokens, seqs = count_ngrams(sequences, max_order)
    if tokens == 0:
        raise ValueError(f"no tokens to build domain {domain!r} from: the input is empty")
    _adopt_legacy_counter(client, domain)
    drop_abandoned(client, domain)
    version = int(client.incr(_counter_key(domain)))
    stats = BuildStats(version=version, tokens=tokens, sequences=seqs)
    meta_key = _vkey(domain, version, "meta")
    lease(client, domain, version)
    client.sadd(f"{PREFIX}:domains", domain)
    client.hset(
        meta_key,
        mapping={
            "status": "building",
            "created": time.time(),
            "max_order": max_order,
            "alpha": alpha,
            "vocab_size": vocab_size,
            "source": source,
            "tokenizer_hash": tokenizer_hash,
            "tokenizer": tokenizer_json,
        },
    )
    total = 1 + sum(len(o) for o in orders)
    written = 0
    pipe = client.pipeline(transaction=False)
    pipe.zadd(_vkey(domain, version, "o0"), {str(t): c for t, c in unigrams.items()})
    for n in range(1, max_order + 1):
        stats.per_order[n] = len(orders[n])
        for ctx, nexts in orders[n].items():
            mapping = {str(t): c for t, c in nexts.items()}
            mapping[TOTAL] = sum(nexts.values())
            pipe.zadd(context_key(domain, version, ctx), mapping)
            stats.entries += len(nexts)
            if len(pipe) >= batch:
                written += len(pipe)
                lease(pipe, domain, version)
                pipe.execute()
                if on_flush:
                    on_flush(written, total)
    written += len(pipe)
    lease(pipe, domain, version)
    pipe.execute()
    if on_flush:
        on_flush(written, total)
    stats.contexts = total - 1
    track_meta: dict[str, str | int] = {}
    if tracks:
        from overlay.tracks import write_tracks

        track_meta = write_tracks(client, domain, version, tracks)
        lease(client, domain, version)
    stats.seconds = time.perf_counter() - start
    client.hset(
        meta_key,
        mapping=track_meta | {
            "status": "complete",
            "tokens": tokens,
            "sequences": seqs,
            "contexts": stats.contexts,
            "entries": stats.entries,
            "build_seconds": round(stats.seconds, 3),
            "per_order": ",".join(f"{n}:{c}" for n, c in stats.per_order.items()),
        },
    )
    client.unlink(_vkey(domain, version, "lease"))
    stats.active = _activate(client, domain, version)
    if not stats.active:
        _delete_matching(client, _vkey(domain, version, "*"))
        raise TableNotFound(f"domain {domain!r} was dropped while version {version} was being built; nothing activated")
    return stats


def _adopt_legacy_counter(client, domain: str) -> None:
    """Move a counter kept at ``ovl:<domain>:next`` (tables built by older releases) into the active pointer's slot."""
    legacy = _dkey(domain, "next")
    value = client.get(legacy)
    if value is not None:
        client.set(_counter_key(domain), value, nx=True)
        client.delete(legacy)


def _activate(client, domain: str, version: int, also: Callable[[object], None] | None = None) -> int:
    """Point readers at ``version`` unless a newer one is already active (compare-and-set under WATCH).

    ``also(pipe)`` queues more writes in the same transaction, done only when the pointer moves (on Redis Cluster
    their keys must share the active pointer's slot). Returns the version active afterwards, or 0 when the counter
    never issued ``version`` (the domain was dropped).
    """
    active, counter = _dkey(domain, "active"), _counter_key(domain)

    def compare_and_set(pipe) -> int:
        current = int(pipe.get(active) or 0)
        if version > int(pipe.get(counter) or 0):
            return 0
        if version <= current:
            return current
        pipe.multi()
        pipe.set(active, version)
        if also is not None:
            also(pipe)
        return version

    return client.transaction(compare_and_set, active, counter, value_from_callable=True)


def list_domains(client) -> list[str]:
    """Names of all domains with at least one version (complete or not)."""
    return sorted(_text(d) for d in client.smembers(f"{PREFIX}:domains"))


def complete_domains(client) -> list[str]:
    """Names of the domains that have an active (complete) version: the ones a reader can open."""
    names = list_domains(client)
    pipe = client.pipeline(transaction=False)
    for domain in names:
        pipe.exists(_dkey(domain, "active"))
    return [d for d, found in zip(names, pipe.execute() if names else []) if found]


def no_table_message(client, domain: str, what: str = "") -> str:
    """The error for a domain without a complete table, naming the domains that have one."""
    known = ", ".join(complete_domains(client)) or "none"
    building = " (its versions are still being built, or were abandoned)" if domain in list_domains(client) else ""
    return f"no complete table for domain {domain!r}{what}{building}; domains with a complete table: {known}"


def lease(pipe, domain: str, version: int) -> None:
    """Queue (or set) the lease of a version this process is writing, renewed for another ``LEASE_S``."""
    me = psutil.Process()
    pipe.set(_vkey(domain, version, "lease"), f"{socket.gethostname()} {me.pid} {me.create_time()}", ex=LEASE_S)


def _owner_gone(held: bytes | str | None, created: float) -> bool:
    """Whether a building version's writer is gone: its lease ran out (or it never had one and is old), or the lease
    names a process of this host that no longer runs."""
    if held is None:
        return time.time() - created > LEASE_S
    host, pid, started = _text(held).split()
    if host != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) > 1.0
    except psutil.NoSuchProcess:
        return True


def abandoned_versions(client, domain: str, known: dict[int, dict[str, str]] | None = None) -> list[int]:
    """The domain's "building" versions whose build or learn was killed (its owner is gone)."""
    known = versions(client, domain) if known is None else known
    building = [v for v, meta in known.items() if meta.get("status") == "building"]
    pipe = client.pipeline(transaction=False)
    for v in building:
        pipe.get(_vkey(domain, v, "lease"))
    held = pipe.execute() if building else []
    return [v for v, h in zip(building, held) if _owner_gone(h, float(known[v].get("created") or 0))]


def drop_abandoned(client, domain: str) -> list[int]:
    """Remove the abandoned "building" versions of a domain (never the active one), so killed builds cost no memory."""
    active = active_version(client, domain)
    gone = [v for v in abandoned_versions(client, domain) if v != active]
    for v in gone:
        _delete_matching(client, _vkey(domain, v, "*"))
    return gone


def versions(client, domain: str) -> dict[int, dict[str, str]]:
    """Every version of a domain with its meta (the tokenizer text left out), oldest first."""
    check_domain(domain)
    last = int(client.get(_counter_key(domain)) or client.get(_dkey(domain, "next")) or 0)
    pipe = client.pipeline(transaction=False)
    for v in range(1, last + 1):
        pipe.hgetall(_vkey(domain, v, "meta"))
    out: dict[int, dict[str, str]] = {}
    for v, meta in zip(range(1, last + 1), pipe.execute() if last else []):
        if meta:
            out[v] = {_text(k): _text(val) for k, val in meta.items() if _text(k) != "tokenizer"}
    return out


def active_version(client, domain: str) -> int | None:
    """The version readers get for ``domain``, or None when no build has completed."""
    value = client.get(_dkey(check_domain(domain), "active"))
    return int(value) if value is not None else None


def _delete_matching(client, pattern: str) -> int:
    """Delete keys matching ``pattern`` with SCAN + pipelined single-key UNLINKs (cluster-safe)."""
    deleted = 0
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=pattern, count=1000):
        pipe.unlink(key)
        if len(pipe) >= 1000:
            deleted += sum(pipe.execute())
    if len(pipe):
        deleted += sum(pipe.execute())
    return deleted


def drop_table(client, domain: str, version: int | None = None, *, keep_active: bool = False) -> list[int]:
    """Remove one version, every version but the active one (``keep_active``), or the whole domain.

    Dropping the active version on its own is refused: readers would lose their table.
    Returns the versions removed.
    """
    known = versions(client, domain)
    active = active_version(client, domain)
    if not known:
        raise TableNotFound(f"no table for domain {domain!r}; known: {', '.join(list_domains(client)) or 'none'}")
    if version is not None:
        if version not in known:
            raise TableNotFound(f"domain {domain!r} has no version {version}; versions: {sorted(known)}")
        if version == active:
            raise ValueError(f"version {version} is the active one of {domain!r}: drop the whole domain instead")
        targets = [version]
    elif keep_active:
        targets = [v for v in known if v != active]
    else:
        targets = list(known)
    for v in targets:
        _delete_matching(client, _vkey(domain, v, "*"))
    if version is None and not keep_active:
        for key in (_dkey(domain, "active"), _counter_key(domain), _dkey(domain, "next")):
            client.delete(key)
        client.srem(f"{PREFIX}:domains", domain)
    return targets


class SemanticTable:
    """Read side of one domain's table (the active version unless one is named): GetNeighbours."""

    cache_size: int = 4096  # contexts kept client-side (a complete version never changes); 0 turns caching off
    _scripted: bool | None = None  # server-side lookup script: None until tried, False where the server refuses it

    def __init__(self, client, domain: str, version: int | None = None):
        check_domain(domain)
        self.client = client
        self.domain = domain
        self.version = version if version is not None else active_version(client, domain)
        if self.version is None:
            raise TableNotFound(no_table_message(client, domain))
        meta = {_text(k): _text(v) for k, v in client.hgetall(_vkey(domain, self.version, "meta")).items()}
        if meta.get("status") != "complete":
            raise TableNotFound(f"version {self.version} of {domain!r} is {meta.get('status', 'missing')}, not complete")
        self.meta = meta
        self.max_order = int(meta["max_order"])
        self.alpha = float(meta["alpha"])
        self.vocab_size = int(meta["vocab_size"])
        self._unigram: Neighbours | None = None

    def info(self) -> dict[str, str]:
        """The version's meta hash, without the embedded tokenizer text."""
        return {k: v for k, v in self.meta.items() if k != "tokenizer"} | {"domain": self.domain, "version": str(self.version)}

    def tokenizer(self):
        """The tokenizer the table was built with (stored in the meta hash)."""
        from overlay.tokenizer import tokenizer_from_json

        if not self.meta.get("tokenizer"):
            raise TableNotFound(f"table {self.domain!r} v{self.version} was built without a tokenizer")
        return tokenizer_from_json(self.meta["tokenizer"])

    def _weight(self, count: float, total: float) -> float:
        return math.log((count + self.alpha) / (total + self.alpha * self.vocab_size))

    def unigrams(self, k: int) -> Neighbours:
        """Top-k unigrams (cached client-side: they never change within a version)."""
        if self._unigram is None or (len(self._unigram) < k and len(self._unigram) == UNIGRAM_CACHE):
            rows = self.client.zrevrange(_vkey(self.domain, self.version, "o0"), 0, max(k, UNIGRAM_CACHE) - 1, withscores=True)
            total = int(self.meta["tokens"])
            ids = [int(m) for m, _ in rows]
            counts = [int(c) for _, c in rows]
            self._unigram = Neighbours(ids, [self._weight(c, total) for c in counts], counts, [0] * len(ids), 0)
        u = self._unigram
        return Neighbours(u.ids[:k], u.weights[:k], u.counts[:k], u.orders[:k], 0)

    def _check_ids(self, context: Sequence[int]) -> list[int]:
        ctx = [int(t) for t in context][-self.max_order :]
        for i, t in enumerate(ctx):
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} (context position {i}) is outside the vocabulary of size {self.vocab_size}")
        return ctx

    def _queue(self, pipe, ctx: list[int], k: int) -> int:
        """Queue one context's lookup (all orders, one command) on ``pipe``; returns the commands queued.

        The server-side script reads the top k+1 members of every order's zset (highest order first) and replies
        with one compact string, which parses far faster than nested RESP replies.
        """
        keys = [context_key(self.domain, self.version, ctx[-n:]) for n in range(len(ctx), 0, -1)]
        pipe.evalsha(LOOKUP_SHA, len(keys), *keys, k)
        return 1

    @staticmethod
    def _parse(reply) -> list[tuple[int, list[int], list[int]]]:
        """(total, ids, counts) per order from the script's compact reply (``id,count,…`` per order, ';' between).

        Ids are numbers and the total's member is ``t``, so swapping ``t`` for -1 makes the reply a JSON array
        that the C parser reads in one call.
        """
        if isinstance(reply, str):
            reply = reply.encode()
        out = []
        for vals in json.loads(b"[[" + reply.replace(b"t,", b"-1,").replace(b";", b"],[") + b"]]"):
            members, counts = vals[0::2], vals[1::2]
            total = 0
            if -1 in members:  # the total outranks every count, so it normally leads
                i = members.index(-1)
                total = int(counts.pop(i))
                del members[i]
            out.append((total, members, list(map(int, counts))))
        return out

    @staticmethod
    def _rows(rows_per_order: list) -> list[tuple[int, list[int], list[int]]]:
        """(total, ids, counts) per order from plain ZREVRANGE … WITHSCORES replies (the fallback path)."""
        out = []
        for rows in rows_per_order:
            total = next((c for m, c in rows if m in (b"t", "t")), 0)
            entries = [(int(m), int(c)) for m, c in rows if m not in (b"t", "t")]
            out.append((total, [t for t, _ in entries], [c for _, c in entries]))
        return out

    def _merge(self, ctx_len: int, rows_per_order: list, k: int, min_candidates: int) -> Neighbours:
        """Backoff: the longest order with ≥ min_candidates continuations leads; lower orders fill up to k.

        ``rows_per_order`` holds (total, ids, counts) per order, from order ``ctx_len`` down to 1.
        """
        ids: list[int] = []
        weights: list[float] = []
        counts: list[int] = []
        orders: list[int] = []
        used = 0
        seen: set[int] = set()
        alpha, log = self.alpha, math.log
        smooth = alpha * self.vocab_size
        for n, (total, toks, cnts) in zip(range(ctx_len, 0, -1), rows_per_order):
            if not used:
                if len(toks) < min_candidates:
                    continue
                used = n
            penalty = BACKOFF * (used - n)
            denom = total + smooth
            for tok, c in zip(toks, cnts):
                if len(ids) >= k:
                    break
                if tok not in seen:
                    seen.add(tok)
                    ids.append(tok)
                    weights.append(log((c + alpha) / denom) + penalty)
                    counts.append(c)
                    orders.append(n)
        if len(ids) < k:
            uni = self.unigrams(k + len(ids))
            penalty = BACKOFF * used
            for tok, w, c in zip(uni.ids, uni.weights, uni.counts):
                if len(ids) >= k:
                    break
                if tok not in seen:
                    seen.add(tok)
                    ids.append(tok)
                    weights.append(w + penalty)
                    counts.append(c)
                    orders.append(0)
        return Neighbours(ids, weights, counts, orders, used)

    def neighbours(self, context_ids: Sequence[int], k: int = 32, min_candidates: int = 1) -> Neighbours:
        """GetNeighbours: up to k candidates for the next token after ``context_ids``, in one round trip.

        Uses the last ``max_order`` ids; never empty (the unigram list is the last resort). An empty
        context gets the unigram top-k with order 0.
        """
        return self.neighbours_batch([context_ids], k, min_candidates)[0]

    def neighbours_batch(self, contexts: Sequence[Sequence[int]], k: int = 32, min_candidates: int = 1) -> list[Neighbours]:
        """GetNeighbours for many contexts in one pipeline (one round trip per server involved).

        A version never changes once complete, so results are kept client-side in an LRU of ``cache_size``
        contexts (0 turns it off); only the contexts not cached go to the server. Each context is one
        server-side script call (all its orders share a hash slot, so this also works on Redis Cluster).
        """
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        ctxs = [self._check_ids(c) for c in contexts]
        cache = self._lru if self.cache_size else None
        out: list[Neighbours | None] = [None] * len(ctxs)
        todo: list[int] = []
        for i, ctx in enumerate(ctxs):
            hit = cache.get((*ctx, k, min_candidates)) if cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                cache.move_to_end((*ctx, k, min_candidates))
                out[i] = Neighbours(hit.ids[:], hit.weights[:], hit.counts[:], hit.orders[:], hit.order)
        if todo:
            for i, rows in zip(todo, self._fetch([ctxs[i] for i in todo], k)):
                nb = out[i] = self._merge(len(ctxs[i]), rows, k, min_candidates)
                if cache is not None:
                    cache[(*ctxs[i], k, min_candidates)] = Neighbours(nb.ids[:], nb.weights[:], nb.counts[:],
                                                                     nb.orders[:], nb.order)
                    if len(cache) > self.cache_size:
                        cache.popitem(last=False)
        return out  # type: ignore[return-value]

    def cache_clear(self) -> None:
        """Forget the client-side cache of looked-up contexts."""
        self._lru.clear()

    @property
    def _lru(self) -> OrderedDict:
        cache = self.__dict__.get("_lru_store")
        if cache is None:
            cache = self.__dict__["_lru_store"] = OrderedDict()
        return cache

    def _fetch(self, ctxs: list[list[int]], k: int) -> list[list[tuple[int, list[int], list[int]]]]:
        """(total, ids, counts) per order for each context, in one round trip (per server)."""
        if not any(ctxs):
            return [[] for _ in ctxs]
        # Redis Cluster pipelines refuse EVALSHA, so there a batch goes as plain ZREVRANGEs (one slot per context)
        if self._scripted is not False and (len(ctxs) == 1 or not isinstance(self.client, RedisCluster)):
            try:
                return self._fetch_scripted(ctxs, k)
            except ResponseError as exc:
                if self._scripted or not _scripting_refused(exc):
                    raise
                self._scripted = False  # the server refuses scripts: use plain ZREVRANGE pipelines from now on
        pipe = self.client.pipeline(transaction=False)
        for ctx in ctxs:
            for n in range(len(ctx), 0, -1):
                pipe.zrevrange(context_key(self.domain, self.version, ctx[-n:]), 0, k, withscores=True)
        rows = pipe.execute() if len(pipe) else []
        out, pos = [], 0
        for ctx in ctxs:
            out.append(self._rows(rows[pos : pos + len(ctx)]))
            pos += len(ctx)
        return out

    def _fetch_scripted(self, ctxs: list[list[int]], k: int) -> list[list[tuple[int, list[int], list[int]]]]:
        """The script path of ``_fetch``: one EVALSHA per context; loads the script when the server lacks it."""
        for attempt in (0, 1):
            try:
                if len(ctxs) == 1:  # the decoder's batch-1 case: a plain command, no pipeline machinery
                    ctx = ctxs[0]
                    if not ctx:
                        return [[]]
                    keys = [context_key(self.domain, self.version, ctx[-n:]) for n in range(len(ctx), 0, -1)]
                    replies = [self.client.evalsha(LOOKUP_SHA, len(keys), *keys, k)]
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for ctx in ctxs:
                        if ctx:
                            self._queue(pipe, ctx, k)
                    replies = iter(pipe.execute())
                    replies = [next(replies) if ctx else b"" for ctx in ctxs]
                self._scripted = True
                return [self._parse(r) if ctx else [] for ctx, r in zip(ctxs, replies)]
            except NoScriptError:
                if attempt:
                    raise
                self.client.script_load(LOOKUP_SCRIPT)
        raise AssertionError("unreachable")


def _scripting_refused(exc: ResponseError) -> bool:
    """True for errors meaning the server will not run scripts at all (disabled or not permitted)."""
    text = str(exc).lower()
    return any(s in text for s in ("unknown command", "noperm", "no permissions", "disabled"))


def candidate_recall(
    table: SemanticTable,
    sequences: Iterable[Sequence[int]],
    ks: Sequence[int] = (8, 32, 128),
    *,
    skip: Callable[[int, Sequence[int]], bool] | None = None,
    batch: int = 512,
) -> dict[int, float]:
    """Fraction of positions whose true next token is among GetNeighbours' first k candidates, per k.

    ``skip(i, seq)`` leaves positions out (e.g. tool results the router injects rather than the model).
    """
    kmax = max(ks)
    hits = Counter()
    n = 0
    contexts: list[list[int]] = []
    targets: list[int] = []

    def flush() -> None:
        nonlocal n
        for nb, target in zip(table.neighbours_batch(contexts, kmax), targets):
            n += 1
            if target in nb.ids:
                rank = nb.ids.index(target)
                for k in ks:
                    hits[k] += rank < k
        contexts.clear()
        targets.clear()

    for seq in sequences:
        seq = list(seq)
        for i in range(1, len(seq)):
            if skip and skip(i, seq):
                continue
            contexts.append(seq[max(0, i - table.max_order) : i])
            targets.append(seq[i])
            if len(contexts) >= batch:
                flush()
    if contexts:
        flush()
    return {k: (hits[k] / n if n else 0.0) for k in ks}
