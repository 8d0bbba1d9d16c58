"""The chain verifier on a real tiny domain: sticker problems of four shapes (give then buy, buy then buy, buy then
give, give then give) in a real table with its track memory and a selector trained for seconds; a question routed into the wrong
shape gives a chain whose CHECK is consistent and whose answer is wrong, and the verifier has to catch it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from overlay.chains import answers_match, load_chains
from overlay.decode import DecodeConfig, OverlayDecoder
from overlay.generation import generation_markdown, verification_success, vote_markdown, vote_measures
from overlay.langflow_support import chat_text
from overlay.router import ChainCheck
from overlay.selector import load_selector
from overlay.table import SemanticTable
from overlay.verifier import (CONFIG_NAME, FEATURES, PEER_FEATURES, WEIGHTS_NAME, Verifier, VerifierConfig,
                              VerifierError, WithoutOwnTrack, auc, chain_features, find_verifier, train_verifier)
from overlay.vote import decode_voted, vote

from conftest import tiny_overlay

NAMES = ["Lily", "Emma", "Mia", "Ava", "Zoe", "Ella", "Nora", "Ruth", "Iris", "Jade", "Cora", "Anna"]
SHAPES = {
    "give, buy": ("{n} had {a} stickers. She gave {b} to her brother and then bought {c} more. How many stickers "
                  "does {n} have now?", "-", "+"),
    "buy, buy": ("{n} had {a} stickers. She bought {b} at the shop and then bought {c} more. How many stickers does "
                 "{n} have now?", "+", "+"),
    "buy, give": ("{n} had {a} stickers. She bought {b} more and then gave {c} to her brother. How many stickers "
                  "does {n} have now?", "+", "-"),
    "give, give": ("{n} had {a} stickers. She gave {b} to her brother and then gave {c} to her sister. How many "
                   "stickers does {n} have now?", "-", "-"),
}
TEMPERATURE = 1.0  # with the track weighed lightly (1.0), some samples take a wrong operator and restate it in a consistent CHECK
LILY = "Lily had 30 stickers. She gave 12 to her brother and then bought 9 more. How many stickers does Lily have now?"


def sticker_records(count: int, seed: int) -> list[dict[str, str]]:
    """GSM8K-format records of the four shapes, in turn, with drawn names and numbers."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        question, op1, op2 = list(SHAPES.values())[i % len(SHAPES)]
        n, a, b, c = rng.choice(NAMES), rng.randint(40, 90), rng.randint(2, 19), rng.randint(2, 19)
        first = a - b if op1 == "-" else a + b
        second = first - c if op2 == "-" else first + c
        answer = (f"She had {a}{op1}{b} = <<{a}{op1}{b}={first}>>{first} stickers.\n"
                  f"Then {first}{op2}{c} = <<{first}{op2}{c}={second}>>{second} stickers.\n#### {second}")
        out.append({"question": question.format(n=n, a=a, b=b, c=c), "answer": answer})
    return out


@pytest.fixture(scope="module")
def stickers(overlay_redis, tmp_path_factory):
    """(table, selector, tokenizer, training chains, test chains) of the sticker domain; selector trained 250 steps."""
    folder = tmp_path_factory.mktemp("stickers")
    for name, count, seed in (("train", 60, 0), ("test", 12, 1)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sticker_records(count, seed)))
    chains = load_chains(folder / "train.jsonl").chains
    model_dir = tiny_overlay(overlay_redis, "verifier-test", chains, folder, vocab_size=400, steps=250)
    model, tok = load_selector(model_dir)
    return (SemanticTable(overlay_redis, "verifier-test"), model, tok, chains, load_chains(folder / "test.jsonl").chains,
            model_dir)


@pytest.fixture(scope="module")
def trained(stickers):
    """A verifier trained on 8 chains per training question, each question routed without its own track."""
    table, model, tok, chains, _, _ = stickers
    decoder = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=80, temperature=TEMPERATURE, track_weight=1.0))
    return train_verifier(decoder, chains, VerifierConfig(samples=8, questions=30, held_out=0.3, seed=0))


def decoder_for(stickers, temperature: float = TEMPERATURE) -> OverlayDecoder:
    """A decoder of the sticker domain sampling at ``temperature``."""
    table, model, tok = stickers[:3]
    return OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=80, temperature=temperature, track_weight=1.0))


def test_the_verifier_ranks_held_out_chains_and_costs_little(trained):
    info = trained.info
    assert info["chains"] == 240 and info["held_out_questions"] == 9 and 0 < info["right"] < info["chains"]
    assert info["auc_peers"] > 0.8 and info["auc_alone"] > 0.8
    assert info["cost_share_of_decode"] < 0.1  # the budget: at most 10 % of decoding the chain
    print(info)


def test_a_wrong_chain_whose_check_is_consistent_fails_its_check(stickers, trained):
    """Lily: chains routed into the wrong shape restate their own arithmetic in a consistent CHECK; the verifier's
    verdict rejects them, so their check fails and the chat says so; a right chain is verified."""
    _, result = decode_voted(decoder_for(stickers), LILY, 24, verifier=trained)
    checks = [ChainCheck.from_dict(r.trace["check"]) for r in result.results]
    wrong = [(r, c) for r, c in zip(result.results, checks) if r.answer is not None and not answers_match(r.answer, "27")
             and c.all_consistent]
    right = [(r, c) for r, c in zip(result.results, checks) if answers_match(r.answer, "27")]
    assert wrong and right, [r.answer for r in result.results]
    for chain, check in wrong:
        assert all(v["verdict"] == "pass" for v in chain.verdicts)  # arithmetic alone passes it
        assert check.rejected and not check.verified
        assert chat_text(chain).splitlines()[0] == f"**Answer: {chain.answer} — verifier {check.p:.2f}: likely wrong**"
    assert any(c.verified for _, c in right)
    assert np.mean([c.p for _, c in right]) > max(c.p for _, c in wrong)
    assert vote(result.results, None, result.verifier, "verifier").answer == "27"


def test_best_of_n_and_pass_at_n_in_the_evaluation(stickers, trained):
    table, model, tok, _, tests, _ = stickers
    gen = verification_success(table, model, tok, tests, DecodeConfig(max_tokens=80), samples=4, verifier=trained,
                               choose="verifier")
    v = gen["vote"]
    assert v["choose"] == "verifier" and v["exact_match"] == v["verifier_exact_match"]
    assert v["greedy_exact_match"] == gen["overlay"]["exact_match"]
    assert max(v["greedy_exact_match"], v["vote_exact_match"], v["verifier_exact_match"]) <= v["pass_at_n"]
    assert 0 <= v["verifier_auc"] <= 1 and v["verifier_ms_per_chain"] > 0
    markdown = generation_markdown(gen)
    for row in (f"| pass@4 (any chain right) | {v['pass_at_n']:.3f} |",
                f"| exact_match, verifier best-of-4 | {v['verifier_exact_match']:.3f} |",
                "| checks consistent (CHECKs restate their own arithmetic) |"):
        assert row in markdown


def test_pass_at_n_counts_a_question_once_any_chain_is_right(stickers, trained):
    chains = [load_chains_record(q, a) for q, a in ((LILY, "27"), (LILY, "999"))]
    dec = decoder_for(stickers)
    votes = [decode_voted(dec, c.question, 4, verifier=trained)[1] for c in chains]
    measured = vote_measures(votes, [v.results[0] for v in votes], [c.answer for c in chains])
    expected = [any(answers_match(r.answer, c.answer) for r in v.results) for v, c in zip(votes, chains)]
    assert expected[1] is False and measured["pass_at_n"] == sum(expected) / 2


def test_the_first_k_chains_are_what_samples_k_decodes(stickers, trained):
    """pass@k, vote@k and verifier best-of-k inside an 8-chain evaluation equal those of a 4-chain one (same seeds)."""
    table, model, tok, _, tests, _ = stickers
    config = DecodeConfig(max_tokens=80)
    eight, four = (verification_success(table, model, tok, tests, config, samples=n, verifier=trained)["vote"]
                   for n in (8, 4))
    assert [row["chains"] for row in eight["prefixes"]] == [1, 2, 4]
    at4 = eight["prefixes"][2]
    assert at4["pass"] == four["pass_at_n"] and at4["vote"] == four["vote_exact_match"]
    assert at4["verifier"] == four["verifier_exact_match"]
    assert at4["verifier_vote"] == four["verifier_vote_exact_match"]
    assert eight["prefixes"][0]["pass"] == eight["greedy_exact_match"] and at4["pass"] <= eight["pass_at_n"]
    markdown = "\n".join(vote_markdown(eight))
    assert f"| 4 | {at4['pass']:.3f} | {at4['vote']:.3f} | {at4['verifier']:.3f} |" in markdown
    assert f"| 8 | {eight['pass_at_n']:.3f} | {eight['vote_exact_match']:.3f} |" in markdown


def load_chains_record(question: str, answer: str):
    """A one-record chain with a given gold answer (only its question and answer are used)."""
    from overlay.chains import Chain

    return Chain(question=question, steps=[], answer=answer, line=0)


def test_training_questions_are_routed_without_their_own_track(stickers):
    table, _, _, chains, _, _ = stickers
    from overlay.tracks import open_tracks

    memory = open_tracks(table)
    question = chains[0].question
    own = memory.get_tracks(question, 5)
    assert own[0].track.question == question and own[0].similarity > 0.9
    without = WithoutOwnTrack(memory).get_tracks(question, 5)
    assert len(without) == 5 and all(r.track.question != question for r in without)


def test_save_load_gives_the_same_scores_and_bad_folders_say_why(stickers, trained, tmp_path):
    folder = trained.save(tmp_path / "verifier")
    loaded = Verifier.load(folder)
    dec = decoder_for(stickers)
    _, result = decode_voted(dec, LILY, 3)
    assert loaded.score_group(result.results) == trained.score_group(result.results)
    assert loaded.info["chains"] == 240 and not list(folder.glob("*.tmp"))
    assert find_verifier(tmp_path / "no-model") is None
    with pytest.raises(VerifierError, match="no verifier at .*config.json is missing"):
        Verifier.load(tmp_path / "missing")
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(VerifierError, match="is not valid JSON"):
        Verifier.load(folder)
    (folder / CONFIG_NAME).write_text(json.dumps({"model_type": "overlay-chain-verifier", "features": ["x"],
                                                  "peer_features": list(PEER_FEATURES)}))
    with pytest.raises(VerifierError, match="other features"):
        Verifier.load(folder)
    trained.save(folder)
    (folder / WEIGHTS_NAME).write_bytes(b"broken")
    with pytest.raises(VerifierError, match="cannot be read"):
        Verifier.load(folder)


def test_features_and_auc_by_hand():
    assert auc([0.9, 0.8, 0.1, 0.8], [True, True, False, False]) == pytest.approx(0.875)
    assert auc([0.5, 0.5], [True, True]) is None
    assert len(FEATURES) + len(PEER_FEATURES) == len(set(FEATURES + PEER_FEATURES))


def test_a_chain_alone_has_no_peer_features(stickers):
    result = decoder_for(stickers).generate(LILY)
    alone, among = chain_features(result), chain_features(result, [result.answer, None, result.answer])
    assert not alone[len(FEATURES):].any()
    assert among[len(FEATURES):].tolist() == ([2 / 3, 1.0] if result.answer is not None else [0.0, 0.0])
    assert np.array_equal(alone[:len(FEATURES)], among[:len(FEATURES)])


def test_training_without_any_right_chain_is_a_clear_error(stickers):
    table, model, tok, chains, _, _ = stickers
    wrong = [load_chains_record(c.question, "-1") for c in chains[:4]]
    decoder = OverlayDecoder(table, model, tok, DecodeConfig(max_tokens=40))
    with pytest.raises(VerifierError, match="0 of .* training chains are right"):
        train_verifier(decoder, wrong, VerifierConfig(samples=2, questions=4, held_out=0.25))


def test_the_model_folder_keeps_its_verifier(stickers, trained):
    folder = stickers[5]
    trained.save(folder / "verifier")
    assert find_verifier(folder).info == trained.info
    assert Path(folder / "verifier" / CONFIG_NAME).is_file()


def test_the_cli_trains_a_verifier_and_eval_chooses_by_it(stickers, overlay_redis, tmp_path):
    from typer.testing import CliRunner

    from overlay.cli import app

    model, data = stickers[5], stickers[5].parent / "train.jsonl"  # trained with --tracks 0: the selector alone,
    # so some of its chains are wrong
    env = {"COLUMNS": "200", "OVERLAY_REDIS_URL": f"unix://{overlay_redis.socket_file}"}
    runner = CliRunner()
    trained = runner.invoke(app, ["verifier", "train", "--model", str(model), "--data", str(data), "--domain",
                                  "verifier-test", "--samples", "4", "--questions", "16", "--max-tokens", "80", "--tracks", "0",
                                  "--out", str(tmp_path / "verifier")], env=env, catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    assert "held out: " in trained.output and "AUC" in trained.output and "of decoding it" in trained.output
    assert Verifier.load(tmp_path / "verifier").info["domain"] == "verifier-test"
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(model), "--data", str(model.parent / "test.jsonl"), "--domain",
                                 "verifier-test", "--limit", "3", "--generate", "3", "--samples", "3", "--max-tokens",
                                 "60", "--choose", "verifier-vote", "--verifier", str(tmp_path / "verifier"), "--out",
                                 str(out)], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    gen = json.loads((out / "eval.json").read_text())["generation"]["vote"]
    assert gen["choose"] == "verifier-vote" and gen["exact_match"] == gen["verifier_vote_exact_match"]
    assert "| exact_match, verifier best-of-3 |" in result.stdout and "| pass@3 (any chain right) |" in result.stdout
