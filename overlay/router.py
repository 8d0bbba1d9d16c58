"""Tag router: splits a reasoning stream into steps and acts on them (ACTION → tool, CHECK → verify).

A CHECK step's verdict says whether its arithmetic is *consistent* (the calculator confirms the claim), which a wrong
chain passes as easily as a right one; ``ChainCheck`` joins a finished chain's CHECK verdicts with a verifier's
probability that its answer is right (``overlay.verifier``), and only that makes a chain *verified*.

Step tags are the special tokens `<Q> <THOUGHT> <ACTION> <RESULT> <CHECK> <ANSWER> <EOS>`;
`<BOS>` and `<PAD>` are markers that never start a step and are dropped from step text;
`<UNK>` and any other `<TAG>`-looking token are kept as ordinary text. Tags are reported by
bare name (`"ACTION"`, not `"<ACTION>"`); text before the first tag forms a step with tag `""`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence

from overlay.tools import ToolError, ToolMap, ToolResult, evaluate, format_number, run_tool_call

STEP_TAGS = ("Q", "THOUGHT", "ACTION", "RESULT", "CHECK", "ANSWER", "EOS")
SKIP_TAGS = ("BOS", "PAD")
SPECIAL_TAGS = ("PAD", "UNK", "BOS", "EOS", "Q", "THOUGHT", "ACTION", "RESULT", "CHECK", "ANSWER")
REL_TOL = Fraction(1, 10**6)

_BOUNDARY_RE = re.compile(f"<({'|'.join(STEP_TAGS)})>")
_SKIP_RE = re.compile(f"<(?:{'|'.join(SKIP_TAGS)})>")
_SPECIAL_RE = re.compile(f"<({'|'.join(SPECIAL_TAGS)})>")
_TAG_TOKEN_RE = re.compile(r"<([A-Za-z_]+)>")
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_CALC_WRAP_RE = re.compile(r"\s*calc\s*\((.*)\)\s*\Z", re.DOTALL)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclass
class Step:
    """One step of a chain: `tag` (bare name, "" for a preamble), its cleaned text and its span.

    From `parse_steps`, `start`/`end` are character offsets into the parsed string (the span runs
    from the tag token up to the next step's tag). From `Router`, they are token positions
    (the index of the tag token in the fed stream, end exclusive).
    """

    tag: str
    text: str
    start: int
    end: int


@dataclass
class Verdict:
    """The outcome of verifying one CHECK claim: `pass`, `fail` or `unverifiable`, with a reason."""

    claim: str
    verdict: str
    reason: str


@dataclass
class ChainCheck:
    """A finished chain's CHECKs taken together: how many CHECK steps it made and how many were consistent, and, when
    a verifier read the chain, its probability ``p`` that the answer is right. Verified means both: consistent
    CHECKs and the verifier's p at least ``threshold``; a chain the verifier rejects is never verified."""

    checks: int
    consistent: int
    p: float | None = None
    threshold: float = 0.5

    @property
    def all_consistent(self) -> bool:
        """True when the chain made at least one CHECK and every one was consistent."""
        return self.checks > 0 and self.consistent == self.checks

    @property
    def rejected(self) -> bool:
        """True when a verifier read the chain and scored it below its threshold."""
        return self.p is not None and self.p < self.threshold

    @property
    def verified(self) -> bool:
        """True when the CHECKs are consistent and a verifier accepts the answer."""
        return self.all_consistent and self.p is not None and not self.rejected

    def line(self) -> str:
        """What to show beside the answer: the verifier's score and verdict, then any inconsistent CHECKs."""
        parts = [] if self.p is None else [f"verifier {self.p:.2f}: likely {'wrong' if self.rejected else 'right'}"]
        failed = self.checks - self.consistent
        if failed:
            parts.append("its check failed" if self.checks == 1 else f"{failed} of its {self.checks} checks failed")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the derived verdicts spelled out for a reader of the trace."""
        return asdict(self) | {"all_consistent": self.all_consistent, "verified": self.verified}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChainCheck:
        """Rebuild from ``to_dict()`` output (derived fields ignored)."""
        return cls(int(data["checks"]), int(data["consistent"]), data.get("p"), float(data.get("threshold", 0.5)))

    @classmethod
    def of(cls, verdicts: Sequence[Mapping[str, str]], p: float | None = None, threshold: float = 0.5) -> ChainCheck:
        """The check of a chain from its CHECK verdicts (``DecodeResult.verdicts``) and a verifier's p, if any."""
        return cls(len(verdicts), sum(v["verdict"] == "pass" for v in verdicts), p, threshold)


@dataclass
class RouterEvent:
    """What the router asks of the decoder after a step ends.

    kind is "inject" (emit `inject_text` before continuing), "verdict" (a CHECK was verified),
    "answer" (an ANSWER number was stored) or "error" (something was malformed; when a tool call
    failed, `inject_text` still carries `<RESULT> error: ...` so the chain can continue).
    `inject_text` begins with the `<RESULT>` tag: emit it in place of the model's own `<RESULT>`
    when that tag closed the ACTION step, and feed the injected tokens back like any others.
    """

    kind: str
    step: Step | None
    inject_text: str | None = None
    verdict: str | None = None
    detail: str = ""


def _clean(content: str) -> str:
    """Drop <BOS>/<PAD> markers and collapse whitespace."""
    return " ".join(_SKIP_RE.sub("", content).split())


def parse_steps(text: str) -> list[Step]:
    """Split a chain into steps at step tags (char offsets); never raises on any string."""
    marks = list(_BOUNDARY_RE.finditer(text))
    first = marks[0].start() if marks else len(text)
    steps: list[Step] = []
    preamble = _clean(text[:first])
    if preamble:
        steps.append(Step("", preamble, len(text) - len(text.lstrip()), first))
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        steps.append(Step(mark.group(1), _clean(text[mark.end() : end]), mark.start(), end))
    return steps


def _calc_side(text: str) -> str:
    """Unwrap `calc(...)`, drop `$` and thousands commas from one side of a claim."""
    match = _CALC_WRAP_RE.match(text)
    inner = match.group(1) if match else text
    return _THOUSANDS_RE.sub("", inner.replace("$", "")).strip()


def verify_check(claim: str) -> tuple[str, str]:
    """Verify `calc(EXPR) = V`, `EXPR = V` or `A = B` numerically (relative tolerance 1e-6)."""
    if not isinstance(claim, str) or not claim.strip():
        return "unverifiable", "empty claim"
    sides = re.split(r"==?", claim)
    if len(sides) != 2:
        return "unverifiable", f"expected exactly one '=' in claim {claim.strip()[:80]!r}"
    values: list[Fraction] = []
    for label, side in zip(("left", "right"), sides):
        expression = _calc_side(side)
        try:
            values.append(evaluate(expression))
        except ToolError as exc:
            return "unverifiable", f"{label} side {expression[:60]!r}: {exc}"
    left, right = values
    shown = f"{format_number(left)} vs {format_number(right)}"
    if abs(left - right) <= REL_TOL * max(abs(left), abs(right)):
        return "pass", f"both sides equal: {shown}"
    return "fail", f"sides differ: {shown}"


def extract_answer(text: str) -> str | None:
    """Return the first number in an ANSWER step with thousands commas removed, or None."""
    match = _NUMBER_RE.search(text or "")
    return match.group(0).replace(",", "") if match else None


def _neutralise(text: str) -> str:
    """Strip angle brackets from special tags in tool output so it cannot steer the chain."""
    return " ".join(_SPECIAL_RE.sub(r"\1", text).split())


class Router:
    """Incremental step router fed one emitted token at a time while the decoder runs.

    A step ends when the next step tag (or `<EOS>`) arrives, or on `finish()`; the finished step
    is then acted on. `sep` joins fed token texts: " " for whitespace-split words, "" for decoded
    pieces that carry their own spacing. `tools` overrides the global registry when given.
    """

    def __init__(self, tools: ToolMap | None = None, sep: str = " ") -> None:
        """Create an empty router."""
        self.tools = tools
        self.sep = sep
        self.steps: list[Step] = []
        self.verdicts: list[Verdict] = []
        self.tool_calls: list[ToolResult] = []
        self.answer: str | None = None
        self.counts: dict[str, int] = {tag: 0 for tag in STEP_TAGS}
        self.errors: list[str] = []
        self.position = 0
        self.done = False
        self._tag: str | None = None
        self._parts: list[str] = []
        self._start = 0

    @property
    def current_tag(self) -> str | None:
        """Tag of the step being received ("" for a preamble), or None when no step is open."""
        return self._tag

    def feed(self, token_text: str, is_tag: bool = False) -> RouterEvent | None:
        """Take one emitted token; return an event when this token closed a step that needs action."""
        position = self.position
        self.position += 1
        match = _TAG_TOKEN_RE.fullmatch(token_text.strip()) if is_tag else None
        name = match.group(1) if match else None
        if name in SKIP_TAGS:
            return None
        if self.done:
            return self._error(f"token {token_text!r} after <EOS> ignored", None)
        if name in STEP_TAGS:
            event = self._close(position)
            self.counts[name] += 1
            if name == "EOS":
                self.steps.append(Step("EOS", "", position, position + 1))
                self.done = True
            else:
                self._tag, self._parts, self._start = name, [], position
            return event
        if self._tag is None:
            self._tag, self._parts, self._start = "", [], position
        self._parts.append(token_text)
        if is_tag and name != "UNK":
            return self._error(f"unknown tag token {token_text!r} kept as text", None)
        return None

    def finish(self) -> RouterEvent | None:
        """End the stream without `<EOS>` (e.g. at max tokens): act on the open step, mark done. An open ACTION or
        CHECK was cut before it ended, so it is recorded as cut instead of being run or verified."""
        if self._tag in ("ACTION", "CHECK"):
            step = Step(self._tag, " ".join(self.sep.join(self._parts).split()), self._start, self.position)
            self.steps.append(step)
            self._tag, self._parts = None, []
            self.done = True
            what = "run" if step.tag == "ACTION" else "verified"
            return self._error(f"the chain was cut inside this {step.tag} ({step.text[:60]!r}) by its end (the token "
                               f"limit or another stop), so it was not {what}", step)
        event = self._close(self.position)
        self.done = True
        return event

    def _error(self, message: str, step: Step | None, inject: str | None = None) -> RouterEvent:
        """Record an error and build the matching event."""
        where = f"step {len(self.steps) - 1} ({step.tag})" if step else f"token {self.position - 1}"
        self.errors.append(f"{where}: {message}")
        return RouterEvent(kind="error", step=step, inject_text=inject, detail=message)

    def _close(self, end: int) -> RouterEvent | None:
        """Finish the open step (if any) and act on it."""
        if self._tag is None:
            return None
        step = Step(self._tag, " ".join(self.sep.join(self._parts).split()), self._start, end)
        self.steps.append(step)
        self._tag, self._parts = None, []
        if step.tag == "ACTION":
            result = run_tool_call(step.text, self.tools)
            self.tool_calls.append(result)
            if not result.ok:
                message = result.error or "tool call failed"
                return self._error(message, step, inject=f"<RESULT> error: {_neutralise(message)}")
            detail = f"{result.tool}({result.args.strip()}) -> {result.output}"
            inject = f"<RESULT> {_neutralise(result.output)}"
            return RouterEvent(kind="inject", step=step, inject_text=inject, detail=detail)
        if step.tag == "CHECK":
            verdict, reason = verify_check(step.text)
            self.verdicts.append(Verdict(step.text, verdict, reason))
            return RouterEvent(kind="verdict", step=step, verdict=verdict, detail=reason)
        if step.tag == "ANSWER":
            answer = extract_answer(step.text)
            if answer is None:
                return self._error(f"no number in ANSWER step {step.text[:60]!r}", step)
            self.answer = answer
            return RouterEvent(kind="answer", step=step, detail=answer)
        return None

    def to_dict(self) -> dict[str, Any]:
        """Serialise the full state (JSON-compatible) so a chain can be persisted and resumed."""
        current = None if self._tag is None else {"tag": self._tag, "parts": list(self._parts), "start": self._start}
        return {
            "version": 1,
            "sep": self.sep,
            "steps": [asdict(step) for step in self.steps],
            "verdicts": [asdict(verdict) for verdict in self.verdicts],
            "tool_calls": [asdict(call) for call in self.tool_calls],
            "answer": self.answer,
            "counts": dict(self.counts),
            "errors": list(self.errors),
            "position": self.position,
            "done": self.done,
            "current": current,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tools: ToolMap | None = None) -> Router:
        """Rebuild a router from `to_dict()` output; tools are not serialised, so pass them again."""
        router = cls(tools=tools, sep=data["sep"])
        router.steps = [Step(**step) for step in data["steps"]]
        router.verdicts = [Verdict(**verdict) for verdict in data["verdicts"]]
        router.tool_calls = [ToolResult(**call) for call in data["tool_calls"]]
        router.answer = data["answer"]
        router.counts = {tag: 0 for tag in STEP_TAGS} | dict(data["counts"])
        router.errors = list(data["errors"])
        router.position = data["position"]
        router.done = data["done"]
        current = data.get("current")
        if current is not None:
            router._tag, router._parts, router._start = current["tag"], list(current["parts"]), current["start"]
        return router
