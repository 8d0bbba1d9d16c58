"""Answer voting: the pure vote over hand-made chains, then decode_voted on a real table and a tiny trained selector."""

from __future__ import annotations

import pytest

from overlay.chains import answers_match, load_chains
from overlay.decode import DecodeConfig, DecodeResult, OverlayDecoder
from overlay.generation import generation_markdown, verification_success
from overlay.selector import load_selector
from overlay.table import SemanticTable
from overlay.vote import (RULES, SAMPLE_TEMPERATURE, SAMPLE_TOP_P, check_samples, decode_voted, passes_checks,
                          sample_settings, vote)

from conftest import EXAMPLES

CHAINS = load_chains(EXAMPLES / "gsm8k_test_sample.jsonl", limit=3).chains
QUESTION = CHAINS[0].question


def chain(answer: str | None, verdicts: tuple[str, ...] = ("pass",), score: float = -1.0,
          stop: str = "answer") -> DecodeResult:
    """A decoded chain made by hand: its answer, CHECK verdicts and mean log-prob (over 10 chosen tokens)."""
    checks = " ".join(f"<CHECK> {i} = {i}" for i in range(len(verdicts)))
    text = f"<Q> how many? <THOUGHT> count {checks}" + (f" <ANSWER> {answer}" if answer is not None else "")
    return DecodeResult(question="how many?", text=text, answer=answer, stop_reason=stop, steps=[],
                        verdicts=[{"claim": f"{i} = {i}", "verdict": v, "reason": ""} for i, v in enumerate(verdicts)],
                        tool_calls=[], errors=[], trace={"log_score": 10 * score, "scored_tokens": 10}, tokens=12,
                        seconds=0.0)


# --- the vote itself ---------------------------------------------------------------------------------------------


def test_the_majority_of_passing_chains_beats_a_higher_scoring_single_chain():
    result = vote([chain("72", score=-1.0), chain("36", score=-0.1), chain("72", score=-0.9)])
    assert result.answer == "72" and result.rule == "checks"
    assert result.chosen == 2 and result.chain.trace["log_score"] == -9.0  # the better-scoring of the two 72s
    assert result.counts == {"72": 2, "36": 1} and result.passed == 3 and result.samples == 3


def test_a_tie_between_answers_goes_to_the_higher_score_whatever_the_order():
    for results in ([chain("72", score=-0.5), chain("36", score=-0.2)],
                    [chain("36", score=-0.2), chain("72", score=-0.5)]):
        result = vote(results)
        assert result.answer == "36" and result.counts == {"72": 1, "36": 1}
        assert result.chain.answer == "36"


def test_chains_failing_their_checks_are_ignored_when_any_passes():
    results = [chain("36", ("pass", "fail"), score=-0.1), chain("36", ("fail",), score=-0.1),
               chain("36", (), score=-0.1),  # no CHECK at all: verified nothing
               chain("36", ("pass",), score=-0.1, stop="max_tokens"),  # cut by the token limit: not well-formed
               chain("36", ("unverifiable",), score=-0.1), chain("72", score=-3.0)]
    assert [passes_checks(r) for r in results] == [False] * 5 + [True]
    result = vote(results)
    assert result.answer == "72" and result.chosen == 5 and result.rule == "checks"
    assert result.counts == {"72": 1} and result.passed == 1 and result.passing == [False] * 5 + [True]


def test_with_no_passing_chain_the_majority_of_all_answers_decides_and_says_so():
    results = [chain("$72", ("fail",), score=-2.0), chain(None, ("pass",), score=-0.1), chain("9", ("fail",), score=-0.2),
               chain("72.0", ("fail",), score=-1.0), chain("72", ("fail",), score=-1.5)]
    result = vote(results)
    assert result.rule == "answers" and result.passed == 0
    assert result.counts == {"72.0": 3, "9": 1}  # compared as numbers; each answer spelled as its best chain spells it
    assert result.answer == "72.0" and result.chosen == 3
    assert RULES["answers"] in result.summary() and "0 of 5 had consistent checks" in result.summary()


def test_with_no_answer_at_all_the_first_chain_stands():
    result = vote([chain(None, score=-3.0), chain(None, score=-0.1)])
    assert (result.rule, result.chosen, result.answer, result.counts) == ("first", 0, None, {})
    assert "no answer" in result.summary()


def test_bad_sample_counts_and_an_empty_vote_are_clear_errors():
    for samples in (0, -1, 65):
        with pytest.raises(ValueError, match=f"samples must be between 1 and 64 .*got {samples}"):
            check_samples(samples)
    with pytest.raises(ValueError, match="at least one decoded chain"):
        vote([])


def test_sample_settings_keep_chain_0_and_derive_a_seed_per_sample():
    greedy = sample_settings(DecodeConfig(seed=3), 5)
    assert greedy[0] == (0.0, 1.0, 3)
    assert all(s[:2] == (SAMPLE_TEMPERATURE, SAMPLE_TOP_P) for s in greedy[1:])
    assert len({s[2] for s in greedy}) == 5 and greedy == sample_settings(DecodeConfig(seed=3), 5)
    assert {s[2] for s in greedy[1:]}.isdisjoint(s[2] for s in sample_settings(DecodeConfig(seed=4), 5)[1:])
    sampled = sample_settings(DecodeConfig(temperature=1.2, top_p=0.8, seed=3), 3)
    assert sampled[0] == (1.2, 0.8, 3) and all(s[:2] == (1.2, 0.8) for s in sampled)


# --- decode_voted on the tiny trained model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(overlay_model):
    table = SemanticTable(overlay_model.client, overlay_model.domain)
    model, tok = load_selector(overlay_model.model_dir)
    return table, model, tok


def decoder(parts, **config) -> OverlayDecoder:
    table, model, tok = parts
    return OverlayDecoder(table, model, tok, DecodeConfig(**({"max_tokens": 50} | config)))


def test_decode_voted_decodes_each_sample_as_its_own_seed_would(parts):
    dec = decoder(parts, max_tokens=160, tracks=0)  # long enough for some sampled chains to reach an answer; the
    # table and selector alone, so the samples differ token by token (tracks: test_sampled_chains_draw_their_tracks)
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    chosen, result = decode_voted(dec, question, 5)
    assert result.samples == len(result.results) == 5 and len({s[2] for s in result.sampling}) == 5
    texts = [r.text for r in result.results]
    assert texts[0] == dec.generate(question).text  # chain 0 is the greedy chain
    for (temperature, top_p, seed), text in zip(result.sampling[1:], texts[1:]):
        assert text == decoder(parts, max_tokens=160, temperature=temperature, top_p=top_p, seed=seed,
                               tracks=0).generate(question).text
    assert len(set(texts)) > 1  # the samples really sample
    assert chosen is result.chain and vote(result.results, result.sampling).to_dict() == result.to_dict()
    assert result.answers == [r.answer for r in result.results] and result.answer == chosen.answer
    assert result.passing == [passes_checks(r) for r in result.results] and result.passed == sum(result.passing)
    voters = [i for i in range(5) if (result.passing[i] if result.rule == "checks" else result.answers[i] is not None)]
    assert result.rule == ("checks" if any(result.passing) else "answers" if voters else "first")
    assert sum(result.counts.values()) == len(voters) and (result.chosen in voters or not voters)
    same = [i for i in voters if answers_match(result.answers[i], result.answer)]
    assert all(sum(answers_match(result.answers[i], a) for i in voters) <= len(same) for a in result.counts)
    assert all(result.scores[i] <= result.scores[result.chosen] for i in same)


def test_the_same_seed_gives_the_same_vote_and_another_seed_other_samples(parts):
    first = decode_voted(decoder(parts, seed=5), QUESTION, 3)[1]
    again = decode_voted(decoder(parts, seed=5), QUESTION, 3)[1]
    assert [r.text for r in first.results] == [r.text for r in again.results]
    assert first.to_dict() == again.to_dict()
    other = decode_voted(decoder(parts), QUESTION, 3, DecodeConfig(seed=6))[1]
    assert [s[2] for s in other.sampling[1:]] != [s[2] for s in first.sampling[1:]]
    assert [r.text for r in other.results[1:]] != [r.text for r in first.results[1:]]


def test_one_sample_is_todays_decode_and_a_given_first_chain_is_reused(parts):
    dec = decoder(parts)
    greedy = dec.generate(QUESTION)
    chosen, result = decode_voted(dec, QUESTION, 1)
    assert chosen.text == greedy.text and result.samples == 1
    _, reused = decode_voted(dec, QUESTION, 3, first=greedy)
    assert reused.results[0] is greedy and reused.samples == 3
    with pytest.raises(ValueError, match="the first chain answers another question"):
        decode_voted(dec, CHAINS[1].question, 3, first=greedy)


def test_the_evaluation_reports_the_vote_beside_greedy(parts):
    table, model, tok = parts
    gen = verification_success(table, model, tok, CHAINS[:2], DecodeConfig(max_tokens=40), keep=1, samples=3)
    vote_gen = gen["vote"]
    assert vote_gen["samples"] == 3 and vote_gen["greedy_exact_match"] == gen["overlay"]["exact_match"]
    assert sum(vote_gen["rules"].values()) == 2 and 0 <= vote_gen["chains_passed"] <= 1
    assert vote_gen["examples"][0]["samples"] == 3 and vote_gen["examples"][0]["expected"] == CHAINS[0].answer
    markdown = generation_markdown(gen)
    assert "### Answer choice (3 overlay chains per question" in markdown
    assert f"| exact_match, vote@3 | {vote_gen['exact_match']:.3f} |" in markdown
    assert f"| pass@3 (any chain right) | {vote_gen['pass_at_n']:.3f} |" in markdown
    assert "vote" not in verification_success(table, model, tok, CHAINS[:1], DecodeConfig(max_tokens=20))


def test_sampled_chains_draw_their_tracks(parts):
    """With tracks, chain 0 follows the chooser's track and each sampled chain draws one by the chooser's p (or none),
    as its own seed would alone."""
    dec = decoder(parts, max_tokens=160)
    question = "Natalia sold clips to 30 of her friends in April, and then she sold half as many clips in May. " \
               "How many clips did Natalia sell altogether in April and May?"
    _, result = decode_voted(dec, question, 4)
    followed = [next((t["id"] for t in r.tracks if t["followed"]), None) for r in result.results]
    assert followed[0] is not None and result.results[0].answer == "45"
    for (temperature, top_p, seed), track in zip(result.sampling[1:], followed[1:]):
        alone = decoder(parts, max_tokens=160, temperature=temperature, top_p=top_p, seed=seed).generate(question)
        assert next((t["id"] for t in alone.tracks if t["followed"]), None) == track
