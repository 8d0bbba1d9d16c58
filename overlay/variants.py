"""Consistent variants of reasoning chains ("stellator" data): tracks (chain templates with slots) and the
variants made from them.

A *track* is a chain template: a question and GSM8K-style solution lines with slots (``{name1}``, ``{n1}``) and
calculations ``<<{n1}/2=r1>>`` that the calculator recomputes, binding ``r1`` for later lines. A variant swaps
slot values (numbers, names, entities) and the question's wording (*variability*) and may change the chain's
structure a little (*volatility*: reordered independent sentences, two dependent steps merged into one, one step
split in two); every RESULT, CHECK and the ANSWER are recomputed, so each kept variant verifies. Variants whose
values are impossible (a whole count turned fraction, a count turned negative or zero) or implausible against the
source (a fraction of a group at 1 or more, a part above its whole, a percentage above 100) are skipped and counted
by reason. A GSM8K solution becomes a track only where its numbers can be traced: slots come from the question's
number occurrences, not values, and a record whose numbers stay ambiguous, or that works numbers out without a
calculation, is skipped with the reason ("ambiguous number: …"). Used by the dataset builder
(``overlay dataset variants``) and the track probe.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

from overlay.chains import (ACTION, ANSWER, CHECK, RESULT, TAG_LIKE, THOUGHT, Chain, ChainFormatError,
                            answers_match, parse_gsm8k_answer)
from overlay.router import verify_check
from overlay.tools import ToolError, calc

SLOT = re.compile(r"\{([A-Za-z_]\w*)\}")
ANNOT = re.compile(r"<<([^<>]*?)(?:=\s*([A-Za-z_]\w*))?>>")
GSM_ANNOT = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
QNUMBER = re.compile(r"(?<![\w.,$])\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+")
UNIT = re.compile(r"<[A-Z]+>|\d+(?:[.,]\d+)*|[^\W\d_]+|[^\w\s]")
CALC_CALL = re.compile(r"CALL calc\((.*)\)")
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
NAMES = {
    "f": "Natalia Maria Julie Betty Emma Olivia Sophia Mia Ava Grace Lily Chloe Zoe Hannah Sarah Anna Emily Rose Alice "
         "Lucy Jenna Carla Nina Tina Rachel Megan Laura Kate Janet Mary Susan Linda Jane Amy Ella".split(),
    "m": "Tom James John Mark Peter Jack Sam Ben Leo Max Paul David Mike Carl Tony Henry Oliver Lucas Noah Ethan Ryan "
         "Kevin Steve Brian Eric Adam Joe Bill Frank George Jason Kyle".split(),
}
ENTITIES = [g.split() for g in (
    "clips pencils pens erasers stickers markers crayons", "apples oranges pears peaches plums lemons bananas",
    "cookies cupcakes muffins brownies pies cakes", "marbles balls toys dolls cards", "books magazines comics novels",
    "dogs cats rabbits birds chickens goats pigs horses ducks", "shirts hats socks scarves gloves",
    "flowers roses tulips daisies", "cars trucks bikes vans", "candies chocolates lollipops")]
SYNONYMS = [("bought", "purchased"), ("buys", "purchases"), ("gave", "handed"), ("gives", "hands"),
            ("altogether", "in total"), ("earns", "makes"), ("earned", "made"), ("received", "got"),
            ("started", "began"), ("wants", "would like"), ("needs", "requires"), ("shop", "store"),
            ("large", "big"), ("small", "little"), ("finished", "completed"), ("collects", "gathers"),
            ("collected", "gathered"), ("each day", "every day"), ("each week", "every week")]
REFERENCE_WORDS = frozenset(
    "she he they it her his their them this that these those then also too remaining rest left more less twice "
    "half times other after before later same another again each both last extra".split())
KIND_LABEL = {"numbers": "number", "names": "name", "entities": "entity", "words": "word"}
NAME_OF = {n: g for g, names in NAMES.items() for n in names}
GROUP_OF = {e: i for i, g in enumerate(ENTITIES) for e in g}


class VariantError(ValueError):
    """Bad library, track, slot values or variant settings; the message says what and where."""

# ---------------------------------------------------------------------------------------------------------------
# Tracks: templates with slots, rendered through the calculator
# ---------------------------------------------------------------------------------------------------------------


def _str(value: Any) -> str:
    return str(value).strip() if not isinstance(value, float) else format(Decimal(str(value)).normalize(), "f")


def _is_number(value: str) -> bool:
    try:
        return Decimal(value.replace(",", "")).is_finite()
    except InvalidOperation:
        return False


@dataclass
class Track:
    """A chain template. ``slots`` maps a slot to its values (the first is the source chain's); or, in row mode,
    ``rows`` holds whole value rows (row 0 is the source). ``answer`` defaults to the last computed value."""

    id: str
    question: str
    solution: list[str]
    slots: dict[str, list[str]] = field(default_factory=dict)
    rows: list[dict[str, str]] = field(default_factory=list)
    answer: str = ""
    bounds: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""

    @property
    def computed(self) -> list[str]:
        """Names bound by calculations, in order."""
        return [m.group(2) for line in self.solution for m in ANNOT.finditer(line) if m.group(2)]

    @property
    def numeric(self) -> set[str]:
        """Slots used inside a calculation (their values must be numbers)."""
        return {s for line in self.solution for m in ANNOT.finditer(line) for s in SLOT.findall(m.group(1))} - set(self.computed)

    def source_values(self) -> dict[str, str]:
        """The source chain's slot values."""
        return dict(self.rows[0]) if self.rows else {k: v[0] for k, v in self.slots.items()}

    def validate(self) -> None:
        """Check slots against their use; raise VariantError naming the track, the slot and what is wrong."""
        where = f"track {self.id!r}"
        if not self.question.strip() or not self.solution:
            raise VariantError(f"{where}: needs a question and at least one solution line")
        given = set(self.rows[0]) if self.rows else set(self.slots)
        for name, values in self.slots.items():
            if not values:
                raise VariantError(f"{where}: slot {name!r} has no values")
        for i, row in enumerate(self.rows):
            if set(row) != given:
                raise VariantError(f"{where}: value list mismatch: row {i + 1} has values for {sorted(row)}, "
                                 f"expected {sorted(given)}")
        computed = self.computed
        if len(set(computed)) != len(computed) or given & set(computed):
            dup = sorted({c for c in computed if computed.count(c) > 1} | (given & set(computed)))
            raise VariantError(f"{where}: {', '.join(dup)} is bound more than once "
                             "(a slot and a calculation, or two calculations)")
        texts = [("question", self.question), ("answer", self.answer)] + [(f"solution line {i + 1}", s)
                                                                          for i, s in enumerate(self.solution)]
        used: set[str] = set()
        for label, text in texts:
            for name in SLOT.findall(text):
                used.add(name)
                if name not in given and name not in computed:
                    raise VariantError(f"{where}: {label} uses slot {{{name}}} but the library gives no value for it "
                                     f"(slots: {', '.join(sorted(given)) or 'none'})")
        if given - used:
            raise VariantError(f"{where}: slot(s) {', '.join(sorted(given - used))} are declared but never used")
        for name in self.numeric:
            values = [r[name] for r in self.rows] if self.rows else self.slots[name]
            bad = next((v for v in values if not _is_number(v)), None)
            if bad is not None:
                raise VariantError(f"{where}: slot {name!r} is used in a calculation but its value {bad!r} is not a number")
        if self.rows and len(self.rows) < 2:
            raise VariantError(f"{where}: row mode needs at least 2 value rows (the source and one variant)")
        self.render(self.source_values())

    def render(self, values: dict[str, str], question: str | None = None) -> tuple[Chain, dict[str, str], str]:
        """(chain, all values incl. computed, GSM8K answer text) for these slot values; ``question`` overrides
        the rendered question (surface edits). Raises VariantError when a calculation fails."""
        bound = dict(values)

        def fill(text: str, label: str) -> str:
            def one(m: re.Match) -> str:
                if m.group(1) not in bound:
                    raise VariantError(f"track {self.id!r}: {label} uses {{{m.group(1)}}} before it has a value")
                return bound[m.group(1)]
            return SLOT.sub(one, text)

        lines = []
        for i, line in enumerate(self.solution):
            out, last = [], 0
            for m in ANNOT.finditer(line):
                expr = fill(m.group(1), f"solution line {i + 1}").replace(",", "").replace(" ", "")
                try:
                    value = calc(expr)
                except ToolError as exc:
                    raise VariantError(f"track {self.id!r}: solution line {i + 1}: {exc}") from None
                if m.group(2):
                    bound[m.group(2)] = value
                bound["_last"] = value
                out += [fill(line[last:m.start()], f"solution line {i + 1}"), f"<<{expr}={value}>>"]
                last = m.end()
            out.append(fill(line[last:], f"solution line {i + 1}"))
            lines.append("".join(out))
        if "_last" not in bound and not self.answer:
            raise VariantError(f"track {self.id!r}: no calculation <<...>> in the solution and no answer given")
        answer = fill(self.answer, "answer") if self.answer else bound["_last"]
        bound.pop("_last", None)
        text = "\n".join(lines) + f"\n#### {answer}"
        q = " ".join((question if question is not None else fill(self.question, "question")).split())
        found = TAG_LIKE.search(q + text)
        if found:
            raise VariantError(f"track {self.id!r}: reserved tag-like token {found.group(0)} in the rendered text")
        try:
            steps, ans, derived = parse_gsm8k_answer(text)
        except ChainFormatError as exc:
            raise VariantError(f"track {self.id!r}: {exc}") from None
        return Chain(q, steps, ans, 0, derived), bound, text

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSONL (empty fields left out)."""
        data = {"id": self.id, "question": self.question, "solution": self.solution, "answer": self.answer,
                "slots": self.slots, "rows": self.rows, "bounds": self.bounds, "source": self.source}
        return {k: v for k, v in data.items() if v or k in ("id", "question", "solution")}


def track_from_dict(data: Any, where: str) -> Track:
    """Build and validate a Track from a YAML/JSONL record."""
    if not isinstance(data, dict):
        raise VariantError(f"{where}: a track must be a mapping with question / solution / slots, got {type(data).__name__}")
    solution = data.get("solution", data.get("steps"))
    if isinstance(solution, str):
        solution = [s for s in solution.splitlines() if s.strip()]
    if not isinstance(solution, list) or not all(isinstance(s, (str, int, float)) for s in solution):
        raise VariantError(f"{where}: 'solution' must be a list of lines")
    slots, rows = data.get("slots") or {}, data.get("rows") or []
    if isinstance(slots, list):  # row mode: slots: [a, b] + values: [[..], [..]]
        values = data.get("values") or []
        for i, row in enumerate(values):
            if not isinstance(row, list) or len(row) != len(slots):
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise VariantError(f"{where}: value list mismatch: row {i + 1} of 'values' has {got} values for "
                                 f"{len(slots)} slots {slots}")
        rows, slots = [dict(zip(map(str, slots), map(_str, row))) for row in values], {}
        if not rows:
            raise VariantError(f"{where}: 'slots' is a list but 'values' gives no rows")
    if not isinstance(slots, dict):
        raise VariantError(f"{where}: 'slots' must map slot names to value lists")
    norm = {}
    for name, values in slots.items():
        values = values if isinstance(values, list) else [values]
        norm[str(name)] = [_str(v) for v in values if v is not None and _str(v)]
    track = Track(id=str(data.get("id") or where), question=str(data.get("question") or ""),
                  solution=[str(s) for s in solution], slots=norm, rows=[{k: _str(v) for k, v in r.items()} for r in rows],
                  answer=_str(data.get("answer") or ""),
                  bounds={k: [float(x) for x in v] for k, v in (data.get("bounds") or {}).items()},
                  source=str(data.get("source") or ""))
    track.validate()
    return track


# ---------------------------------------------------------------------------------------------------------------
# Libraries: YAML / JSONL templates, or GSM8K records turned into templates
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrackLibrary:
    """The tracks, and the records that could not become one (line, reason)."""

    tracks: list[Track]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    path: str = ""

    def save(self, path: str | Path) -> Path:
        """Write as a YAML library that load_library reads back."""
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"tracks": [t.to_dict() for t in self.tracks]}, sort_keys=False,
                                       allow_unicode=True, width=120))
        return path


def _replace_words(text: str, mapping: dict[str, str]) -> str:
    if not mapping:
        return text
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(mapping, key=len, reverse=True))) + r")\b")
    return pattern.sub(lambda m: mapping[m.group(1)], text)


def _num_value(text: str) -> str:
    """Canonical string of a number literal (commas and '$' dropped, no trailing zeros)."""
    return format(Decimal(text.replace(",", "").replace("$", "")).normalize(), "f")


WORD = re.compile(r"[^\W\d_]+")
STOPWORDS = frozenset(
    "a an the of and or to in on at for is are was were be been being has have had do does did he she they it his her "
    "their them its this that these those there how many much what which who if then so than as by with from into out "
    "up will would can could each per every all total altogether s".split())
MONEY_WORDS = frozenset("dollar dollars cent cents".split())
# Words that make a number a constant of the problem rather than one of its quantities (every word of one entry).
CONSTANT_HINTS = {value: [frozenset(h.split()) for h in hints.split(",")] for value, hints in {
    "1": "one", "2": "half,halve,twice,double,doubled,two,pair,both", "3": "third,triple,tripled,thrice,three,foot yard",
    "4": "quarter,fourth,four", "5": "five,fifth", "6": "six,sixth", "7": "seven,week", "8": "eight", "9": "nine",
    "10": "ten,tenth,decade", "11": "eleven", "12": "dozen,twelve,month,year,inch foot", "13": "thirteen",
    "14": "fourteen", "15": "fifteen,quarter hour", "16": "sixteen,ounce pound", "17": "seventeen", "18": "eighteen",
    "19": "nineteen", "20": "twenty,score", "24": "hour day", "30": "thirty,month day", "40": "forty", "50": "fifty",
    "52": "week year", "60": "sixty,minute,hour", "70": "seventy", "80": "eighty", "90": "ninety",
    "100": "percent,hundred,cent dollar,century", "365": "year", "1000": "thousand"}.items()}
SMALL_CONSTANTS = frozenset("0 0.5 0.25 0.1 0.01 1 2 3 4 5 6 7 8 9 10 12 16 24 30 52 60 100 1000 365".split())
DERIVE_WITH = tuple(Fraction(c) for c in (2, 3, 4, 10, 12, 60, 100, 1000))
AMBIGUOUS = "ambiguous number"
# Arithmetic written in a solution's text, outside any <<…>> annotation ("4/2 = 2 bags", "3(6)=18"): a number the
# solution works out without the calculator, so no variant could recompute it.
WRITTEN = re.compile(r"\d\)?\s*(?:[-+*/×x÷]|\()\s*\(?\$?\d[\d.,]*\)?\s*(?:[-+*/×x÷]\s*\(?\$?\d[\d.,]*\)?\s*)*=\s*\$?\d")


def _stem(word: str) -> str:
    w = word.lower()
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def _content(text: str) -> list[str]:
    """Content-word stems of a text in order (stop words dropped): what the contexts of numbers are compared on."""
    return [_stem(w) for w in WORD.findall(text) if w.lower() not in STOPWORDS]


def _noun(text: str) -> str:
    """The content word right after a number (``2 dogs`` → dog), or "" when an operator or a function word follows."""
    m = re.match(r"[ -]?([^\W\d_]+)", text)
    word = m.group(1).lower() if m else ""
    return "" if not word or word in STOPWORDS or word in ("more", "less", "fewer", "times", "percent", "x") else _stem(word)


def _hinted(value: str, words: set[str] | frozenset[str], text: str) -> bool:
    """Whether the words say ``value`` may be a constant (half → 2, minutes and hours → 60, % → 100)."""
    return any(h <= words for h in CONSTANT_HINTS.get(value, [])) or (value == "100" and "%" in text)


@dataclass
class _Ref:
    """What a solution number can refer to: a question number occurrence ("q") or a calculation's result ("r"),
    with the words around it (right after it, just before it, its sentence or line) and whether it is money."""

    kind: str
    index: int
    value: str
    after: frozenset[str]
    near: frozenset[str]
    wide: frozenset[str]
    money: bool
    span: tuple[int, int] = (0, 0)
    percent: bool = False
    fraction: bool = False
    noun: str = ""

    def score(self, words: frozenset[str], money: bool | None, noun: str = "") -> float:
        """How well a solution line's words (and the number's currency and noun, when the text shows them) fit
        this context."""
        s = 2 * len(self.after & words) + len(self.near & words) + 0.5 * len(self.wide & words)
        s += 2 if noun and noun == self.noun else 0
        if money is None:
            return s
        return s + (1 if money == self.money else -2)


@dataclass
class _Site:
    """A number in a calculation: where it is (line, annotation, span in the expression), its value, the words of
    its line, its currency when the line's text shows it, and what it refers to once decided."""

    line: int
    annotation: int
    span: tuple[int, int]
    value: str
    words: frozenset[str]
    money: bool | None
    expr: str
    noun: str = ""
    ref: _Ref | None = None


def _question_refs(question: str) -> list[tuple[_Ref, re.Match]]:
    """Each number occurrence of the question as a reference, with its match."""
    ends = [0] + [m.end() for m in re.finditer(r"[.!?](?=\s|$)", question)] + [len(question)]
    matches = list(QNUMBER.finditer(question))
    out = []
    for k, m in enumerate(matches):
        s0, s1 = max(e for e in ends if e <= m.start()), min(e for e in ends if e >= m.end())
        left = max(s0, matches[k - 1].end() if k else 0)
        right = min(s1, matches[k + 1].start() if k + 1 < len(matches) else len(question))
        following = re.match(r"\s*([A-Za-z]+|%)", question[m.end():])
        word = following.group(1).lower() if following else ""
        money = m.group(0).startswith("$") or question[:m.start()].rstrip().endswith(("$", "£", "€", "¥")) \
            or word in MONEY_WORDS
        value = _num_value(m.group(1) + (m.group(2) or ""))
        fraction = question[m.end():m.end() + 2][:1] == "/" and question[m.end() + 1:m.end() + 2].isdigit() \
            or question[:m.start()].endswith("/") and question[:m.start() - 1][-1:].isdigit()
        ref = _Ref("q", k, value, frozenset(_content(question[m.end():right])[:3]),
                   frozenset(_content(question[left:m.start()])[-3:]), frozenset(_content(question[s0:s1])), money,
                   m.span(1), word in ("%", "percent"), fraction, _noun(question[m.end():]))
        out.append((ref, m))
    return out


def _derivations(u: Fraction, refs: list[_Ref]) -> list[set[int]]:
    """The sets of references (by id) from which ``u`` follows in one operation (with each other or a common
    constant), or as a percentage (p/100, 1 ± p/100): a number the solution worked out without a calculation."""
    vals = [(id(r), Fraction(r.value), r.kind == "r" or r.percent) for r in refs]
    found = []
    for i, a, percent in vals:
        hundredth = a / 100
        if percent and u in (hundredth, 1 - hundredth, 1 + hundredth):
            found.append({i})
        for j, b, _ in vals + [(None, c, False) for c in DERIVE_WITH]:
            if j == i:
                continue
            if u in (a + b, a - b, b - a, a * b) or (b and u == a / b) or (a and u == b / a):
                found.append({i} | ({j} if j is not None else set()))
    return found


def _written_fractions(question: str, qrefs: list[_Ref], sites: list[_Site], qwords: frozenset[str]) -> None:
    """A fraction a calculation writes as the question does ("3/4 of" → 3/4): those two question numbers, unless
    the words may also make them constants ("three-fourths")."""
    for site, nxt in zip(sites, sites[1:]):
        if nxt.annotation == site.annotation and nxt.span[0] == site.span[1] + 1 and site.expr[site.span[1]] == "/":
            pair = next(((a, b) for a, b in zip(qrefs, qrefs[1:]) if (a.value, b.value) == (site.value, nxt.value)
                         and question[a.span[1]:b.span[0]] == "/"), None)
            if pair and not any(_hinted(s.value, qwords | s.words, question) for s in (site, nxt)):
                site.ref, nxt.ref = pair


def _resolve(question: str, qrefs: list[_Ref], sites: list[_Site], results: list[_Ref],
             first_site: list[int]) -> tuple[dict[int, int], set[int]]:
    """Decide what each calculation number refers to (sets ``site.ref``; None is a constant) from the words around
    it (the line's words against each candidate's, its currency, its noun) and the data flow (the one step that can
    use a result). Returns the ties between question occurrences (occurrence → representative: numbers the evidence
    does not tell apart share a slot) and the occurrences that must keep their value (they may be the constant a
    number stands for). Raises VariantError "ambiguous number: …" where a result and another reading stay possible,
    or the solution works a number out without a calculation."""
    parent = {q.index: q.index for q in qrefs}

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    frozen: set[int] = set()
    named: set[int] = set()  # sites the words name a constant (half → 2)
    qwords = frozenset(_content(question))
    _written_fractions(question, qrefs, sites, qwords)
    uses = Counter(id(r) for r in results for s in sites
                   if s.ref is None and s.value == r.value and s.annotation > r.index)  # sites that could use each result
    for n, site in enumerate(sites):
        if site.ref is not None:
            continue
        percent_use = site.expr[site.span[1]:].startswith(("/100", "*.01", "*0.01", "%")) \
            or site.expr[:site.span[0]].endswith((".01*", "/100*"))
        same = [q for q in qrefs if q.value == site.value]
        Q = [q for q in same if not q.fraction and q.percent <= percent_use  # a fraction's parts and a percentage are
             and not (site.noun and q.noun and site.noun != q.noun and site.noun not in q.after)]  # used as such; 2 hens
        R = [r for r in results[:site.annotation] if r.value == site.value]  # are not 2 dogs
        if Q and len(Q) < len(same):  # another number of that value it cannot be: it may be that one in another use
            frozen |= {q.index for q in same}
            Q = []
        taken = {id(s.ref) for s in sites[first_site[site.annotation]:n] if s.ref is not None}
        fresh = [c for c in Q + R if id(c) not in taken]  # one number per thing in a calculation, when there are more
        Q, R = ([q for q in Q if id(q) not in taken], [r for r in R if id(r) not in taken]) if fresh else (Q, R)
        forced = [r for r in R if uses[id(r)] == 1]  # the one step that can use the result, unless its words say
        if forced and max((q.score(site.words, site.money, site.noun) for q in Q), default=-math.inf) < \
                forced[-1].score(site.words, site.money, site.noun) + 3:  # it is a question number
            site.ref = forced[-1]
            continue
        constant, twice = None, sum(s.value == site.value for s in sites if s.annotation == site.annotation) > 1
        if _hinted(site.value, qwords | site.words, question):  # the number may be the constant the words name
            constant = 3 if _hinted(site.value, site.words, "") else 1
            strong = max((q.score(site.words, site.money) for q in Q), default=-math.inf) >= constant + 6  # (the
            # word after "4 * 2" is the unit of the result as much as of the 2)
            if Q and strong and not twice:
                constant = None  # the words around a question number say it is that number
            elif constant == 3 and not twice and not R:
                named.add(n)
                Q = []
            else:
                if Q and (constant == 1 or twice):
                    frozen |= {q.index for q in Q}  # which is which cannot be told: the question keeps that value
                Q = []
        if not Q and not R:
            continue
        q_scores = sorted(((q.score(site.words, site.money, site.noun), -q.index, q) for q in Q),
                          key=lambda t: t[:2], reverse=True)  # ties: the earlier occurrence
        r_scores = sorted(((r.score(site.words, site.money, site.noun), r.index, r) for r in R),
                          key=lambda t: t[:2], reverse=True)  # ties: the most recent result
        best_q = q_scores[0][0] if q_scores else -math.inf
        best_r = r_scores[0][0] if r_scores else -math.inf
        if R and constant is not None:  # a result or the constant the words name: the context must decide
            if twice:
                raise VariantError(f"{AMBIGUOUS}: a result or a constant")
            if constant - best_r >= 2:
                named.add(n)
                continue
            if best_r - constant < 2:
                raise VariantError(f"{AMBIGUOUS}: a result or a constant")
        if R and Q and abs(best_r - best_q) < 2:
            raise VariantError(f"{AMBIGUOUS}: a result or a question number")
        if best_r > best_q:
            site.ref = r_scores[0][2]
            continue
        if best_q <= 0 and len(site.words) > 1:  # the line's words say nothing of that question number: it may be
            continue  # a constant of the same value ("1+2+2" people, "2 to a tent"), so the question keeps it
        top = q_scores[0]
        close = [t[2] for t in q_scores if top[0] - t[0] < 2]  # not clearly told apart: one slot, changed together
        for q in close[1:]:
            parent[root(q.index)] = root(top[2].index)
        site.ref = top[2]
    frozen |= _unsupported(question, qrefs, sites, results, frozen, named)
    return {k: root(k) for k in parent}, frozen


def _unsupported(question: str, qrefs: list[_Ref], sites: list[_Site], results: list[_Ref], frozen: set[int],
                 named: set[int]) -> set[int]:
    """After the numbers are decided: raise VariantError "ambiguous number: …" where the solution works a number out
    without a calculation (a result no step uses, 35 = 20 + 15 in the head, 200 - 100 = 100, a number from nowhere
    or from a result); return the question occurrences that must keep their value (a constant of the same value, or
    the source of a number derived in the head)."""
    qwords = frozenset(_content(question))
    frozen = set(frozen)
    for r in results[:-1]:
        if not any(s.ref is r for s in sites):
            raise VariantError(f"{AMBIGUOUS}: a result no later step uses")
    for j, result in enumerate(results):  # 200 - 100 = 100: the result may be the question's 100 itself, and the
        own = [s for s in sites if s.annotation == j]  # step a formula that only holds for the source's numbers
        if len(own) == 2 and re.fullmatch(r"[\d.]+[-/][\d.]+", own[0].expr) and own[1].value == result.value \
                and own[1].ref is not None and own[1].ref.kind == "q":
            raise VariantError(f"{AMBIGUOUS}: a step whose result equals its own question number")
    used = {s.ref.value for s in sites if s.ref is not None and s.ref.kind == "q"}
    pairs = [(a, b) for a in sites for b in sites if a is not b and a.annotation == b.annotation]
    for q in qrefs:  # a question number no calculation uses that two numbers of one calculation make up (35 = 20 + 15)
        if q.value not in used | SMALL_CONSTANTS and q.index not in frozen \
                and any(Fraction(a.value) + Fraction(b.value) == Fraction(q.value) for a, b in pairs):
            raise VariantError(f"{AMBIGUOUS}: a question number split in the head")
    for n, site in enumerate(sites):  # a constant of a question number's value, not named as one: that number keeps it
        if site.ref is None and n not in named:
            frozen |= {q.index for q in qrefs if q.value == site.value}
        stated = NUMBER.fullmatch(site.expr) is not None  # <<12=12>>: a number put down, not calculated
        if site.ref is None and (stated or site.value not in SMALL_CONSTANTS) \
                and not _hinted(site.value, qwords | site.words, question) \
                and not any(q.value == site.value for q in qrefs):  # a number of the question's keeps its value
            found = _derivations(Fraction(site.value), qrefs + results[:site.annotation])
            if not found or stated:
                raise VariantError(f"{AMBIGUOUS}: a number neither in the question nor calculated")
            ids = {id(q): q.index for q in qrefs}
            if any(not d <= set(ids) for d in found):
                raise VariantError(f"{AMBIGUOUS}: a number derived from a result without a calculation")
            frozen |= {ids[i] for d in found if d <= set(ids) for i in d}
    return frozen


def _parse_solution(lines: list[str]) -> tuple[list[_Site], list[_Ref], list[int], dict[tuple[int, int], int]]:
    """The calculation numbers (sites) and results of GSM8K solution lines, the first site of each annotation, and
    for each number of the text that repeats a calculation number ((line, start) → site)."""
    sites: list[_Site] = []
    results: list[_Ref] = []
    first_site: list[int] = []
    mirrors: dict[tuple[int, int], int] = {}
    for i, ln in enumerate(lines):
        annots = list(GSM_ANNOT.finditer(ln))
        text = "".join(ln[a:b] for a, b in zip([0] + [m.end() for m in annots], [m.start() for m in annots] + [len(ln)]))
        words = frozenset(_content(text))
        for j, m in enumerate(annots):
            prev_end = annots[j - 1].end() if j else 0
            nxt = annots[j + 1].start() if j + 1 < len(annots) else len(ln)
            before = ln[prev_end:m.start()]
            shown = re.match(r"\$?\s*" + NUMBER.pattern, ln[m.end():nxt])
            rest = ln[m.end() + (shown.end() if shown else 0):nxt]
            rest = rest[:next(NUMBER.finditer(rest)).start()] if NUMBER.search(rest) else rest
            first_site.append(len(sites))
            shown_numbers = [(t.start(), _num_value(t.group(0)), before[:t.start()].rstrip().endswith(("$", "£", "€")),
                              _noun(before[t.end():])) for t in NUMBER.finditer(before)]
            pointer, expr = 0, m.group(1).replace(" ", "").replace(",", "")
            for lit in NUMBER.finditer(expr):
                value = _num_value(lit.group(0))
                mirror = next((k for k in range(pointer, len(shown_numbers)) if shown_numbers[k][1] == value), None)
                money, noun = None, ""
                if mirror is not None:
                    pointer = mirror + 1
                    mirrors[(i, prev_end + shown_numbers[mirror][0])] = len(sites)
                    money, noun = shown_numbers[mirror][2:]
                    money = money if "$" in before.rstrip("=$ ") else None  # no "$" but the result's: unknown
                sites.append(_Site(i, len(results), lit.span(), value, words, money, expr, noun))
            try:
                value = _num_value(m.group(2).strip())
            except InvalidOperation:
                raise VariantError(f"annotation result {m.group(2)!r} is not a number") from None
            tail = rest if rest.strip(" .,") else before[[0, *(t.end() for t in NUMBER.finditer(before))][-1]:]
            money = "$" in before or bool(re.match(r"\s*\$", ln[m.end():nxt])) or bool(re.match(r"\s*(dollar|cent)", tail))
            results.append(_Ref("r", len(results), value, frozenset(_content(tail)[:3]),  # the words after the shown
                                frozenset(_content(before)[-3:]), words, money, noun=_noun(tail)))  # result, or the
            # calculation when a chain's thought puts them there ("48/2 clips in May. = <<48/2=24>>24")
    return sites, results, first_site, mirrors


def _singular_in(plural: str, text: str) -> bool:
    """Whether the text also uses the entity's singular or a compound of it (a swap of the plural alone would leave
    "bike" beside "trucks", or "hotdogs" beside "hot ducks")."""
    forms = {plural[:-1]} | ({plural[:-3] + "y"} if plural.endswith("ies") else set()) \
        | ({plural[:-2]} if plural.endswith(("ches", "shes", "xes", "sses")) else set())
    whole = len(re.findall(rf"\b{re.escape(plural)}\b", text, re.IGNORECASE))
    return any(len(re.findall(re.escape(f), text, re.IGNORECASE)) > (whole if plural.startswith(f) else 0)
               for f in forms)


def _kindred_in(entity: str, text: str) -> bool:
    """Whether the text names another entity of the same lexicon group ("novels" and "books" may be the same things:
    swapped apart they would not be)."""
    return any(e != entity and re.search(rf"\b{e}\b", text) for e in ENTITIES[GROUP_OF[entity]])


def track_from_gsm8k(record: dict, line: int) -> Track:
    """Turn one GSM8K record into a track: each question number occurrence a calculation refers to becomes a slot
    n1.. (occurrences, not values: what a calculation number refers to — which occurrence, an earlier result or a
    constant — is decided from the words around it and the data flow; occurrences the evidence cannot tell apart
    share a slot, ones that may be a constant keep their value), each annotation result a computed slot r1..,
    lexicon names and entities slots name1.. / item1... Raises VariantError when the template does not re-compute
    the original annotations, or "ambiguous number: …" when a number may be a result or something else."""
    question, answer_text = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer_text, str) or "####" not in answer_text:
        raise VariantError("not a GSM8K record (question / answer with '####')")
    if "{" in question + answer_text or "}" in question + answer_text:
        raise VariantError("braces in the text")
    body, _, final = answer_text.rpartition("####")
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    if not any(GSM_ANNOT.search(ln) for ln in lines):
        raise VariantError("no <<expr=result>> annotation")
    qinfo = _question_refs(question)
    qrefs = [r for r, _ in qinfo]
    sites, results, first_site, mirrors = _parse_solution(lines)
    if not any(s.value == q.value for s in sites for q in qrefs):
        raise VariantError("no question number is used in a calculation")
    final_value = _num_value(final.strip()) if NUMBER.fullmatch(final.strip().replace("$", "")) else None
    answer = next(("{" + f"r{r.index + 1}" + "}" for r in reversed(results) if r.value == final_value), None)
    if answer is None:
        raise VariantError(f"answer {final.strip()!r} is not the result of an annotation")
    if WRITTEN.search(GSM_ANNOT.sub(" ", re.sub(r"=\s*\$?<<", "<<", body))):
        raise VariantError(f"{AMBIGUOUS}: arithmetic written in the text, not calculated")
    group, frozen = _resolve(question, qrefs, sites, results, first_site)
    frozen = {k for k in group if group[k] in {group[f] for f in frozen}}
    used = {group[s.ref.index] for s in sites if s.ref is not None and s.ref.kind == "q"} - frozen
    for q in qrefs:  # an unused repetition of a used quantity (same value, same noun) changes with it
        if group[q.index] not in used and q.index not in frozen:
            same = [p for p in qrefs if group[p.index] in used and p.value == q.value and p.after & q.after]
            if same:
                group[q.index] = group[same[0].index]
    names: dict[int, str] = {}
    for q in qrefs:
        if group[q.index] in used and group[q.index] not in names:
            names[group[q.index]] = f"n{len(names) + 1}"

    def slot(ref: _Ref | None) -> str | None:
        if ref is None:
            return None
        if ref.kind == "r":
            return f"r{ref.index + 1}"
        return names.get(group[ref.index]) if ref.index not in frozen else None

    bounds: dict[str, list[float]] = {}
    parts, last = [], 0
    for ref, m in qinfo:
        name = names.get(group[ref.index]) if ref.index not in frozen else None
        if name:
            parts += [question[last:m.start()], m.group(0)[: m.group(0).index(m.group(1))] + "{" + name + "}"]
            last = m.end()
            if ref.percent and Decimal(ref.value) <= 100:
                bounds[name] = [0, 100]
    q_template = "".join(parts) + question[last:]
    word_slots = {w: f"name{i + 1}" for i, w in enumerate(w for w in dict.fromkeys(re.findall(r"[A-Za-z]+", question))
                                                          if w in NAME_OF)}
    word_slots |= {w: f"item{i + 1}" for i, w in enumerate(w for w in dict.fromkeys(re.findall(r"[a-z]+", question))
                                                           if w in GROUP_OF and not _singular_in(w, question + body)
                                                           and not _kindred_in(w, question + body))}

    def text_number(i: int, start: int, value: str, current: int, shown: bool) -> str | None:
        """The slot a number of the solution's text stands for: the calculation number it repeats, the result shown
        after its annotation, else the one earlier result or question slot of that value the words point to."""
        if (i, start) in mirrors:
            return slot(sites[mirrors[(i, start)]].ref)
        if shown and results[current].value == value:
            return slot(results[current])
        words = sites_words[i]
        cands = [r for r in results[:current + 1] if r.value == value]
        cands += [q for q in qrefs if q.value == value and slot(q)]
        scored = sorted(((c.score(words, None), c) for c in cands), key=lambda t: t[0], reverse=True)
        if len(scored) == 1 or (scored and scored[0][0] - scored[1][0] >= 1):
            return slot(scored[0][1])
        return None

    sites_words = {i: frozenset(_content(GSM_ANNOT.sub(" ", ln))) for i, ln in enumerate(lines)}
    solution, site_at, current = [], 0, -1
    for i, ln in enumerate(lines):
        out, last = [], 0

        def numsub(text: str, offset: int, shown_after: bool) -> str:
            def one(m: re.Match) -> str:
                name = text_number(i, offset + m.start(), _num_value(m.group(0)), current,
                                   shown_after and not text[:m.start()].strip(" $"))
                return "{" + name + "}" if name else m.group(0)
            return NUMBER.sub(one, text)

        for m in GSM_ANNOT.finditer(ln):
            out.append(numsub(ln[last:m.start()], last, last > 0))
            expr = m.group(1).replace(" ", "").replace(",", "")
            pieces, pos = [], 0
            while site_at < len(sites) and sites[site_at].line == i and sites[site_at].annotation == current + 1:
                s = sites[site_at]
                name = slot(s.ref)
                pieces += [expr[pos:s.span[0]], "{" + name + "}" if name else expr[s.span[0]:s.span[1]]]
                pos, site_at = s.span[1], site_at + 1
            current += 1
            out.append(f"<<{''.join(pieces) + expr[pos:]}=r{current + 1}>>")
            last = m.end()
        out.append(numsub(ln[last:], last, last > 0))
        solution.append(_replace_words("".join(out), {w: "{" + s + "}" for w, s in word_slots.items()}))
    if not names:
        raise VariantError("no question number is used in a calculation")
    q_template = _replace_words(q_template, {w: "{" + s + "}" for w, s in word_slots.items()})
    values = {n: [qrefs[k].value] for k, n in names.items()} | {s: [w] for w, s in word_slots.items()}
    used_slots = set(SLOT.findall(q_template + "\n".join(solution)))
    values = {k: v for k, v in values.items() if k in used_slots}
    track = Track(id=f"gsm8k-{line}", question=q_template, solution=solution, slots=values, answer=answer,
                  bounds={k: v for k, v in bounds.items() if k in values}, source=f"gsm8k line {line}")
    try:
        track.validate()
        chain, bound, _ = track.render(track.source_values())
    except VariantError as exc:
        raise VariantError(str(exc).split(": ", 1)[-1]) from None
    for r in results:
        if Decimal(bound[f"r{r.index + 1}"]) != Decimal(r.value):
            raise VariantError(f"annotation result {r.value} does not re-compute (the template gives {bound[f'r{r.index + 1}']})")
    original = Chain(" ".join(question.split()), *parse_gsm8k_answer(answer_text)[:2], line)
    if skeleton(chain.to_text(), exact=True) != skeleton(original.to_text(), exact=True):
        raise VariantError("re-rendering the template does not give the original chain")
    return track


def library_from_gsm8k(path: str | Path, limit: int | None = 50, start: int = 0) -> TrackLibrary:
    """Tracks from the first ``limit`` convertible GSM8K records of a JSONL file (from record ``start``)."""
    lib = TrackLibrary([], [], str(path))
    with Path(path).open(encoding="utf-8") as fh:
        for line, raw in enumerate(fh, 1):
            if line <= start or not raw.strip():
                continue
            if limit is not None and len(lib.tracks) >= limit:
                break
            try:
                lib.tracks.append(track_from_gsm8k(json.loads(raw), line))
            except (VariantError, json.JSONDecodeError, ChainFormatError, AttributeError) as exc:
                lib.skipped.append((str(line), str(exc)))
    return lib


def chain_record(chain: Chain) -> dict[str, str]:
    """A chain of any source format as a GSM8K record: each calculation a ``thought = <<expr=result>>`` line, the
    answer after ``####``; so every dataset load_chains reads can become a track."""
    lines, thought = [], []
    for i, step in enumerate(chain.steps):
        if step.tag == THOUGHT:
            thought.append(step.text)
        elif step.tag == ACTION:
            result = chain.steps[i + 1].text if i + 1 < len(chain.steps) and chain.steps[i + 1].tag == RESULT else ""
            call = CALC_CALL.fullmatch(step.text.strip())
            if not call or not result:
                raise VariantError(f"step {i + 1} is not a calculation with its result: {step.text[:60]!r}")
            lines.append(f"{' '.join(thought)} = <<{call.group(1)}={result}>>{result}".strip())
            thought = []
    lines += [" ".join(thought)] if thought else []
    return {"question": chain.question, "answer": "\n".join(lines) + f"\n#### {chain.answer}"}


def library_from_chains(chains: Iterable[Chain]) -> TrackLibrary:
    """Tracks from chains of any format (see chain_record); chains that cannot become one are listed with why:
    no calculation, question numbers not traced to a calculation, an answer no calculation gives."""
    lib = TrackLibrary([], [], "")
    for n, chain in enumerate(chains, 1):
        where = str(chain.line or n)
        try:
            track = track_from_gsm8k(chain_record(chain), chain.line or n)
        except (VariantError, ChainFormatError) as exc:
            lib.skipped.append((where, str(exc)))
            continue
        lib.tracks.append(track)
    return lib


def load_library(path: str | Path, limit: int | None = None) -> TrackLibrary:
    """Read a library: YAML (``tracks:`` list) or JSONL of track records, or GSM8K JSONL records (converted).
    Raises VariantError for a missing or empty library and for bad tracks (naming the track)."""
    p = Path(path)
    if not p.is_file():
        raise VariantError(f"library file not found: {p}")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise VariantError(f"library {p} is not valid YAML: {' '.join(str(exc).split())}") from None
        records = data.get("tracks") if isinstance(data, dict) else data
        if records is None:
            records = []
        if not isinstance(records, list):
            raise VariantError(f"library {p}: expected a list of tracks under 'tracks:'")
        lib = TrackLibrary([track_from_dict(r, f"{p.name} track {i + 1}") for i, r in enumerate(records[:limit])], [], str(p))
    else:
        lines = [(i, ln) for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
        try:
            records = [(i, json.loads(ln)) for i, ln in lines]
        except json.JSONDecodeError as exc:
            raise VariantError(f"library {p}: malformed JSON ({exc.msg})") from None
        gsm8k = all(isinstance(r, dict) and "solution" not in r and "####" in str(r.get("answer", "")) for _, r in records)
        if records and gsm8k:
            lib = library_from_gsm8k(p, limit)
        else:
            lib = TrackLibrary([track_from_dict(r, f"{p.name} line {i}") for i, r in records[:limit]], [], str(p))
    if not lib.tracks:
        why = f" ({len(lib.skipped)} records skipped, first: {lib.skipped[0][1]})" if lib.skipped else ""
        raise VariantError(f"library {p} has no tracks{why}")
    ids = [t.id for t in lib.tracks]
    if len(set(ids)) != len(ids):
        raise VariantError(f"library {p}: track ids must be unique ({sorted(i for i in set(ids) if ids.count(i) > 1)})")
    return lib


# ---------------------------------------------------------------------------------------------------------------
# Variants with controlled volatility
# ---------------------------------------------------------------------------------------------------------------


SURFACE_EDITS = ("numbers", "names", "entities", "synonyms")
STRUCTURE_EDITS = ("reorder", "merge", "split")


@dataclass
class VariantConfig:
    """How variants are made: how many per track, how many held out, which edits, and how much of each kind:
    ``variability`` for the surface (slot values, wording), ``volatility`` for the structure (clause order, steps)."""

    variants: int = field(default=6, metadata={"help": "Variants per track (5-10 recommended)."})
    heldout: int = field(default=2, metadata={"help": "Of which held out of training (probed)."})
    volatility: float = field(default=0.2, metadata={
        "help": "0..1: structure: the chance of reordering the question's independent sentences and of one step "
                "edit (two dependent steps merged, or one step split in two)."})
    edits: str = field(default="numbers,names,entities,synonyms,reorder,merge,split", metadata={
        "help": "Allowed edits, comma-separated: numbers, names, entities, synonyms (surface); reorder, merge, "
                "split (structure)."})
    seed: int = field(default=0, metadata={"help": "Seed of the variant generator."})
    variability: float = field(default=0.5, metadata={
        "help": "0..1: surface: the chance each slot (number, name, entity) is swapped and each synonym applied."})

    def __post_init__(self) -> None:
        unknown = self.kinds - {*SURFACE_EDITS, *STRUCTURE_EDITS}
        if unknown:
            raise VariantError(f"unknown edit kind(s) {sorted(unknown)}: use "
                               f"{', '.join(SURFACE_EDITS + STRUCTURE_EDITS)}")
        if not 1 <= self.variants <= 50 or not 0 <= self.heldout <= self.variants:
            raise VariantError(f"need 0 ≤ heldout ≤ variants ≤ 50, got variants={self.variants}, heldout={self.heldout}")
        for name in ("variability", "volatility"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise VariantError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def kinds(self) -> set[str]:
        return {e.strip() for e in self.edits.split(",") if e.strip()}


HELDOUT_VARIANTS = VariantConfig(edits="numbers,names")  # the held-out split of every figure: numbers and names changed


@dataclass
class Variant:
    """One rendering of a track: index 0 is the source; ``values`` holds the slot and computed values;
    ``chain`` is what the model should produce."""

    track: str
    index: int
    values: dict[str, str]
    chain: Chain
    gsm8k_answer: str
    edits: list[str]
    heldout: bool = False

    @property
    def numbers(self) -> frozenset[str]:
        """The variant's slot and computed numbers (canonical strings): what "modulo slots" lets vary."""
        return frozenset(_num_value(v) for v in self.values.values() if _is_number(v))

    def record(self) -> dict[str, Any]:
        """GSM8K-format record (load_chains(path, "gsm8k") reads it), with track, index and edits."""
        return {"question": self.chain.question, "answer": self.gsm8k_answer, "track": self.track,
                "variant": self.index, "heldout": self.heldout, "values": self.values, "edits": self.edits}


def _perturb(value: str, rng: random.Random, bounds: list[float] | None) -> str:
    """A different number of the same kind: integer → integer of similar roundness in [v/2, 2v]; decimal → same places."""
    d = Decimal(value.replace(",", ""))
    if d == 0:
        return value
    lo_b, hi_b = (bounds or [-math.inf, math.inf])[:2]
    if d == d.to_integral_value():
        v = int(d)
        step = 10 if v % 10 == 0 and v >= 20 else 5 if v % 5 == 0 and v >= 10 else 1
        lo, hi = max(step, (v // 2) // step * step), min(int(hi_b) if hi_b < math.inf else 2 * v, 2 * v)
        options = [x for x in range(lo, hi + 1, step) if x != v and x >= lo_b]
        return str(rng.choice(options)) if options else value
    places = -d.as_tuple().exponent
    for _ in range(20):
        x = (d * Decimal(str(rng.uniform(0.5, 2.0)))).quantize(Decimal(1).scaleb(-places))
        if x != d and x > 0 and lo_b <= x <= hi_b:
            return str(x)
    return value


def _swap_options(value: str, kind: str) -> list[str]:
    if kind == "names" and value in NAME_OF:
        return [n for n in NAMES[NAME_OF[value]] if n != value]
    if kind == "entities" and value in GROUP_OF:
        return [e for e in ENTITIES[GROUP_OF[value]] if e != value]
    return []


def _slot_kind(track: Track, name: str, value: str) -> str:
    if name in track.numeric or _is_number(value):
        return "numbers"
    return "names" if value in NAME_OF else "entities" if value in GROUP_OF else "words"


def _draw_values(track: Track, cfg: VariantConfig, rng: random.Random) -> tuple[dict[str, str], list[str]]:
    """New slot values (pool mode): each swappable slot changes with probability variability, at least one changes."""
    source = track.source_values()
    values, edits, changeable = dict(source), [], []
    for name, v in source.items():
        kind = _slot_kind(track, name, v)
        pool = [x for x in track.slots[name] if x != v]
        if kind in cfg.kinds or (kind == "words" and pool):
            if pool or kind == "numbers" or _swap_options(v, kind):
                changeable.append((name, kind, pool))
    if not changeable:
        return values, edits
    chosen = [c for c in changeable if rng.random() < cfg.variability]
    numbers = [c for c in changeable if c[1] == "numbers"]
    if numbers and not any(c[1] == "numbers" for c in chosen):
        chosen.append(rng.choice(numbers))
    chosen = chosen or [rng.choice(changeable)]
    taken = set()
    for name, kind, pool in sorted(chosen):
        v = source[name]
        options = pool or _swap_options(v, kind)
        options = [o for o in options if o not in taken] or options
        new = rng.choice(options) if options else _perturb(v, rng, track.bounds.get(name))
        taken.add(new)
        if new != v:
            values[name] = new
            edits.append(f"{KIND_LABEL[kind]} {name}: {v} → {new}")
    return values, edits


def _surface(question: str, cfg: VariantConfig, rng: random.Random) -> tuple[str, list[str]]:
    """Synonyms from the lexicon (each with probability variability) and one swap of adjacent independent
    sentences (probability volatility)."""
    edits = []
    if "synonyms" in cfg.kinds:
        for a, b in SYNONYMS:
            for src, dst in ((a, b), (b, a)):
                pattern = re.compile(rf"\b{re.escape(src)}\b")
                if pattern.search(question) and rng.random() < cfg.variability:
                    question = pattern.sub(dst, question)
                    edits.append(f"synonym {src} → {dst}")
                    break
    if "reorder" in cfg.kinds and rng.random() < cfg.volatility:
        sentences = SENTENCE.split(question)
        pairs = [i for i in range(len(sentences) - 2)
                 if not REFERENCE_WORDS & {w.lower() for w in re.findall(r"[A-Za-z]+", sentences[i + 1])}]
        if pairs:
            i = rng.choice(pairs)
            sentences[i], sentences[i + 1] = sentences[i + 1], sentences[i]
            question = " ".join(sentences)
            edits.append(f"reorder sentences {i + 1} ↔ {i + 2}")
    return question, edits


def _impossible(source: dict[str, str], new: dict[str, str], computed: list[str]) -> str | None:
    """Why the variant's computed values cannot be (a whole count turned fraction, a non-negative value turned
    negative, a non-zero one zero), or None: computed values keep the source's kind."""
    for name in computed:
        if name not in source or name not in new:
            continue
        a, b = Decimal(source[name]), Decimal(new[name])
        if a == a.to_integral_value() and b != b.to_integral_value():
            return "impossible value: a whole number became a fraction"
        if a >= 0 > b:
            return "impossible value: negative"
        if a != 0 and b == 0:
            return "impossible value: zero"
    return None


QUESTION_FRACTION = re.compile(r"\{(\w+)\}\s*/\s*\{(\w+)\}")


def _operations(track: Track, values: dict[str, str]) -> list[tuple[str, Fraction, Fraction]] | None:
    """Every binary operation of the track's calculations as (operator, left, right) for these slot values, in a
    fixed order (the same for every variant of a track); None when a calculation cannot be evaluated here."""
    bound = {k: Fraction(Decimal(v.replace(",", ""))) for k, v in values.items() if _is_number(v)}
    ops: list[tuple[str, Fraction, Fraction]] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.Name):
            return bound[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = walk(node.left), walk(node.right)
            ops.append((type(node.op).__name__, a, b))
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) \
                else a * b if isinstance(node.op, ast.Mult) else a / b
        raise ValueError("not plain arithmetic")

    try:
        for line in track.solution:
            for m in ANNOT.finditer(line):
                value = walk(ast.parse(SLOT.sub(r"\1", m.group(1)).replace(",", "").replace(" ", ""), mode="eval").body)
                if m.group(2):
                    bound[m.group(2)] = value
    except (ValueError, KeyError, SyntaxError, ZeroDivisionError, RecursionError):
        return None
    return ops


def _implausible(track: Track, values: dict[str, str]) -> str | None:
    """Why the variant's question makes no sense (learned from the source): a fraction of a group written in the
    question at 1 or more where the source's was below, a percentage above 100 where the source's was not; or None."""
    src = track.source_values()
    for a, b in QUESTION_FRACTION.findall(track.question):
        if _is_number(src.get(a, "")) and _is_number(src.get(b, "")) and Decimal(src[a]) < Decimal(src[b]) \
                and Decimal(values[a]) >= Decimal(values[b]):
            return "implausible value: a fraction of a group above 1"
    for name, limits in track.bounds.items():
        if limits == [0, 100] and Decimal(src[name]) <= 100 < Decimal(values[name]):
            return "implausible value: a percentage above 100"
    return None


def _implausible_steps(track: Track, source: list[tuple[str, Fraction, Fraction]] | None,
                       values: dict[str, str]) -> str | None:
    """Why the variant's steps make no sense although they compute (learned from the source's steps): a part above
    its whole (a subtraction the source kept non-negative), a fraction the source kept below 1 at 1 or more; or None."""
    new = _operations(track, values) if source else None
    if not new or len(new) != len(source):
        return None
    for (op, a, b), (_, x, y) in zip(source, new):
        if op == "Sub" and a >= b and x < y:
            return "implausible value: a part above its whole"
        if op == "Div" and 0 < a < b and x >= y:
            return "implausible value: a fraction above 1"
    return None


def _annotations(line: str) -> list[re.Match]:
    return list(ANNOT.finditer(line))


def _uses(track: Track, name: str, skip: set[int]) -> int:
    """How many times ``{name}`` appears in the track's question, answer and the solution lines not in ``skip``."""
    texts = [track.question, track.answer] + [s for i, s in enumerate(track.solution) if i not in skip]
    return sum(len(re.findall(r"\{" + re.escape(name) + r"\}", s)) for s in texts)


def _merge_options(track: Track) -> list[int]:
    """Lines i whose one calculation is used exactly once, by the one calculation of line i + 1 (and nowhere else)."""
    options = []
    for i in range(len(track.solution) - 1):
        a, b = _annotations(track.solution[i]), _annotations(track.solution[i + 1])
        if len(a) == 1 and len(b) == 1 and a[0].group(2):
            name = a[0].group(2)
            if b[0].group(1).count("{" + name + "}") == 1 and _uses(track, name, {i, i + 1}) == 0:
                options.append(i)
    return options


def _merge(track: Track, i: int) -> list[str]:
    """The solution with line i's calculation inlined, in brackets, into line i + 1 (one step fewer)."""
    inner = _annotations(track.solution[i])[0].group(1)
    name = _annotations(track.solution[i])[0].group(2)
    merged = track.solution[i + 1].replace("{" + name + "}", f"({inner})")
    return track.solution[:i] + [merged] + track.solution[i + 2:]


SPLITTABLE = re.compile(r"^([^()+\-*/]+)([+*])([^()+\-*/]+)((?:\2[^()+\-*/]+)+)$")


def _split_options(track: Track) -> list[int]:
    """Lines whose one calculation is a sum or product of three or more terms (``a+b+c``): splittable in two steps."""
    return [i for i, line in enumerate(track.solution)
            if len(_annotations(line)) == 1 and SPLITTABLE.match(_annotations(line)[0].group(1))]


def _split(track: Track, i: int) -> list[str]:
    """The solution with an extra step before line i computing its first two terms (``a+b+c`` → ``a+b``, ``s+c``)."""
    m = _annotations(track.solution[i])[0]
    a, op, b, rest = SPLITTABLE.match(m.group(1)).groups()
    name = next(f"s{k}" for k in range(1, 100) if f"s{k}" not in track.computed and f"s{k}" not in track.source_values())
    first = f"<<{a}{op}{b}={name}>>"
    line = track.solution[i]
    rewritten = line[:m.start()] + f"<<{{{name}}}{rest}" + (f"={m.group(2)}" if m.group(2) else "") + ">>" + line[m.end():]
    return track.solution[:i] + [first, rewritten] + track.solution[i + 1:]


def _restructure(track: Track, cfg: VariantConfig, rng: random.Random) -> tuple[Track, list[str]]:
    """With probability volatility, one step edit allowed by cfg (merge two dependent steps, or split one)."""
    options = [("merge", i) for i in _merge_options(track) if "merge" in cfg.kinds]
    options += [("split", i) for i in _split_options(track) if "split" in cfg.kinds]
    if not options or rng.random() >= cfg.volatility:
        return track, []
    kind, i = rng.choice(options)
    solution = _merge(track, i) if kind == "merge" else _split(track, i)
    edited = Track(track.id, track.question, solution, track.slots, track.rows, track.answer, track.bounds, track.source)
    return edited, [f"merge steps {i + 1}+{i + 2}" if kind == "merge" else f"split step {i + 1}"]


def make_variants(track: Track, cfg: VariantConfig, skipped: Counter | None = None) -> list[Variant]:
    """The source (index 0) and up to cfg.variants distinct variants; the last cfg.heldout ones are held out.
    Every draw that gives no variant is counted in ``skipped`` by reason."""
    skipped = skipped if skipped is not None else Counter()
    rng = random.Random(f"{cfg.seed}:{track.id}")
    chain, bound, text = track.render(track.source_values())
    out = [Variant(track.id, 0, bound, chain, text, [])]
    source_ops = _operations(track, track.source_values())
    seen = {chain.to_text()}
    candidates = track.rows[1:] if track.rows else None
    for _ in range(cfg.variants * 25):
        if len(out) > cfg.variants:
            break
        if candidates is not None:
            if not candidates:
                break
            values = candidates.pop(0)
            edits = [f"row {len(track.rows) - len(candidates) - 1}: " + ", ".join(f"{k}={v}" for k, v in values.items()
                                                                                    if v != track.rows[0][k])]
        else:
            values, edits = _draw_values(track, cfg, rng)
        question = SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), track.question)
        question, surface = _surface(question, cfg, rng)
        shaped, structure = _restructure(track, cfg, rng)
        try:
            v_chain, v_bound, v_text = shaped.render(values, question)
        except VariantError as exc:
            skipped["calculation failed" + (": division by zero" if "zero" in str(exc) else "")] += 1
            continue
        if shaped is not track:  # a merged step hides its result: check the values of the unmerged chain too
            try:
                v_bound = track.render(values, question)[1] | v_bound
            except VariantError:
                skipped["calculation failed"] += 1
                continue
        why = _implausible(track, values) or _impossible(bound, v_bound, track.computed) \
            or _implausible_steps(track, source_ops, values)
        if why or v_chain.to_text() in seen:
            skipped[why or "duplicate"] += 1
            continue
        seen.add(v_chain.to_text())
        out.append(Variant(track.id, len(out), v_bound, v_chain, v_text, edits + surface + structure))
    for v in out[max(1, len(out) - cfg.heldout):] if cfg.heldout else []:
        v.heldout = True
    return out


@dataclass
class VariantSet:
    """Every track's source and variants; ``train`` (sources + training variants) and ``heldout`` views;
    ``skipped`` counts the draws that gave no variant, by reason."""

    variants: list[Variant]
    config: VariantConfig
    skipped: Counter = field(default_factory=Counter)

    @property
    def train(self) -> list[Variant]:
        return [v for v in self.variants if not v.heldout]

    @property
    def heldout(self) -> list[Variant]:
        return [v for v in self.variants if v.heldout]

    def source(self, track: str) -> Variant:
        return next(v for v in self.variants if v.track == track and v.index == 0)

    @classmethod
    def load(cls, path: str | Path) -> VariantSet:
        """Read the variants.json that ``write`` produced: the exact split a model was trained with."""
        p = Path(path)
        if p.is_dir():
            p = p / "variants.json"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            variants = []
            for r in data["variants"]:
                steps, answer, derived = parse_gsm8k_answer(r["answer"])
                chain = Chain(r["question"], steps, answer, 0, derived)
                variants.append(Variant(r["track"], int(r["variant"]), r["values"], chain, r["answer"], list(r["edits"]),
                                        bool(r["heldout"])))
            config = VariantConfig(**data["config"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ChainFormatError) as exc:
            raise VariantError(f"cannot read the variant split {p}: {type(exc).__name__}: {exc}") from None
        return cls(variants, config, Counter(data.get("skipped", {})))

    def write(self, out: str | Path) -> dict[str, Path]:
        """train.jsonl and heldout.jsonl (GSM8K format) and variants.json (values and edits) under ``out``,
        each written whole to a temporary file first so an interruption leaves no half file."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl", "variants": out / "variants.json"}
        texts = {name: "".join(json.dumps(v.record()) + "\n" for v in getattr(self, name)) for name in ("train", "heldout")}
        texts["variants"] = json.dumps({"config": asdict(self.config), "skipped": dict(self.skipped),
                                        "variants": [v.record() for v in self.variants]}, indent=1)
        for name, path in paths.items():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(texts[name], encoding="utf-8")
            tmp.replace(path)
        return paths


def generate_variants(library: TrackLibrary, config: VariantConfig | None = None) -> VariantSet:
    """Seeded variants for every track; the same library and config always give the same split."""
    config = config or VariantConfig()
    skipped: Counter = Counter()
    variants = [v for t in library.tracks for v in make_variants(t, config, skipped)]
    if not any(v.index for v in variants):
        raise VariantError("no track produced a variant: give more slot values or raise the variability")
    return VariantSet(variants, config, skipped)


def verify_chain(chain: Chain) -> str | None:
    """Why the chain does not verify, or None: every ACTION's calculation gives the RESULT after it, every CHECK
    passes, and the ANSWER is the checked value."""
    checked = None
    for i, step in enumerate(chain.steps):
        if step.tag == ACTION:
            call = CALC_CALL.fullmatch(step.text.strip())
            after = chain.steps[i + 1] if i + 1 < len(chain.steps) else None
            if not call or after is None or after.tag != RESULT:
                return f"step {i + 1}: an ACTION without a calculation and its RESULT"
            try:
                value = calc(call.group(1))
            except ToolError as exc:
                return f"step {i + 1}: {exc}"
            if not answers_match(after.text, value):
                return f"step {i + 1}: RESULT {after.text} but the calculator gives {value}"
        elif step.tag == CHECK:
            verdict, why = verify_check(step.text)
            if verdict != "pass":
                return f"CHECK {step.text!r}: {why}"
            checked = step.text.rpartition("=")[2].strip()
    if checked is not None and not answers_match(chain.answer, checked):
        return f"{ANSWER} {chain.answer} is not the checked value {checked}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Comparing chains modulo slots
# ---------------------------------------------------------------------------------------------------------------

def _reason_kind(reason: str) -> str:
    """A skip reason without its particular values, so reasons can be counted."""
    return re.sub(r"'[^']*'|\d+(?:\.\d+)?", "…", reason)


def stellator(chains: Sequence[Chain], config: VariantConfig) -> tuple[VariantSet, dict[str, Any]]:
    """Tracks from ``chains`` and their variants, with the statistics: chains that became tracks and produced
    variants, variants per chain, what was skipped by reason, and how many kept variants verify (all must)."""
    library = library_from_chains(chains)
    if not library.tracks:
        why = f" (first: {library.skipped[0][1]})" if library.skipped else ""
        raise VariantError(f"none of the {len(chains)} chains could become a track{why}")
    vset = generate_variants(library, config)
    per_track = Counter(v.track for v in vset.variants if v.index)
    failures = [(v.track, v.index, why) for v in vset.variants if (why := verify_chain(v.chain))]
    stats = {
        "chains": len(chains), "tracks": len(library.tracks),
        "chains_skipped": dict(Counter(_reason_kind(r) for _, r in library.skipped).most_common()),
        "chains_with_variants": len(per_track),
        "variants": sum(per_track.values()), "variants_per_chain": round(sum(per_track.values()) / len(library.tracks), 3),
        "variants_per_chain_histogram": dict(sorted(Counter(per_track.get(t.id, 0) for t in library.tracks).items())),
        "train_chains": len(vset.train), "heldout_chains": len(vset.heldout),
        "draws_skipped": dict(vset.skipped.most_common()),
        "edits": dict(Counter(e.split(" ")[0] for v in vset.variants for e in v.edits).most_common()),
        "verified": len(vset.variants) - len(failures), "not_verified": failures[:20],
        "config": asdict(config),
    }
    return vset, stats


def skeleton(text: str, slot_words: frozenset[str] = frozenset(), exact: bool = False,
             slot_numbers: frozenset[str] | None = None) -> list[str]:
    """Units of a text: tags, words, numbers, symbols. Unless exact, slot words become '@' and numbers '#' (only
    those in ``slot_numbers`` when given: the template's constants, like the 2 of ``{n1}/2``, stay literal)."""
    units = []
    for u in UNIT.findall(text):
        if u[0].isdigit():
            try:
                value = _num_value(u)
            except InvalidOperation:  # e.g. "1.2.3" from a model
                value = u
            units.append("#" if not exact and (slot_numbers is None or value in slot_numbers) else value)
        else:
            units.append("@" if not exact and u in slot_words else u)
    return units



def slot_words(track: Track) -> frozenset[str]:
    """Every word a word slot of the track can take (its values and their lexicon alternatives)."""
    words: set[str] = set()
    values = [r for r in track.rows] if track.rows else [{k: v} for k, vs in track.slots.items() for v in vs]
    for row in values:
        for name, v in row.items():
            if name not in track.numeric and not _is_number(v):
                words |= set(re.findall(r"[^\W\d_]+", v))
                for kind in ("names", "entities"):
                    words |= set(_swap_options(v, kind))
    return frozenset(words)
