"""Track memory: the training chains stored so a new question can be routed into the one it resembles.

Each training chain is a *track*: its question with numbers masked and its role-abstracted chain
(``overlay.roles``). The memory lives in Redis beside the semantic-weight table, in the same version (written before
the version is marked complete, so it is activated with the table by the same compare-and-set). Retrieval is BM25
over number-masked question terms (words and word pairs): per shard one posting zset per term, weights precomputed,
so GetTracks is one ZUNIONSTORE per shard in a server-side script: one pipelined round trip on a single server.
Shards are hash-tagged by domain and shard number (not by version, so a learned version COPYs within its slot), and a
cluster spreads them. A chooser (a small logistic model fitted at build time on training questions whose own track,
or whole family, is left out) scores the retrieved tracks, so a poor track can be refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import lru_cache
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from overlay.chains import RESULT, Chain, answers_match
from overlay.roles import (AbstractChain, Binding, QuestionNumber, abstract_chain, asking_words, bind, bindings,
                           execute, fill, masked_question, number_roles, question_numbers, words)
from overlay.table import _text, _vkey, check_domain

SHARDS = 4
K1, B = 1.2, 0.75
MAX_DF = 0.5  # query terms in more than this share of tracks carry no routing signal and are skipped
PER_FAMILY = 3  # tracks of one family (a source and its variants) among the top k: room for other problems
QUERY_TERMS = 32  # the rarest terms of a question route it; 16 lost 4 points of any-5 on MAWPS dev (bench_tracks)
ALTERNATIVES = 6  # matchings of a track's numbers tried, best first, when the best gives an implausible answer
ALTERNATIVE_MARGIN = 0.4  # ... within this much mean anchor similarity of the best (measured on MAWPS dev)
FEATURES = ("similarity", "gap", "rank", "binding", "weakest", "executed", "same_count", "unused", "non_negative",
            "whole", "whole_like_own", "magnitude", "agreement", "agreement_bound", "alternative", "cues", "asked_cues",
            "bias")
CUE_SHARE = 0.02  # words in at least this share of the training questions are cue words ("left", "each", "total")
REFUSE_BELOW = 0.2  # a fitted chooser refuses its best track below this probability (on MAWPS dev, picks at p 0.2–0.4
# were right 4 times in 10, below 0.2 2 in 9: about what the table alone gets there)
TOP_K = 10  # tracks retrieved and followed per question: the right answer is among 10 for 93 % of MAWPS dev, 5: 87 %

TRACKS_SCRIPT = """
local n = #KEYS - 1
local tmp = KEYS[#KEYS]
local k, per = tonumber(ARGV[1]), tonumber(ARGV[3])
redis.call('ZUNIONSTORE', tmp, n, unpack(KEYS, 1, n))
local top = redis.call('ZREVRANGE', tmp, 0, k * 10 - 1, 'WITHSCORES')
redis.call('DEL', tmp)
local seen, out, kept = {}, {}, 0
for i = 1, #top, 2 do
  local family, id = string.match(top[i], '^(.*)|([^|]*)$')
  local count = seen[family] or 0
  if count < per then
    seen[family] = count + 1
    out[#out + 1] = id
    out[#out + 1] = top[i + 1]
    out[#out + 1] = redis.call('GET', ARGV[2] .. id) or ''
    kept = kept + 1
    if kept == k then break end
  end
end
return out
"""
TRACKS_SHA = hashlib.sha1(TRACKS_SCRIPT.encode()).hexdigest()


class TrackError(ValueError):
    """A track memory that is missing, unreadable or asked for something it cannot give; the message says which."""


def terms(question: str) -> Counter:
    """Retrieval terms of a question: its number-masked, stemmed words (``roles.words``: the same words anchors are
    made of, so the index's idf weighs them) and word pairs."""
    ws = words(question)
    out = Counter(ws)
    out.update(f"{a}_{b}" for a, b in zip(ws, ws[1:]))
    return out


def _shard(track_id: str, shards: int) -> int:
    return int(hashlib.md5(track_id.encode()).hexdigest()[:8], 16) % shards


def _skey(domain: str, version: int, shard: int, suffix: str) -> str:
    """A key of one shard of a version's track memory: hash-tagged by domain and shard, so versions of a shard share
    a slot (COPY works on a cluster) and shards spread over a cluster's nodes."""
    return _vkey(domain, version, f"t:{{{domain}:t{shard}}}:{suffix}")


def _df_key(domain: str, version: int) -> str:
    """The terms' document frequencies (in shard 0's slot, so a learned version COPYs it on a cluster too)."""
    return _skey(domain, version, 0, "df")


@dataclass
class Track:
    """One stored track: its id, family (the source chain it came from; variants share it), question, masked
    question, the role-abstracted chain and the source's answer."""

    id: str
    family: str
    question: str
    chain: AbstractChain
    answer: str

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "family": self.family, "question": self.question, "answer": self.answer,
                           "chain": self.chain.to_dict()}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Track:
        d = json.loads(text)
        return cls(d["id"], d["family"], d["question"], AbstractChain.from_dict(d["chain"]), d["answer"])


def make_tracks(chains: Sequence[Chain], families: Sequence[str] | None = None, prefix: str = "t") -> list[Track]:
    """Tracks of chains whose roles reproduce their own answer (the others cannot be followed and are left out) and
    stored once per form (the same masked question with the same role steps: a variant that changed only numbers, a
    dataset's duplicate; the copy with the fewest coincidences of values is kept); ids are ``prefix`` and the chain's
    position."""
    kept: dict[tuple, Track] = {}
    for i, chain in enumerate(chains):
        abstract = abstract_chain(chain)
        key = (masked_question(chain.question).lower(), tuple(abstract.steps))
        if key in kept and kept[key].chain.coincidences <= abstract.coincidences:
            continue
        track = Track(f"{prefix}{i}", families[i] if families else f"{prefix}{i}", chain.question, abstract, chain.answer)
        answer, _ = execute(abstract, Binding({k: k for k in range(len(abstract.numbers))}, 1.0, True), abstract.numbers)
        if answers_match(answer, chain.answer):
            kept[key] = track
    return _without_coincidences(sorted(kept.values(), key=lambda t: int(t.id[len(prefix):])))


def _without_coincidences(tracks: list[Track]) -> list[Track]:
    """Drop a track whose roles were decided between numbers of equal value when its family has a track without such
    a coincidence: variants of one problem that differ in form only there (a result that happened to equal a question
    number) would otherwise tie in retrieval and answer differently; the family's clean form is the problem's."""
    clean = {t.family for t in tracks if not t.chain.coincidences}
    return [t for t in tracks if not t.chain.coincidences or t.family not in clean]


def file_families(path: str | Path, chains: Sequence[Chain]) -> list[str]:
    """Each chain's family: the ``track`` field of its record (stellator files name their source), else its line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for c in chains:
        family = f"line{c.line}"
        if 0 < c.line <= len(lines) and '"track"' in lines[c.line - 1]:
            with suppress(ValueError, TypeError):
                family = str(json.loads(lines[c.line - 1]).get("track") or family)
        out.append(family)
    return out


@dataclass
class Index:
    """BM25 weights of every track's terms, the terms' document frequencies and the collection size."""

    weights: list[dict[str, float]]
    df: Counter
    n: int
    families: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, questions: Sequence[str], families: Sequence[str] | None = None) -> Index:
        bags = [terms(q) for q in questions]
        df = Counter(t for bag in bags for t in bag)
        avg = sum(sum(b.values()) for b in bags) / max(1, len(bags))
        n = len(bags)
        weights = []
        for bag in bags:
            length = sum(bag.values())
            norm = K1 * (1 - B + B * length / avg)
            weights.append({t: idf(df[t], n) * tf * (K1 + 1) / (tf + norm) for t, tf in bag.items()})
        return cls(weights, df, n, list(families) if families is not None else [str(i) for i in range(n)])

    def search(self, question: str, k: int, exclude: set[int] = frozenset()) -> list[tuple[int, float]]:
        """Top-k (track index, score) in memory, at most PER_FAMILY per family: what GetTracks computes in Redis (used
        to fit the chooser)."""
        wanted = set(query_terms(question, self.df, self.n))
        scores: Counter = Counter()
        for i, w in enumerate(self.weights):
            if i in exclude:
                continue
            s = sum(w[t] for t in wanted if t in w)
            if s:
                scores[i] = s
        seen: Counter = Counter()
        out = []
        for i, s in sorted(scores.items(), key=lambda x: (-x[1], x[0])):
            if seen[self.families[i]] < PER_FAMILY:
                seen[self.families[i]] += 1
                out.append((i, s))
                if len(out) == k:
                    break
        return out


def idf(df: int, n: int) -> float:
    """BM25's idf, floored at a small positive value."""
    return max(0.01, math.log(1 + (n - df + 0.5) / (df + 0.5)))


def query_terms(question: str, df: Mapping[str, int], n: int, limit: int = QUERY_TERMS) -> list[str]:
    """The question's ``limit`` rarest indexed terms (rarest first): what a question is routed by."""
    known = [t for t in terms(question) if 0 < df.get(t, 0) <= MAX_DF * n]
    return sorted(known, key=lambda t: (df[t], t))[:limit]


def max_score(question: str, df: Mapping[str, int], n: int) -> float:
    """The score of a track whose terms are exactly the query's (each once, average length): normalises similarity."""
    return sum(idf(df[t], n) for t in query_terms(question, df, n)) or 1.0


# ---------------------------------------------------------------------------------------------------------------
# Choosing among retrieved tracks
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Retrieved:
    """A track GetTracks returned for a question: its rank, similarity (BM25 over the best possible, 0..1), how its
    numbers bound to the question's, the answer it gives when followed with the calculator, and the chooser's
    probability that this answer is right."""

    track: Track
    rank: int
    similarity: float
    binding: Binding
    answer: str | None
    features: list[float] = field(default_factory=list)
    p: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.track.id, "family": self.track.family, "rank": self.rank,
                "similarity": round(self.similarity, 4), "binding": round(self.binding.confidence, 4),
                "answer": self.answer, "p": round(self.p, 4), "question": self.track.question}


def _as_number(value: str | None) -> Decimal | None:
    try:
        return Decimal(str(value).replace(",", "")) if value is not None else None
    except InvalidOperation:
        return None


@lru_cache(maxsize=65536)
def _question_words(question: str) -> tuple[frozenset[str], frozenset[str]]:
    """A question's words and its asking sentence's words (numbers left out)."""
    return frozenset(w for w in words(question) if w != "#"), asking_words(question)


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def featurise(found: list[Retrieved], numbers: Sequence[QuestionNumber], question: str | None = None,
              idf_of: Mapping[str, float] | None = None) -> None:
    """Fill each retrieved track's features (FEATURES, in order): how similar the question is (to the best hit, and
    its rank), how well the numbers bound (mean and weakest pair, and whether a next-best matching was taken), whether
    the track could be followed, whether it uses the question's numbers (same count; share of the question's numbers
    it leaves unused), whether the answer is plausible (not negative, whole when the question's numbers are, whole
    like the track's own answer, of the same magnitude relative to the question's largest number as the track's own
    answer to its own), how much of the retrieved similarity agrees with this answer (plain, and weighted by
    binding), and how many of the words that say which operation (cue words: those in at least ``CUE_SHARE`` of the
    training questions, e.g. "left", "each", "total", "more") the question and the track share, in the whole question
    and in the asking sentence (BM25 weighs them little because they are common)."""
    cut = math.log(1 + (1 - CUE_SHARE) / CUE_SHARE)
    if question is not None and idf_of:
        mine, mine_asked = (frozenset(w for w in ws if idf_of.get(w, cut + 1) <= cut)
                            for ws in _question_words(question))
    else:
        mine = mine_asked = None
    top = found[0].similarity if found else 0.0
    followed = [r for r in found if r.answer is not None]
    total = sum(r.similarity for r in followed) or 1.0
    total_bound = sum(r.similarity * r.binding.confidence for r in followed) or 1.0
    values = [_as_number(n.value) for n in numbers]
    whole_question = all(v is not None and v == v.to_integral_value() for v in values)
    largest = max((abs(v) for v in values if v is not None), default=Decimal(1)) or Decimal(1)
    for r in found:
        value, own = _as_number(r.answer), _as_number(r.track.answer)
        same = [o for o in followed if r.answer is not None and answers_match(o.answer, r.answer)]
        r.features = [r.similarity, r.similarity - top, math.log1p(r.rank), r.binding.confidence, r.binding.weakest,
                      float(r.answer is not None), float(len(numbers) == len(r.track.chain.numbers)),
                      (len(numbers) - len(r.track.chain.used)) / max(1, len(numbers)),
                      float(value is not None and value >= 0),
                      float(value is not None and (not whole_question or value == value.to_integral_value())),
                      float(value is not None and own is not None
                            and (value == value.to_integral_value()) == (own == own.to_integral_value())),
                      _magnitude(value, largest, own, r.track.chain.numbers),
                      sum(o.similarity for o in same) / total,
                      sum(o.similarity * o.binding.confidence for o in same) / total_bound,
                      float(r.binding.alternative > 0), *_cue_overlap(r.track.question, mine, mine_asked, idf_of, cut),
                      1.0]


def _cue_overlap(track_question: str, mine: frozenset[str] | None, mine_asked: frozenset[str] | None,
                 idf_of: Mapping[str, float] | None, cut: float) -> tuple[float, float]:
    if mine is None or not idf_of:
        return 0.0, 0.0
    theirs, theirs_asked = (frozenset(w for w in ws if idf_of.get(w, cut + 1) <= cut)
                            for ws in _question_words(track_question))
    return _jaccard(mine, theirs), _jaccard(mine_asked, theirs_asked)


def _magnitude(value: Decimal | None, largest: Decimal, own: Decimal | None,
               own_numbers: Sequence[QuestionNumber]) -> float:
    """Minus how far (in decades, at most 3) the answer's size relative to the question's largest number is from the
    track's own answer's relative to its own largest number: a sum stays above its parts, a share below."""
    own_values = [_as_number(n.value) for n in own_numbers]
    own_largest = max((abs(v) for v in own_values if v is not None), default=Decimal(1)) or Decimal(1)
    if not value or not own:
        return -3.0
    ratio = math.log10(float(abs(value) / largest)) - math.log10(float(abs(own) / own_largest))
    return -min(3.0, abs(ratio))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, x))))


@dataclass
class Chooser:
    """Logistic weights over FEATURES: the probability that following a retrieved track answers right."""

    weights: list[float]
    threshold: float = 0.5

    def spec(self) -> dict[str, Any]:
        """What the table stores: the weights with the feature names they belong to."""
        return {"weights": self.weights, "threshold": self.threshold, "features": list(FEATURES)}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Chooser:
        """The stored chooser, or DEFAULT_CHOOSER when none is stored or it was fitted on other features (a version
        written by an older release): weights are only meaningful with the features they were fitted on."""
        weights = spec.get("weights")
        if not weights or list(spec.get("features", ())) != list(FEATURES) or len(weights) != len(FEATURES):
            return DEFAULT_CHOOSER
        return cls([float(w) for w in weights], float(spec.get("threshold", REFUSE_BELOW)))

    def score(self, found: list[Retrieved]) -> None:
        """Fill each retrieved track's ``p``."""
        for r in found:
            r.p = _sigmoid(sum(w * f for w, f in zip(self.weights, r.features)))

    def choose(self, found: list[Retrieved]) -> Retrieved | None:
        """The most probable followable track, or None when even it is below the threshold (refused)."""
        self.score(found)
        best = max((r for r in found if r.answer is not None), key=lambda r: (r.p, -r.rank), default=None)
        return best if best is not None and best.p >= self.threshold else None

    @classmethod
    def fit(cls, rows: np.ndarray, labels: np.ndarray, steps: int = 2000, lr: float = 0.5, l2: float = 1e-3) -> Chooser:
        """Plain logistic regression by gradient descent (a dozen features, a few thousand rows)."""
        w = np.zeros(rows.shape[1])
        for _ in range(steps):
            p = 1 / (1 + np.exp(-np.clip(rows @ w, -30, 30)))
            w -= lr * (rows.T @ (p - labels) / len(labels) + l2 * w)
        return cls([float(x) for x in w])

    @classmethod
    def fit_lists(cls, lists: Sequence[tuple[np.ndarray, np.ndarray]], steps: int = 1500, lr: float = 0.5,
                  l2: float = 1e-3) -> Chooser:
        """Fit to choose: a softmax over each question's retrieved tracks (rows, labels) trained to put its mass on
        the right ones (lists without a right track teach nothing here), then calibrated — a scale, the list's best
        similarity and an offset, fitted by logistic regression on each list's best-scored track — so the chosen
        track's ``p`` is the probability that it answers right and the threshold can refuse."""
        width = max(len(y) for _, y in lists)
        dim = lists[0][0].shape[1]
        X = np.zeros((len(lists), width, dim))
        Y = np.zeros((len(lists), width))
        mask = np.zeros((len(lists), width), dtype=bool)
        for i, (x, y) in enumerate(lists):
            X[i, :len(y)], Y[i, :len(y)], mask[i, :len(y)] = x, y, True
        teach = Y.sum(1) > 0
        Xt, target, mt = X[teach], Y[teach] / Y[teach].sum(1, keepdims=True), mask[teach]
        w = np.zeros(dim)
        for _ in range(steps if teach.any() else 0):
            s = np.where(mt, Xt @ w, -np.inf)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            w -= lr * (np.einsum("qk,qkd->d", p - target, Xt) / len(Xt) + l2 * w)
        scores = np.where(mask, X @ w, -np.inf)
        best, rows = scores.argmax(1), np.arange(len(X))
        chosen, labels = X[rows, best], Y[rows, best]
        sim, gap, bias = FEATURES.index("similarity"), FEATURES.index("gap"), FEATURES.index("bias")
        # scale the score; shift it by the list's best similarity (similarity − gap: the same for every track of a
        # list, so the choice is unchanged) and a constant: a softmax cannot learn how good a whole list is
        a, c, b = cls.fit(np.stack([scores[rows, best], chosen[:, sim] - chosen[:, gap], chosen[:, bias]], 1),
                          labels).weights
        out = a * w
        out[sim] += c
        out[gap] -= c
        out[bias] += b
        return cls([float(x) for x in out], REFUSE_BELOW)


DEFAULT_CHOOSER = Chooser([1.0, 0.5, -0.3, 0.5, 0.5, 1.0, 0.5, -1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 2.0, -0.5, 1.0, 1.0,
                           -5.0], 0.2)


def retrieved(question: str, hits: Sequence[tuple[Track, float]], idf_of: Mapping[str, float],
              numbers: Sequence[QuestionNumber] | None = None) -> list[Retrieved]:
    """Bind and follow each hit (track, similarity) for this question; features filled. Of a track's best matchings
    of numbers (``ALTERNATIVES``, within ``ALTERNATIVE_MARGIN`` of the best's confidence) the first whose answer is
    plausible is kept (execution-guided binding: not negative when the question's numbers are not; whole when the
    question's numbers and the track's own answer are), else the best."""
    numbers = list(numbers) if numbers is not None else question_numbers(question)
    values = [_as_number(n.value) for n in numbers]
    signed = any(v is not None and v < 0 for v in values)
    whole_question = all(v is not None and v == v.to_integral_value() for v in values)
    found = []
    for rank, (track, sim) in enumerate(hits):
        own = _as_number(track.answer)
        want_whole = whole_question and own is not None and own == own.to_integral_value()
        options = bindings(track.chain, question, idf_of, numbers, ALTERNATIVES)
        choice = None
        for binding in options:
            if binding.confidence < options[0].confidence - ALTERNATIVE_MARGIN:
                break
            answer = execute(track.chain, binding, numbers)[0] if binding.complete else None
            choice = choice or (binding, answer)
            value = _as_number(answer)
            if value is not None and (signed or value >= 0) and (not want_whole or value == value.to_integral_value()):
                choice = (binding, answer)
                break
        found.append(Retrieved(track, rank, sim, *choice))
    featurise(found, numbers, question, idf_of)
    return found


def fit_chooser(tracks: Sequence[Track], index: Index, idf_of: Mapping[str, float], *, k: int = TOP_K,
                questions: int = 1000, seed: int = 0, family_out: float = 0.25) -> tuple[Chooser, dict[str, Any]]:
    """Fit the chooser on training questions retrieved against the other tracks: each question's own track is left
    out, and for a share ``family_out`` its whole family and every track with the same masked question too, so the
    chooser also learns what a poor match on a new problem looks like. Fitted to choose (``Chooser.fit_lists``).
    Returns the chooser and what it was fitted on."""
    rng = random.Random(seed)
    picks = rng.sample(range(len(tracks)), min(questions, len(tracks)))
    families: dict[str, set[int]] = {}
    same_text: dict[str, set[int]] = {}
    for i, t in enumerate(tracks):
        families.setdefault(t.family, set()).add(i)
        same_text.setdefault(masked_question(t.question).lower(), set()).add(i)
    lists, right, rows = [], 0, 0
    for n, i in enumerate(picks):
        track = tracks[i]
        out = families[track.family] | same_text[masked_question(track.question).lower()] \
            if n < family_out * len(picks) else {i}
        hits = index.search(track.question, k, exclude=out)
        norm = max_score(track.question, index.df, index.n)
        found = retrieved(track.question, [(tracks[j], s / norm) for j, s in hits], idf_of)
        if found:
            lists.append((np.asarray([r.features for r in found]),
                          np.asarray([float(answers_match(r.answer, track.answer)) for r in found])))
            rows += len(found)
        right += bool(found) and answers_match(found[0].answer, track.answer)
    positives = int(sum(y.sum() for _, y in lists))
    if not lists or positives == 0 or positives == rows:
        return DEFAULT_CHOOSER, {"questions": len(picks), "rows": rows, "fitted": False}
    chooser = Chooser.fit_lists(lists)
    return chooser, {"questions": len(picks), "rows": rows, "positives": positives, "top1_right": right,
                     "family_out": family_out, "k": k, "fitted": True}


# ---------------------------------------------------------------------------------------------------------------
# The memory in Redis
# ---------------------------------------------------------------------------------------------------------------

def write_tracks(client, domain: str, version: int, tracks: Sequence[Track], *, shards: int = SHARDS, k: int = TOP_K,
                 fit_questions: int = 1000, batch: int = 2000) -> dict[str, Any]:
    """Write tracks, their BM25 postings, the word idf and the fitted chooser into ``version`` (not activated here:
    the caller marks the version complete and moves the pointer). Returns the meta fields to record."""
    check_domain(domain)
    if not tracks:
        raise TrackError(f"no track to store for domain {domain!r}: no chain's roles reproduced its answer")
    index = Index.build([t.question for t in tracks], [t.family for t in tracks])
    idf_of = word_idf(index)
    chooser, fitted = fit_chooser(tracks, index, idf_of, k=k, questions=fit_questions)
    pipe = client.pipeline(transaction=False)
    for t, weights in zip(tracks, index.weights):
        s = _shard(t.id, shards)
        pipe.set(_skey(domain, version, s, f"d:{t.id}"), t.to_json())
        for term, w in weights.items():
            pipe.zadd(_skey(domain, version, s, f"p:{term}"), {f"{t.family}|{t.id}": round(w, 5)})
        if len(pipe) >= batch:
            pipe.execute()
    df_items = list(index.df.items())
    for i in range(0, len(df_items), batch):
        pipe.hset(_df_key(domain, version), mapping=dict(df_items[i:i + batch]))
    pipe.execute()
    return {"tracks": len(tracks), "track_shards": shards, "track_families": len({t.family for t in tracks}),
            "track_chooser": json.dumps(chooser.spec() | fitted)}


def carry_tracks(client, domain: str, base: int, version: int, new: Sequence[Track], batch: int = 1000) -> dict[str, Any]:
    """Learning without retraining: COPY ``base``'s track memory into ``version`` (server-side, each key within its
    slot) and add ``new`` tracks, their terms weighted with the base's statistics. Returns the meta fields to record
    (none when the base has no track memory and nothing is added)."""
    meta = {_text(k): _text(v) for k, v in client.hgetall(_vkey(domain, base, "meta")).items()}
    count = int(meta.get("tracks", 0) or 0)
    if not count:
        return write_tracks(client, domain, version, new) if new else {}
    src, dst = _vkey(domain, base, "t:"), _vkey(domain, version, "t:")
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=f"{src}*", count=batch):
        key = _text(key)
        pipe.copy(key, dst + key[len(src):], replace=True)
        if len(pipe) >= batch:
            pipe.execute()
    pipe.execute()
    shards = int(meta.get("track_shards", SHARDS))
    df = {_text(t): int(c) for t, c in client.hgetall(_df_key(domain, base)).items()}
    avg = sum(terms(t.question).total() for t in new) / max(1, len(new))
    for i, t in enumerate(new):
        t.id = f"v{version}-{i}"
        s = _shard(t.id, shards)
        pipe.set(_skey(domain, version, s, f"d:{t.id}"), t.to_json())
        bag = terms(t.question)
        norm = K1 * (1 - B + B * sum(bag.values()) / max(avg, 1.0))
        for term, tf in bag.items():
            weight = idf(df.get(term, 0) + 1, count + len(new)) * tf * (K1 + 1) / (tf + norm)
            pipe.zadd(_skey(domain, version, s, f"p:{term}"), {f"{t.family}|{t.id}": round(weight, 5)})
            pipe.hincrby(_df_key(domain, version), term, 1)
    pipe.execute()
    families = int(meta.get("track_families", count)) + len({t.family for t in new})
    return {"tracks": count + len(new), "track_families": families}


def word_idf(index: Index) -> dict[str, float]:
    """idf of single words (what anchors are weighted by when numbers are bound)."""
    return {t: idf(c, index.n) for t, c in index.df.items() if "_" not in t}


class TrackMemory:
    """GetTracks over one version of a domain's track memory (the active one by default)."""

    def __init__(self, client, domain: str, version: int | None = None) -> None:
        from overlay.table import active_version

        self.client, self.domain = client, check_domain(domain)
        self.version = version if version is not None else active_version(client, domain)
        if self.version is None:
            raise TrackError(f"no complete table for domain {domain!r}: build one with `overlay table build`")
        meta = {_text(k): _text(v) for k, v in client.hgetall(_vkey(domain, self.version, "meta")).items()}
        if not int(meta.get("tracks", 0) or 0):
            raise TrackError(f"version {self.version} of domain {domain!r} has no track memory: rebuild it with "
                             f"`overlay table build` (tracks are stored with the table since this release)")
        self.count, self.shards = int(meta["tracks"]), int(meta.get("track_shards", SHARDS))
        self.meta = meta
        self.chooser = Chooser.from_spec(json.loads(meta.get("track_chooser") or "{}"))
        self.df = {_text(t): int(c) for t, c in client.hgetall(_df_key(domain, self.version)).items()}
        self.idf = {t: idf(c, self.count) for t, c in self.df.items() if "_" not in t}
        self._sha_ok = False

    def _script(self) -> str:
        if not self._sha_ok:
            self.client.script_load(TRACKS_SCRIPT)
            self._sha_ok = True
        return TRACKS_SHA

    def search(self, question: str, k: int = TOP_K) -> list[tuple[Track, float]]:
        """Top-k (track, similarity: BM25 over the question's own best score, 1 ≈ all its words; a short track can
        score above 1) for a question: one pipelined round trip, one script call per shard."""
        if not isinstance(question, str) or not question.strip():
            raise TrackError("GetTracks needs a non-empty question")
        wanted = query_terms(question, self.df, self.count)
        if not wanted or k < 1:
            return []
        sha = self._script()
        from redis.cluster import RedisCluster

        cluster = isinstance(self.client, RedisCluster)
        pipe = None if cluster else self.client.pipeline(transaction=False)
        replies = []
        for s in range(self.shards):
            keys = [_skey(self.domain, self.version, s, f"p:{t}") for t in wanted]
            keys.append(_skey(self.domain, self.version, s, f"tmp:{random.getrandbits(48):x}"))
            args = (sha, len(keys), *keys, k, _skey(self.domain, self.version, s, "d:"), PER_FAMILY)
            if pipe is None:  # a cluster refuses scripts in pipelines: one call per shard, each to its node
                replies.append(self.client.evalsha(*args))
            else:
                pipe.evalsha(*args)
        if pipe is not None:
            replies = pipe.execute()
        norm = max_score(question, self.df, self.count)
        raw = [(float(reply[i + 1]) / norm, _text(reply[i]), reply[i + 2])
               for reply in replies for i in range(0, len(reply), 3) if reply[i + 2]]
        raw.sort(key=lambda h: (-h[0], h[1]))
        return [(Track.from_json(doc), score) for score, _, doc in raw[:k]]  # only the kept k are parsed

    def get_tracks(self, question: str, k: int = TOP_K) -> list[Retrieved]:
        """GetTracks: the top-k tracks for a question, bound to its numbers, followed with the calculator and scored
        by the chooser."""
        found = retrieved(question, self.search(question, k), self.idf)
        self.chooser.score(found)
        return found

    def choose(self, question: str, k: int = TOP_K) -> tuple[Retrieved | None, list[Retrieved]]:
        """(the track to follow, or None when every retrieved track is refused; all retrieved tracks)."""
        found = self.get_tracks(question, k)
        return self.chooser.choose(found), found


def open_tracks(table: Any) -> TrackMemory | None:
    """The track memory stored with a table's version (``SemanticTable``), or None when that version has none."""
    if not int(table.meta.get("tracks", 0) or 0):
        return None
    return TrackMemory(table.client, table.domain, table.version)


# ---------------------------------------------------------------------------------------------------------------
# Following a track while decoding
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Proposal:
    """The followed track's next decision: one token, or a whole number (its value, the tokens that spell it and
    its role: "Q2", "R1" or "constant")."""

    tokens: list[int]
    value: str | None = None
    role: str = ""


class Follower:
    """A cursor on one retrieved track while a chain is decoded. It proposes the track's next token (roles bound to
    this question's numbers and the chain's own tool results) and moves on when that is what was emitted; when the
    chain leaves the track it waits for the next step tag and re-synchronises at the track's next step with that tag,
    or gives up when there is none."""

    def __init__(self, found: Retrieved, numbers: Sequence[QuestionNumber], encode: Any, spans: Any,
                 tag_ids: Mapping[str, int], eos: int) -> None:
        self.found, self.numbers, self.encode, self.spans = found, list(numbers), encode, spans
        self.tag_ids, self.eos = tag_ids, eos
        self.steps = found.track.chain.steps  # a RESULT step's tag is proposed; its content is the tool's, injected
        self.next_step = 0  # the step whose tag comes next
        self.queue: list[Proposal] = []
        self.open = False  # the queue holds the content of the step just opened, not yet expanded when False
        self.alive = True
        self.waiting = False  # off the track: wait for a step tag to re-synchronise
        self.followed = 0

    def proposal(self, results: Sequence[str]) -> Proposal | None:
        """What the track would emit next (the next step's tag once a step's content is spelt, EOS after the answer),
        or None (waiting, finished, or a role not resolvable)."""
        if self.open and not self.queue:
            self._expand(results)
        if not self.alive or self.waiting:
            return None
        if self.queue:
            return self.queue[0]
        if self.next_step < len(self.steps):
            return Proposal([self.tag_ids[self.steps[self.next_step][0]]])
        return Proposal([self.eos]) if self.next_step == len(self.steps) else None

    def _expand(self, results: Sequence[str]) -> None:
        """Spell the content of the step just opened, with this question's numbers and the results so far."""
        self.open = False
        tag, text = self.steps[self.next_step - 1]
        if tag == RESULT:
            return
        filled = fill(text, self.found.binding, self.numbers, results)
        if filled is None:
            self.alive = False
            return
        ids = self.encode(" " + filled.strip() + " ")
        spans = list(self.spans(ids))
        roles = number_roles(text)
        roles = roles if len(roles) == len(spans) else [""] * len(spans)  # numbers the tokenizer spells otherwise
        units, i = [], 0
        for (first, end, value), role in zip(spans, roles):
            units += [Proposal([t]) for t in ids[i:first]]
            units.append(Proposal(ids[first:end], value, role))
            i = end
        self.queue = units + [Proposal([t]) for t in ids[i:]]

    def observe(self, tokens: Sequence[int], followed: bool, tag_of: Mapping[int, str]) -> None:
        """Move on after an emitted decision: on the track when it was the proposal, else off it (re-synchronising at
        the next step with the same tag when the decision opened a step)."""
        if not self.alive:
            return
        first = tokens[0]
        if followed and not self.waiting:
            self.followed += 1
            if self.queue:
                self.queue.pop(0)
            elif self.next_step < len(self.steps):
                self.next_step += 1
                self.open = True
            else:
                self.next_step += 1
            return
        tag = tag_of.get(first)
        if tag is None:
            self.waiting = True
            return
        later = [j for j in range(self.next_step, len(self.steps)) if self.steps[j][0] == tag]
        if not later:
            self.alive = False
            return
        self.next_step, self.queue, self.open, self.waiting = later[0] + 1, [], True, False

    def to_dict(self) -> dict[str, Any]:
        return self.found.to_dict() | {"followed_decisions": self.followed, "alive": self.alive}


__all__ = ["Chooser", "Follower", "Index", "Proposal", "Retrieved", "Track", "TrackError", "TrackMemory", "make_tracks",
           "terms", "write_tracks"]
