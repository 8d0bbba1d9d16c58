"""Normalise reasoning datasets (GSM8K or generic JSONL) into one tagged inner-dialogue chain format."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Context, Decimal
from pathlib import Path
from typing import NamedTuple

from overlay.tools import SIGNIFICANT_DIGITS, ToolError, calc

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
# Inline arithmetic `56 * 9 = 504`, `x = 12/3 = 4`, `20 + 15 => 35`, `(5+7)/3 = 12/3 = 4 apples`: one or more
# expressions joined by `=`, then `=`/`=>`/`→` and a written result not followed by more arithmetic.
_NUM = r"\$?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)"
_OP = r"\s*(?:[-+*/×÷−]|(?<=\s)[xX](?=\s))\s*"
_TERM = rf"(?:\(\s*)*[-−]?{_NUM}(?:\s*\))*"
_EXPR = rf"{_TERM}(?:{_OP}{_TERM})+"
_EQ = r"\s*(?:=>|→|==?)\s*"
_INLINE = re.compile(rf"(?<![\w.,$)])(?P<lhs>{_EXPR}(?:{_EQ}{_EXPR})*){_EQ}(?P<res>[-−]?{_NUM})(?![\d,.]*\d|{_OP}[\d(.$])")
_EQ_PREFIX = re.compile(r"^\s*[A-Za-z]\w*\s*=\s*")
_SYMBOLS = str.maketrans({"×": "*", "÷": "/", "−": "-", "x": "*", "X": "*", "$": None})
_LETTER = re.compile(r"[^\W\d_]")
# An answer as a number with optional sign, currency and unit: `250 m`, `$78.20`, `-€5`, `1,000`, `72.0`, `50%`.
_ANSWER_NUMBER = re.compile(
    r"(?P<sign>[-−+]?)\s*[$€£¥]?\s*(?P<sign2>[-−]?)(?P<num>\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)"
    r"(?:\s*(?:[^\W\d_]|[%°])[^\d]*?)?\.?"
)
MAX_FIELDS_SHOWN = 10


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
    corrected: int = 0

    def summary(self) -> str:
        """One-line human summary: counts, then errors grouped by kind (the reason up to its first colon)."""
        head = (f"{len(self.chains)} chains converted, {len(self.errors)} errors, {self.noisy} noisy (check not derived), "
                f"{self.corrected} written results corrected by the calculator")
        first: dict[str, tuple[int, str]] = {}
        for line, reason in self.errors:
            kind, _, detail = reason.partition(":")
            first.setdefault(kind, (line, detail.strip()))
        counts = Counter(reason.partition(":")[0] for _, reason in self.errors)
        rest = "; ".join(f"{kind}: {n} (first at line {first[kind][0]}{': ' + first[kind][1] if first[kind][1] else ''})"
                         for kind, n in counts.most_common())
        return head + (f" — {rest}" if rest else "")


class Call(NamedTuple):
    """One calculator call taken from a solution: the expression, the calculator's value, and whether the
    value the text wrote down disagreed with it."""

    expr: str
    result: str
    corrected: bool


class _Fields(NamedTuple):
    """Record fields to read: question (joined with spaces), steps, answer and an optional equation."""

    question: tuple[str, ...]
    steps: str
    answer: str
    equation: str | None


def _clean(text: str) -> str:
    """Collapse all whitespace to single spaces so chain text round-trips exactly."""
    return " ".join(text.split())


def _norm_expr(expr: str) -> str:
    """Calculator form of a written expression: no spaces, `$` or thousands commas; `× ÷ − x` as `* / - *`."""
    return _NUM_COMMA.sub("", "".join(expr.split()).translate(_SYMBOLS))


def _norm_number(value: str) -> str:
    """Remove thousands commas from a plain number; leave any other text as it is."""
    value = _clean(value)
    return value.replace(",", "") if _NUMBER.fullmatch(value) else value


def _parse_answer_number(text: str) -> Decimal | None:
    """The number in an answer written with optional sign, currency, thousands commas and unit; else None."""
    m = _ANSWER_NUMBER.fullmatch(text.strip())
    if m is None or (m.group("sign") and m.group("sign2")):
        return None
    value = Decimal(m.group("num").replace(",", ""))
    return -value if (m.group("sign") + m.group("sign2")) in ("-", "−") else value


def answers_match(got: str | None, want: str) -> bool:
    """True when two answers are the same number (`250 m` = `250`, `$78.20` = `78.2`, `1,000` = `1000`, `72.0` = `72`;
    non-integers to the calculator's 10 significant digits), else the same text up to spacing; None never matches."""
    if got is None:
        return False
    a, b = _parse_answer_number(str(got)), _parse_answer_number(str(want))
    if a is not None and b is not None:
        if a == a.to_integral_value() and b == b.to_integral_value():
            return a == b
        ctx = Context(prec=SIGNIFICANT_DIGITS)
        return ctx.plus(a) == ctx.plus(b)
    return _clean(str(got)) == _clean(str(want))


def _calculate(expr: str) -> str | None:
    """The calculator's value, or None when it rejects expr twice (the retry keeps its wall-time bound, tripping
    on a busy machine, from changing how a dataset converts)."""
    for _ in range(2):
        try:
            return calc(expr)
        except ToolError:
            pass
    return None


def _calc_call(exprs: list[str], written: str | None) -> Call | None:
    """The first expression the calculator accepts whose value matches `written`, else the last one it accepts
    (`corrected` when a written value disagrees); None when it accepts none."""
    normed = (_norm_expr(_EQ_PREFIX.sub("", e)) for e in exprs)
    accepted = [(e, v) for e in normed if (v := _calculate(e)) is not None]
    if not accepted:
        return None
    matching = [(e, v) for e, v in accepted if not written or answers_match(v, written)]
    expr, value = (matching or accepted[-1:])[0]
    return Call(expr, value, not matching)


def _call_steps(call: Call) -> list[Step]:
    """The ACTION/RESULT pair of one calculator call."""
    return [Step(ACTION, f"CALL calc({call.expr})"), Step(RESULT, call.result)]


def convert_line(line: str, inline: bool = True) -> tuple[list[Step], list[Call]]:
    """Turn one solution line into a THOUGHT plus an ACTION/RESULT pair per calculation (`<<expr=res>>`
    annotations, else with `inline` arithmetic written out as `expr = res`); RESULTs are the calculator's values."""
    calls: list[Call] = []

    def annotation(m: re.Match) -> str:
        inner = m.group("inner")
        expr, _, res = inner.rpartition("=") if "=" in inner else (inner, "", m.group("shown") or "")
        call = _calc_call([expr], res)
        if call is None:
            return (m.group("eq") or "") + (m.group("cur") or "") + (m.group("shown") or res)
        calls.append(call)
        return "" if m.group("eq") else (m.group("cur") or "") + call.expr

    def written(m: re.Match) -> str:
        call = _calc_call(re.split(_EQ, m.group("lhs")), m.group("res"))
        if call is None:
            return m.group(0)
        calls.append(call)
        return m.group("lhs")

    text = _ANNOT.sub(annotation, line)
    if inline and text == line:
        text = _INLINE.sub(written, text)
    thought = _clean(text)
    # A thought that only restates its own calculations (no words) is dropped: the ACTION carries it.
    steps = [Step(THOUGHT, thought)] if thought and (not calls or _LETTER.search(thought)) else []
    for call in calls:
        steps += _call_steps(call)
    return steps, calls


def _build_steps(lines: list[str], answer: str, inline: bool = True,
                 equation: str | None = None) -> tuple[list[Step], bool, int]:
    """Convert solution lines (adding the equation's calculation when they hold none) and append the CHECK step;
    returns the steps, whether a calculation yields the answer, and how many written results were corrected."""
    steps: list[Step] = []
    calls: list[Call] = []
    for line in lines:
        s, c = convert_line(line, inline)
        steps += s
        calls += c
    call = _calc_call([equation], None) if equation and not calls else None
    if call is not None:
        steps += _call_steps(call)
        calls.append(call)
    match = next((c for c in reversed(calls) if answers_match(c.result, answer)), None)
    if match is None:
        steps.append(Step(CHECK, f"{answer} = {answer}"))
    else:
        steps.append(Step(CHECK, f"calc({match.expr}) = {answer if _NUMBER.fullmatch(answer) else match.result}"))
    return steps, match is not None, sum(c.corrected for c in calls)


def _parse_gsm8k(answer_text: str) -> tuple[list[Step], str, bool, int]:
    """parse_gsm8k_answer plus the number of written results the calculator corrected."""
    if not isinstance(answer_text, str) or "####" not in answer_text:
        raise ChainFormatError("no '####' answer line")
    body, _, final = answer_text.rpartition("####")
    answer = _norm_number(final)
    if not answer:
        raise ChainFormatError("no answer after '####'")
    lines = [ln for ln in body.splitlines() if ln.strip()]
    if not lines:
        raise ChainFormatError("no steps")
    steps, derived, corrected = _build_steps(lines, answer, inline=False)
    return steps, answer, derived, corrected


def parse_gsm8k_answer(answer_text: str) -> tuple[list[Step], str, bool]:
    """Split a GSM8K answer into steps (THOUGHT/ACTION/RESULT..., CHECK), final answer and check_derived."""
    return _parse_gsm8k(answer_text)[:3]


def _field_names(rec: dict) -> str:
    """The record's field names for an error message, at most MAX_FIELDS_SHOWN of them."""
    names = [repr(k) for k in rec]
    more = f" and {len(names) - MAX_FIELDS_SHOWN} more" if len(names) > MAX_FIELDS_SHOWN else ""
    return f"fields {', '.join(names[:MAX_FIELDS_SHOWN])}{more}" if names else "no fields"


def _record_to_chain(rec: object, line: int, fmt: str, fields: _Fields) -> tuple[Chain, int]:
    """Convert one decoded JSON record into a chain and its count of corrected results; raises ChainFormatError."""
    if not isinstance(rec, dict):
        raise ChainFormatError(f"record is not a JSON object ({type(rec).__name__})")
    eq = rec.get(fields.equation) if fields.equation else None
    equation = eq if isinstance(eq, str) and eq.strip() else None
    needed = [*fields.question, fields.answer] + ([fields.steps] if fmt == "jsonl" and equation is None else [])
    missing = [f for f in dict.fromkeys(needed) if f not in rec]
    if missing:
        names = ", ".join(repr(f) for f in missing)
        raise ChainFormatError(f"missing field{'s' if len(missing) > 1 else ''} {names}: record has {_field_names(rec)}")
    parts = [rec[f] for f in fields.question]
    question = _clean(" ".join(str(x) for x in parts if isinstance(x, (str, int, float)) and not isinstance(x, bool)))
    if not question:
        raise ChainFormatError(f"missing question: {', '.join(map(repr, fields.question))} empty or not text")
    if fmt == "gsm8k":
        a = rec[fields.answer]
        if not isinstance(a, str) or not a.strip():
            raise ChainFormatError(f"no answer: field {fields.answer!r} empty or not text")
        steps, answer, derived, corrected = _parse_gsm8k(a)
    else:
        raw = rec.get(fields.steps)
        if isinstance(raw, str):
            lines = raw.splitlines()
        elif isinstance(raw, list) and all(isinstance(x, (str, int, float)) for x in raw):
            lines = [str(x) for x in raw]
        else:
            lines = []
        lines = [ln for ln in lines if ln.strip()]
        if not lines and equation is None:
            raise ChainFormatError(f"no steps: field {fields.steps!r} empty or not a list of strings")
        a = rec[fields.answer]
        if a is None or isinstance(a, (dict, list, bool)) or not str(a).strip():
            raise ChainFormatError(f"no answer: field {fields.answer!r} empty")
        answer = _norm_number(str(a))
        steps, derived, corrected = _build_steps(lines, answer, equation=equation)
    texts = [question, answer] + [s.text for s in steps]
    found = next((m.group(0) for t in texts for m in [TAG_LIKE.search(t)] if m), None)
    if found:
        raise ChainFormatError(f"reserved tag-like token {found} inside record text")
    return Chain(question, steps, answer, line, derived), corrected


def load_chains(path: str | Path, fmt: str = "gsm8k", question_field: str | Sequence[str] = "question",
                steps_field: str = "steps", answer_field: str = "answer", limit: int | None = None,
                equation_field: str | None = "equation") -> ConversionReport:
    """Read a JSONL dataset into chains, reporting every bad record by line instead of dropping it.

    Several question fields are joined with spaces; `equation_field` (jsonl) is used when the steps hold no arithmetic.
    """
    if fmt not in ("gsm8k", "jsonl"):
        raise ValueError(f"fmt must be 'gsm8k' or 'jsonl', got {fmt!r}")
    qf = (question_field,) if isinstance(question_field, str) else tuple(question_field)
    if not qf or not all(isinstance(f, str) and f for f in (*qf, steps_field, answer_field)):
        raise ValueError("field names must be non-empty strings")
    fields = _Fields(qf, steps_field, answer_field, equation_field if fmt == "jsonl" else None)
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
                chain, corrected = _record_to_chain(rec, lineno, fmt, fields)
            except ChainFormatError as e:
                report.errors.append((lineno, str(e)))
                continue
            report.chains.append(chain)
            report.corrected += corrected
            report.noisy += not chain.check_derived
    if records == 0:
        raise ChainFormatError(f"dataset file has no records: {p}")
    return report
