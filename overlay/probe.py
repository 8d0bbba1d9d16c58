"""Track probe: do held-out variants of trained chains make a trained selector "fall into" the chain's track?

A *track* is a chain template: a question and GSM8K-style solution lines with variable slots (``{name}``,
``{n1}``) and calculations ``<<{n1}/2=half>>`` that the calculator computes, binding ``half`` for later
lines. Variants swap slot values (numbers, names, entities) and vary the question's surface (synonyms,
reordered independent sentences); some variants are held out of training. The probe feeds each held-out
variant's prefix (question + first j steps) to the decoder, decodes greedily and checks whether the
continuation reproduces the variant's expected next m steps *modulo the slots* (every number is ``#``,
every slot word ``@``), for the model and a control model in the same run. Inside the model it compares
hidden states of variant and source at aligned tokens per layer and measures attention on anchor tokens
(tags, operators, numbers), drawing one "token → attention → embedding shift → output" figure per example.
"""

from __future__ import annotations

import difflib
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Optional

import typer

from overlay.chains import (ANSWER, EOS, Q, RESULT, SPECIAL_TOKENS, STEP_TAGS, TAG_LIKE, Chain, ChainFormatError,
                            parse_gsm8k_answer)
from overlay.tools import ToolError, calc

SLOT = re.compile(r"\{([A-Za-z_]\w*)\}")
ANNOT = re.compile(r"<<([^<>]*?)(?:=\s*([A-Za-z_]\w*))?>>")
GSM_ANNOT = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
QNUMBER = re.compile(r"(?<![\w.,$])\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|\.\d+")
UNIT = re.compile(r"<[A-Z]+>|\d+(?:[.,]\d+)*|[^\W\d_]+|[^\w\s]")
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
IDS = {tag: i for i, tag in enumerate(SPECIAL_TOKENS)}
STEP_IDS = frozenset(IDS[t] for t in STEP_TAGS)
OPERATORS = frozenset("+-*/=()x×÷%")

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


class ProbeError(ValueError):
    """Bad library, slot values, model or settings for the probe; the message says what and where."""


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
        """Check slots against their use; raise ProbeError naming the track, the slot and what is wrong."""
        where = f"track {self.id!r}"
        if not self.question.strip() or not self.solution:
            raise ProbeError(f"{where}: needs a question and at least one solution line")
        given = set(self.rows[0]) if self.rows else set(self.slots)
        for name, values in self.slots.items():
            if not values:
                raise ProbeError(f"{where}: slot {name!r} has no values")
        for i, row in enumerate(self.rows):
            if set(row) != given:
                raise ProbeError(f"{where}: value list mismatch: row {i + 1} has values for {sorted(row)}, "
                                 f"expected {sorted(given)}")
        computed = self.computed
        if len(set(computed)) != len(computed) or given & set(computed):
            dup = sorted({c for c in computed if computed.count(c) > 1} | (given & set(computed)))
            raise ProbeError(f"{where}: {', '.join(dup)} is bound more than once "
                             "(a slot and a calculation, or two calculations)")
        texts = [("question", self.question), ("answer", self.answer)] + [(f"solution line {i + 1}", s)
                                                                          for i, s in enumerate(self.solution)]
        used: set[str] = set()
        for label, text in texts:
            for name in SLOT.findall(text):
                used.add(name)
                if name not in given and name not in computed:
                    raise ProbeError(f"{where}: {label} uses slot {{{name}}} but the library gives no value for it "
                                     f"(slots: {', '.join(sorted(given)) or 'none'})")
        if given - used:
            raise ProbeError(f"{where}: slot(s) {', '.join(sorted(given - used))} are declared but never used")
        for name in self.numeric:
            values = [r[name] for r in self.rows] if self.rows else self.slots[name]
            bad = next((v for v in values if not _is_number(v)), None)
            if bad is not None:
                raise ProbeError(f"{where}: slot {name!r} is used in a calculation but its value {bad!r} is not a number")
        if self.rows and len(self.rows) < 2:
            raise ProbeError(f"{where}: row mode needs at least 2 value rows (the source and one variant)")
        self.render(self.source_values())

    def render(self, values: dict[str, str], question: str | None = None) -> tuple[Chain, dict[str, str], str]:
        """(chain, all values incl. computed, GSM8K answer text) for these slot values; ``question`` overrides
        the rendered question (surface edits). Raises ProbeError when a calculation fails."""
        bound = dict(values)

        def fill(text: str, label: str) -> str:
            def one(m: re.Match) -> str:
                if m.group(1) not in bound:
                    raise ProbeError(f"track {self.id!r}: {label} uses {{{m.group(1)}}} before it has a value")
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
                    raise ProbeError(f"track {self.id!r}: solution line {i + 1}: {exc}") from None
                if m.group(2):
                    bound[m.group(2)] = value
                bound["_last"] = value
                out += [fill(line[last:m.start()], f"solution line {i + 1}"), f"<<{expr}={value}>>"]
                last = m.end()
            out.append(fill(line[last:], f"solution line {i + 1}"))
            lines.append("".join(out))
        if "_last" not in bound and not self.answer:
            raise ProbeError(f"track {self.id!r}: no calculation <<...>> in the solution and no answer given")
        answer = fill(self.answer, "answer") if self.answer else bound["_last"]
        bound.pop("_last", None)
        text = "\n".join(lines) + f"\n#### {answer}"
        q = " ".join((question if question is not None else fill(self.question, "question")).split())
        found = TAG_LIKE.search(q + text)
        if found:
            raise ProbeError(f"track {self.id!r}: reserved tag-like token {found.group(0)} in the rendered text")
        try:
            steps, ans, derived = parse_gsm8k_answer(text)
        except ChainFormatError as exc:
            raise ProbeError(f"track {self.id!r}: {exc}") from None
        return Chain(q, steps, ans, 0, derived), bound, text

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSONL (empty fields left out)."""
        data = {"id": self.id, "question": self.question, "solution": self.solution, "answer": self.answer,
                "slots": self.slots, "rows": self.rows, "bounds": self.bounds, "source": self.source}
        return {k: v for k, v in data.items() if v or k in ("id", "question", "solution")}


def track_from_dict(data: Any, where: str) -> Track:
    """Build and validate a Track from a YAML/JSONL record."""
    if not isinstance(data, dict):
        raise ProbeError(f"{where}: a track must be a mapping with question / solution / slots, got {type(data).__name__}")
    solution = data.get("solution", data.get("steps"))
    if isinstance(solution, str):
        solution = [s for s in solution.splitlines() if s.strip()]
    if not isinstance(solution, list) or not all(isinstance(s, (str, int, float)) for s in solution):
        raise ProbeError(f"{where}: 'solution' must be a list of lines")
    slots, rows = data.get("slots") or {}, data.get("rows") or []
    if isinstance(slots, list):  # row mode: slots: [a, b] + values: [[..], [..]]
        values = data.get("values") or []
        for i, row in enumerate(values):
            if not isinstance(row, list) or len(row) != len(slots):
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise ProbeError(f"{where}: value list mismatch: row {i + 1} of 'values' has {got} values for "
                                 f"{len(slots)} slots {slots}")
        rows, slots = [dict(zip(map(str, slots), map(_str, row))) for row in values], {}
        if not rows:
            raise ProbeError(f"{where}: 'slots' is a list but 'values' gives no rows")
    if not isinstance(slots, dict):
        raise ProbeError(f"{where}: 'slots' must map slot names to value lists")
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


def track_from_gsm8k(record: dict, line: int) -> Track:
    """Turn one GSM8K record into a track: question numbers used in the annotations become slots n1.., each
    annotation result a computed slot r1.., lexicon names and entities slots name1.. / item1... Raises
    ProbeError when the template does not re-compute the original annotations."""
    question, answer_text = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer_text, str) or "####" not in answer_text:
        raise ProbeError("not a GSM8K record (question / answer with '####')")
    if "{" in question + answer_text or "}" in question + answer_text:
        raise ProbeError("braces in the text")
    body, _, final = answer_text.rpartition("####")
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    annotated = [m for ln in lines for m in GSM_ANNOT.finditer(ln)]
    if not annotated:
        raise ProbeError("no <<expr=result>> annotation")
    literals = {_num_value(n) for m in annotated for n in NUMBER.findall(m.group(1).replace(" ", ""))}
    slot_of: dict[str, str] = {}
    for m in QNUMBER.finditer(question):
        value = _num_value(m.group(1) + (m.group(2) or ""))
        if value in literals and value not in slot_of:
            slot_of[value] = f"n{len(slot_of) + 1}"
    if not slot_of:
        raise ProbeError("no question number is used in a calculation")
    bounds: dict[str, list[float]] = {}

    def qsub(m: re.Match) -> str:
        value = _num_value(m.group(1) + (m.group(2) or ""))
        if value not in slot_of:
            return m.group(0)
        after = question[m.end():m.end() + 8].lstrip()
        if after.startswith("%") or after.startswith("percent"):
            bounds[slot_of[value]] = [0, 100]
        return m.group(0)[: m.group(0).index(m.group(1))] + "{" + slot_of[value] + "}"

    q_template = QNUMBER.sub(qsub, question)
    names = [w for w in dict.fromkeys(re.findall(r"[A-Za-z]+", question)) if w in NAME_OF]
    items = [w for w in dict.fromkeys(re.findall(r"[a-z]+", question)) if w in GROUP_OF]
    word_slots = {w: f"name{i + 1}" for i, w in enumerate(names)} | {w: f"item{i + 1}" for i, w in enumerate(items)}
    results: list[tuple[str, str]] = []  # (value, slot), most recent last

    def numsub(text: str) -> str:
        def one(m: re.Match) -> str:
            value = _num_value(m.group(0))
            for v, name in reversed(results):
                if v == value:
                    return "{" + name + "}"
            return "{" + slot_of[value] + "}" if value in slot_of else m.group(0)
        return NUMBER.sub(one, text)

    solution = []
    for ln in lines:
        out, last = [], 0
        for m in GSM_ANNOT.finditer(ln):
            out.append(numsub(ln[last:m.start()]))
            expr = numsub(m.group(1).replace(" ", "").replace(",", ""))
            name = f"r{len(results) + 1}"
            try:
                results.append((_num_value(m.group(2).strip()), name))
            except InvalidOperation:
                raise ProbeError(f"annotation result {m.group(2)!r} is not a number") from None
            out.append(f"<<{expr}={name}>>")
            last = m.end()
        out.append(numsub(ln[last:]))
        solution.append(_replace_words("".join(out), {w: "{" + s + "}" for w, s in word_slots.items()}))
    final_value = _num_value(final.strip()) if NUMBER.fullmatch(final.strip().replace("$", "")) else None
    answer = next(("{" + n + "}" for v, n in reversed(results) if v == final_value), None)
    if answer is None:
        raise ProbeError(f"answer {final.strip()!r} is not the result of an annotation")
    q_template = _replace_words(q_template, {w: "{" + s + "}" for w, s in word_slots.items()})
    values = {s: [v] for v, s in slot_of.items()} | {s: [w] for w, s in word_slots.items()}
    used = set(SLOT.findall(q_template + "\n".join(solution)))
    values = {k: v for k, v in values.items() if k in used}
    track = Track(id=f"gsm8k-{line}", question=q_template, solution=solution, slots=values, answer=answer,
                  bounds={k: v for k, v in bounds.items() if k in values}, source=f"gsm8k line {line}")
    try:
        track.validate()
        chain, bound, _ = track.render(track.source_values())
    except ProbeError as exc:
        raise ProbeError(str(exc).split(": ", 1)[-1]) from None
    for v, name in results:
        if Decimal(bound[name]) != Decimal(v):
            raise ProbeError(f"annotation result {v} does not re-compute (the template gives {bound[name]})")
    original = Chain(" ".join(question.split()), *parse_gsm8k_answer(answer_text)[:2], line)
    if skeleton(chain.to_text(), exact=True) != skeleton(original.to_text(), exact=True):
        raise ProbeError("re-rendering the template does not give the original chain")
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
            except (ProbeError, json.JSONDecodeError, ChainFormatError, AttributeError) as exc:
                lib.skipped.append((str(line), str(exc)))
    return lib


def load_library(path: str | Path, limit: int | None = None) -> TrackLibrary:
    """Read a library: YAML (``tracks:`` list) or JSONL of track records, or GSM8K JSONL records (converted).
    Raises ProbeError for a missing or empty library and for bad tracks (naming the track)."""
    p = Path(path)
    if not p.is_file():
        raise ProbeError(f"library file not found: {p}")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ProbeError(f"library {p} is not valid YAML: {' '.join(str(exc).split())}") from None
        records = data.get("tracks") if isinstance(data, dict) else data
        if records is None:
            records = []
        if not isinstance(records, list):
            raise ProbeError(f"library {p}: expected a list of tracks under 'tracks:'")
        lib = TrackLibrary([track_from_dict(r, f"{p.name} track {i + 1}") for i, r in enumerate(records[:limit])], [], str(p))
    else:
        lines = [(i, ln) for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
        try:
            records = [(i, json.loads(ln)) for i, ln in lines]
        except json.JSONDecodeError as exc:
            raise ProbeError(f"library {p}: malformed JSON ({exc.msg})") from None
        gsm8k = all(isinstance(r, dict) and "solution" not in r and "####" in str(r.get("answer", "")) for _, r in records)
        if records and gsm8k:
            lib = library_from_gsm8k(p, limit)
        else:
            lib = TrackLibrary([track_from_dict(r, f"{p.name} line {i}") for i, r in records[:limit]], [], str(p))
    if not lib.tracks:
        why = f" ({len(lib.skipped)} records skipped, first: {lib.skipped[0][1]})" if lib.skipped else ""
        raise ProbeError(f"library {p} has no tracks{why}")
    ids = [t.id for t in lib.tracks]
    if len(set(ids)) != len(ids):
        raise ProbeError(f"library {p}: track ids must be unique ({sorted(i for i in set(ids) if ids.count(i) > 1)})")
    return lib


# ---------------------------------------------------------------------------------------------------------------
# Variants with controlled volatility
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class VariantConfig:
    """How variants are made: how many per track, how many held out, which edits, and how many of them."""

    variants: int = field(default=6, metadata={"help": "Variants per track (5-10 recommended)."})
    heldout: int = field(default=2, metadata={"help": "Of which held out of training (probed)."})
    volatility: float = field(default=0.5, metadata={
        "help": "0..1: the chance each slot is swapped, each lexicon synonym applied and the question reordered."})
    edits: str = field(default="numbers,names,entities,synonyms,reorder", metadata={
        "help": "Allowed edits, comma-separated: numbers, names, entities, synonyms, reorder."})
    seed: int = field(default=0, metadata={"help": "Seed of the variant generator."})

    def __post_init__(self) -> None:
        kinds = {e.strip() for e in self.edits.split(",") if e.strip()}
        unknown = kinds - {"numbers", "names", "entities", "synonyms", "reorder"}
        if unknown:
            raise ProbeError(f"unknown edit kind(s) {sorted(unknown)}: use numbers, names, entities, synonyms, reorder")
        if not 1 <= self.variants <= 50 or not 1 <= self.heldout <= self.variants:
            raise ProbeError(f"need 1 ≤ heldout ≤ variants ≤ 50, got variants={self.variants}, heldout={self.heldout}")
        if not 0.0 <= self.volatility <= 1.0:
            raise ProbeError(f"volatility must be in [0, 1], got {self.volatility}")

    @property
    def kinds(self) -> set[str]:
        return {e.strip() for e in self.edits.split(",") if e.strip()}


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
    """New slot values (pool mode): each swappable slot changes with probability volatility, at least one changes."""
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
    chosen = [c for c in changeable if rng.random() < cfg.volatility]
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
    """Synonyms from the lexicon and one swap of adjacent independent sentences, each with probability volatility."""
    edits = []
    if "synonyms" in cfg.kinds:
        for a, b in SYNONYMS:
            for src, dst in ((a, b), (b, a)):
                pattern = re.compile(rf"\b{re.escape(src)}\b")
                if pattern.search(question) and rng.random() < cfg.volatility:
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


def _consistent(source: dict[str, str], new: dict[str, str], computed: list[str]) -> bool:
    """Computed values keep the source's kind: integers stay integers, non-negative stay non-negative."""
    for name in computed:
        a, b = Decimal(source[name]), Decimal(new[name])
        if (a == a.to_integral_value() and b != b.to_integral_value()) or (a >= 0 > b) or (a != 0 and b == 0):
            return False
    return True


def make_variants(track: Track, cfg: VariantConfig) -> list[Variant]:
    """The source (index 0) and up to cfg.variants distinct variants; the last cfg.heldout ones are held out."""
    rng = random.Random(f"{cfg.seed}:{track.id}")
    chain, bound, text = track.render(track.source_values())
    out = [Variant(track.id, 0, bound, chain, text, [])]
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
        try:
            v_chain, v_bound, v_text = track.render(values, question)
        except ProbeError:
            continue
        if not _consistent(bound, v_bound, track.computed) or v_chain.to_text() in seen:
            continue
        seen.add(v_chain.to_text())
        out.append(Variant(track.id, len(out), v_bound, v_chain, v_text, edits + surface))
    for v in out[max(1, len(out) - cfg.heldout):]:
        v.heldout = True
    return out


@dataclass
class VariantSet:
    """Every track's source and variants; ``train`` (sources + training variants) and ``heldout`` views."""

    variants: list[Variant]
    config: VariantConfig

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
            raise ProbeError(f"cannot read the variant split {p}: {type(exc).__name__}: {exc}") from None
        return cls(variants, config)

    def write(self, out: str | Path) -> dict[str, Path]:
        """train.jsonl and heldout.jsonl (GSM8K format) and variants.json (values and edits) under ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl", "variants": out / "variants.json"}
        for name in ("train", "heldout"):
            paths[name].write_text("".join(json.dumps(v.record()) + "\n" for v in getattr(self, name)))
        paths["variants"].write_text(json.dumps({"config": asdict(self.config),
                                                 "variants": [v.record() for v in self.variants]}, indent=1))
        return paths


def generate_variants(library: TrackLibrary, config: VariantConfig | None = None) -> VariantSet:
    """Seeded variants for every track; the same library and config always give the same split."""
    config = config or VariantConfig()
    variants = [v for t in library.tracks for v in make_variants(t, config)]
    if not any(v.heldout for v in variants):
        raise ProbeError("no track produced a variant: give more slot values or raise the volatility")
    return VariantSet(variants, config)


# ---------------------------------------------------------------------------------------------------------------
# Comparing chains modulo slots
# ---------------------------------------------------------------------------------------------------------------


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


def _same_unit(expected: str, got: str, words: frozenset[str]) -> bool:
    return expected == got or (expected == "#" and got[:1].isdigit()) or (expected == "@" and got in words)


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


def model_steps(text: str) -> list[tuple[str, str]]:
    """(tag, text) of the steps a model produces: tool <RESULT>s, <EOS> and <Q> left out; "" = text before a tag."""
    from overlay.router import parse_steps

    return [(s.tag, s.text) for s in parse_steps(text) if s.tag not in ("RESULT", "EOS", "Q")]


def split_chain(chain: Chain, j: int) -> tuple[str, str, int]:
    """(prefix, expected continuation, j used): the chain cut after its j-th model step and that step's <RESULT>.
    j is clipped so that at least one model step (the answer) is left to produce."""
    parts = [(s.tag, s.text) for s in chain.steps] + [(ANSWER, chain.answer)]
    n_model = sum(t != RESULT for t, _ in parts)
    j = max(0, min(j, n_model - 1))
    cut, seen = 0, 0
    while cut < len(parts) and (seen < j or (cut and parts[cut][0] == RESULT)):
        seen += parts[cut][0] != RESULT
        cut += 1
    prefix = f"{Q} {chain.question} " + "".join(f"{t} {x} " for t, x in parts[:cut])
    rest = "".join(f"{t} {x} " for t, x in parts[cut:]) + EOS
    return prefix, rest, j


def compare_steps(expected: str, generated: str, words: frozenset[str] = frozenset(), exact: bool = False,
                  numbers: frozenset[str] | None = None) -> tuple[int, int, dict | None]:
    """(steps followed, units followed, where it diverged or None) of a continuation against the expected one.

    Units are tags, words, numbers and symbols. Modulo slots, an expected slot number (one of ``numbers``, the
    variant's slot and computed values; every number when None) matches any number and an expected slot word
    (one of ``words``) any slot word; everything else must be equal. ``diverged``: step (offset after the
    prefix), expected tag, produced tag, unit index in the step (-1: the tag itself), expected and produced unit."""
    exp, gen = model_steps(expected), model_steps(generated)
    steps = units = 0
    for i, (tag, text) in enumerate(exp):
        if i >= len(gen):
            return steps, units, {"step": i, "tag": tag, "got_tag": None, "unit": -1, "expected": f"<{tag}>", "got": "(stopped)"}
        got_tag, got_text = gen[i]
        if got_tag != tag:
            got = f"<{got_tag}>" if got_tag else (got_text.split() or ["(nothing)"])[0]
            return steps, units, {"step": i, "tag": tag, "got_tag": got_tag, "unit": -1, "expected": f"<{tag}>", "got": got}
        eu, gu = skeleton(text, words, exact, numbers), skeleton(got_text, exact=True)
        same = next((n for n, (a, b) in enumerate(zip(eu, gu)) if not _same_unit(a, b, words)), min(len(eu), len(gu)))
        if same < len(eu) or same < len(gu):
            return steps, units + 1 + same, {"step": i, "tag": tag, "got_tag": got_tag, "unit": same,
                                             "expected": eu[same] if same < len(eu) else "(step end)",
                                             "got": gu[same] if same < len(gu) else "(step end)"}
        steps, units = steps + 1, units + 1 + len(eu)
    return steps, units, None


@dataclass
class Entry:
    """One probed continuation: did the model enter the track, how far it followed, where it left it."""

    track: str
    variant: int
    prefix_steps: int
    expected_steps: int
    followed_steps: int
    followed_units: int
    entered: bool
    exact_followed_steps: int
    exact_entered: bool
    diverged: dict | None
    stop_reason: str
    prefix: str
    continuation: str
    expected: str


def follow_tracks(decoder, variants: list[Variant], words: dict[str, frozenset[str]], j: int, m: int,
                  extra_tokens: int = 12) -> list[Entry]:
    """Decode every variant greedily from its prefix (question + first j steps), batched, each chain stopping as
    soon as a finished step leaves the track, at its end, or after its expected length + extra_tokens."""
    from overlay.decode import TAG_IDS
    from overlay.tokenizer import encode

    tok, texts = decoder.tokenizer, decoder.texts
    states, plans = [], []
    for v in variants:
        prefix, expected, used = split_chain(v.chain, j)
        states.append(decoder.state_from_prefix(prefix, v.chain.question))
        plans.append((prefix, expected, used, len(encode(tok, expected)) + extra_tokens, words.get(v.track, frozenset())))
    active = list(range(len(states)))
    while active:
        before = [len(states[i].ids) for i in active]
        decoder.step([states[i] for i in active])
        still = []
        for i, n in zip(active, before):
            s, (_, expected, _, budget, w) = states[i], plans[i]
            made = s.ids[s.prompt_len:]
            if s.acc.stop_reason:
                continue
            if len(made) >= budget:
                s.acc.stop_reason = "budget"
                continue
            if any(t in TAG_IDS for t in s.ids[n:]):  # a step closed (tool output may follow the tag)
                text = "".join(texts[t] for t in made)
                done, _, diverged = compare_steps(expected, text, w, numbers=variants[i].numbers)
                last_tag = next(t for t in reversed(made) if t in TAG_IDS)
                finished = len(model_steps(text)) - (last_tag not in (IDS[RESULT], IDS[EOS]))
                if diverged is not None and (diverged["step"] < finished or (diverged["unit"] == -1 and diverged["got_tag"])):
                    s.acc.stop_reason = "left track"
                    continue
                if done == len(model_steps(expected)):
                    s.acc.stop_reason = "track end"
                    continue
            still.append(i)
        active = still
    out = []
    for v, s, (prefix, expected, used, _, w) in zip(variants, states, plans):
        text = " ".join("".join(texts[t] for t in s.ids[s.prompt_len:]).split())
        n_exp = len(model_steps(expected))
        steps, units, diverged = compare_steps(expected, text, w, numbers=v.numbers)
        exact_steps, _, _ = compare_steps(expected, text, w, exact=True)
        need = min(m, n_exp)
        out.append(Entry(v.track, v.index, used, n_exp, steps, units, steps >= need, exact_steps, exact_steps >= need,
                         diverged, s.acc.stop_reason or "", prefix.strip(), text, expected))
    return out


def continue_from(decoder, prefix: str, max_new_tokens: int = 256):
    """Greedy (per the decoder's config) continuation of a chain prefix ``<Q> question <THOUGHT> ...``: the
    decoder's loop started from arbitrary chain text; returns the decoder's DecodeResult for the whole chain."""
    try:
        state = decoder.state_from_prefix(prefix.rstrip() + " ")
    except ValueError as exc:
        raise ProbeError(str(exc)) from exc
    start = time.perf_counter()
    while not state.acc.stop_reason and len(state.ids) - state.prompt_len < max_new_tokens:
        decoder.step([state])
    state.elapsed = time.perf_counter() - start
    return decoder.result(state)


# ---------------------------------------------------------------------------------------------------------------
# Inside the model: hidden states at aligned tokens, attention on anchors
# ---------------------------------------------------------------------------------------------------------------


def check_hidden_access(model, name: str = "model") -> int:
    """Number of layers whose hidden states and attention maps the model returns; ProbeError when it gives none."""
    import torch

    probe_ids = torch.tensor([[IDS["<BOS>"], IDS[Q]]], device=next(model.parameters()).device)
    try:
        with torch.inference_mode():
            out = model(probe_ids, probe_ids.clone(), output_hidden_states=True, output_attentions=True)
    except TypeError as exc:
        raise ProbeError(f"{name} ({type(model).__name__}) has no hidden-state access: its forward does not take "
                         f"output_hidden_states / output_attentions ({exc})") from None
    hidden, atts = getattr(out, "hidden_states", None), getattr(out, "attentions", None)
    if not hidden or not atts or any(a is None for a in atts):
        what = "hidden states" if not hidden else "attention maps"
        raise ProbeError(f"{name} ({type(model).__name__}) returns no {what} for output_hidden_states=True, "
                         "output_attentions=True: the probe needs both (a SelectorModel, or a causal LM loaded with "
                         "attn_implementation='eager')")
    if len(hidden) != len(atts) + 1:
        raise ProbeError(f"{name} returns {len(hidden)} hidden states for {len(atts)} attention layers (expected layers + 1)")
    return len(atts)


def _window(model) -> int:
    return int(getattr(getattr(model, "config", None), "window", 8))


class Inspector:
    """Hidden states, attention and candidate scores of one model for every reasoning position of a chain."""

    def __init__(self, model, tokenizer, table=None, k_candidates: int = 32):
        self.model, self.tokenizer, self.table, self.K = model, tokenizer, table, k_candidates
        self.k = _window(model)
        self.device = next(model.parameters()).device
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.labels = [t.replace("\u2581", " ") for t in vocab]
        self.abstract = ["#" if t.strip().isdigit() else t for t in self.labels]
        tags = set(range(len(SPECIAL_TOKENS)))
        self.anchor = [i in tags or t.strip() in OPERATORS or t.strip().isdigit() for i, t in enumerate(self.labels)]

    def kind(self, token: int) -> str:
        t = self.labels[token].strip()
        return "tag" if token < len(SPECIAL_TOKENS) else "number" if t.isdigit() else "operator" if t in OPERATORS else "word"

    def run(self, ids: list[int], positions: list[int], scores: bool = False) -> dict[str, Any]:
        """Per position p (the window ending at p): last-token hidden state per layer [L+1][P,d], attention of the
        last token per layer (mean over heads) [L][P,k], anchor masks, and with ``scores`` p(next token)."""
        import torch

        from overlay.dataset import window_of

        windows = torch.tensor([window_of(ids, p + 1, self.k) for p in positions], dtype=torch.long)
        cands = windows[:, -1:].clone()
        if scores and self.table is not None:
            nbs = self.table.neighbours_batch([ids[max(0, p + 1 - self.table.max_order):p + 1] for p in positions], self.K)
            width = max(len(nb.ids) for nb in nbs)
            cands = torch.zeros(len(positions), width, dtype=torch.long)
            for row, nb in enumerate(nbs):
                cands[row, :len(nb.ids)] = torch.tensor(nb.ids)
        with torch.inference_mode():
            out = self.model(windows.to(self.device), cands.to(self.device), output_hidden_states=True,
                             output_attentions=True)
        hidden = [h[:, -1, :].float().cpu() for h in out.hidden_states]
        att = [a[:, :, -1, :].float().mean(1).cpu() for a in out.attentions]
        anchor = torch.tensor([[self.anchor[t] and t != 0 for t in w] for w in windows.tolist()])
        result = {"windows": windows, "hidden": hidden, "attention": att, "anchor": anchor, "real": windows != 0}
        if scores and self.table is not None:
            logp = torch.log_softmax(out.logits.float().cpu(), -1)
            target = torch.tensor([ids[p + 1] for p in positions])
            hit = cands == target[:, None]
            result["p_next"] = torch.where(hit.any(1), (logp.exp() * hit).sum(1), torch.zeros(len(positions)))
            result["top1"] = cands[torch.arange(len(positions)), logp.argmax(1)]
        return result

    def reasoning(self, ids: list[int]) -> list[int]:
        """Positions from the first step tag to the second-to-last token (each predicts the next one)."""
        first = next((i for i, t in enumerate(ids) if t in STEP_IDS), len(ids))
        return list(range(first, len(ids) - 1))

    def align(self, a: list[int], b: list[int]) -> list[tuple[int, int]]:
        """Aligned reasoning positions of two chains: equal runs of their token sequences with digits as '#'."""
        pa, pb = self.reasoning(a), self.reasoning(b)
        sa, sb = [self.abstract[a[p]] for p in pa], [self.abstract[b[p]] for p in pb]
        blocks = difflib.SequenceMatcher(None, sa, sb, autojunk=False).get_matching_blocks()
        return [(pa[x.a + n], pb[x.b + n]) for x in blocks for n in range(x.size)]

    def similarity(self, a: list[int], b: list[int], run_a: dict | None = None) -> dict[str, Any]:
        """Per layer mean cosine of a's and b's hidden states at aligned positions whose windows differ (identical
        windows give identical states, so they are counted but left out of the means), plus per-position values
        (1.0 where the windows are identical, NaN where a's token is not aligned)."""
        import torch

        pairs = self.align(a, b)
        pos_a = self.reasoning(a)
        run_a = run_a or self.run(a, pos_a)
        index_a = {p: i for i, p in enumerate(pos_a)}
        run_b = self.run(b, [q for _, q in pairs]) if pairs else None
        keep = [n for n, (p, _) in enumerate(pairs) if not torch.equal(run_a["windows"][index_a[p]], run_b["windows"][n])]
        layers = len(run_a["hidden"])
        per_pos = [[math.nan] * len(pos_a) for _ in range(layers)]  # NaN: not aligned; 1.0: identical windows
        for p, _ in pairs:
            for layer in range(layers):
                per_pos[layer][index_a[p]] = 1.0
        means = []
        for layer in range(layers):
            if not keep:
                means.append(None)
                continue
            ha = run_a["hidden"][layer][[index_a[pairs[n][0]] for n in keep]]
            hb = run_b["hidden"][layer][keep]
            cos = torch.nn.functional.cosine_similarity(ha, hb, dim=-1)
            means.append(float(cos.mean()))
            for n, c in zip(keep, cos.tolist()):
                per_pos[layer][index_a[pairs[n][0]]] = c
        return {"layers": means, "pairs": len(keep), "identical_windows": len(pairs) - len(keep), "per_position": per_pos}

    @staticmethod
    def anchor_attention(run: dict) -> dict[str, list[float]]:
        """Per layer: mean attention mass of the last token on anchor tokens, and the anchors' share of the window."""
        real = run["real"].float()
        share = float(((run["anchor"].float()).sum(1) / real.sum(1).clamp(min=1)).mean())
        mass = [float((a * run["anchor"].float()).sum(1).mean()) for a in run["attention"]]
        return {"mass": mass, "share": share}


# ---------------------------------------------------------------------------------------------------------------
# The probe run: entry measures and inner measures for the model and the control, report, figures
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeConfig:
    """One probe run (the CLI options are its fields)."""

    prefix_steps: str = field(default="0,1", metadata={
        "help": "j: model steps of the variant's own chain fed after the question, comma-separated for several."})
    next_steps: int = field(default=2, metadata={"help": "m: steps the continuation must reproduce to count as entered."})
    variants: int = field(default=6, metadata={"help": "Variants per track."})
    heldout: int = field(default=2, metadata={"help": "Of which held out of training and probed."})
    volatility: float = field(default=0.5, metadata={"help": "0..1: how much each variant is changed."})
    edits: str = field(default="numbers,names,entities,synonyms,reorder", metadata={"help": "Allowed edit kinds."})
    seed: int = field(default=0, metadata={"help": "Variant generator seed (must match the one used for training)."})
    limit: int = field(default=0, metadata={"help": "Probe only the first N tracks; 0 = all."})
    k_candidates: int = field(default=32, metadata={"help": "Table candidates per token (K)."})
    repetition_penalty: float = field(default=1.5, metadata={"help": "The decoder's repetition penalty (1 = none)."})
    extra_tokens: int = field(default=12, metadata={"help": "Tokens allowed beyond the expected continuation's length."})
    figures: int = field(default=4, metadata={"help": "Per-example figures to draw."})
    sources: bool = field(default=True, metadata={"help": "Also probe the source chains (seen in training) as a reference."})

    def __post_init__(self) -> None:
        self.prefixes()
        self.variant_config()
        if self.next_steps < 1 or self.k_candidates < 2 or self.extra_tokens < 0 or self.figures < 0 or self.limit < 0:
            raise ProbeError("need next_steps ≥ 1, k_candidates ≥ 2, extra_tokens ≥ 0, figures ≥ 0 and limit ≥ 0")

    def prefixes(self) -> list[int]:
        try:
            js = [int(x) for x in str(self.prefix_steps).split(",") if x.strip()]
        except ValueError:
            raise ProbeError(f"prefix_steps must be comma-separated integers, got {self.prefix_steps!r}") from None
        if not js or min(js) < 0:
            raise ProbeError(f"prefix_steps must list integers ≥ 0, got {self.prefix_steps!r}")
        return js

    def variant_config(self) -> VariantConfig:
        return VariantConfig(self.variants, self.heldout, self.volatility, self.edits, self.seed)


def summarize(entries: list[Entry]) -> dict[str, Any]:
    """Entry rate (modulo slots and exact), mean followed steps / units, and where continuations diverged."""
    n = max(1, len(entries))
    div = [e.diverged for e in entries if e.diverged]
    return {
        "n": len(entries),
        "entry_rate": sum(e.entered for e in entries) / n,
        "exact_entry_rate": sum(e.exact_entered for e in entries) / n,
        "followed_steps": sum(e.followed_steps for e in entries) / n,
        "followed_units": sum(e.followed_units for e in entries) / n,
        "expected_steps": sum(e.expected_steps for e in entries) / n,
        "completed_rate": sum(e.diverged is None for e in entries) / n,
        "diverged_at_tag": dict(Counter(d["tag"] for d in div).most_common()),
        "diverged_at_step": {str(k): v for k, v in sorted(Counter(d["step"] for d in div).items())},
        "diverged_at_unit": dict(Counter("tag" if d["unit"] < 0 else str(min(d["unit"], 5)) if d["unit"] < 5 else "5+"
                                         for d in div).most_common()),
        "first_divergences": dict(Counter(f"{d['expected']} → {d['got']}" for d in div).most_common(8)),
        "stop_reasons": dict(Counter(e.stop_reason for e in entries).most_common()),
    }


def _mean_layers(parts: list[tuple[list, int]]) -> list[float | None]:
    """Pair-weighted mean per layer of several chains' layer means."""
    if not parts:
        return []
    out = []
    for layer in range(len(parts[0][0])):
        num = sum(v[layer] * w for v, w in parts if v[layer] is not None)
        den = sum(w for v, w in parts if v[layer] is not None)
        out.append(num / den if den else None)
    return out


def _unit_position(ids: list[int], labels: list[str], tag: int, unit: int) -> int:
    """Token position of unit number ``unit`` of the step whose tag token is at ``tag`` (-1: the tag itself)."""
    for p in range(tag + 1, len(ids)):
        if ids[p] in STEP_IDS or len(UNIT.findall("".join(labels[t] for t in ids[tag + 1:p + 1]))) > unit:
            return p if unit >= 0 else tag
    return tag


def _tag_positions(ids: list[int], start: int) -> list[int]:
    return [p for p in range(start, len(ids)) if ids[p] in STEP_IDS and ids[p] != IDS[RESULT]]


def probe_tracks(table, models: dict[str, tuple[Any, Any]], library: TrackLibrary, out: str | Path,
                 config: ProbeConfig | None = None, log=None, split: VariantSet | None = None) -> dict[str, Any]:
    """Run the probe for every model in ``models`` (name → (model, tokenizer); e.g. "model" and "control") on the
    held-out variants of ``library``, with the decoder over ``table``; writes probe.json, probe.md, summary.png
    and example-*.png/json under ``out`` and returns the results. ``split`` (VariantSet.load of the variants.json
    written when the training chains were made) fixes the held-out variants; without it they are regenerated
    from the config's seed, which gives the same split only with the same library and overlay version."""
    from overlay.decode import DecodeConfig, OverlayDecoder
    from overlay.tokenizer import TokenizerMismatch, check_tokenizers, encode

    config = config or ProbeConfig()
    log = log or (lambda *_: None)
    start = time.perf_counter()
    if not library.tracks:
        raise ProbeError("the library has no tracks")
    if not models:
        raise ProbeError("give at least one model to probe")
    lib = TrackLibrary(library.tracks[: config.limit or None], library.skipped, library.path)
    if split is None:
        vset = generate_variants(lib, config.variant_config())
    else:
        ids = {t.id for t in lib.tracks}
        vset = VariantSet([v for v in split.variants if v.track in ids], split.config)
        missing = sorted(ids - {v.track for v in vset.variants if v.index == 0})
        if missing or not vset.heldout:
            raise ProbeError(f"the variant split does not match the library (tracks without a source chain: "
                             f"{', '.join(missing[:5]) or 'none'}; held-out variants: {len(vset.heldout)})")
        leaked = {v.chain.to_text() for v in vset.train} & {v.chain.to_text() for v in vset.heldout}
        if leaked:
            raise ProbeError(f"{len(leaked)} held-out variant(s) are also training chains in the split")
    words = {t.id: slot_words(t) for t in lib.tracks}
    try:
        check_tokenizers({f"table {table.domain!r} v{table.version}": table.meta.get("tokenizer_hash"),
                          **{name: tok for name, (_, tok) in models.items()}})
    except TokenizerMismatch as exc:
        raise ProbeError(f"{exc}: train the model and the control on this table's tokenizer") from None
    for name, (model, _) in models.items():
        check_hidden_access(model, name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    heldout, js = vset.heldout, config.prefixes()
    sources = [v for v in vset.variants if v.index == 0]
    tracks = [t.id for t in lib.tracks]
    results: dict[str, Any] = {
        "config": asdict(config), "table": {"domain": table.domain, "version": table.version},
        "library": {"path": lib.path, "tracks": len(lib.tracks), "skipped": len(lib.skipped), "variants": len(vset.variants),
                    "train_chains": len(vset.train), "heldout": len(heldout), "split": "file" if split else "generated"},
        "models": {}, "entries": {}, "examples": []}
    inspectors, runs = {}, {}
    for name, (model, tok) in models.items():
        t0 = time.perf_counter()
        decoder = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=100_000, k_candidates=config.k_candidates,
                                                                 temperature=0.0, repetition_penalty=config.repetition_penalty))
        entries = {j: follow_tracks(decoder, heldout, words, j, config.next_steps, config.extra_tokens) for j in js}
        res: dict[str, Any] = {"heldout": {str(j): summarize(e) for j, e in entries.items()}}
        if config.sources:
            res["sources"] = summarize(follow_tracks(decoder, sources, words, js[0], config.next_steps, config.extra_tokens))
        results["entries"][name] = {str(j): [asdict(x) for x in e] for j, e in entries.items()}
        insp = inspectors[name] = Inspector(model, tok, table, config.k_candidates)
        on, off, att, share, identical = [], [], [], [], 0
        for v in heldout:
            ids = encode(tok, v.chain.to_text())
            run = runs[(name, v.track, v.index)] = insp.run(ids, insp.reasoning(ids))
            sim = insp.similarity(ids, encode(tok, vset.source(v.track).chain.to_text()), run)
            run["similarity"] = sim
            on.append((sim["layers"], sim["pairs"]))
            identical += sim["identical_windows"]
            if len(tracks) > 1:
                other = tracks[(tracks.index(v.track) + 1) % len(tracks)]
                sim_o = insp.similarity(ids, encode(tok, vset.source(other).chain.to_text()), run)
                off.append((sim_o["layers"], sim_o["pairs"]))
            a = insp.anchor_attention(run)
            att.append((a["mass"], len(run["windows"])))
            share.append((a["share"], len(run["windows"])))
        res["layer_similarity"] = _mean_layers(on)
        res["layer_similarity_other_track"] = _mean_layers(off)
        res["aligned_pairs"] = sum(w for _, w in on)
        res["aligned_identical_windows"] = identical
        res["anchor_attention"] = _mean_layers(att)
        res["anchor_share"] = sum(s * w for s, w in share) / max(1, sum(w for _, w in share))
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results["models"][name] = res
        h = res["heldout"][str(js[0])]
        log(f"{name}: entry rate {h['entry_rate']:.3f} (exact {h['exact_entry_rate']:.3f}), followed "
            f"{h['followed_steps']:.2f} of {h['expected_steps']:.2f} steps, {res['seconds']:.1f} s")
    picked = []
    for t in tracks:
        v = next((x for x in heldout if x.track == t), None)
        if v is not None and len(picked) < config.figures:
            picked.append(v)
    for n, v in enumerate(picked):
        ex = _example(v, vset, models, inspectors, runs, results["entries"], js[0], config)
        stem = f"example-{n + 1:02d}"
        (out / f"{stem}.json").write_text(json.dumps(ex, indent=1))
        example_figure(ex, out / f"{stem}.png")
        results["examples"].append({"track": v.track, "variant": v.index, "json": f"{stem}.json", "png": f"{stem}.png"})
    results["seconds"] = round(time.perf_counter() - start, 2)
    (out / "probe.json").write_text(json.dumps(results, indent=1, default=str))
    summary_figure(results, out / "summary.png")
    (out / "probe.md").write_text(markdown(results))
    return results


def _example(v: Variant, vset: VariantSet, models, inspectors, runs, entries, j: int, config: ProbeConfig) -> dict:
    """The numbers behind one example figure: tokens around the prefix end and, per model, attention on anchors,
    embedding shift (1 − cosine to the source at aligned tokens), p(expected next token), greedy agreement."""
    from overlay.tokenizer import encode

    name0 = next(iter(models))
    tok, insp = models[name0][1], inspectors[name0]
    ids = encode(tok, v.chain.to_text())
    prefix, _, used = split_chain(v.chain, j)
    cut = len(encode(tok, prefix))
    upto = len(encode(tok, split_chain(v.chain, used + config.next_steps)[0]))
    positions = insp.reasoning(ids)
    lo = max(positions[0], cut - 8)
    hi = min(positions[-1] + 1, max(upto, cut + 8), lo + 64)
    region = [p for p in positions if lo <= p < hi]
    index = {p: i for i, p in enumerate(positions)}
    tags = _tag_positions(ids, cut)
    ex: dict[str, Any] = {
        "track": v.track, "variant": v.index, "edits": v.edits, "prefix_steps": used, "question": v.chain.question,
        "source_question": vset.source(v.track).chain.question,
        "positions": region, "tokens": [insp.labels[ids[p]].strip() or "␣" for p in region],
        "next_tokens": [insp.labels[ids[p + 1]].strip() or "␣" for p in region],
        "kinds": [insp.kind(ids[p]) for p in region], "prefix_end": cut, "models": {}}
    for name, (model, _) in models.items():
        run = runs[(name, v.track, v.index)]
        scored = inspectors[name].run(ids, region, scores=True)
        entry = next(e for e in entries[name][str(j)] if e["track"] == v.track and e["variant"] == v.index)
        d = entry["diverged"]
        ex["models"][name] = {
            "anchor_attention": [[round(float(a[index[p]] @ run["anchor"][index[p]].float()), 4) for p in region]
                                 for a in run["attention"]],
            "shift": [[None if math.isnan(c := run["similarity"]["per_position"][layer][index[p]]) else round(1 - c, 4)
                       for p in region] for layer in range(len(run["hidden"]))],
            "p_next": [round(float(x), 4) for x in scored.get("p_next", [])],
            "top1_ok": [int(t) == ids[p + 1] for t, p in zip(scored.get("top1", []), region)],
            "entered": entry["entered"], "followed_steps": entry["followed_steps"], "diverged": d,
            "diverged_position": _unit_position(ids, insp.labels, tags[d["step"]], d["unit"])
            if d and d["step"] < len(tags) else None,
            "continuation": entry["continuation"]}
    return ex


KIND_COLOURS = {"tag": "#1f77b4", "number": "#d62728", "operator": "#9467bd", "word": "#333333"}
MODEL_COLOURS = ["#2ca02c", "#ff7f0e", "#17becf", "#8c564b"]
TAG_COLOURS = {"THOUGHT": "#9edae5", "ACTION": "#c5b0d5", "CHECK": "#f7b6d2", "ANSWER": "#dbdb8d"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _boundary(positions: list[int], token: int | None) -> float | None:
    """x of the boundary before ``token``: the column predicting it is the one before (token - 1)."""
    if token is None:
        return None
    if token - 1 in positions:
        return positions.index(token - 1) + 0.5
    return positions.index(token) - 0.5 if token in positions else None


def example_figure(ex: dict, path: str | Path) -> Path:
    """One example as "token → attention → embedding shift → output": heatmaps of attention on anchor tokens and of
    the hidden-state shift from the source chain per layer, for each model, over p(expected next token)."""
    import numpy as np

    plt = _plt()
    names = list(ex["models"])
    P = len(ex["tokens"])
    rows = [("attention", n) for n in names] + [("shift", n) for n in names] + [("output", None)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(10.0, 0.2 * P + 2.5), 1.55 * len(rows) + 2.2))
    x = np.arange(P)
    cut = _boundary(ex["positions"], ex["prefix_end"])
    for ax, (what, name) in zip(axes, rows):
        if what == "output":
            for c, n in enumerate(names):
                m = ex["models"][n]
                colour = MODEL_COLOURS[c % len(MODEL_COLOURS)]
                ax.plot(x, m["p_next"], "-o", ms=3, lw=1.2, color=colour, label=f"{n}: p(expected next token)")
                bad = [i for i, ok in enumerate(m["top1_ok"]) if not ok]
                ax.plot(bad, [m["p_next"][i] for i in bad], "x", ms=7, color=colour)
            ax.set_ylim(-0.05, 1.1)
            ax.set_ylabel("output\np(next)")
            ax.legend(loc="lower left", fontsize=7, ncol=len(names))
        else:
            m = ex["models"][name]
            data = np.array(m["anchor_attention"] if what == "attention" else
                            [[np.nan if v is None else v for v in row] for row in m["shift"]], dtype=float)
            top = 1.0 if what == "attention" else max(0.05, float(np.nanmax(data)) if np.isfinite(data).any() else 0.05)
            first = 1 if what == "attention" else 0
            im = ax.imshow(data, aspect="auto", interpolation="nearest", vmin=0, vmax=top,
                           cmap="viridis" if what == "attention" else "magma_r",
                           extent=(-0.5, P - 0.5, first + data.shape[0] - 0.5, first - 0.5))
            ax.set_yticks(range(first, first + data.shape[0]))
            label = "attention\non anchors" if what == "attention" else "embedding shift\n1 − cos(source)"
            ax.set_ylabel(f"{name}\n{label}\nlayer", fontsize=8)
            cax = ax.inset_axes([1.005, 0.0, 0.012, 1.0])
            fig.colorbar(im, cax=cax)
        for c, n in enumerate(names):
            at = _boundary(ex["positions"], ex["models"][n]["diverged_position"])
            if at is not None:
                ax.axvline(at + 0.08 * c, color=MODEL_COLOURS[c % len(MODEL_COLOURS)], lw=1.8, ls=":")
        if cut is not None:
            ax.axvline(cut, color="grey", lw=1, ls="--")
        ax.set_xlim(-0.5, P - 0.5)
        if what != "output":
            ax.set_xticks([])
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(ex["tokens"], rotation=90, fontsize=7)
    for label, kind in zip(axes[-1].get_xticklabels(), ex["kinds"]):
        label.set_color(KIND_COLOURS[kind])
    verdict = "; ".join(f"{n}: {'entered' if m['entered'] else 'left'} after {m['followed_steps']} step(s)"
                        for n, m in ex["models"].items())
    fig.suptitle(f"track {ex['track']} variant {ex['variant']} (prefix: question + {ex['prefix_steps']} step(s))\n"
                 f"{'; '.join(ex['edits'])[:150]}\n{verdict}   [dashed: prefix end, dotted: divergence, x: greedy miss]",
                 fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.93, top=1 - 1.1 / fig.get_figheight(), bottom=0.9 / fig.get_figheight(),
                        hspace=0.12)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def summary_figure(results: dict, path: str | Path) -> Path:
    """Entry rate, followed steps, divergence tags, layer similarity and anchor attention, model vs control."""
    import numpy as np

    plt = _plt()
    names = list(results["models"])
    js = list(results["models"][names[0]]["heldout"])
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    width = 0.8 / len(names)
    for c, n in enumerate(names):
        colour = MODEL_COLOURS[c % len(MODEL_COLOURS)]
        h = results["models"][n]["heldout"]
        xs = np.arange(len(js)) + c * width
        axes[0, 0].bar(xs, [h[j]["entry_rate"] for j in js], width, color=colour, label=f"{n} (modulo slots)")
        axes[0, 0].bar(xs, [h[j]["exact_entry_rate"] for j in js], width * 0.5, color="black", alpha=0.35,
                       label="exact" if c == 0 else None)
        axes[0, 1].bar(xs, [h[j]["followed_steps"] for j in js], width, color=colour, label=n)
        axes[0, 1].plot(xs, [h[j]["expected_steps"] for j in js], "_", ms=20, color="black",
                        label="steps to follow" if c == 0 else None)
        layers = results["models"][n]["layer_similarity"]
        axes[1, 0].plot(range(len(layers)), [np.nan if v is None else v for v in layers], "-o", color=colour,
                        label=f"{n}: to own source")
        other = results["models"][n]["layer_similarity_other_track"]
        if other:
            axes[1, 0].plot(range(len(other)), [np.nan if v is None else v for v in other], "--s", color=colour, alpha=0.6,
                            label=f"{n}: to another track")
        att = results["models"][n]["anchor_attention"]
        axes[1, 1].plot(range(1, len(att) + 1), att, "-o", color=colour, label=n)
        axes[1, 1].axhline(results["models"][n]["anchor_share"], color=colour, ls=":", lw=1)
    for ax, title, xl in ((axes[0, 0], "track-entry rate (held-out variants)", "prefix steps j"),
                          (axes[0, 1], "steps followed before diverging", "prefix steps j")):
        ax.set_xticks(np.arange(len(js)) + 0.4 - width / 2)
        ax.set_xticklabels(js)
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylim(0, 1.05)
    j0 = js[0]
    tags = sorted({t for n in names for t in results["models"][n]["heldout"][j0]["diverged_at_tag"]})
    bottom = np.zeros(len(names))
    for t in tags:
        vals = np.array([results["models"][n]["heldout"][j0]["diverged_at_tag"].get(t, 0) for n in names], dtype=float)
        axes[0, 2].bar(names, vals, bottom=bottom, label=f"<{t}>" if t else "text before a tag",
                       color=TAG_COLOURS.get(t, "#c49c94"))
        bottom += vals
    done = [results["models"][n]["heldout"][j0]["n"] - bottom[i] for i, n in enumerate(names)]
    axes[0, 2].bar(names, done, bottom=bottom, color="lightgrey", label="followed to the end")
    axes[0, 2].set_title(f"where continuations left the track (j={j0}): expected step tag")
    axes[0, 2].legend(fontsize=7)
    axes[1, 0].set_title("hidden-state cosine, variant vs source, aligned tokens")
    axes[1, 0].set_xlabel("layer (0 = embeddings)")
    axes[1, 0].xaxis.get_major_locator().set_params(integer=True)
    axes[1, 1].xaxis.get_major_locator().set_params(integer=True)
    axes[1, 0].legend(fontsize=7)
    axes[1, 1].set_title("attention mass on anchors (dotted: anchors' share)")
    axes[1, 1].set_xlabel("layer")
    axes[1, 1].legend(fontsize=7)
    axes[1, 2].axis("off")
    lib = results["library"]
    lines = [f"library: {lib['tracks']} tracks, {lib['train_chains']} training chains, {lib['heldout']} held out",
             f"table: {results['table']['domain']} v{results['table']['version']}", ""]
    for n in names:
        h = results["models"][n]["heldout"][j0]
        s = results["models"][n].get("sources")
        lines += [f"{n}: entry {h['entry_rate']:.2f} (exact {h['exact_entry_rate']:.2f})",
                  f"   followed {h['followed_steps']:.2f}/{h['expected_steps']:.2f} steps, {h['followed_units']:.1f} units",
                  f"   seen sources: entry {s['entry_rate']:.2f}" if s else ""]
    axes[1, 2].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(results: dict) -> str:
    """The probe's summary as Markdown tables."""
    names = list(results["models"])
    js = list(results["models"][names[0]]["heldout"])
    lib = results["library"]
    out = [f"# Track probe\n\n{lib['tracks']} tracks from {lib['path']}, {lib['train_chains']} training chains, "
           f"{lib['heldout']} held-out variants; table {results['table']['domain']} v{results['table']['version']}; "
           f"m = {results['config']['next_steps']} steps.\n"]
    for j in js:
        out += [f"\n## Held-out variants, prefix = question + {j} step(s)\n", "| measure | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
        for key in ("entry_rate", "exact_entry_rate", "followed_steps", "expected_steps", "followed_units", "completed_rate"):
            out.append(f"| {key} | " + " | ".join(_fmt(results["models"][n]["heldout"][j][key]) for n in names) + " |")
        out.append("| diverged at (expected tag) | " + " | ".join(
            ", ".join(f"{k} {v}" for k, v in results["models"][n]["heldout"][j]["diverged_at_tag"].items()) or "–"
            for n in names) + " |")
    if all("sources" in results["models"][n] for n in names):
        out.append("| source chains (seen): entry_rate | " + " | ".join(
            _fmt(results["models"][n]["sources"]["entry_rate"]) for n in names) + " |")
    layers = max(len(results["models"][n]["layer_similarity"]) for n in names)
    out += ["\n## Inside the model\n", "| layer | " + " | ".join(f"{n} cos (own source) | {n} cos (other track)" for n in names)
            + " |", "|---|" + "---|---|" * len(names)]
    for layer in range(layers):
        cells = []
        for n in names:
            m = results["models"][n]
            cells += [_fmt(m["layer_similarity"][layer]),
                      _fmt(m["layer_similarity_other_track"][layer]) if m["layer_similarity_other_track"] else "–"]
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    out.append("\n| anchor attention per layer | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    models = [results["models"][n] for n in names]
    out.append("| mass | " + " | ".join(", ".join(f"{a:.3f}" for a in m["anchor_attention"]) for m in models) + " |")
    out.append("| anchors' share of the window | " + " | ".join(_fmt(m["anchor_share"]) for m in models) + " |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Training a model on the library and a control on other chains, over one shared table
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PrepareConfig:
    """Sizes for training the probed model and its control (same architecture, steps and seed)."""

    steps: int = field(default=600, metadata={"help": "Training steps for each of the two models."})
    n_layer: int = field(default=2, metadata={"help": "Transformer blocks."})
    n_head: int = field(default=4, metadata={"help": "Attention heads."})
    n_embd: int = field(default=128, metadata={"help": "Embedding width."})
    batch_size: int = field(default=128, metadata={"help": "Windows per batch."})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    window: int = field(default=8, metadata={"help": "k: tokens the selector reads."})
    candidates: int = field(default=32, metadata={"help": "K: candidates per training row."})
    vocab_size: int = field(default=2000, metadata={"help": "Tokenizer vocabulary (trained on both chain sets)."})
    max_order: int = field(default=3, metadata={"help": "Longest table context."})
    seed: int = field(default=0, metadata={"help": "Training seed."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads during training."})


def prepare_models(client, domain: str, train: list[Chain], control: list[Chain], out: str | Path,
                   config: PrepareConfig | None = None, log=None) -> dict[str, Path]:
    """One tokenizer and one table over ``train`` + ``control`` chains (never the held-out variants); a model
    trained on ``train`` (the library's sources and training variants) and a control trained on ``control``.
    Returns {"model": folder, "control": folder}."""
    from overlay.dataset import DatasetConfig, build_dataset
    from overlay.table import SemanticTable, build_table, check_domain
    from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
    from overlay.train import TrainConfig
    from overlay.train import train as train_model

    config = config or PrepareConfig()
    log = log or (lambda *_: None)
    check_domain(domain)
    if not train or not control:
        raise ProbeError(f"need chains for both models (library training chains: {len(train)}, control chains: {len(control)})")
    out = Path(out)
    texts = [c.to_text() for c in train + control]
    tok = train_tokenizer(texts, vocab_size=config.vocab_size)
    stats = build_table(client, domain, (encode(tok, t) for t in texts), vocab_size=len(tok),
                        tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok),
                        max_order=config.max_order, source="track probe: library training chains + control chains")
    log(f"table {domain} v{stats.version}: {stats.sequences} chains, {stats.contexts} contexts")
    table = SemanticTable(client, domain)
    folders = {}
    for name, chains in (("model", train), ("control", control)):
        data = out / f"dataset-{name}"
        build_dataset(table, tok, chains, data, DatasetConfig(window=config.window, candidates=config.candidates,
                                                             seed=config.seed, dev_fraction=0.0))
        result = train_model(TrainConfig(
            data=str(data), out=str(out / name), arch="window", steps=config.steps, n_layer=config.n_layer, n_head=config.n_head,
            n_embd=config.n_embd, batch_size=config.batch_size, lr=config.lr, warmup=max(1, min(100, config.steps // 10)),
            eval_every=0, save_every=0, seed=config.seed, threads=config.threads, device="cpu"), progress=False)
        log(f"{name}: {len(chains)} chains, {result.rows_train} rows, loss {result.train_loss:.3f}, {result.seconds:.1f} s")
        folders[name] = Path(result.out)
    return folders


# ---------------------------------------------------------------------------------------------------------------
# Command line: overlay probe library | variants | prepare | tracks
# ---------------------------------------------------------------------------------------------------------------

probe_app = typer.Typer(help="Track probe: do held-out variants of trained chains re-enter their track?",
                        no_args_is_help=True)


def _console():
    from rich.console import Console

    return Console()


def _fail(message: str) -> None:
    _console().print(f"[bold red]error:[/] {' '.join(str(message).split())}")
    raise typer.Exit(2)


def _with_config(cls: type, extra: dict[str, tuple[Any, Any]]):
    """Decorator: a typer command whose options are ``extra`` plus the fields of dataclass ``cls`` (``config=``)."""
    import dataclasses
    import inspect

    from overlay.cliutil import dataclass_params

    def wrap(run):
        names = [f.name for f in dataclasses.fields(cls)]

        def command(**kwargs: Any) -> None:
            fields = {n: kwargs.pop(n) for n in names}
            try:
                config = cls(**fields)
            except ValueError as exc:
                _fail(str(exc))
            run(config=config, **kwargs)

        command.__signature__ = inspect.Signature(dataclass_params(cls, extra))  # type: ignore[attr-defined]
        command.__doc__ = run.__doc__
        return command
    return wrap


REDIS = (Optional[str], typer.Option(None, "--redis-url", envvar="OVERLAY_REDIS_URL",
                                     help="Redis URL; default: the embedded server."))


def _library_command(data: Path = typer.Option(..., "--data", help="GSM8K JSONL file."),
                     out: Path = typer.Option(..., "--out", help="YAML library to write."),
                     limit: int = typer.Option(50, "--limit", help="How many tracks."),
                     start: int = typer.Option(0, "--start", help="Skip the first N records.")) -> None:
    """Turn GSM8K records into a template library: question numbers used in the annotations become slots."""
    try:
        lib = library_from_gsm8k(data, limit, start)
    except OSError as exc:
        _fail(str(exc))
    if not lib.tracks:
        _fail(f"no record of {data} could be turned into a track ({len(lib.skipped)} skipped)")
    lib.save(out)
    reasons = Counter(r for _, r in lib.skipped)
    _console().print(f"[green]library[/] {out}: {len(lib.tracks)} tracks, {len(lib.skipped)} records skipped"
                     + (f" ({'; '.join(f'{r}: {n}' for r, n in reasons.most_common(3))})" if reasons else ""))


probe_app.command("library")(_library_command)


@probe_app.command("variants")
@_with_config(VariantConfig, {"library": (Path, typer.Option(..., "--library", help="YAML/JSONL library.")),
                              "out": (Path, typer.Option(..., "--out", help="Folder for train.jsonl / heldout.jsonl."))})
def _variants_command(library: Path, out: Path, config: VariantConfig) -> None:
    """Write the library's training chains (sources + training variants) and held-out variants as GSM8K JSONL."""
    try:
        vset = generate_variants(load_library(library), config)
    except ProbeError as exc:
        _fail(str(exc))
    paths = vset.write(out)
    _console().print(f"[green]variants[/] {len(vset.train)} training chains → {paths['train']}, "
                     f"{len(vset.heldout)} held out → {paths['heldout']}")


def _load_control(path: Path, start: int, limit: int, exclude: set[str]) -> list[Chain]:
    from overlay.chains import load_chains

    chains = load_chains(path, "gsm8k").chains
    return [c for c in chains if c.line > start and c.question not in exclude][:limit]


@probe_app.command("prepare")
@_with_config(PrepareConfig, {
    "library": (Path, typer.Option(..., "--library", help="YAML/JSONL library.")),
    "control_data": (Path, typer.Option(..., "--control-data", help="GSM8K JSONL the control model is trained on.")),
    "out": (Path, typer.Option(..., "--out", help="Folder for the datasets, model/ and control/.")),
    "domain": (str, typer.Option("probe", "--domain", help="Table domain to build.")),
    "control_start": (int, typer.Option(1000, "--control-start", help="Use control records after this line.")),
    "control_limit": (int, typer.Option(0, "--control-limit", help="Control chains; 0 = as many as training chains.")),
    "variants": (int, typer.Option(6, "--variants")), "heldout": (int, typer.Option(2, "--heldout")),
    "volatility": (float, typer.Option(0.5, "--volatility")), "variant_seed": (int, typer.Option(0, "--variant-seed")),
    "redis_url": REDIS})
def _prepare_command(library: Path, control_data: Path, out: Path, domain: str, control_start: int, control_limit: int,
                     variants: int, heldout: int, volatility: float, variant_seed: int, redis_url: Optional[str],
                     config: PrepareConfig) -> None:
    """Train a model on the library's training chains and a control on other chains, over one shared table."""
    from overlay import store
    from overlay.chains import ChainFormatError

    console = _console()
    try:
        vset = generate_variants(load_library(library), VariantConfig(variants, heldout, volatility, seed=variant_seed))
        vset.write(out)
        train = [v.chain for v in vset.train]
        exclude = {v.chain.question for v in vset.variants}
        control = _load_control(control_data, control_start, control_limit or len(train), exclude)
        folders = prepare_models(store.connect(redis_url), domain, train, control, out, config, log=console.print)
    except (ProbeError, ChainFormatError, ValueError, OSError, store.StoreUnavailable) as exc:
        _fail(str(exc))
    console.print(f"[green]ready[/]: overlay probe tracks --model {folders['model']} --control {folders['control']} "
                  f"--library {library} --domain {domain} --split {out / 'variants.json'} --out {out / 'report'}")


def infer_domain(model_dir: str | Path) -> str:
    """The table domain a selector was trained against (train_result.json → dataset manifest → table)."""
    try:
        result = json.loads((Path(model_dir) / "train_result.json").read_text())
        manifest = json.loads((Path(result["config"]["data"]) / "manifest.json").read_text())
        return manifest["table"]["domain"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise ProbeError(f"cannot tell which table {model_dir} was trained with: give the table domain") from None


def load_models(model_dir: str | Path, control_dir: str | Path | None = None) -> dict[str, tuple[Any, Any]]:
    """{"model": (model, tokenizer)[, "control": ...]} loaded from selector folders."""
    from overlay.selector import load_selector

    models = {"model": load_selector(model_dir)}
    if control_dir:
        models["control"] = load_selector(control_dir)
    return models


@probe_app.command("tracks")
@_with_config(ProbeConfig, {
    "model": (Path, typer.Option(..., "--model", help="Selector trained on the library's training chains.")),
    "library": (Path, typer.Option(..., "--library", help="YAML/JSONL library (or GSM8K JSONL).")),
    "out": (Path, typer.Option(..., "--out", help="Report folder: probe.json, probe.md, PNG figures.")),
    "control": (Optional[Path], typer.Option(None, "--control", help="Control selector trained without the library.")),
    "domain": (Optional[str], typer.Option(None, "--domain", help="Table domain; default: the model's training table.")),
    "split": (Optional[Path], typer.Option(None, "--split", help="variants.json from `probe variants`/`prepare`: "
                                           "the exact held-out variants (default: regenerate from --seed).")),
    "threads": (int, typer.Option(1, "--threads", help="torch CPU threads.")),
    "redis_url": REDIS})
def _tracks_command(model: Path, library: Path, out: Path, control: Optional[Path], domain: Optional[str],
                    split: Optional[Path], threads: int, redis_url: Optional[str], config: ProbeConfig) -> None:
    """Probe held-out variants: track-entry rate, followed length, divergence, layer similarity, figures."""
    import torch

    from overlay import store
    from overlay.table import SemanticTable, TableNotFound

    console = _console()
    if threads:
        torch.set_num_threads(threads)
    try:
        lib = load_library(library)
        models = load_models(model, control)
        table = SemanticTable(store.connect(redis_url), domain or infer_domain(model))
        results = probe_tracks(table, models, lib, out, config, log=console.print,
                               split=VariantSet.load(split) if split else None)
    except (ProbeError, ValueError, OSError, TableNotFound, store.StoreUnavailable) as exc:
        _fail(str(exc))
    console.print((out / "probe.md").read_text())
    console.print(f"[green]report[/] {out}: probe.json, probe.md, summary.png, {len(results['examples'])} example figure(s)")


# ---------------------------------------------------------------------------------------------------------------
# The Track Probe node's job (components/overlay/track_probe.py stays thin)
# ---------------------------------------------------------------------------------------------------------------


def probe_node(library: str | None, model_dir: str | None, control_dir: str | None = None, domain: str | None = None,
               out_dir: str | None = None, prefix_steps: str = "0,1", next_steps: int = 2, redis_url: str | None = None,
               variants: int = 6, heldout: int = 2, seed: int = 0, limit: int = 0, figures: int = 2,
               split: str | None = None) -> tuple[dict[str, Any], str, str]:
    """Run the probe with a node's settings (empty fields: $OVERLAY_MODEL_DIR, $OVERLAY_DOMAIN or the model's own
    table, $OVERLAY_REDIS_URL); returns (summary, Markdown report, status line)."""
    import os

    from overlay import store
    from overlay.langflow_support import ENV_DOMAIN, ENV_MODEL_DIR, NodeError, connect, setting
    from overlay.table import SemanticTable

    path = (library or "").strip()
    if not path:
        raise NodeError("no library given: fill Library Path with a YAML/JSONL track library or a GSM8K JSONL file")
    model = setting(model_dir, ENV_MODEL_DIR, "model folder")
    config = ProbeConfig(prefix_steps=str(prefix_steps or "0,1"), next_steps=int(next_steps), variants=int(variants),
                         heldout=int(heldout), seed=int(seed), limit=int(limit), figures=int(figures))
    lib = load_library(path)
    name = (domain or "").strip() or os.environ.get(ENV_DOMAIN, "").strip() or infer_domain(model)
    table = SemanticTable(connect(redis_url), name)
    out = (Path(out_dir.strip()) if (out_dir or "").strip()
           else store.data_dir() / "reports" / time.strftime("probe-%Y%m%d-%H%M%S"))
    results = probe_tracks(table, load_models(model, (control_dir or "").strip() or None), lib, out, config,
                           split=VariantSet.load(split.strip()) if (split or "").strip() else None)
    j = config.prefixes()[0]
    summary = {"report": str(out), "prefix_steps": j, "next_steps": config.next_steps,
               "heldout_variants": results["library"]["heldout"], "tracks": results["library"]["tracks"],
               "figures": [str(out / "summary.png")] + [str(out / e["png"]) for e in results["examples"]], "models": {}}
    for n, m in results["models"].items():
        h = m["heldout"][str(j)]
        summary["models"][n] = {k: h[k] for k in ("entry_rate", "exact_entry_rate", "followed_steps", "expected_steps",
                                                  "followed_units", "diverged_at_tag")} | {
            "layer_similarity": m["layer_similarity"], "layer_similarity_other_track": m["layer_similarity_other_track"],
            "anchor_attention": m["anchor_attention"], "anchor_share": m["anchor_share"]}
    status = "; ".join(f"{n}: entry {m['entry_rate']:.2f}, followed {m['followed_steps']:.2f}/{m['expected_steps']:.2f} steps"
                       for n, m in summary["models"].items())
    return summary, (out / "probe.md").read_text(), f"{status} on {results['library']['heldout']} held-out variants ({out})"
