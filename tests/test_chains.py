"""Tests for overlay.chains: GSM8K / generic JSONL conversion, errors per record, text round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlay.chains import (
    ACTION, ANSWER, CHECK, EOS, Q, RESULT, SPECIAL_TOKENS, STEP_TAGS, THOUGHT,
    Chain, ChainFormatError, Step, answers_match, convert_line, load_chains, parse_gsm8k_answer,
)

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts are JSON-encoded, strings written as they are) one per line."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_special_tokens_order():
    assert SPECIAL_TOKENS == ["<PAD>", "<UNK>", "<BOS>", "<EOS>", "<Q>", "<THOUGHT>", "<ACTION>",
                              "<RESULT>", "<CHECK>", "<ANSWER>"]
    assert STEP_TAGS == (THOUGHT, ACTION, RESULT, CHECK, ANSWER)


def test_gsm8k_record_exact_text(tmp_path):
    report = load_chains(write_jsonl(tmp_path / "a.jsonl", [NATALIA]))
    assert report.errors == [] and report.noisy == 0
    (chain,) = report.chains
    assert chain.line == 1 and chain.check_derived and chain.answer == "72"
    assert chain.to_text() == (
        f"<Q> {NATALIA['question']} "
        "<THOUGHT> Natalia sold 48/2 clips in May. <ACTION> CALL calc(48/2) <RESULT> 24 "
        "<THOUGHT> Natalia sold 48+24 clips altogether in April and May. <ACTION> CALL calc(48+24) <RESULT> 72 "
        "<CHECK> calc(48+24) = 72 <ANSWER> 72 <EOS>"
    )


def test_gsm8k_annotation_variants():
    steps, answer, derived = parse_gsm8k_answer(
        "He pays 12 / 60 = $<<12 / 60=0.2>>0.2 a minute and earns <<5*2=10>>10 more.\n"
        "Then <<1,000+200=1,200>>1,200 in total, and 3 more.\n#### 1,200")
    assert answer == "1200" and derived
    assert [(s.tag, s.text) for s in steps] == [
        (THOUGHT, "He pays 12 / 60 a minute and earns 5*2 more."),
        (ACTION, "CALL calc(12/60)"), (RESULT, "0.2"), (ACTION, "CALL calc(5*2)"), (RESULT, "10"),
        (THOUGHT, "Then 1000+200 in total, and 3 more."), (ACTION, "CALL calc(1000+200)"), (RESULT, "1200"),
        (CHECK, "calc(1000+200) = 1200"),
    ]


def test_gsm8k_noisy_record_kept_and_counted(tmp_path):
    noisy = {"question": "Sam has 4 and gets 6. How many?",
             "answer": "Carlos has 24/6=<<24/6=4>>4.\nSam memorized 4+6=10 digits.\n#### 10"}
    report = load_chains(write_jsonl(tmp_path / "n.jsonl", [NATALIA, noisy]))
    assert len(report.chains) == 2 and report.noisy == 1 and report.errors == []
    chain = report.chains[1]
    assert not chain.check_derived and chain.line == 2
    assert chain.steps[-1] == Step(CHECK, "10 = 10")
    assert chain.to_text().endswith("<THOUGHT> Sam memorized 4+6=10 digits. <CHECK> 10 = 10 <ANSWER> 10 <EOS>")
    assert "1 noisy" in report.summary()


def test_generic_jsonl_list_and_newline_steps(tmp_path):
    recs = [
        {"q": "What is 2+3 doubled?", "s": ["Add: 2+3 = <<2+3=5>>5.", "Double it: <<5*2=10>>10."], "a": 10},
        {"q": "Name?", "s": "First think.\n\nThen answer.", "a": " Bob "},
    ]
    report = load_chains(write_jsonl(tmp_path / "g.jsonl", recs), fmt="jsonl",
                         question_field="q", steps_field="s", answer_field="a")
    assert report.errors == [] and len(report.chains) == 2 and report.noisy == 1
    assert report.chains[0].to_text() == (
        "<Q> What is 2+3 doubled? <THOUGHT> Add: 2+3. <ACTION> CALL calc(2+3) <RESULT> 5 "
        "<THOUGHT> Double it: 5*2. <ACTION> CALL calc(5*2) <RESULT> 10 <CHECK> calc(5*2) = 10 <ANSWER> 10 <EOS>")
    assert report.chains[1].to_text() == (
        "<Q> Name? <THOUGHT> First think. <THOUGHT> Then answer. <CHECK> Bob = Bob <ANSWER> Bob <EOS>")
    assert not report.chains[1].check_derived


def test_bad_records_reported_with_line_and_reason(tmp_path):
    good = {"question": "Q?", "steps": ["s"], "answer": "1"}
    lines = [
        good,                                             # 1 ok
        "{not json",                                      # 2 malformed JSON
        "",                                               # 3 blank: skipped, no error
        {"steps": ["s"], "answer": "1"},                  # 4 missing question
        {"question": "  ", "steps": ["s"], "answer": "1"},  # 5 empty question
        {"question": "Q?", "steps": [], "answer": "1"},   # 6 no steps
        {"question": "Q?", "steps": ["s"]},               # 7 no answer
        "x" * 100_001,                                    # 8 too long
        "[1, 2]",                                         # 9 not an object
        {"question": "Q <FOO> ?", "steps": ["s"], "answer": "1"},  # 10 tag-like token
        good,                                             # 11 ok
    ]
    report = load_chains(write_jsonl(tmp_path / "bad.jsonl", lines), fmt="jsonl")
    assert [c.line for c in report.chains] == [1, 11]
    reasons = dict(report.errors)
    assert sorted(reasons) == [2, 4, 5, 6, 7, 8, 9, 10]
    assert reasons[2].startswith("malformed JSON") and "line 2" in reasons[2]
    assert reasons[4] == "missing field 'question': record has fields 'steps', 'answer'"
    assert reasons[5].startswith("missing question")
    assert reasons[6].startswith("no steps")
    assert reasons[7] == "missing field 'answer': record has fields 'question', 'steps'"
    assert reasons[8].startswith("line too long")
    assert reasons[9].startswith("record is not a JSON object")
    assert "<FOO>" in reasons[10]
    assert "8 errors" in report.summary()


def test_gsm8k_missing_hash_line_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [NATALIA, {"question": "Q?", "answer": "no final line"}, NATALIA])
    report = load_chains(path)
    assert report.errors == [(2, "no '####' answer line")] and len(report.chains) == 2
    assert len(load_chains(path, limit=1).chains) == 1
    with pytest.raises(ChainFormatError, match="no '####'"):
        parse_gsm8k_answer("just text")


def test_missing_or_empty_file_raises(tmp_path):
    with pytest.raises(ChainFormatError, match="nope.jsonl"):
        load_chains(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ChainFormatError, match="empty.jsonl"):
        load_chains(empty)


@pytest.mark.parametrize("name", ["gsm8k_train_sample.jsonl", "gsm8k_test_sample.jsonl"])
def test_round_trip_on_samples(name):
    report = load_chains(DATA / name)
    assert report.errors == [] and len(report.chains) == {"gsm8k_train_sample.jsonl": 300}.get(name, 100)
    for chain in report.chains:
        text = chain.to_text()
        back = Chain.from_text(text)
        assert back.to_text() == text
        assert back == Chain(chain.question, chain.steps, chain.answer, 0, chain.check_derived)
        assert text.startswith(Q) and text.endswith(f"{ANSWER} {chain.answer} {EOS}")


@pytest.mark.parametrize("text, message", [
    ("<THOUGHT> x <ANSWER> 1 <EOS>", "start with <Q>"),
    ("hello <Q> q <ANSWER> 1", "start with <Q>"),
    ("<Q> q <THOUGHT> x <EOS>", "<ANSWER>"),
    ("<Q> q <FOO> x <ANSWER> 1 <EOS>", "unknown tag <FOO>"),
    ("<Q> q <PAD> <ANSWER> 1 <EOS>", "misplaced special token <PAD>"),
    ("<Q>  <ANSWER> 1 <EOS>", "empty question"),
    ("<Q> q <ANSWER>  <EOS>", "empty answer"),
    ("<Q> q <ANSWER> 1 <ANSWER> 2 <EOS>", "exactly one <ANSWER>"),
    ("<Q> q <Q> r <ANSWER> 1 <EOS>", "more than one <Q>"),
    ("<Q> q <RESULT> 3 <ANSWER> 3 <EOS>", "must directly follow"),
    ("", "start with <Q>"),
])
def test_from_text_errors(text, message):
    with pytest.raises(ChainFormatError, match=message):
        Chain.from_text(text)


def test_from_text_accepts_bos_and_missing_eos():
    chain = Chain.from_text("<BOS> <Q> q? <ACTION> CALL calc(1+1) <RESULT> 2 <CHECK> 2 = 2 <ANSWER> 2")
    assert chain.question == "q?" and chain.answer == "2" and not chain.check_derived
    assert [s.tag for s in chain.steps] == [ACTION, RESULT, CHECK]


def test_field_mapping_joins_question_fields(tmp_path):
    rec = {"Body": "Tom has 3 apples.", "Question": "How many after 4 more?", "Solution": ["3 + 4 = 7"], "Final": 7.0}
    path = write_jsonl(tmp_path / "m.jsonl", [rec])
    report = load_chains(path, "jsonl", question_field=["Body", "Question"], steps_field="Solution", answer_field="Final")
    assert report.errors == [] and report.noisy == 0
    assert report.chains[0].to_text() == ("<Q> Tom has 3 apples. How many after 4 more? <ACTION> CALL calc(3+4) "
                                          "<RESULT> 7 <CHECK> calc(3+4) = 7.0 <ANSWER> 7.0 <EOS>")


def test_missing_fields_named_with_the_fields_found(tmp_path):
    recs = [{"Body": "b", "Question": "q?", "Equation": "1+1", "Answer": 2}] * 3
    report = load_chains(write_jsonl(tmp_path / "x.jsonl", recs), "jsonl", steps_field="solution")
    reason = "missing fields 'question', 'answer', 'solution': record has fields 'Body', 'Question', 'Equation', 'Answer'"
    assert report.chains == [] and report.errors == [(1, reason), (2, reason), (3, reason)]
    summary = report.summary()
    assert "\n" not in summary and summary.endswith(
        "missing fields 'question', 'answer', 'solution': 3 (first at line 1: record has fields 'Body', 'Question', "
        "'Equation', 'Answer')")


@pytest.mark.parametrize("line, thought, expr, result", [
    ("56 * 9 = 504", None, "56*9", "504"),
    ("x = 12/3 = 4", "x = 12/3", "12/3", "4"),
    ("Together 20 + 15 => 35", "Together 20 + 15", "20+15", "35"),
    ("So 12 + 3 = 15 apples.", "So 12 + 3 apples.", "12+3", "15"),
    ("Cost: $1,250 × 2 = $2,500", "Cost: $1,250 × 2", "1250*2", "2500"),
    ("(5 + 7) / 3 = 12/3 = 4 each", "(5 + 7) / 3 = 12/3 each", "(5+7)/3", "4"),
    ("3 + 4 = 7 * 2 = 14", None, "7*2", "14"),
    ("He pays 10 / 4 = 2.5 dollars", "He pays 10 / 4 dollars", "10/4", "2.5"),
])
def test_inline_arithmetic_becomes_action_result(line, thought, expr, result):
    steps, calls = convert_line(line)
    want = ([Step(THOUGHT, thought)] if thought else []) + [Step(ACTION, f"CALL calc({expr})"), Step(RESULT, result)]
    assert steps == want and not any(c.corrected for c in calls)


@pytest.mark.parametrize("line", ["Add the two amounts.", "On 12/3 they met 4 friends.", "12/16 = 3/4", "x = 5",
                                  "20% of 50 = 10", "5 / 0 = 0"])
def test_steps_without_computable_arithmetic_stay_thoughts(line):
    assert convert_line(line) == ([Step(THOUGHT, line)], [])


def test_inline_result_is_the_calculators_and_disagreements_are_counted(tmp_path):
    recs = [{"question": "7 boxes of 8?", "steps": ["Multiply.", "7 * 8 = 54 pens"], "answer": "56"},
            {"question": "Split 10 in 3?", "steps": "10 / 3 = 3.33", "answer": "3.333333333"}]
    report = load_chains(write_jsonl(tmp_path / "c.jsonl", recs), "jsonl")
    assert report.corrected == 2 and report.noisy == 0 and "2 written results corrected" in report.summary()
    assert report.chains[0].to_text() == ("<Q> 7 boxes of 8? <THOUGHT> Multiply. <THOUGHT> 7 * 8 pens <ACTION> CALL "
                                          "calc(7*8) <RESULT> 56 <CHECK> calc(7*8) = 56 <ANSWER> 56 <EOS>")
    assert [s.text for s in report.chains[1].steps if s.tag == RESULT] == ["3.333333333"]


def test_equation_used_when_steps_hold_no_arithmetic(tmp_path):
    recs = [{"question": "27 rows of 16 chairs?", "equation": "X=(27.0*16.0)", "steps": ["Multiply rows by chairs."],
             "answer": "432"},
            {"question": "41 and 57 trees?", "equation": "41 + 57", "answer": "98"},
            {"question": "q?", "equation": "41 + 57", "steps": ["41 + 58 = 99"], "answer": "99"}]
    report = load_chains(write_jsonl(tmp_path / "e.jsonl", recs), "jsonl")
    assert report.errors == [] and report.noisy == 0
    assert [s.text for s in report.chains[0].steps] == ["Multiply rows by chairs.", "CALL calc((27.0*16.0))", "432",
                                                      "calc((27.0*16.0)) = 432"]
    assert [s.text for s in report.chains[1].steps] == ["CALL calc(41+57)", "98", "calc(41+57) = 98"]
    assert [s.text for s in report.chains[2].steps] == ["CALL calc(41+58)", "99", "calc(41+58) = 99"]
    without = load_chains(tmp_path / "e.jsonl", "jsonl", equation_field=None)
    assert without.errors == [(2, "missing field 'steps': record has fields 'question', 'equation', 'answer'")]


def test_mawps_shaped_records_convert(tmp_path):
    recs = [{"id": "m-1", "question": "Bryan has 56 books in each of his 9 bookshelves. How many books?",
             "equation": "56 * 9", "steps": ["56 * 9 = 504"], "answer": "504"},
            {"id": "m-3", "question": "Conner has 25000 dollars and spends 1500 a month. How much after 8 months?",
             "equation": "25000 - (1500 * 8)", "steps": ["25000 - (1500 * 8) = 13000"], "answer": "13000"},
            {"id": "m-5", "question": "2.99 dollars for a 12 pack. Each can?", "equation": "2.99 / 12",
             "steps": ["2.99 / 12 = 0.25"], "answer": "0.25"}]
    report = load_chains(write_jsonl(tmp_path / "mawps.jsonl", recs), "jsonl")
    assert report.errors == [] and report.noisy == 1 and report.corrected == 1
    assert report.chains[1].to_text().endswith("<ACTION> CALL calc(25000-(1500*8)) <RESULT> 13000 "
                                               "<CHECK> calc(25000-(1500*8)) = 13000 <ANSWER> 13000 <EOS>")
    assert [s.text for s in report.chains[2].steps] == ["CALL calc(2.99/12)", "0.2491666667", "0.25 = 0.25"]


def test_gsm8k_results_are_the_calculators():
    steps, answer, derived = parse_gsm8k_answer("It costs 8*18 = $<<8*18=144.00>>144.00 in all.\n#### 144")
    assert [s.text for s in steps] == ["It costs 8*18 in all.", "CALL calc(8*18)", "144", "calc(8*18) = 144"]
    assert derived and answer == "144"


@pytest.mark.parametrize("got, want, same", [
    ("250", "250 m", True), ("$78.20", "78.2", True), ("1,000", "1000", True), ("72.0", "72", True),
    ("-5", "-$5", True), ("50%", "50", True), ("0.8333333333", "0.8333333333333334", True), ("5 apples", "5", True),
    ("72", "73", False), ("0.25", "0.2491666667", False), ("1000000000", "1000000001", False), (None, "1", False),
    ("Bob", " Bob ", True), ("Bob", "Ann", False), ("3/4", "3", False), ("", "0", False),
])
def test_answers_match(got, want, same):
    assert answers_match(got, want) is same
