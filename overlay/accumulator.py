"""Global score accumulator: the per-token trace of a chain, running scores, stop rules, persistence.

`ScoreAccumulator` keeps running sums so `add` is constant time however long the chain gets.
`SessionStore` persists any JSON state (e.g. accumulator + router) in Redis by session id with a
TTL, so a REST conversation can continue; it takes a client (Redis or RedisCluster), never makes one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import redis
from redis.exceptions import ClusterError

from overlay.router import STEP_TAGS
from overlay.store import StoreUnavailable

SESSION_PREFIX = "ovl:session:"
TRACE_CAP = 100_000  # trace steps kept per session (a Redis stream, trimmed beyond this)
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")
_STEP_TAG_TOKENS = {f"<{tag}>": tag for tag in STEP_TAGS}
_SECRET_RE = re.compile(r"(://[^:/@\s]*:)[^@\s]*@|(password=)\S+", re.IGNORECASE)


@dataclass
class TraceStep:
    """One emitted token and why: the table candidates, the selector's choice, score and margin.

    `tag` is the tag of the step the token belongs to; `score` is the log-prob of the chosen token
    under the selector's softmax over `candidates`; `margin` is the chosen logit minus the best
    other; `injected` marks tokens the router inserted (tool results), which the selector did not choose.
    `source` says where the chosen candidate came from (table, question, result, track; copy for a copied number's
    later digits); `copies` lists the copy candidates offered as "source:value"; `role` is a followed track's number
    role ("Q2": the question's second number, "R1": the first tool result, "constant"), empty otherwise.
    """

    position: int
    token_id: int
    token: str
    tag: str
    candidates: list[int]
    chosen_rank: int
    score: float
    margin: float
    table_weight: float
    order_used: int
    injected: bool = False
    source: str = "table"
    copies: list[str] = field(default_factory=list)
    role: str = ""


def _normalised(step: TraceStep) -> TraceStep:
    """Coerce fields to plain Python types (e.g. numpy/torch scalars) so the trace stays JSON-safe."""
    return TraceStep(
        position=int(step.position),
        token_id=int(step.token_id),
        token=str(step.token),
        tag=str(step.tag),
        candidates=[int(candidate) for candidate in step.candidates],
        chosen_rank=int(step.chosen_rank),
        score=float(step.score),
        margin=float(step.margin),
        table_weight=float(step.table_weight),
        order_used=int(step.order_used),
        injected=bool(step.injected),
        source=str(step.source),
        copies=[str(c) for c in step.copies],
        role=str(step.role),
    )


class ScoreAccumulator:
    """Running log-score, per-token trace, tag counts and stop reason of one chain.

    Injected tokens are traced but do not count towards `log_score`, `mean_logprob` or `perplexity`.
    `tag_counts` counts emitted step-tag tokens (e.g. `<ACTION>`) by bare tag name.
    """

    def __init__(self) -> None:
        """Start an empty trace."""
        self.log_score = 0.0
        self.scored_tokens = 0
        self.steps: list[TraceStep] = []
        self.earlier = 0  # tokens added before this object was restored from a state without their trace
        self.tag_counts: dict[str, int] = {}
        self.stop_reason: str | None = None

    def add(self, step: TraceStep) -> None:
        """Append one token to the trace and update the running sums in constant time."""
        step = _normalised(step)
        self.steps.append(step)
        if not step.injected:
            self.log_score += step.score
            self.scored_tokens += 1
        tag = _STEP_TAG_TOKENS.get(step.token)
        if tag is not None:
            self.tag_counts[tag] = self.tag_counts.get(tag, 0) + 1

    @property
    def tokens(self) -> int:
        """Tokens in the chain, those whose trace steps are not held here (``earlier``) included."""
        return self.earlier + len(self.steps)

    @property
    def mean_logprob(self) -> float:
        """Mean log-prob per selector-chosen token (0.0 before any)."""
        return self.log_score / self.scored_tokens if self.scored_tokens else 0.0

    @property
    def perplexity(self) -> float:
        """exp(-mean_logprob) over selector-chosen tokens (1.0 before any; inf on overflow)."""
        exponent = -self.mean_logprob
        return math.exp(exponent) if exponent < 709 else math.inf

    def should_stop(self, max_tokens: int, min_mean_logprob: float | None = None) -> str | None:
        """Return (and record) why decoding should stop: "eos", "max_tokens" or "low_score"; else None."""
        if self.stop_reason is not None:
            return self.stop_reason
        if self.steps and self.steps[-1].token == "<EOS>":
            self.stop_reason = "eos"
        elif self.tokens >= max_tokens:
            self.stop_reason = "max_tokens"
        elif min_mean_logprob is not None and self.scored_tokens and self.mean_logprob < min_mean_logprob:
            self.stop_reason = "low_score"
        return self.stop_reason

    def to_dict(self, trace: bool = True) -> dict[str, Any]:
        """Serialise to plain JSON-compatible data (exact: floats survive a JSON round trip).

        ``trace=False`` leaves the per-token steps out: the small, fixed-size state a session overwrites on every
        save, while the steps go to an append-only, capped trace (``SessionStore.append``).
        """
        data = {
            "version": 1,
            "tokens": self.tokens,
            "log_score": self.log_score,
            "scored_tokens": self.scored_tokens,
            "tag_counts": dict(self.tag_counts),
            "stop_reason": self.stop_reason,
        }
        return (data | {"steps": [asdict(step) for step in self.steps]}) if trace else data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreAccumulator:
        """Rebuild an accumulator from `to_dict()` output, running sums included; without steps (``trace=False``)
        it holds no trace and goes on counting from the saved number of tokens."""
        accumulator = cls()
        accumulator.log_score = float(data["log_score"])
        accumulator.scored_tokens = int(data["scored_tokens"])
        accumulator.tag_counts = {str(tag): int(count) for tag, count in data["tag_counts"].items()}
        accumulator.stop_reason = data["stop_reason"]
        accumulator.steps = [TraceStep(**step) for step in data.get("steps", ())]
        accumulator.earlier = int(data.get("tokens", len(accumulator.steps))) - len(accumulator.steps)
        return accumulator

    def to_json(self) -> str:
        """Serialise to a compact JSON string."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ScoreAccumulator:
        """Rebuild an accumulator from `to_json()` output."""
        return cls.from_dict(json.loads(text))


def _scrub(message: str) -> str:
    """Remove anything that looks like a password from an error message."""
    return _SECRET_RE.sub(lambda m: (m.group(1) + "***@") if m.group(1) else m.group(2) + "***", message)


class SessionStore:
    """Persist JSON session state in Redis under `ovl:session:{session_id}` with a refreshed TTL."""

    def __init__(self, client: redis.Redis | redis.RedisCluster, prefix: str = SESSION_PREFIX) -> None:
        """Wrap an existing Redis or RedisCluster client."""
        self.client = client
        self.prefix = prefix

    def key(self, session_id: str) -> str:
        """Return the Redis key for a session id, validating the id (1..128 of [A-Za-z0-9_.:-])."""
        if not isinstance(session_id, str) or not _SESSION_ID_RE.match(session_id):
            raise ValueError(f"invalid session id {str(session_id)[:40]!r}: use 1..128 characters of [A-Za-z0-9_.:-]")
        return self.prefix + session_id

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one client command, turning connection failures into StoreUnavailable."""
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ClusterError) as exc:
            detail = _scrub(str(exc))[:200]
            message = f"session store unavailable: Redis {method.upper()} failed ({type(exc).__name__}: {detail})"
            raise StoreUnavailable(message) from exc

    def save(self, session_id: str, state: Mapping[str, Any], ttl_s: int = 3600) -> None:
        """Store `state` as JSON and (re)set its time-to-live to `ttl_s` seconds."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, not {type(state).__name__}")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise ValueError(f"ttl_s must be a positive integer number of seconds, got {ttl_s!r}")
        self._call("set", self.key(session_id), json.dumps(dict(state), separators=(",", ":")), ex=ttl_s)

    def load(self, session_id: str) -> dict[str, Any] | None:
        """Return the stored state for a session, or None if it is missing or expired."""
        raw = self._call("get", self.key(session_id))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"session {session_id!r} does not hold valid JSON: {exc}") from None

    def delete(self, session_id: str) -> bool:
        """Delete a session (its state, ids and trace); return True if it existed."""
        key = self.key(session_id)
        return bool(self._call("delete", key, key + ":ids", key + ":trace"))

    def append(self, session_id: str, state: Mapping[str, Any], ids: list[int], trace: list[Mapping[str, Any]],
               ttl_s: int = 3600, trace_cap: int = TRACE_CAP) -> int:
        """Save a chain incrementally: a small fixed-size state (overwritten), the ids and trace steps made since the
        last save (appended to a list and to a capped stream). What one save writes does not grow with the chain;
        returns the bytes written."""
        key = self.key(session_id)
        payload = json.dumps(dict(state), separators=(",", ":"))
        steps = [json.dumps(dict(s), separators=(",", ":")) for s in trace]
        written = len(payload) + sum(len(s) for s in steps) + sum(len(str(i)) for i in ids)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(key, payload, ex=ttl_s)
            if ids:
                pipe.rpush(key + ":ids", *ids)
            for step in steps:
                pipe.xadd(key + ":trace", {"s": step}, maxlen=trace_cap, approximate=True)
            pipe.expire(key + ":ids", ttl_s)
            pipe.expire(key + ":trace", ttl_s)
            pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, ClusterError) as exc:
            raise StoreUnavailable(f"session store unavailable: Redis pipeline failed ({type(exc).__name__}: "
                                   f"{_scrub(str(exc))[:200]})") from exc
        return written

    def load_chain(self, session_id: str) -> tuple[dict[str, Any], list[int], list[dict[str, Any]]] | None:
        """(state, ids, trace steps) saved by ``append``, or None when the session is missing or expired."""
        state = self.load(session_id)
        if state is None:
            return None
        key = self.key(session_id)
        ids = [int(i) for i in self._call("lrange", key + ":ids", 0, -1)]
        trace = [json.loads(fields[b"s"] if b"s" in fields else fields["s"])
                 for _, fields in self._call("xrange", key + ":trace")]
        return state, ids, trace
