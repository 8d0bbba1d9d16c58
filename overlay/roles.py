"""Number roles: every number of a chain is the question's k-th number, the k-th tool result, or a constant.

With roles a variant's chain is its source's token sequence, so a track found for a new question can be followed
with that question's numbers. Two ambiguities are resolved deliberately: a value that an earlier calculation
produced is that result (data flow, the latest such result), and a question number is bound to a new question's
number by the words around it (its *anchor*), not by its position, because sentences reorder and values repeat.
Numbers written as words ("three", "twice", "half", "a dozen") are question numbers too.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from itertools import permutations

from overlay.chains import ACTION, ANSWER, CHECK, RESULT, THOUGHT, Chain
from overlay.tools import ToolError, calc

UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
# Words that stand for a number in a question: multipliers (twice = ×2) and fractions by their divisor (half = /2),
# as the chains compute with them.
WORD_NUMBERS: dict[str, int] = {w: i for i, w in enumerate(UNITS)} | TENS | {
    "hundred": 100, "thousand": 1000, "dozen": 12, "twice": 2, "double": 2, "thrice": 3, "triple": 3,
    "half": 2, "halves": 2, "third": 3, "thirds": 3, "quarter": 4, "quarters": 4}
_WORD_NUMBER = re.compile(r"\b(" + "|".join(sorted(TENS, key=len, reverse=True)) + r")-(" + "|".join(UNITS[1:10])
                          + r")\b|\b(" + "|".join(sorted(WORD_NUMBERS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_DIGITS = re.compile(r"(?<![\w.])\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\w)|(?<![\w.])\.(\d+)(?!\w)")
_WORD = re.compile(r"[a-z]+|#")
_SENTENCE_END = re.compile(r"[.!?;]\s")
_ROLE = re.compile(r"\{([QR])(\d+)\}")
_CHAIN_NUMBER = re.compile(r"(?<![\w.{])(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?![\w}])")
_ROLE_OR_NUMBER = re.compile(f"{_ROLE.pattern}|{_CHAIN_NUMBER.pattern}")  # a role, or a number kept as a constant
ANCHOR_SPAN = 4  # words each side of a number that make its anchor
ABSTRACT = ("?", "@")  # anchor terms about the question's structure ("?asked", "@1", "=?q": in the asking sentence)
ABSTRACT_IDF = 4.0  # their weight beside word idf (a rare word's is 4–8)
STOP = frozenset("a an the of to and in on at for is was are were be it its by with as that this".split())
# Capitalised words that start sentences but are not names (a name role binds the others).
NOT_NAMES = frozenset(
    "A An The If In On At How What When Where Which Who Why Each Every Some All After Before During Then There "
    "This That These Those She He They It His Her Their Its We You I Mr Mrs Ms Dr If Of For To From With One Two "
    "Three Four Five Six Seven Eight Nine Ten Monday Tuesday Wednesday Thursday Friday Saturday Sunday January "
    "February March April May June July August September October November December Christmas Halloween".split())
_NAME = re.compile(r"\b[A-Z][a-z]+\b")


def number_value(text: str) -> str | None:
    """Canonical value of a number literal (commas and '$' dropped, no trailing zeros), or None."""
    try:
        value = Decimal(text.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    return format(value.quantize(Decimal(1)) if value == value.to_integral_value() else value, "f")


@dataclass
class QuestionNumber:
    """One number of a question: its value, where it is, whether it was written as a word, and its anchor (the
    words around it, weighted by closeness; the unit noun right after it weighs most)."""

    value: str
    start: int
    end: int
    word: bool
    anchor: dict[str, float]


def stem(word: str) -> str:
    """A crude English stem (plural and verb endings dropped) so "bags"/"bag" and "borrowed"/"borrow" match."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, repl in (("ies", "i"), ("sses", "ss"), ("ves", "f"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[:-len(suffix)] + repl
            break
    if len(word) >= 4 and word[-1] in "ey":  # berry/berri, cookie/cooki, make/mak
        word = word[:-1] + ("i" if word[-1] == "y" else "")
    return word


def words(text: str) -> list[str]:
    """Number-masked, lowercased, stemmed words of a text ('#' for a number, '$' read as "dollar", '%' as "percent")."""
    text = _mask(text.replace("$", " dollar ").replace("%", " percent "))
    return [stem(w) for w in _WORD.findall(text.lower())]


@dataclass
class _Context:
    """What anchors abstract over in one question: its names (by order of appearance) and the words of the
    sentence that asks (so "the number counts what is asked" matches across wordings)."""

    people: dict[str, int]
    asked: frozenset[str]
    asked_span: tuple[int, int]

    @classmethod
    def of(cls, question: str) -> _Context:
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(question):
            spans.append((start, m.end()))
            start = m.end()
        spans.append((start, len(question)))
        spans = [(a, b) for a, b in spans if question[a:b].strip()] or [(0, len(question))]
        asking = [sp for sp in spans if "?" in question[sp[0]:sp[1]]
                  or re.match(r"\s*(how|what|find|calculate|determine)\b", question[sp[0]:sp[1]], re.I)]
        a, b = asking[-1] if asking else spans[-1]
        m = re.search(r"\b(how|what|find|calculate|determine)\b", question[a:b], re.I)
        a = a + m.start() if m else a
        asked = frozenset(w for w in words(question[a:b]) if w not in STOP and w != "#" and w not in QUESTION_WORDS)
        return cls({stem(n.lower()): i for i, n in enumerate(names(question))}, asked, (a, b))


def asking_words(question: str) -> frozenset[str]:
    """The words (``words``, numbers left out) of the sentence that asks, from its question word on."""
    a, b = _Context.of(question).asked_span
    return frozenset(w for w in words(question[a:b]) if w != "#")


QUESTION_WORDS = frozenset("how many much what find calculate determine did do does will would can could total "
                           "all altogether in".split())


def _anchor(text: str, start: int, end: int, ctx: _Context | None = None) -> dict[str, float]:
    """Words of the number's sentence within ANCHOR_SPAN of it, weight 1/(1+distance); the next word (the unit
    noun) counts double. With the question's context, names become their order ("@1") and words the asking sentence
    shares are marked ("?" sides), and a number inside the asking sentence is marked too: what binds across
    rewordings is the number's relation to the names and to what is asked, not the words alone."""
    left_end = max((m.end() for m in _SENTENCE_END.finditer(text, 0, start)), default=0)
    right = _SENTENCE_END.search(text, end)
    left = words(text[left_end:start])[-ANCHOR_SPAN:]
    after = words(text[end:right.start() if right else len(text)])[:ANCHOR_SPAN]
    anchor: dict[str, float] = {}

    def add(term: str, w: float) -> None:
        anchor[term] = anchor.get(term, 0.0) + w

    for side, seq in (("<", list(reversed(left))), (">", after)):
        for d, w in enumerate(seq):
            if w in STOP:
                continue
            weight = 2.0 if side == ">" and d == 0 else 1.0 / (1 + d)
            if ctx is not None and w in ctx.people:
                add(f"{side}@{ctx.people[w] + 1}", weight)
                continue
            add(side + w, weight)
            if ctx is not None and w in ctx.asked and w != "#":
                add(side + "?asked", 0.5 * weight)
    if ctx is not None and ctx.asked_span[0] <= start < ctx.asked_span[1]:
        add("=?q", 1.0)
    return anchor


def _mask(text: str) -> str:
    """Text with every number (digits or number word) replaced by '#'."""
    return _WORD_NUMBER.sub(" # ", _DIGITS.sub(" # ", text))


def masked_question(question: str) -> str:
    """The question with its numbers masked: what retrieval indexes, so variants with new numbers match."""
    return " ".join(_mask(question).split())


def question_numbers(question: str) -> list[QuestionNumber]:
    """Every number of a question in order of appearance, digits and number words alike."""
    found: list[tuple[int, int, str, bool]] = []
    for m in _DIGITS.finditer(question):
        value = number_value(m.group(0))
        if value is not None:
            found.append((m.start(), m.end(), value, False))
    taken = [(s, e) for s, e, _, _ in found]
    for m in _WORD_NUMBER.finditer(question):
        if any(s < m.end() and m.start() < e for s, e in taken):
            continue
        if m.group(1):
            value = TENS[m.group(1).lower()] + UNITS.index(m.group(2).lower())
        else:
            word = m.group(3).lower()
            if word in ("one", "a") or (word in FRACTIONS and not _fraction(question, m.start(), m.end())):
                continue  # "one of them", "the third day", "8 quarters": not quantities the chains compute with
            value = WORD_NUMBERS[word]
        found.append((m.start(), m.end(), str(value), True))
    found.sort()
    ctx = _Context.of(question)
    return [QuestionNumber(v, s, e, w, _anchor(question, s, e, ctx)) for s, e, v, w in found]


FRACTIONS = frozenset("half halves third thirds quarter quarters".split())
_BEFORE = re.compile(r"([\w$.,]+)[\s-]*$")
_AFTER = re.compile(r"^\s*(-|[\w]+)")


def _fraction(text: str, start: int, end: int) -> bool:
    """True when a fraction word is a quantity: "half as many", "a third of", "cut in half", "half the price"; not
    an ordinal ("the third day", "the first half"), a coin or unit after a count ("8 quarters", "14 half-dollars"), a
    compound ("half-price"), nor a bare plural or singular noun ("how many quarters", "a quarter")."""
    word = text[start:end].lower()
    before = _BEFORE.search(text[max(0, start - 40):start])
    after = _AFTER.match(text[end:end + 40])
    prev = before.group(1).lower() if before else ""
    nxt = after.group(1).lower() if after else ""
    if prev in ORDINAL_BEFORE:
        return False
    if nxt in ("of", "as"):
        return True
    if nxt == "-" or prev[:1].isdigit() or prev in WORD_NUMBERS:
        return False
    if word != "half":
        return nxt in ("the", "a", "an") and word in ("third", "quarter")
    return True


ORDINAL_BEFORE = frozenset("the first second third fourth last next other each every".split())


def names(question: str) -> list[str]:
    """Capitalised words of a question that are not sentence words (the people and places a chain may name)."""
    out: list[str] = []
    for w in _NAME.findall(question):
        if w not in NOT_NAMES and w not in out:
            out.append(w)
    return out


@dataclass
class AbstractChain:
    """A chain with its numbers as roles: steps of (tag, text) where ``{Q3}`` is the question's third number,
    ``{R1}`` the first tool result and other numbers are constants; the question numbers' values and anchors,
    and the names the chain uses ("{N1}"); ``coincidences``: how many of its roles were decided between numbers of
    equal value (a result equal to a question number, a value the question repeats), where the role may be wrong."""

    steps: list[tuple[str, str]]
    numbers: list[QuestionNumber]
    names: list[str] = field(default_factory=list)
    coincidences: int = 0

    @property
    def used(self) -> list[int]:
        """Question-number indexes (0-based) the chain refers to, in order of first use."""
        seen: list[int] = []
        for _, text in self.steps:
            for kind, k in _ROLE.findall(text):
                if kind == "Q" and int(k) - 1 not in seen:
                    seen.append(int(k) - 1)
        return seen

    def to_dict(self) -> dict:
        """Plain data for storing the track."""
        return {"steps": [list(s) for s in self.steps], "names": self.names,
                "numbers": [[n.value, n.start, n.end, int(n.word), n.anchor] for n in self.numbers]}

    @classmethod
    def from_dict(cls, data: Mapping) -> AbstractChain:
        """Inverse of to_dict."""
        return cls([(t, s) for t, s in data["steps"]],
                   [QuestionNumber(v, s, e, bool(w), dict(a)) for v, s, e, w, a in data["numbers"]], list(data["names"]))


def _context_words(text: str, start: int, end: int) -> dict[str, float]:
    """Anchor-like bag for a number inside a step's text (for choosing among question numbers of equal value)."""
    return _anchor(text, start, end)


def similarity(a: Mapping[str, float], b: Mapping[str, float], idf: Mapping[str, float] | None = None) -> float:
    """IDF-weighted cosine of two anchors (word sides ignored when sides differ: '<cost' and '>cost' half-match)."""
    def weight(term: str) -> float:
        if term[1:2] in ABSTRACT:
            return ABSTRACT_IDF
        return idf.get(term[1:], 1.0) if idf else 1.0

    def vec(x: Mapping[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for term, w in x.items():
            out[term] = out.get(term, 0.0) + w * weight(term)
            out[term[1:]] = out.get(term[1:], 0.0) + 0.5 * w * weight(term)
        return out

    va, vb = vec(a), vec(b)
    dot = sum(w * vb.get(t, 0.0) for t, w in va.items())
    na, nb = math.sqrt(sum(w * w for w in va.values())), math.sqrt(sum(w * w for w in vb.values()))
    return dot / (na * nb) if na and nb else 0.0


def abstract_chain(chain: Chain) -> AbstractChain:
    """Replace every number of the chain's steps by its role: the latest earlier tool result with that value, else the
    question number of that value whose anchor best matches the words around it, else a constant."""
    numbers = question_numbers(chain.question)
    people = names(chain.question)
    by_value: dict[str, list[int]] = {}
    for i, n in enumerate(numbers):
        by_value.setdefault(n.value, []).append(i)
    results: list[str] = []
    recent: dict[str, int] = {}  # value → question index chosen last in this step pair (THOUGHT then its ACTION)
    steps: list[tuple[str, str]] = []
    coincidences = 0

    def role(text: str, m: re.Match, tag: str) -> str:
        nonlocal coincidences
        value = number_value(m.group(1))
        if value is None:
            return m.group(0)
        options = by_value.get(value)
        if value in results:
            coincidences += bool(options) or results.count(value) > 1
            return "{R%d}" % (len(results) - results[::-1].index(value))
        if not options:
            return m.group(0)
        coincidences += len(options) > 1
        if len(options) > 1 and tag != ACTION:
            ctx = _context_words(text, m.start(), m.end())
            best = max(options, key=lambda i: (similarity(ctx, numbers[i].anchor), -i))
        else:
            best = recent.get(value, options[0])
        recent[value] = best
        return "{Q%d}" % (best + 1)

    for step in chain.steps:
        if step.tag == RESULT:
            value = number_value(step.text.strip())
            results.append(value if value is not None else step.text.strip())
            steps.append((RESULT, "{R%d}" % len(results)))
            continue
        if step.tag == THOUGHT:
            recent = {}
        text = _CHAIN_NUMBER.sub(lambda m: role(step.text, m, step.tag), step.text)
        steps.append((step.tag, _name_roles(text, people)))
    answer = _CHAIN_NUMBER.sub(lambda m: role(chain.answer, m, ANSWER), chain.answer)
    steps.append((ANSWER, answer))
    return AbstractChain(steps, numbers, people, coincidences)


def _name_roles(text: str, people: Sequence[str]) -> str:
    """Names of the question in a step's text as {N1}, {N2}… (bound to the new question's names when followed)."""
    for i, name in enumerate(people):
        text = re.sub(rf"\b{re.escape(name)}\b", "{N%d}" % (i + 1), text)
    return text


@dataclass
class Binding:
    """Which of a new question's numbers each track number stands for (track index → question index), how well
    the anchors agreed (mean similarity of the bound pairs, 0..1), and the names to use."""

    slots: dict[int, int]
    confidence: float
    complete: bool
    names: dict[int, str] = field(default_factory=dict)
    weakest: float = 1.0  # the least similar bound pair
    alternative: int = 0  # 0 for the best matching, i for the i-th next best


def bind(track: AbstractChain, question: str, idf: Mapping[str, float] | None = None,
         numbers: Sequence[QuestionNumber] | None = None) -> Binding:
    """Match the track's used question numbers one-to-one to this question's numbers by anchor similarity (best
    total, ties by order of appearance), so a reordered sentence still binds the right number."""
    return bindings(track, question, idf, numbers, 1)[0]


def bindings(track: AbstractChain, question: str, idf: Mapping[str, float] | None = None,
             numbers: Sequence[QuestionNumber] | None = None, m: int = 4) -> list[Binding]:
    """The ``m`` best one-to-one matchings of the track's used question numbers to this question's numbers, best
    first (``bind`` is the first): a caller that follows them can prefer a close second whose answer is plausible."""
    numbers = list(numbers) if numbers is not None else question_numbers(question)
    used = track.used
    people = names(question)
    # a name the question lacks keeps the track's own (a filled step never shows a bare {N3})
    name_map = {i: people[i] if i < len(people) else name for i, name in enumerate(track.names)}
    if not used:
        return [Binding({}, 1.0, True, name_map)]
    if len(numbers) < len(used):
        return [Binding({}, 0.0, False, name_map)]
    sim = [[similarity(track.numbers[t].anchor, n.anchor, idf) + _prior(t, j, track.numbers, numbers)
            for j, n in enumerate(numbers)] for t in used]
    out = []
    for rank, pairs in enumerate(_assign(sim, m)):
        bounded = [min(1.0, max(0.0, sim[i][j])) for i, j in pairs]
        out.append(Binding({used[i]: j for i, j in pairs}, sum(bounded) / len(used), True, name_map, min(bounded),
                           rank))
    return out


def _magnitude(value: str) -> float | None:
    try:
        v = abs(float(value))
    except ValueError:
        return None
    return math.log10(v) if v > 0 else None


def _prior(t: int, j: int, track_numbers: Sequence[QuestionNumber], numbers: Sequence[QuestionNumber]) -> float:
    """A small preference for the same relative position, the same written form, the same kind of value (whole or
    not) and a similar magnitude (breaks ties between anchors: a price binds a price, a count a count)."""
    a, b = track_numbers[t], numbers[j]
    rel = abs(t / max(1, len(track_numbers) - 1) - j / max(1, len(numbers) - 1)) if len(numbers) > 1 else 0.0
    prior = 0.05 * (1 - rel) + (0.02 if a.word == b.word else 0.0)
    prior += 0.02 if ("." in a.value) == ("." in b.value) else 0.0
    ma, mb = _magnitude(a.value), _magnitude(b.value)
    if ma is not None and mb is not None:
        prior += MAGNITUDE_PRIOR * max(0.0, 1 - abs(ma - mb) / 2)
    return prior


MAGNITUDE_PRIOR = 0.05


def _assign(sim: list[list[float]], m: int = 1) -> list[list[tuple[int, int]]]:
    """The ``m`` best assignments of rows to distinct columns by total: exhaustive for small problems (ties by order),
    greedy beyond (one)."""
    rows, cols = len(sim), len(sim[0])
    if rows <= 6 and cols <= 8:
        def total(p: tuple[int, ...]) -> float:
            return sum(sim[i][p[i]] for i in range(rows))

        ranked = heapq.nlargest(m, permutations(range(cols), rows), key=total) if m > 1 else \
            [max(permutations(range(cols), rows), key=total)]
        return [list(enumerate(p)) for p in ranked]
    cells = sorted(((sim[i][j], i, j) for i in range(rows) for j in range(cols)), reverse=True)
    taken_r, taken_c, out = set(), set(), []
    for _, i, j in cells:
        if i not in taken_r and j not in taken_c:
            taken_r.add(i)
            taken_c.add(j)
            out.append((i, j))
    return [sorted(out)]


def fill(text: str, binding: Binding, numbers: Sequence[QuestionNumber], results: Sequence[str]) -> str | None:
    """A step text with its roles replaced by this question's values; None when a role cannot be resolved yet."""
    missing = False

    def one(m: re.Match) -> str:
        nonlocal missing
        k = int(m.group(2)) - 1
        if m.group(1) == "Q":
            j = binding.slots.get(k)
            if j is None:
                missing = True
                return m.group(0)
            return numbers[j].value
        if k >= len(results):
            missing = True
            return m.group(0)
        return results[k]

    out = _ROLE.sub(one, text)
    out = re.sub(r"\{N(\d+)\}", lambda m: binding.names.get(int(m.group(1)) - 1, m.group(0)), out)
    return None if missing else out


def number_roles(text: str) -> list[str]:
    """The role of each number ``fill`` writes into a step text, in order: "Q2", "R1", or "constant"."""
    return ["%s%s" % m.group(1, 2) if m.group(1) else "constant" for m in _ROLE_OR_NUMBER.finditer(text)]


def execute(track: AbstractChain, binding: Binding, numbers: Sequence[QuestionNumber]) -> tuple[str | None, list[tuple[str, str]]]:
    """Follow a track with this question's numbers and the calculator alone: (answer or None, filled steps)."""
    results: list[str] = []
    steps: list[tuple[str, str]] = []
    for tag, text in track.steps:
        if tag == RESULT:
            continue
        filled = fill(text, binding, numbers, results)
        if filled is None:
            return None, steps
        steps.append((tag, filled))
        if tag == ACTION:
            m = re.fullmatch(r"CALL calc\((.*)\)", filled.strip())
            try:
                value = calc(m.group(1)) if m else None
            except ToolError:
                value = None
            if value is None:
                return None, steps
            results.append(value)
            steps.append((RESULT, value))
    answer = steps[-1][1] if steps and steps[-1][0] == ANSWER else None
    return answer, steps


def check_roles(track: AbstractChain, chain: Chain) -> bool:
    """True when following the abstract chain with its own question gives the chain's answer (the roles are right)."""
    from overlay.chains import answers_match

    binding = Binding({i: i for i in range(len(track.numbers))}, 1.0, True,
                      {i: n for i, n in enumerate(track.names)})
    answer, _ = execute(track, binding, track.numbers)
    return answers_match(answer, chain.answer)


__all__ = ["AbstractChain", "Binding", "QuestionNumber", "abstract_chain", "bind", "check_roles", "execute", "fill",
           "asking_words", "bindings", "masked_question", "names", "number_roles", "number_value", "question_numbers",
           "similarity"]
