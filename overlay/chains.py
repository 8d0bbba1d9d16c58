"""Normalise reasoning datasets (GSM8K or generic JSONL) into one tagged inner-dialogue chain format."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

PAD, UNK, BOS, EOS = "<PAD>", "<UNK>", "<BOS>", "<EOS>"
Q, THOUGHT, ACTION, RESULT, CHECK, ANSWER = "<Q>", "<THOUGHT>", "<ACTION>", "<RESULT>", "<CHECK>", "<ANSWER>"
SPECIAL_TOKENS: list[str] = [PAD, UNK, BOS, EOS, Q, THOUGHT, ACTION, RESULT, CHECK, ANSWER]
STEP_TAGS = (THOUGHT, ACTION, RESULT, CHECK, ANSWER)
MAX_LINE_CHARS = 100_000

TAG_LIKE = re.compile(r"<[A-Z][A-Z_]*>")
# `= $<<48/2=24>>24`, `<<5*2=10>>10`: optional "=" and currency, the annotation, the number shown after it.
_ANNOT = re.compile(
    r"(?P<eq>\s*=\s*)?(?P<cur>\$)?<<(?P<inner>[^<>]*)>>(?P<shown>-?\$?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+))?"
)
_NUM_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUMBER = re.compile(r"-?\$?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")


class ChainFormatError(ValueError):
    """Raised on malformed chain text or an unreadable dataset file."""


@dataclass
class Step:
    """One tagged step of a chain (tag is one of STEP_TAGS)."""

    tag: str
    text: str


@dataclass
class Chain:
    """A question, its tagged reasoning steps and the final answer; `line` is the 1-based source line."""

    question: str
    steps: list[Step]
    answer: str
    line: int
    check_derived: bool = True

    def to_text(self) -> str:
        """Serialise as `<Q> q <TAG> text ... <ANSWER> a <EOS>`, the one format every later stage reads."""
        parts = [f"{Q} {self.question} "]
        parts += [f"{s.tag} {s.text} " for s in self.steps if s.tag != ANSWER]
        parts.append(f"{ANSWER} {self.answer} {EOS}")
        return "".join(parts)

    @classmethod
    def from_text(cls, text: str) -> Chain:
        """Parse chain text back into a Chain (line=0); raises ChainFormatError saying what is wrong."""
        if not isinstance(text, str):
            raise ChainFormatError(f"chain text must be str, got {type(text).__name__}")
        body = text.strip()
        if body.startswith(BOS):
            body = body[len(BOS):].lstrip()
        if body.endswith(EOS):
            body = body[: -len(EOS)].rstrip()
        pieces = re.split(f"({TAG_LIKE.pattern})", body)
        if pieces[0].strip():
            raise ChainFormatError(f"chain must start with {Q}, found text {pieces[0].strip()[:40]!r}")
        pairs = [(pieces[i], pieces[i + 1].strip()) for i in range(1, len(pieces), 2)]
        for tag, _ in pairs:
            if tag not in (Q, *STEP_TAGS):
                kind = "misplaced special token" if tag in SPECIAL_TOKENS else "unknown tag"
                raise ChainFormatError(f"{kind} {tag} in chain text")
        if not pairs or pairs[0][0] != Q:
            raise ChainFormatError(f"chain must start with {Q}")
        if not pairs[0][1]:
            raise ChainFormatError(f"empty question after {Q}")
        if sum(t == Q for t, _ in pairs) > 1:
            raise ChainFormatError(f"more than one {Q} in chain text")
        if pairs[-1][0] != ANSWER or sum(t == ANSWER for t, _ in pairs) != 1:
            raise ChainFormatError(f"chain must end with exactly one {ANSWER} step")
        if not pairs[-1][1]:
            raise ChainFormatError(f"empty answer after {ANSWER}")
        steps = [Step(t, s) for t, s in pairs[1:-1]]
        for i, st in enumerate(steps):
            if st.tag == RESULT and (i == 0 or steps[i - 1].tag != ACTION):
                raise ChainFormatError(f"{RESULT} must directly follow an {ACTION} step (step {i + 1})")
        checks = [s for s in steps if s.tag == CHECK]
        derived = bool(checks) and checks[-1].text.startswith("calc(")
        return cls(pairs[0][1], steps, pairs[-1][1], 0, derived)


@dataclass
class ConversionReport:
    """Result of converting a file: chains, per-record errors (1-based line, reason), noisy-record count."""

    chains: list[Chain]
    errors: list[tuple[int, str]]
    noisy: int = 0

    def summary(self) -> str:
        """One-paragraph human summary: counts, then errors grouped by reason."""
        head = f"{len(self.chains)} chains converted, {len(self.errors)} errors, {self.noisy} noisy (check not derived)"
        first: dict[str, int] = {}
        for line, reason in self.errors:
            first.setdefault(reason.split(":")[0], line)
        counts = Counter(reason.split(":")[0] for _, reason in self.errors)
        rest = "; ".join(f"{r}: {n} (first at line {first[r]})" for r, n in counts.most_common())
        return head + (f" — {rest}" if rest else "")


def _clean(text: str) -> str:
    """Collapse all whitespace to single spaces so chain text round-trips exactly."""
    return " ".join(text.split())


def _norm_expr(expr: str) -> str:
    """Strip spaces and thousands commas from a calculator expression."""
    return _NUM_COMMA.sub("", "".join(expr.split()))


def _norm_number(value: str) -> str:
    """Remove thousands commas from a plain number; leave any other text as it is."""
    value = _clean(value)
    return value.replace(",", "") if _NUMBER.fullmatch(value) else value


def _same_value(a: str, b: str) -> bool:
    """Numeric equality ignoring commas and `$`, falling back to string equality."""
    a, b = (x.replace(",", "").replace("$", "").strip() for x in (a, b))
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


def convert_line(line: str) -> tuple[list[Step], list[tuple[str, str]]]:
    """Turn one solution line into THOUGHT (+ ACTION/RESULT pairs per `<<expr=res>>` annotation)."""
    calls: list[tuple[str, str]] = []

    def repl(m: re.Match) -> str:
        inner = m.group("inner")
        expr, _, res = inner.rpartition("=") if "=" in inner else (inner, "", m.group("shown") or "")
        expr, res = _norm_expr(expr), _norm_number(res.replace("$", ""))
        calls.append((expr, res))
        return "" if m.group("eq") else (m.group("cur") or "") + expr

    thought = _clean(_ANNOT.sub(repl, line))
    steps = [Step(THOUGHT, thought)] if thought else []
    for expr, res in calls:
        steps += [Step(ACTION, f"CALL calc({expr})"), Step(RESULT, res)]
    return steps, calls


def _build_steps(lines: list[str], answer: str) -> tuple[list[Step], bool]:
    """Convert solution lines and append the CHECK step; False when no calculation yields the answer."""
    steps: list[Step] = []
    calls: list[tuple[str, str]] = []
    for line in lines:
        s, c = convert_line(line)
        steps += s
        calls += c
    match = next((e for e, r in reversed(calls) if _same_value(r, answer)), None)
    steps.append(Step(CHECK, f"calc({match}) = {answer}" if match is not None else f"{answer} = {answer}"))
    return steps, match is not None


def parse_gsm8k_answer(answer_text: str) -> tuple[list[Step], str, bool]:
    """Split a GSM8K answer into steps (THOUGHT/ACTION/RESULT..., CHECK), final answer and check_derived."""
    if not isinstance(answer_text, str) or "####" not in answer_text:
        raise ChainFormatError("no '####' answer line")
    body, _, final = answer_text.rpartition("####")
    answer = _norm_number(final)
    if not answer:
        raise ChainFormatError("no answer after '####'")
    lines = [ln for ln in body.splitlines() if ln.strip()]
    if not lines:
        raise ChainFormatError("no steps")
    steps, derived = _build_steps(lines, answer)
    return steps, answer, derived


def _record_to_chain(rec: object, line: int, fmt: str, qf: str, sf: str, af: str) -> Chain:
    """Convert one decoded JSON record; raises ChainFormatError with the reason."""
    if not isinstance(rec, dict):
        raise ChainFormatError(f"record is not a JSON object ({type(rec).__name__})")
    q = rec.get(qf)
    if not isinstance(q, str) or not q.strip():
        raise ChainFormatError(f"missing question: field {qf!r} absent or empty")
    question = _clean(q)
    if fmt == "gsm8k":
        a = rec.get(af)
        if not isinstance(a, str) or not a.strip():
            raise ChainFormatError(f"no answer: field {af!r} absent or empty")
        steps, answer, derived = parse_gsm8k_answer(a)
    else:
        raw = rec.get(sf)
        if isinstance(raw, str):
            lines = raw.splitlines()
        elif isinstance(raw, list) and all(isinstance(x, (str, int, float)) for x in raw):
            lines = [str(x) for x in raw]
        else:
            lines = []
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            raise ChainFormatError(f"no steps: field {sf!r} absent, empty or not a list of strings")
        a = rec.get(af)
        if a is None or isinstance(a, (dict, list, bool)) or not str(a).strip():
            raise ChainFormatError(f"no answer: field {af!r} absent or empty")
        answer = _norm_number(str(a))
        steps, derived = _build_steps(lines, answer)
    texts = [question, answer] + [s.text for s in steps]
    found = next((m.group(0) for t in texts for m in [TAG_LIKE.search(t)] if m), None)
    if found:
        raise ChainFormatError(f"reserved tag-like token {found} inside record text")
    return Chain(question, steps, answer, line, derived)


def load_chains(path: str | Path, fmt: str = "gsm8k", question_field: str = "question",
                steps_field: str = "steps", answer_field: str = "answer",
                limit: int | None = None) -> ConversionReport:
    """Read a JSONL dataset into chains, reporting every bad record by line instead of dropping it."""
    if fmt not in ("gsm8k", "jsonl"):
        raise ValueError(f"fmt must be 'gsm8k' or 'jsonl', got {fmt!r}")
    p = Path(path)
    if not p.is_file():
        raise ChainFormatError(f"dataset file not found: {p}")
    report = ConversionReport([], [])
    records = 0
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if limit is not None and records >= limit:
                break
            if not raw.strip():
                continue
            records += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.errors.append((lineno, f"invalid UTF-8: {e.reason} at byte {e.start}"))
                continue
            if len(text) > MAX_LINE_CHARS:
                report.errors.append((lineno, f"line too long: {len(text)} characters > {MAX_LINE_CHARS}"))
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                report.errors.append((lineno, f"malformed JSON: {e.msg} (line {lineno}, column {e.colno})"))
                continue
            try:
                chain = _record_to_chain(rec, lineno, fmt, question_field, steps_field, answer_field)
            except ChainFormatError as e:
                report.errors.append((lineno, str(e)))
                continue
            report.chains.append(chain)
            report.noisy += not chain.check_derived
    if records == 0:
        raise ChainFormatError(f"dataset file has no records: {p}")
    return report
