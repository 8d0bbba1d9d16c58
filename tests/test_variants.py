"""Consistent variants (stellator data): tracks from GSM8K records and from chains of any format, variants that
recompute and verify, the surface/structure knobs, skip reasons, and the CLI that writes them."""

from __future__ import annotations

import gc
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import EXAMPLES
from overlay.chains import ACTION, RESULT, Chain, load_chains
from overlay.cli import app
from overlay.tools import calc
from overlay.variants import (VariantConfig, VariantError, chain_record, generate_variants, library_from_chains,
                              library_from_gsm8k, load_library, make_variants, stellator, track_from_dict,
                              track_from_gsm8k, verify_chain)

LIBRARY = Path(__file__).resolve().parent.parent / "examples" / "probe_library.yaml"
GSM8K = EXAMPLES / "gsm8k_train_sample.jsonl"
PROBE_EDITS = "numbers,names,entities,synonyms,reorder"
NATALIA = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                       "How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}


def write(tmp_path: Path, text: str, name: str = "lib.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def actions_recompute(chain) -> bool:
    """Every <ACTION> CALL calc(e) is followed by <RESULT> calc(e), and the answer is the last result."""
    steps = chain.steps
    pairs = [(a.text, r.text) for a, r in zip(steps, steps[1:]) if a.tag == ACTION and r.tag == RESULT]
    ok = all(calc(re.fullmatch(r"CALL calc\((.*)\)", a).group(1)) == r for a, r in pairs)
    return bool(pairs) and ok and pairs[-1][1] == chain.answer


# --- library and variants ------------------------------------------------------------------------------------------


def test_example_library_renders_and_recomputes():
    lib = load_library(LIBRARY)
    assert [t.id for t in lib.tracks] == ["clips", "wages", "shopping", "reading", "garden", "trip"]
    chain, values, text = lib.tracks[0].render(lib.tracks[0].source_values())
    assert chain.to_text().startswith("<Q> Natalia sold clips to 48 of her friends")
    assert "<ACTION> CALL calc(48/2) <RESULT> 24" in chain.to_text() and chain.answer == "72"
    assert values["may"] == "24" and values["total"] == "72" and text.endswith("#### 72")
    assert lib.tracks[3].rows[0] == {"name": "Julie", "pages": "120", "days": "4"}  # row mode


def test_variants_are_seeded_distinct_consistent_and_held_out():
    lib = load_library(LIBRARY)
    config = VariantConfig(variants=6, heldout=2, seed=3, volatility=0.5, edits=PROBE_EDITS)
    first, again = generate_variants(lib, config), generate_variants(lib, config)
    assert [v.chain.to_text() for v in first.variants] == [v.chain.to_text() for v in again.variants]
    other = generate_variants(lib, VariantConfig(variants=6, heldout=2, seed=4, volatility=0.5, edits=PROBE_EDITS))
    assert [v.chain.to_text() for v in first.variants] != [v.chain.to_text() for v in other.variants]
    for track in lib.tracks:
        mine = [v for v in first.variants if v.track == track.id]
        assert 6 <= len(mine) <= 7 and mine[0].index == 0 and not mine[0].heldout
        assert len({v.chain.to_text() for v in mine}) == len(mine)
        assert sum(v.heldout for v in mine) == 2
        assert all(actions_recompute(v.chain) for v in mine)
        assert all(v.edits for v in mine[1:])
    train = {v.chain.to_text() for v in first.train}
    assert not train & {v.chain.to_text() for v in first.heldout}
    edits = " ".join(e for v in first.variants for e in v.edits)
    for kind in ("number", "name", "entity", "synonym", "reorder", "row"):
        assert kind in edits


def test_variability_volatility_and_edit_kinds_control_the_changes():
    lib = load_library(LIBRARY)
    calm = generate_variants(lib, VariantConfig(variability=0.0, volatility=0.0, edits="numbers,merge,split,reorder"))
    for v in calm.variants[1:]:
        assert all(e.startswith(("number", "row")) for e in v.edits), v.edits
    with pytest.raises(VariantError, match="unknown edit kind"):
        VariantConfig(edits="numbers,colours")
    with pytest.raises(VariantError, match="heldout"):
        VariantConfig(variants=3, heldout=4)


def test_variant_files_load_as_gsm8k(tmp_path):
    vset = generate_variants(load_library(LIBRARY), VariantConfig(variants=5, heldout=1))
    paths = vset.write(tmp_path)
    train = load_chains(paths["train"], "gsm8k")
    assert not train.errors and [c.to_text() for c in train.chains] == [v.chain.to_text() for v in vset.train]
    assert len(load_chains(paths["heldout"], "gsm8k").chains) == len(vset.heldout) == 6
    assert json.loads(paths["variants"].read_text())["config"]["heldout"] == 1


def test_gsm8k_records_become_templates_that_recompute(tmp_path):
    track = track_from_gsm8k(NATALIA, 1)
    assert track.question.startswith("{name1} sold {item1} to {n1} of her friends")
    assert track.solution[0] == "{name1} sold {n1}/2 = <<{n1}/2=r1>>{r1} {item1} in May."
    assert track.slots == {"n1": ["48"], "name1": ["Natalia"], "item1": ["clips"]} and track.answer == "{r2}"
    chain, _, _ = track.render({"n1": "36", "name1": "Maria", "item1": "pencils"})
    assert "<ACTION> CALL calc(36+18) <RESULT> 54" in chain.to_text() and chain.answer == "54"
    lib = library_from_gsm8k(GSM8K, limit=20)
    assert len(lib.tracks) == 20 and lib.skipped  # records whose numbers are words are skipped, with a reason
    assert all(reason for _, reason in lib.skipped)
    vset = generate_variants(lib, VariantConfig(variants=5, heldout=2))
    assert all(actions_recompute(v.chain) for v in vset.variants if any(s.tag == ACTION for s in v.chain.steps))
    again = load_library(lib.save(tmp_path / "gsm8k.yaml"))
    assert [t.to_dict() for t in again.tracks] == [t.to_dict() for t in lib.tracks]
    assert len(load_library(GSM8K, limit=5).tracks) == 5  # a GSM8K file is a library too


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("tracks: []\n", "has no tracks"),
    ("", "has no tracks"),
    ("tracks:\n  - id: a\n    question: '{name} has {n1}'\n    solution: ['<<{n1}*{n2}=x>>']\n    slots: {name: [Tom], n1: [3]}\n",
     "solution line 1 uses slot {n2} but the library gives no value for it"),
    ("tracks:\n  - id: a\n    question: 'has {n1}'\n    solution: ['<<{n1}*2=x>>']\n    slots: [n1, n2]\n    values: [[3, 4], [5]]\n",
     "value list mismatch: row 2 of 'values' has 1 values for 2 slots"),
    ("tracks:\n  - id: a\n    question: 'has {n1}'\n    solution: ['<<{n1}*2=x>>']\n    slots: {n1: [3, four]}\n",
     "slot 'n1' is used in a calculation but its value 'four' is not a number"),
    ("tracks:\n  - id: a\n    question: 'has {n1}'\n    solution: ['<<{n1}*2=x>>']\n    slots: {n1: [3], n9: [1]}\n",
     "slot(s) n9 are declared but never used"),
    ("tracks:\n  - id: a\n    question: 'has {n1}'\n    solution: ['<<{n1}*2=x>>']\n    slots: {n1: []}\n",
     "slot 'n1' has no values"),
    ("tracks:\n  - id: a\n    question: 'has {n1}'\n    solution: ['<<{n1}/0=x>>']\n    slots: {n1: [3]}\n",
     "track 'a': solution line 1: calc: division by zero"),
    ("tracks: [", "is not valid YAML"),
])
def test_bad_libraries_say_what_is_wrong(tmp_path, text, message):
    with pytest.raises(VariantError) as info:
        load_library(write(tmp_path, text))
    assert message in str(info.value)


def test_missing_and_unconvertible_libraries(tmp_path):
    with pytest.raises(VariantError, match="library file not found"):
        load_library(tmp_path / "nope.yaml")
    words = {"question": "Two cats and three dogs. How many pets?", "answer": "2+3 = <<2+3=5>>5\n#### 5"}
    with pytest.raises(VariantError, match=r"has no tracks \(1 records skipped, first: no question number"):
        load_library(write(tmp_path, json.dumps(words) + "\n", "g.jsonl"))


# --- stellator data: structure edits, verification, skip reasons, other formats -------------------------------------


def test_merge_and_split_change_the_steps_and_still_verify():
    merged = make_variants(track_from_gsm8k(NATALIA, 1), VariantConfig(variants=4, heldout=0, volatility=1.0,
                                                                      edits="numbers,merge"))
    assert all("merge steps 1+2" in v.edits for v in merged[1:]) and len(merged) == 5
    for v in merged[1:]:
        actions = [s.text for s in v.chain.steps if s.tag == ACTION]
        n = re.search(r"to (\d+) of her", v.chain.question).group(1)
        assert actions == [f"CALL calc({n}+({n}/2))"] and verify_chain(v.chain) is None
    three = track_from_dict({"id": "sum", "question": "Tom has {a} red, {b} blue and {c} green pens. How many pens?",
                             "solution": ["He has {a}+{b}+{c} = <<{a}+{b}+{c}=t>>{t} pens."],
                             "slots": {"a": ["3"], "b": ["4"], "c": ["5"]}}, "sum")
    split = make_variants(three, VariantConfig(variants=3, heldout=0, volatility=1.0, edits="numbers,split"))
    for v in split[1:]:
        a, b, c = map(int, re.findall(r"\d+", v.chain.question))
        actions = [s.text for s in v.chain.steps if s.tag == ACTION]
        assert "split step 1" in v.edits and actions == [f"CALL calc({a}+{b})", f"CALL calc({a + b}+{c})"]
        assert v.chain.answer == str(a + b + c) and verify_chain(v.chain) is None


def test_a_variant_recomputes_its_results_and_a_tampered_one_does_not_verify():
    v = make_variants(track_from_gsm8k(NATALIA, 1), VariantConfig(variants=2, heldout=0, edits="numbers"))[1]
    assert verify_chain(v.chain) is None and v.chain.answer != "72"
    text = v.chain.to_text()
    result = next(s.text for s in v.chain.steps if s.tag == RESULT)
    wrong = Chain.from_text(text.replace(f"<RESULT> {result} ", f"<RESULT> {int(result) + 1} ", 1))
    assert "RESULT" in verify_chain(wrong) and "calculator gives" in verify_chain(wrong)
    bad_answer = Chain.from_text(text.replace(f"<ANSWER> {v.chain.answer}", "<ANSWER> 5"))
    assert "is not the checked value" in verify_chain(bad_answer)


def test_impossible_values_are_skipped_and_counted_by_reason():
    track = track_from_dict({"id": "left", "question": "Ann had {a} apples and ate {b}. How many are left?",
                             "solution": ["<<{a}-{b}=left>>"], "slots": {"a": ["10"], "b": ["9"]}}, "left")
    skipped: Counter = Counter()
    kept = make_variants(track, VariantConfig(variants=8, heldout=0, variability=1.0, edits="numbers"), skipped)
    assert skipped["impossible value: negative"] > 0 or skipped["impossible value: zero"] > 0
    assert all(int(v.chain.answer) > 0 for v in kept)


def test_stellator_on_the_sample_counts_everything_and_every_kept_variant_verifies():
    chains = load_chains(GSM8K).chains
    vset, stats = stellator(chains, VariantConfig(variants=3, heldout=1))
    assert stats["chains"] == len(chains) == stats["tracks"] + sum(stats["chains_skipped"].values())
    assert stats["verified"] == stats["train_chains"] + stats["heldout_chains"] == len(vset.variants)
    assert not stats["not_verified"] and sum(stats["draws_skipped"].values()) > 0
    assert 2 < stats["variants_per_chain"] <= 3 and stats["chains_with_variants"] <= stats["tracks"]
    assert {"number", "merge"} <= set(stats["edits"])
    assert not {v.chain.to_text() for v in vset.train} & {v.chain.to_text() for v in vset.heldout}


def test_chains_of_another_format_become_tracks(tmp_path):
    records = [{"question": "There are 41 short trees and 44 tall trees. Workers plant 57 short trees. How many short "
                            "trees are there now?", "steps": ["41 + 57 = 98"], "answer": "98"},
               {"question": "Conner has 25000 dollars and spends 1500 dollars a month. How much is left after 8 months?",
                "equation": "25000 - (1500 * 8)", "answer": "13000"},
               {"question": "What is two plus two?", "steps": ["two plus two is four"], "answer": "4"}]
    data = write(tmp_path, "".join(json.dumps(r) + "\n" for r in records), "m.jsonl")
    chains = load_chains(data, "jsonl").chains
    assert chain_record(chains[0])["answer"] == "= <<41+57=98>>98\n#### 98"
    lib = library_from_chains(chains)
    assert len(lib.tracks) == 2 and len(lib.skipped) == 1
    vset = generate_variants(lib, VariantConfig(variants=3, heldout=1, edits="numbers"))
    assert all(verify_chain(v.chain) is None for v in vset.variants)
    assert any("calc(25000-(1500*8))" not in v.chain.to_text() for v in vset.variants if v.track == lib.tracks[1].id)


def test_cli_writes_stellator_files_and_stats(tmp_path):
    out = tmp_path / "stel"
    result = CliRunner().invoke(app, ["dataset", "variants", "--data", str(GSM8K), "--limit", "40", "--out", str(out),
                                      "--variants", "3", "--heldout", "1", "--volatility", "0.5"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["chains"] == 40 and stats["verified"] == stats["train_chains"] + stats["heldout_chains"]
    assert f"{stats['verified']} of {stats['verified']} chains verify" in result.output
    assert len(load_chains(out / "train.jsonl").chains) == stats["train_chains"]
    bad = CliRunner().invoke(app, ["dataset", "variants", "--data", str(GSM8K), "--out", str(out), "--variability", "2"])
    assert bad.exit_code != 0 and "variability must be in [0, 1]" in bad.output


# --- numbers from occurrences, not values (issue 28) -----------------------------------------------------------------


def numbers_in(text: str) -> list[int]:
    """The question's numbers in order (its text is the only thing a reader has)."""
    return [int(n) for n in re.findall(r"\d+", text)]


def variants_of(record: dict, **config) -> list:
    """The source and its number variants (many draws), or the VariantError that skipped the record."""
    return make_variants(track_from_gsm8k(record, 1), VariantConfig(variants=12, heldout=0, variability=1.0,
                                                                    edits="numbers", **config))


DALE = {"question": "Dale and Andrew had breakfast at a cafe. A slice of toast costs £1, and eggs cost £3 each. Dale had 2 "
                    "slices of toast and 2 eggs. Andrew had 1 slice of toast and 2 eggs. How much did their breakfast cost?",
        "answer": "The cost of Dale's toast is 2 × $1 = $<<2*1=2>>2.\nThe cost of Andrew's toast is 1 × $1 = $<<1*1=1>>1.\n"
                  "The cost of Dale's eggs is 2 × $3 = $<<2*3=6>>6.\nThe cost of Andrew's eggs is 2 × $3 = $<<2*3=6>>6.\n"
                  "Their breakfast cost $2 + $1 + $6 + $6 = $<<2+1+6+6=15>>15.\n#### 15"}
PENS = {"question": "Tom buys 2 pens. Each pen costs $2. He also buys 3 notebooks for $5 each. How much does he spend?",
        "answer": "The pens cost 2 x $2 = $<<2*2=4>>4.\nThe notebooks cost 3 x $5 = $<<3*5=15>>15.\n"
                  "He spends $4 + $15 = $<<4+15=19>>19.\n#### 19"}
PACKS = {"question": "Sara buys 3 packs of 4 pens. Her friend gives her 12 pencils. How many pens and pencils does she have?",
         "answer": "Sara has 3 * 4 = <<3*4=12>>12 pens.\nShe has 12 pens + 12 pencils = <<12+12=24>>24 pens and pencils.\n#### 24"}
GROVE = {"question": "Jack has a grove with 4 trees by 5 trees. It takes 6 minutes to clean each tree. He gets help to clean "
                     "the trees so it only takes half as long. How many hours did he spend cleaning trees?",
         "answer": "There were 4*5=<<4*5=20>>20 trees to clean\nSo it took 20*6=<<20*6=120>>120 minutes\n"
                   "That is 120/60=<<120/60=2>>2 hours\nSo he spent 2/2=<<2/2=1>>1 hour cleaning\n#### 1"}
CLASS = {"question": "There are 40 students in a class. 3/4 of them are in the classroom and the rest are in the canteen. "
                     "How many students are in the canteen?",
         "answer": "3/4 x 40 = <<3/4*40=30>>30 students are in the classroom.\n"
                   "So 40 - 30 = <<40-30=10>>10 students are in the canteen.\n#### 10"}


@pytest.mark.parametrize(("record", "gold"), [
    (DALE, lambda n: n[2] * n[0] + n[4] * n[0] + n[3] * n[1] + n[5] * n[1]),  # toast, eggs: 2 slices ≠ 2 eggs ≠ result 2
    (PENS, lambda n: n[0] * n[1] + n[2] * n[3]),  # a count of 2 and a price of 2
    (PACKS, lambda n: n[0] * n[1] + n[2]),  # the question's 12 pencils equal the result 12 pens
])
def test_a_repeated_value_or_a_result_equal_to_a_question_number_keeps_its_meaning(record, gold):
    variants = variants_of(record)
    assert len(variants) > 3
    for v in variants:
        assert v.chain.answer == str(gold(numbers_in(v.chain.question))), (v.chain.question, v.gsm8k_answer)
        assert verify_chain(v.chain) is None


def test_the_issue_example_no_longer_multiplies_the_eggs_by_the_toast_cost():
    track = track_from_gsm8k(DALE, 76)
    assert "{r1}" not in "".join(track.solution[1:4])  # Dale's toast cost (2) is used only in the total
    eggs = track.solution[2]
    assert "<<{n1}" not in eggs and "{n2}=r3" in eggs


def test_a_number_that_may_be_a_result_or_a_constant_skips_the_track_with_the_reason():
    with pytest.raises(VariantError, match="^ambiguous number: a result or a constant"):
        track_from_gsm8k(GROVE, 1)  # "half as long" is 2 and so is the 2 hours: 2/2 cannot be told apart
    written = {"question": "Kevin has 15 phones and repairs 3. A client brings 6 more. He and a coworker each fix half. "
                           "How many phones does each fix?",
               "answer": "Kevin has 15 - 3 = <<15-3=12>>12 phones left.\nWith the client's, 12 + 6 = 18 phones, so each "
                         "fixes 18 / 2 = <<18/2=9>>9 phones.\n#### 9"}
    with pytest.raises(VariantError, match="^ambiguous number: arithmetic written in the text, not calculated"):
        track_from_gsm8k(written, 1)  # 12 + 6 = 18 is written, not calculated: a variant could not recompute it
    unused = written | {"answer": written["answer"].replace("12 + 6 = 18 phones", "that makes 18 phones")}
    with pytest.raises(VariantError, match="^ambiguous number: a result no later step uses"):
        track_from_gsm8k(unused, 1)  # the 12 phones left feed no calculation: the 18 after it is not recomputed


@pytest.mark.parametrize(("question", "answer", "reason"), [
    ("Tom has 5 boxes of pens. How many pens does he have?", "Each box holds 13 pens, so 5*13 = <<5*13=65>>65 pens.\n"
     "#### 65", "a number neither in the question nor calculated"),
    ("Amy watches 35 minutes of a film, and a rewind adds 5 minutes. She watches 45 minutes more, and a rewind adds 15 "
     "minutes. She watches the last 20 minutes. How long did it take?",
     "The film is 20 + 15 + 45 + 20 = <<20+15+45+20=100>>100 minutes.\nRewinding added 5 + 15 = <<5+15=20>>20 minutes.\n"
     "In all 100 + 20 = <<100+20=120>>120 minutes.\n#### 120", "a question number split in the head"),
])
def test_numbers_the_solution_works_out_without_the_calculator_skip_the_track(question, answer, reason):
    with pytest.raises(VariantError, match=f"^ambiguous number: {reason}$"):
        track_from_gsm8k({"question": question, "answer": answer}, 1)  # 13 per box and 35 = 20 + 15 are in no step


def test_a_fraction_of_a_group_stays_below_one_unless_it_was_above_in_the_source():
    skipped: Counter = Counter()
    variants = make_variants(track_from_gsm8k(CLASS, 1), VariantConfig(variants=12, heldout=0, variability=1.0,
                                                                        edits="numbers"), skipped)
    assert len(variants) > 3
    for v in variants:
        a, b, total = numbers_in(v.chain.question)[1:3] + numbers_in(v.chain.question)[:1]
        assert a < b and v.chain.answer == str(total - total * a // b), v.chain.question
    assert skipped["implausible value: a fraction of a group above 1"] > 0
    more = {"question": CLASS["question"].replace("3/4 of them are in the classroom and the rest are in the canteen",
                                                  "5/4 of that many are in the school choir"),
            "answer": "5/4 x 40 = <<5/4*40=50>>50 students are in the choir.\n#### 50"}
    assert any(numbers_in(v.chain.question)[1] >= numbers_in(v.chain.question)[2] for v in variants_of(more)[1:])


def test_stats_count_ambiguous_tracks_and_implausible_draws(tmp_path):
    data = write(tmp_path, "".join(json.dumps(r) + "\n" for r in (DALE, GROVE, CLASS, NATALIA)), "g.jsonl")
    out = tmp_path / "stel"
    result = CliRunner().invoke(app, ["dataset", "variants", "--data", str(data), "--out", str(out), "--variants", "6",
                                      "--heldout", "1", "--variability", "1", "--edits", "numbers"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["chains_skipped"] == {"ambiguous number: a result or a constant": 1} and stats["tracks"] == 3
    assert stats["draws_skipped"].get("implausible value: a fraction of a group above 1", 0) > 0


# --- the hand-checked samples: held-out variants of GSM8K train before and after the fix ------------------------------

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def checked(name: str) -> list[dict]:
    """A hand-checked sample: 50 held-out variants drawn at random with a fixed seed from the full GSM8K train run
    (before: the generator of commit 29f4985; after: the fixed one), each read and labelled right or wrong (does the
    gold follow from the variant's own question?), with a reason for a wrong one and its source record."""
    return [json.loads(line) for line in (FIXTURES / f"variants_checked_{name}.jsonl").read_text().splitlines()]


def regenerate(record: dict, tmp_path: Path) -> list | str:
    """The variants the generator makes today from the record's source, as in the full run (its track id, the
    run's settings), or why the source is skipped. The cyclic GC is off meanwhile: calc's CPU-time limit counts a
    collection's pause, and a calculation it fails would shift the draws."""
    source = write(tmp_path, json.dumps(record["source"]) + "\n", "source.jsonl")
    chain = load_chains(source).chains[0]
    chain.line = int(record["track"].rpartition("-")[2])
    gc.disable()
    try:
        lib = library_from_chains([chain])
        return make_variants(lib.tracks[0], VariantConfig(variants=4, heldout=2)) if lib.tracks else lib.skipped[0][1]
    finally:
        gc.enable()


def test_the_hand_checked_sample_after_the_fix_has_at_most_one_wrong_gold_and_is_what_the_generator_makes(tmp_path):
    after = checked("after")
    assert len(after) >= 50 and sum(r["label"] == "wrong" for r in after) <= 1
    for r in after:
        v = regenerate(r, tmp_path)[r["variant"]]
        assert (v.chain.question, v.gsm8k_answer) == (r["question"], r["answer"])
        assert v.gsm8k_answer.rpartition("####")[2].strip() == r["gold"]


def test_the_wrong_golds_found_before_the_fix_are_no_longer_made(tmp_path):
    before = checked("before")
    wrong = [r for r in before if r["label"] == "wrong"]
    assert len(before) >= 50 and len(wrong) == 11 and all(r["reason"] for r in wrong)
    for r in wrong:
        made = regenerate(r, tmp_path)
        assert isinstance(made, str) or all((v.chain.question, v.gsm8k_answer) != (r["question"], r["answer"])
                                            for v in made)
