"""The overlay decode loop: GetNeighbours → selector over the K candidates → choose → accumulator → router.

Per token the work is one table lookup (one round trip) and one selector forward over the last k tokens
scored against K candidates; neither depends on how long the chain already is. Tool results are injected
by the router (``<RESULT> …``), never chosen by the model. State (ids, router, accumulator) can be kept in
Redis per session id, so a chain stopped by a token limit or a lost server continues in a later call.
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from overlay.accumulator import ScoreAccumulator, SessionStore, TraceStep
from overlay.chains import ANSWER, BOS, EOS, PAD, Q, RESULT, SPECIAL_TOKENS, STEP_TAGS, UNK, Chain
from overlay.router import Router
from overlay.table import SemanticTable
from overlay.tokenizer import decode, encode
from overlay.tracks import TOP_K

PEER_MARGIN = 64  # tokens kept free below the peer's n_positions: a tool result is injected in one go

IDS = {tag: i for i, tag in enumerate(SPECIAL_TOKENS)}
BOS_ID = IDS[BOS]
NEVER = frozenset(IDS[t] for t in (PAD, UNK, BOS, Q))
NEVER_OUTSIDE_ACTION = NEVER | {IDS[RESULT]}
TAG_IDS = frozenset(IDS.values())
TAG_NAMES = {IDS[t]: t for t in STEP_TAGS}
STEP_TAG_IDS = frozenset(IDS[t] for t in STEP_TAGS)


@dataclass
class DecodeConfig:
    """How one chain is decoded; every field has a default so nodes and the CLI can pass a subset."""

    max_tokens: int = 256
    k_candidates: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    mix: float = 0.0
    repetition_penalty: float = 1.5
    repetition_window: int = 16
    min_mean_logprob: float | None = None
    max_step_repeats: int = 3
    max_question_chars: int = 2000
    session_ttl_s: int = 3600
    save_every: int = 64
    tracks: int = TOP_K
    track_weight: float = 30.0  # × the chooser's p: a followed track outweighs the selector's confident slips (a
    # <RESULT> before the calculation's last number): MAWPS test, first 120: weight 10: 90 right, 30: 105 (= the track)

    def __post_init__(self) -> None:
        """Reject settings that cannot decode, naming the field."""
        if self.max_tokens < 1 or self.k_candidates == 1 or self.k_candidates < 0:
            raise ValueError(f"max_tokens must be ≥ 1 and k_candidates ≥ 2 (0: the model's training K), got {self.max_tokens}, {self.k_candidates}")
        if self.repetition_penalty < 1 or self.repetition_window < 0:
            raise ValueError("repetition_penalty must be ≥ 1 and repetition_window ≥ 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be ≥ 0 and top_p in (0, 1] (got {self.temperature}, {self.top_p})")
        if self.tracks < 0 or self.track_weight < 0:
            raise ValueError(f"tracks and track_weight must be ≥ 0 (got {self.tracks}, {self.track_weight})")


@dataclass
class DecodeResult:
    """A decoded chain: its text, the extracted answer, why it stopped, and the full trace."""

    question: str
    text: str
    answer: str | None
    stop_reason: str
    steps: list[dict[str, str]]
    verdicts: list[dict[str, str]]
    tool_calls: list[dict[str, Any]]
    errors: list[str]
    trace: dict[str, Any]
    tokens: int
    seconds: float
    session_id: str | None = None
    tracks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def well_formed(self) -> bool:
        """True when the chain parses back into the chain format and reached its answer."""
        try:
            Chain.from_text(self.text)
        except ValueError:
            return False
        return self.stop_reason in ("eos", "answer")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the trace included)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"well_formed": self.well_formed}


@dataclass
class DecodeState:
    """One chain in flight: token ids, the prompt's length, router and accumulator; a session saves its small state
    and appends its ids and trace (``OverlayDecoder._save``)."""

    question: str
    ids: list[int]
    prompt_len: int
    router: Router
    acc: ScoreAccumulator = field(default_factory=ScoreAccumulator)
    elapsed: float = 0.0
    kv: Any = field(default=None, repr=False, compare=False)  # the selector's per-chain memory; not saved
    question_len: int = -1  # ids of the question (the selector's memory); -1: the prompt's length
    saved: tuple[int, int] = field(default=(0, 0), repr=False, compare=False)  # ids, trace steps already saved
    sampling: tuple[float, float, int] | None = None  # this chain's (temperature, top_p, seed); None: the config's
    follow: Any = field(default=None, repr=False, compare=False)  # the followed track's cursor (tracks.Follower)
    retrieved: list[Any] = field(default_factory=list, repr=False, compare=False)  # GetTracks' answer, once per question

    @property
    def memory(self) -> int:
        """How many leading ids are the question (encoded once, kept in the selector's memory)."""
        return self.prompt_len if self.question_len < 0 else self.question_len

    def summary(self) -> dict[str, Any]:
        """The fixed-size part of a saved chain (ids and trace are appended separately)."""
        acc = self.acc
        return {"question": self.question, "prompt_len": self.prompt_len, "question_len": self.memory, "elapsed": self.elapsed,
                "log_score": acc.log_score, "scored_tokens": acc.scored_tokens, "tag_counts": acc.tag_counts,
                "stop_reason": acc.stop_reason}


def _masked(logp: torch.Tensor | list[float], allowed: list[bool] | None) -> list[float]:
    """Scores as floats with disallowed candidates at -inf (all allowed when none is)."""
    values = logp.tolist() if isinstance(logp, torch.Tensor) else list(logp)
    if allowed is None or not any(allowed):
        return values
    return [v if ok else -math.inf for v, ok in zip(values, allowed)]


def choose_index(logp: torch.Tensor | list[float], temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 position: int = 0, allowed: list[bool] | None = None) -> int:
    """The one sampler: greedy (the first maximum) at temperature 0, else nucleus sampling over the allowed
    candidates, seeded by (seed, position) so a resumed chain makes the same choices."""
    values = _masked(logp, allowed)
    if temperature == 0:
        return values.index(max(values))
    probs = torch.softmax(torch.tensor(values) / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    cum = torch.cumsum(probs[order], 0)
    keep = order[: int(torch.searchsorted(cum, torch.tensor(top_p))) + 1]
    rng = random.Random(seed * 1_000_003 + position)
    return int(rng.choices(keep.tolist(), weights=probs[keep].tolist())[0])


def choice_margin(logp: torch.Tensor | list[float], allowed: list[bool] | None, choice: int) -> float:
    """The chosen candidate's score minus the best other allowed one (0 when it is the only one)."""
    values = _masked(logp, allowed)
    others = values[:choice] + values[choice + 1:]
    best = max(others) if others else values[choice]
    return values[choice] - best if math.isfinite(best) else 0.0


class OverlayDecoder:
    """Decode questions into chains over a table and a selector (or the table alone when model is None).

    Set ``stage_seconds`` to ``collections.defaultdict(float)`` to have every step add the seconds it spends
    per stage (lookup, selector, choose, accumulator, router, stop_rules); None (the default) costs nothing.
    """

    stage_seconds: dict[str, float] | None = None

    def __init__(self, table: SemanticTable, model: torch.nn.Module | None, tokenizer, config: DecodeConfig | None = None,
                 sessions: SessionStore | None = None, adapter: str = "", tracks: Any = "auto"):
        self.table = table
        if tracks == "auto":  # the table version's own track memory, when it has one and a selector decodes
            from overlay.tracks import open_tracks

            tracks = open_tracks(table) if model is not None else None
        self.tracks = tracks  # a tracks.TrackMemory, or None: no track is followed
        self._routed: tuple | None = None  # (memory, question, k, chosen, retrieved) of the last GetTracks
        self.adapter = adapter
        self.model = model.eval() if model is not None else None
        self.tokenizer = tokenizer
        self.config = config or DecodeConfig()
        self.k = self.config.k_candidates or int(getattr(getattr(model, "config", None), "candidates", 32))
        self.sessions = sessions
        self.window = int(getattr(getattr(model, "config", None), "window", 8))
        self.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        from overlay.selector.state import NumberSpans, token_texts

        self.texts = token_texts(tokenizer)
        self.wordlike = [t.strip().isalpha() for t in self.texts]
        self.rep_cost = math.log(self.config.repetition_penalty)
        self.numbers = NumberSpans(self.texts)
        self.peer = None
        if model is not None and getattr(model.config, "overlay_peer", False):
            from overlay.peer import PeerScorer

            self.peer = PeerScorer(model, len(self.texts))

    def _prompt(self, question: str) -> list[int]:
        """Token ids of ``<Q> question``, after checking the question's size."""
        question = " ".join((question or "").split())
        if not question:
            raise ValueError("the question is empty: give at least one word")
        if len(question) > self.config.max_question_chars:
            raise ValueError(f"the question has {len(question)} characters; the limit is {self.config.max_question_chars}")
        return encode(self.tokenizer, f"{Q} {question} ")

    def new_state(self, question: str, sampling: tuple[float, float, int] | None = None) -> DecodeState:
        """A chain holding only the prompt ``<Q> question`` (sampled with ``sampling`` when given, else as the config
        says); ``step`` extends it."""
        ids = self._prompt(question)
        state = DecodeState(" ".join(question.split()), ids, len(ids), Router(sep=""), sampling=sampling)
        self._route(state)
        return state

    def _route(self, state: DecodeState) -> None:
        """GetTracks once per question. A greedy chain follows the chooser's track (if any passes its threshold); a
        sampled chain draws the track it follows from the retrieved ones by the chooser's p (none by 1 - the best p),
        seeded like its tokens, so the chains of a vote explore the tracks."""
        if self.tracks is None or not self.config.tracks or self.peer is not None:
            return
        from overlay.roles import question_numbers
        from overlay.tracks import Follower

        routed = self._routed  # the chains of a vote share their question's one GetTracks
        if routed is None or routed[0] is not self.tracks or routed[1:3] != (state.question, self.config.tracks):
            routed = (self.tracks, state.question, self.config.tracks, *self.tracks.choose(state.question,
                                                                                              self.config.tracks))
            self._routed = routed
        best, state.retrieved = routed[3], routed[4]
        temperature, _, seed = state.sampling or (self.config.temperature, self.config.top_p, self.config.seed)
        if temperature > 0:
            options = [r for r in state.retrieved if r.answer is not None]
            weights = [r.p for r in options] + [1 - max((r.p for r in options), default=0.0)]
            best = random.Random(seed * 7919 + 17).choices(options + [None], weights=weights)[0] if any(weights) else None
        if best is not None:
            state.follow = Follower(best, question_numbers(state.question), self._encode, self.numbers.spans,
                                    {t: IDS[t] for t in STEP_TAGS}, IDS[EOS])

    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def state_from_prefix(self, prefix: str, question: str | None = None) -> DecodeState:
        """A chain that starts from chain text ``<Q> question <THOUGHT> …`` (encoded as given): the steps after the
        question are routed (so an open ACTION or CHECK is known) but not traced; decoding continues after it."""
        if not prefix.strip().startswith(Q):
            raise ValueError(f"a chain prefix starts with {Q}, got {prefix.strip()[:30]!r}")
        ids = encode(self.tokenizer, prefix)
        first = next((i for i, t in enumerate(ids) if t in STEP_TAG_IDS), len(ids))
        state = DecodeState(question or prefix.split(Q, 1)[1].split("<")[0].strip(), ids, len(ids), Router(sep=""),
                            question_len=first)
        for t in ids[first:]:
            state.router.feed(self.texts[t], is_tag=t in TAG_IDS)
        return state

    def force(self, state: DecodeState, ids: list[int]) -> None:
        """Append tokens chosen elsewhere (a forced or replayed chain), traced as injected and routed as usual."""
        for t in ids:
            self._emit(state, t, injected=True)

    def _emit(self, state: DecodeState, token: int, *, injected: bool, cands: list[int] | None = None, rank: int = 0,
              score: float = 0.0, margin: float = 0.0, weight: float = 0.0, order: int = 0, source: str = "table",
              copies: list[str] | None = None, role: str = "") -> None:
        """Append one token to the chain, trace it, route it, and inject tool output when asked."""
        prof = self.stage_seconds
        t0 = time.perf_counter() if prof is not None else 0.0
        state.ids.append(token)
        text = self.texts[token]
        is_tag = token in TAG_IDS
        state.acc.add(TraceStep(len(state.ids) - state.prompt_len - 1, token, text.strip() or text,
                                state.router.current_tag or "", cands or [], rank, score, margin, weight, order, injected,
                                "tool" if injected and source == "table" else source, copies or [], role))
        if prof is not None:
            t1 = time.perf_counter()
            prof["accumulator"] += t1 - t0
        event = state.router.feed(text, is_tag=is_tag)
        out = None
        if event is not None and event.inject_text:
            out = encode(self.tokenizer, event.inject_text + " ")  # chains in training end a result with a space
            if out and out[0] == IDS[RESULT] and token == IDS[RESULT]:
                out = out[1:]
        if prof is not None:
            prof["router"] += time.perf_counter() - t1
        for t in out or ():
            self._emit(state, t, injected=True)

    def _penalty(self, state: DecodeState, cands: list[int], values: list[float]) -> list[float]:
        """``values`` (the candidates' log-probs, then the copies') less each candidate's repetition cost, ln(penalty) ×
        its uses among the recent generated words, in float32 as the scores are (the same numbers as a tensor
        subtraction); copies cost nothing. Only word tokens count (digits, operators and tags repeat legitimately,
        e.g. a CHECK restating an ACTION), which breaks the "hats hats hats" loops small greedy models fall into.
        """
        if not self.rep_cost or not self.config.repetition_window:
            return values
        recent = state.ids[max(state.prompt_len, len(state.ids) - self.config.repetition_window):]
        wordlike = self.wordlike
        present = {c for c in set(recent).intersection(cands) if wordlike[c]}
        if not present:
            return values
        cost = np.float32(self.rep_cost)
        adjusted = list(values)
        for i, c in enumerate(cands):
            if c in present:
                adjusted[i] = float(np.float32(values[i]) - np.float32(recent.count(c)) * cost)
        return adjusted

    def _offered(self, copies: list[tuple[str, str]]) -> list[str]:
        """The copy values offered, as "source:value" for the trace. The question-aware scorer hands out the same list
        while a chain's copy values do not change, so the labels are made once per change, not once per token."""
        memo = self.__dict__.get("_offered_memo")
        if memo is None or memo[0] is not copies:
            memo = self.__dict__["_offered_memo"] = (copies, [f"{src}:{value}" for value, src in copies])
        return memo[1]

    def _allowed(self, state: DecodeState, cands: list[int], copies: int) -> list[bool]:
        """Mask of candidates the grammar allows: no PAD/UNK/BOS/<Q>, <RESULT> only to close an ACTION; a copied
        number never starts inside another number."""
        never = NEVER if state.router.current_tag == "ACTION" else NEVER_OUTSIDE_ACTION
        mask = [c not in never for c in cands]
        if copies:
            mask += [not (self.numbers is not None and self.numbers.in_number(state.ids[-1]))] * copies
        return mask

    def _scorers(self) -> tuple[Any, Any, Any]:
        """The written-out forwards for the current model (slot, ALiBi, question-aware), rebuilt whenever the model,
        its modules or its weights have changed; None where they do not apply."""
        owner, fast, cached, qa = self.__dict__.get("_paths", (None, None, None, None))
        stale = owner is not self.model or any(p is not None and not p.usable(self.model) for p in (fast, cached, qa))
        if stale:
            from overlay.selector import CachedScorer, FastScorer, QASelector, QAScorer, unwrap  # transformers loads lazily

            fast, cached = FastScorer.build(self.model), CachedScorer.build(self.model)
            base = unwrap(self.model)
            qa = QAScorer(self.model, self.numbers, self.adapter) if isinstance(base, QASelector) else None
            self.__dict__["_paths"] = (self.model, fast, cached, qa)
        return fast, cached, qa

    def _scores(self, states: list[DecodeState], neighbours: list,
                extras: list[list[int]]) -> list[tuple[torch.Tensor, list[tuple[str, str]]]]:
        """Per chain, log-probabilities over its candidates (table ids, the followed track's token when the table did not
        offer it, then copy values) and the copies offered."""
        if self.model is None:
            return [(torch.tensor(nb.weights + [min(nb.weights, default=0.0)] * len(x)), []) for nb, x in zip(neighbours, extras)]
        if self.peer is not None:
            return [(self.peer.log_probs(s), []) for s in states]
        if any(extras) and not self._scorers()[2]:  # only the question-aware scorer scores any token
            return [(torch.cat([logp, logp.min().repeat(len(x))]), c) for (logp, c), x in
                    zip(self._scores(states, neighbours, [[] for _ in states]), extras)]
        fast, cached, qa = self._scorers()
        lengths = [len(nb.ids) for nb in neighbours]
        if qa is not None:
            out = []
            for state, nb, extra in zip(states, neighbours, extras):
                if state.kv is None or state.kv[0] is not qa:
                    state.kv = (qa, qa.start(state.ids[:state.memory]))
                mem = state.kv[1]
                if mem.consumed == 0:  # the chain stream starts with BOS, then the ids after the question
                    qa.push(mem, BOS_ID)
                for token in state.ids[state.memory + mem.consumed - 1:]:  # only what the memory has not read
                    qa.push(mem, token)
                logp, copies = qa.log_probs(mem, nb.ids + extra if extra else nb.ids)
                out.append((self._mix(torch.from_numpy(logp), nb), copies))
            return out
        if cached is not None and len(states) == 1:  # one chain: its own keys/values, one new row per block
            state = states[0]
            if state.kv is None or state.kv[0] is not cached:
                state.kv = (cached, cached.new_cache())
            logits = torch.from_numpy(cached.scores(state.kv[1], state.ids, neighbours[0].ids))[None]
        else:
            logits = self._window_logits(states, neighbours, lengths, fast)
        logits = logits.float().cpu()
        return [(self._mix(torch.log_softmax(logits[row, :n], -1), nb), []) for row, (nb, n) in
                enumerate(zip(neighbours, lengths))]

    def _window_logits(self, states: list[DecodeState], neighbours: list, lengths: list[int], fast: Any) -> torch.Tensor:
        """Candidate logits [B,Kmax] from each chain's last k tokens (PAD-filled) through a window selector."""
        k = self.window
        rows = [s.ids[-k:] for s in states]
        full = all(len(r) == k for r in rows)
        windows = torch.tensor(rows if full else [[0] * (k - len(r)) + r for r in rows], dtype=torch.long)
        kmax = max(lengths)
        cands = torch.tensor([nb.ids + [0] * (kmax - n) for nb, n in zip(neighbours, lengths)], dtype=torch.long)
        if fast is not None and full and not any(fast.pad in r for r in rows):
            has_pad = any(n < kmax or fast.pad in nb.ids for nb, n in zip(neighbours, lengths))
            return fast(windows.to(self.device), cands.to(self.device), has_pad)
        with torch.inference_mode():
            return self.model.score(windows.to(self.device), cands.to(self.device))

    def _mix(self, logp: torch.Tensor, nb: Any) -> torch.Tensor:
        """Add mix × table weight to the table candidates' log-probabilities (copies get no table weight)."""
        if not self.config.mix:
            return logp
        weights = torch.zeros(len(logp))
        weights[:len(nb.weights)] = torch.tensor(nb.weights)
        return logp + self.config.mix * weights

    def _candidates(self, states: list[DecodeState]) -> list:
        """GetNeighbours for every chain in one pipelined round trip (the whole vocabulary for the full-context peer)."""
        if self.peer is not None:
            return [self.peer.vocabulary] * len(states)
        return self.table.neighbours_batch([s.ids[-self.table.max_order:] for s in states], self.k)

    def step(self, states: list[DecodeState]) -> None:
        """One decision for every chain in ``states``: one pipelined lookup and one selector step each. A copied
        number is one decision that emits all its digits."""
        prof = self.stage_seconds
        t0 = time.perf_counter() if prof is not None else 0.0
        neighbours = self._candidates(states)
        if prof is not None:
            t1 = time.perf_counter()
            prof["lookup"] += t1 - t0
        proposals = [s.follow.proposal([c.output for c in s.router.tool_calls]) if s.follow is not None else None
                     for s in states]
        extras = [[p.tokens[0]] if p is not None and p.tokens[0] not in nb.ids else [] for p, nb in zip(proposals, neighbours)]
        scores = self._scores(states, neighbours, extras)
        if prof is not None:
            t0 = time.perf_counter()
            prof["selector"] += t0 - t1
        for state, nb, extra, proposal, (logp, copies) in zip(states, neighbours, extras, proposals, scores):
            cands = nb.ids + extra if extra else nb.ids
            n_table = len(cands)
            values = logp.tolist()  # the choice works on floats: one conversion per token
            allowed = self._allowed(state, cands, len(copies))
            adjusted = self._penalty(state, cands, values)
            follow = self._track_index(proposal, cands, copies)
            if follow is not None:
                adjusted = list(adjusted)
                adjusted[follow] += self.config.track_weight * state.follow.found.p
            temperature, top_p, seed = state.sampling or (self.config.temperature, self.config.top_p, self.config.seed)
            masked = _masked(adjusted, allowed)  # once for the choice and its margin
            choice = choose_index(masked, temperature, top_p, seed, len(state.ids))
            margin = choice_margin(masked, None, choice)
            score = values[choice]
            role = ""
            if choice == follow:
                tokens, source, role = list(proposal.tokens), "track", proposal.role
            elif choice < n_table:
                tokens, source = [cands[choice]], "table"
            else:
                value, source = copies[choice - n_table]
                tokens = self.numbers.tokens(value)
            if state.follow is not None:
                state.follow.observe(tokens, choice == follow, TAG_NAMES)
            if prof is not None:
                prof["choose"] += time.perf_counter() - t0
            tag = state.router.current_tag
            answered = tokens[0] in STEP_TAG_IDS and tag == "ANSWER" and state.ids[-1] != IDS[ANSWER]
            if answered:
                tokens = [IDS[EOS]]  # a new step after a finished answer ends the chain: the stray tag is not kept
            if tokens[0] in TAG_IDS and tokens[0] != IDS[RESULT] and tag == "ACTION":
                self._emit(state, IDS[RESULT], injected=True)
            offered = self._offered(copies)
            self._emit(state, tokens[0], injected=False, cands=cands, rank=choice, score=score, margin=margin,
                       weight=nb.weights[choice] if choice < len(nb.weights) else 0.0, order=nb.order, source=source,
                       copies=offered, role=role)
            for t in tokens[1:]:
                self._emit(state, t, injected=True, source="copy" if source != "track" else "track", role=role)
            if answered:
                state.acc.stop_reason = "answer"
            if prof is not None:
                t0 = time.perf_counter()
            self._check_stop(state)
            if prof is not None:
                t1 = time.perf_counter()
                prof["stop_rules"] += t1 - t0
                t0 = t1

    @staticmethod
    def _track_index(proposal: Any, cands: list[int], copies: list[tuple[str, str]]) -> int | None:
        """Where the followed track's proposal is among the candidates: its copy value when it is a number the chain
        may copy, else its (first) token."""
        if proposal is None:
            return None
        if proposal.value is not None:
            for i, (value, _) in enumerate(copies):
                if value == proposal.value:
                    return len(cands) + i
        return cands.index(proposal.tokens[0])

    def _check_stop(self, state: DecodeState) -> None:
        """Stop at <EOS>, at a repeated step, at the token limit, or by the accumulator's rule. A chain cut by its
        token limit keeps its open step, so a later call with a larger limit continues it."""
        acc, router = state.acc, state.router
        if acc.stop_reason:
            return
        last = state.ids[-1]
        if last in TAG_IDS and router.steps and self._repeats(router) >= self.config.max_step_repeats:
            acc.stop_reason = "repetition"
            router.finish()
            return
        if self.peer is not None and len(state.ids) >= self.peer.context - PEER_MARGIN:
            acc.stop_reason = "context_limit"  # the peer has no position beyond its n_positions
            return
        reason = acc.should_stop(self.config.max_tokens, self.config.min_mean_logprob)
        if reason and reason != "max_tokens" and not router.done:
            router.finish()

    @staticmethod
    def _repeats(router: Router) -> int:
        """How often the step just closed already occurs, same tag and text (only checked at step ends)."""
        last = router.steps[-1]
        return sum(1 for s in router.steps if s.tag == last.tag and s.text == last.text)

    def result(self, state: DecodeState, session_id: str | None = None) -> DecodeResult:
        """The chain decoded so far as a DecodeResult (text, answer, steps, verdicts, tool calls, trace)."""
        r = state.router
        if not r.done:  # the view of a chain still open (cut by a limit) closes its last step; the state stays open
            r = Router.from_dict(r.to_dict())
            r.finish()
        text = decode(self.tokenizer, state.ids)
        return DecodeResult(
            question=state.question, text=" ".join(text.split()), answer=r.answer, stop_reason=state.acc.stop_reason or "running",
            steps=[{"tag": s.tag, "text": s.text} for s in r.steps],
            verdicts=[{"claim": v.claim, "verdict": v.verdict, "reason": v.reason} for v in r.verdicts],
            tool_calls=[vars(c).copy() for c in r.tool_calls], errors=list(r.errors), trace=state.acc.to_dict(),
            tokens=len(state.ids) - state.prompt_len, seconds=state.elapsed, session_id=session_id,
            tracks=self._tracks_trace(state),
        )

    @staticmethod
    def _tracks_trace(state: DecodeState) -> list[dict[str, Any]]:
        """The retrieved tracks (rank, similarity, binding, the answer each gives, the chooser's p) and which was
        followed, for how many decisions."""
        followed = state.follow.found.track.id if state.follow is not None else None
        out = []
        for r in state.retrieved:
            row = r.to_dict() | {"followed": r.track.id == followed}
            if row["followed"]:
                row |= {"followed_decisions": state.follow.followed, "left_track": not state.follow.alive}
            out.append(row)
        return out

    def _save(self, session_id: str | None, state: DecodeState) -> int:
        """Append what the chain made since its last save (ids, trace) and overwrite its small state; returns the
        bytes written, which do not grow with the chain's length."""
        if not (session_id and self.sessions is not None):
            return 0
        ids_done, steps_done = state.saved
        written = self.sessions.append(session_id, state.summary(), state.ids[ids_done:],
                                       [asdict(s) for s in state.acc.steps[steps_done:]], ttl_s=self.config.session_ttl_s)
        state.saved = (len(state.ids), len(state.acc.steps))
        return written

    def _restore(self, saved: tuple[dict[str, Any], list[int], list[dict[str, Any]]]) -> DecodeState:
        """Rebuild a chain from its saved state, ids and trace; the router replays the steps from the ids."""
        summary, ids, trace = saved
        state = DecodeState(summary["question"], ids, int(summary["prompt_len"]), Router(sep=""),
                            elapsed=float(summary.get("elapsed", 0.0)), question_len=int(summary.get("question_len", -1)))
        acc = state.acc
        acc.log_score, acc.scored_tokens = float(summary["log_score"]), int(summary["scored_tokens"])
        acc.tag_counts, acc.stop_reason = dict(summary["tag_counts"]), summary["stop_reason"]
        acc.steps = [TraceStep(**s) for s in trace]
        first = next((i for i, t in enumerate(ids) if t in STEP_TAG_IDS), len(ids))
        for t in ids[first:]:
            state.router.feed(self.texts[t], is_tag=t in TAG_IDS)
        if acc.stop_reason not in (None, "max_tokens", "low_score"):
            state.router.finish()
        state.saved = (len(ids), len(trace))
        self._route(state)
        if state.follow is not None:  # walk the track along the decisions already taken, as the trace records them
            results = [c.output for c in state.router.tool_calls]
            steps = acc.steps
            for i, s in enumerate(steps):
                if s.injected:
                    continue
                tokens = [s.token_id]
                for later in steps[i + 1:]:
                    if not (later.injected and later.source in ("copy", "track")):
                        break
                    tokens.append(later.token_id)
                state.follow.proposal(results)
                state.follow.observe(tokens, s.source == "track", TAG_NAMES)
        return state

    def generate(self, question: str = "", session_id: str | None = None, max_new_tokens: int | None = None) -> DecodeResult:
        """Decode one chain. With a session id whose state exists, continue it (the question may be empty).

        ``max_new_tokens`` bounds this call only (the chain's own limit is ``config.max_tokens``); the state is
        saved every ``save_every`` tokens and at the end, so a later call picks up where this one stopped.
        """
        state = None
        if session_id and self.sessions is not None:
            saved = self.sessions.load_chain(session_id)
            if saved is not None:
                state = self._restore(saved)
                if question and " ".join(question.split()) != state.question:
                    raise ValueError(f"session {session_id!r} belongs to another question: {state.question[:60]!r}")
                if state.acc.stop_reason == "max_tokens" and len(state.acc.steps) < self.config.max_tokens:
                    state.acc.stop_reason = None  # a larger limit than the one that cut it: continue
            elif not (question or "").strip():
                raise ValueError(f"session {session_id!r} does not exist (never started, or expired after "
                                 f"{self.config.session_ttl_s} s): give the question to start it")
        if state is None:
            state = self.new_state(question)
        start = time.perf_counter()
        budget = max_new_tokens if max_new_tokens is not None else self.config.max_tokens
        made = 0
        while not state.acc.stop_reason and made < budget:
            self.step([state])
            made += 1
            if session_id and made % self.config.save_every == 0:
                state.elapsed += time.perf_counter() - start
                start = time.perf_counter()
                self._save(session_id, state)
        state.elapsed += time.perf_counter() - start
        self._save(session_id, state)
        return self.result(state, session_id)

    def warm_up(self) -> None:
        """Run a few decode steps on a throwaway question, so the first real question pays no set-up cost."""
        state = self.new_state("warm up with 12 and 3")
        for _ in range(4):
            if not state.acc.stop_reason:
                self.step([state])

    def generate_batch(self, questions: list[str]) -> list[DecodeResult]:
        """Decode many questions at once: one pipelined lookup and one batched forward per token position."""
        return self.run_batch([self.new_state(q) for q in questions])

    def run_batch(self, states: list[DecodeState]) -> list[DecodeResult]:
        """Decode chains to their end together (each with its own sampling, when set), sharing the elapsed time."""
        start = time.perf_counter()
        active = list(states)
        while active:
            self.step(active)
            active = [s for s in active if not s.acc.stop_reason]
        elapsed = time.perf_counter() - start
        for s in states:
            s.elapsed = elapsed / len(states)
        return [self.result(s, None) for s in states]


def _client(redis_url: str | None) -> Any:
    """The Redis client for a URL (``store.connect`` keeps one per data directory and restarts a dead server)."""
    from overlay import store

    return store.connect(redis_url)


def model_fingerprint(folder: str | Path) -> tuple:
    """(name, size, mtime) of a model folder's files and its adapters': changes when either is retrained."""
    folder = Path(folder)
    files = sorted(p for pattern in ("*", "adapters/*/*") for p in folder.glob(pattern) if p.is_file()) \
        if folder.is_dir() else []
    return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def adapter_for(model_dir: str | Path, domain: str) -> str:
    """The domain's LoRA adapter in a model folder (``adapters/<domain>``), or "" for the base alone."""
    return domain if (Path(model_dir) / "adapters" / domain / "adapter_config.json").is_file() else ""


@functools.lru_cache(maxsize=4)
def _base(model_dir: str, device: str, fingerprint: tuple) -> tuple[Any, Any]:
    """One loaded base (with every adapter of its folder, none merged) per model folder and its files; loaded without
    transformers' "Loading weights" progress bar, which would otherwise land on every command's and server's stderr."""
    from transformers.utils import logging as hf_logging

    from overlay.selector import load_selector

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, tokenizer = load_selector(model_dir, device=device)
        names = sorted(p.parent.name for p in Path(model_dir).glob("adapters/*/adapter_config.json"))
        if names:
            from overlay.train import load_adapters

            model = load_adapters(model_dir, names, device)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model, tokenizer


@functools.lru_cache(maxsize=8)
def _cached(domain: str, model_dir: str, redis_url: str | None, device: str, config: tuple, version: int | None,
            fingerprint: tuple) -> OverlayDecoder:
    from overlay.tokenizer import check_tokenizers

    client = _client(redis_url)
    table = SemanticTable(client, domain, version)
    model, tokenizer = _base(model_dir, device, fingerprint)
    check_tokenizers({f"table {domain!r} v{table.version}": table.meta.get("tokenizer_hash"), f"model {model_dir}": tokenizer})
    decoder = OverlayDecoder(table, model, tokenizer, DecodeConfig(**dict(config)), SessionStore(client),
                             adapter_for(model_dir, domain))
    decoder.warm_up()
    return decoder


def load_decoder(domain: str, model_dir: str, redis_url: str | None = None, device: str = "cpu", **config: Any) -> OverlayDecoder:
    """A decoder for a domain's active table and a selector folder, using the domain's LoRA adapter when the folder
    has one (the base is loaded once and shared, so switching domains reloads nothing); cached per arguments, the
    table's active version and the model files (a rebuilt table or a retrained model is picked up by the next
    call); warmed up once."""
    from overlay.table import active_version

    version = active_version(_client(redis_url), domain)
    return _cached(domain, str(model_dir), redis_url, device, tuple(sorted(config.items())), version,
                   model_fingerprint(model_dir))
