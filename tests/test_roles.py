"""Tests for overlay.roles: number words, data-flow roles, binding by the words around a number, following a track."""

from __future__ import annotations

from overlay.chains import Chain, answers_match, parse_gsm8k_answer
from overlay.roles import (AbstractChain, Binding, abstract_chain, bind, bindings, check_roles, execute,
                           question_numbers, stem, words)


def chain(question: str, answer: str) -> Chain:
    steps, final, derived = parse_gsm8k_answer(answer)
    return Chain(question, steps, final, 1, derived)


def values(question: str) -> list[str]:
    return [n.value for n in question_numbers(question)]


def follow(track: AbstractChain, question: str) -> str | None:
    numbers = question_numbers(question)
    return execute(track, bind(track, question, numbers=numbers), numbers)[0]


TOM = chain("Tom has 3 boxes with 12 apples each. He eats 5 apples. How many apples are left?",
            "Tom has 3*12 = <<3*12=36>>36 apples.\nHe has 36-5 = <<36-5=31>>31 left.\n#### 31")


def test_number_words_are_numbers():
    assert values("Sam has three apples and twice as many pears.") == ["3", "2"]
    assert values("She ate half of the 10 cookies.") == ["2", "10"]
    assert values("He bought a dozen eggs and twenty-five apples.") == ["12", "25"]
    assert values("Natalia sold half as many clips in May.") == ["2"]
    assert values("A third of the 30 kids left.") == ["3", "30"]
    assert [n.word for n in question_numbers("three apples and 4 pears")] == [True, False]


def test_fraction_words_that_are_not_numbers():
    assert values("Sara had 100 pennies and 783 quarters in her bank.") == ["100", "783"]
    assert values("In the first half of the game they scored 3 goals.") == ["3"]
    assert values("He spent 14 half - dollars.") == ["14"]
    assert values("The third grade has 25 students.") == ["25"]
    assert values("How many quarters does she have?") == []


def test_stem_and_words():
    assert stem("bags") == stem("bag") and stem("cookies") == stem("cookie") and stem("borrowed") == stem("borrow")
    assert stem("glass") == "glass"
    assert words("He paid $ 5 for 20 % of it.") == ["he", "paid", "dollar", "#", "for", "#", "percent", "of", "it"]


def test_roles_reproduce_own_answer():
    track = abstract_chain(TOM)
    assert [t for t, _ in track.steps if t.endswith("ACTION>")]
    assert "{Q1}*{Q2}" in "".join(s for _, s in track.steps) and "{R1}-{Q3}" in "".join(s for _, s in track.steps)
    assert check_roles(track, TOM)
    assert answers_match(follow(track, TOM.question), "31")


def test_result_equal_to_a_question_number_is_data_flow():
    # 2*3 = 6 and Ben's 6 pens are a question number of the same value: the next step adds the result, not Ben's 6
    c = chain("Ann has 2 bags with 3 pens each. Ben has 6 pens. Ann finds 4 more pens. How many pens does Ann have?",
              "Ann has 2*3 = <<2*3=6>>6 pens.\nShe has 6+4 = <<6+4=10>>10 pens.\n#### 10")
    track = abstract_chain(c)
    text = "".join(s for _, s in track.steps).replace(" ", "")
    assert "{R1}+{Q4}" in text and "{Q3}" not in text
    assert check_roles(track, c)
    # followed with new numbers, the result flows (4*5 + 7), Ben's 9 is not used
    q = "Ann has 4 bags with 5 pens each. Ben has 9 pens. Ann finds 7 more pens. How many pens does Ann have?"
    assert answers_match(follow(track, q), "27")


def test_reordered_sentences_bind_by_anchor_not_position():
    track = abstract_chain(TOM)
    reordered = "He eats 5 apples. Tom has 3 boxes with 12 apples each. How many apples are left?"
    numbers = question_numbers(reordered)
    b = bind(track, reordered, numbers=numbers)
    bound = {track.numbers[t].value: numbers[j].value for t, j in b.slots.items()}
    assert bound == {"3": "3", "12": "12", "5": "5"}
    assert answers_match(execute(track, b, numbers)[0], "31")
    # new values and a new entity, reordered: still the same roles
    assert answers_match(follow(track, "Mia eats 4 pears. Mia has 6 crates with 10 pears each. How many pears are "
                                       "left?"), "56")


def test_number_word_binds_like_a_digit():
    track = abstract_chain(TOM)
    assert answers_match(follow(track, "Tom has three boxes with 12 apples each. He eats 5 apples. How many apples "
                                       "are left?"), "31")


def test_unit_noun_and_asked_entity_bind():
    # the track's first number counts what is asked; so must the bound one, though the nouns differ
    src = chain("Diane has 37 crayons. She gets 5 more from Frances. Later, Diane buys 16 cards at the store. "
                "How many crayons does Diane have in all?",
                "Diane has 37+5 = <<37+5=42>>42 crayons.\n#### 42")
    track = abstract_chain(src)
    q = "Annie has 6 apples. She gets 7 more from Nathan. Later, Annie buys 10 crayons at the store. How many " \
        "apples does Annie have in all?"
    assert answers_match(follow(track, q), "13")


def test_bindings_ranked_and_incomplete():
    track = abstract_chain(TOM)
    q = "Tom has 3 boxes with 12 apples each. He eats 5 apples. How many apples are left?"
    options = bindings(track, q, m=3)
    assert len(options) == 3 and options[0].slots == bind(track, q).slots
    assert [o.alternative for o in options] == [0, 1, 2]
    assert options[0].confidence >= options[1].confidence - 1e-9 or options[0].weakest >= 0
    short = bind(track, "Tom has 3 boxes. How many are left?")
    assert not short.complete and short.slots == {}


def test_abstract_chain_round_trip():
    track = abstract_chain(TOM)
    again = AbstractChain.from_dict(track.to_dict())
    assert again.steps == track.steps and [n.value for n in again.numbers] == ["3", "12", "5"]
    assert isinstance(bind(again, TOM.question), Binding)


def test_roles_decided_between_equal_values_are_counted_and_a_clean_family_form_wins():
    from overlay.tracks import make_tracks

    ann = chain("Ann has 2 bags with 3 pens each. Ben has 6 pens. Ann finds 4 more pens. How many pens does Ann have?",
                "Ann has 2*3 = <<2*3=6>>6 pens.\nShe has 6+4 = <<6+4=10>>10 pens.\n#### 10")
    clean = chain("Ann has 2 bags with 3 pens each. Ben has 7 pens. Ann finds 4 more pens. How many pens does Ann have?",
                  "Ann has 2*3 = <<2*3=6>>6 pens.\nShe has 6+4 = <<6+4=10>>10 pens.\n#### 10")
    assert abstract_chain(ann).coincidences > 0 and abstract_chain(clean).coincidences == 0
    assert abstract_chain(TOM).coincidences == 0
    kept = make_tracks([ann, clean], ["ann", "ann"])
    assert [t.question for t in kept] == [clean.question]
    assert len(make_tracks([ann], ["ann"])) == 1  # a family with no clean form keeps what it has
