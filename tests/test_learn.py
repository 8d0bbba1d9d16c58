"""Learned table versions and people's feedback, against real Redis servers (single and cluster) and real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
import redis
from typer.testing import CliRunner

from conftest import EXAMPLES
from overlay import table as tbl
from overlay.accumulator import SessionStore
from overlay.chains import load_chains
from overlay.cli import app
from overlay.learn import (MAX_TEXT_CHARS, append_feedback, apply_feedback, feedback_key, feedback_version,
                           learn_chains, learn_version, pending_feedback)
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer

# Each script runs in its own interpreter against the test's Redis and dies by SIGKILL at the point named.
APPEND_THEN_DIE = """
import os, signal, sys, redis
from overlay.learn import append_feedback
client = redis.Redis(unix_socket_path=sys.argv[1])
print(append_feedback(client, sys.argv[2], text=sys.argv[3], verdict="correct"), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
DIE_AT_FIRST_FLUSH = """
import json, os, signal, sys, redis
from overlay.learn import apply_feedback, learn_version
client = redis.Redis(unix_socket_path=sys.argv[1])
def die(done, total):
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[3] == "apply":
    apply_feedback(client, sys.argv[2], batch=20, on_flush=die)
else:
    learn_version(client, sys.argv[2], [(s, 1.0) for s in json.loads(sys.argv[3])], source="killed", batch=20,
                  on_flush=die)
"""
COUNTS = ("tokens", "sequences", "contexts", "entries", "per_order")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Chain texts of the first 50 sample records, spaced as feedback stores them."""
    return [" ".join(c.to_text().split()) for c in load_chains(EXAMPLES / "gsm8k_train_sample.jsonl", limit=50).chains]


@pytest.fixture(scope="module")
def tok(texts):
    """A tokenizer trained on those chains (tables store it; learning and feedback tokenize with it)."""
    return train_tokenizer(texts, vocab_size=500)


def build(client, domain: str, chain_texts: list[str], tok) -> int:
    """Build a version of ``domain`` from chain texts with the shared tokenizer; returns the version."""
    return tbl.build_table(client, domain, [encode(tok, t) for t in chain_texts], vocab_size=len(tok), max_order=3,
                           tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok)).version


def dump(client, domain: str, version: int) -> dict[str, dict[str, float]]:
    """Every zset of a version (unigrams and contexts) by key suffix, so versions of other domains compare."""
    prefix = f"ovl:{domain}:v{version}:"
    names = [key.decode() for key in client.scan_iter(match=prefix + "o*", count=1000)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.zrange(name, 0, -1, withscores=True)
    rows = pipe.execute() if names else []
    return {name[len(prefix):]: {m.decode(): s for m, s in members} for name, members in zip(names, rows)}


def meta_counts(client, domain: str, version: int) -> dict[str, str]:
    """The count fields of a version's meta hash."""
    return {k: v for k, v in tbl.versions(client, domain)[version].items() if k in COUNTS}


def assert_consistent(client, domain: str, version: int) -> None:
    """Every context total equals its members' sum, no count is ≤ 0, and the meta counts match the keys."""
    zsets = dump(client, domain, version)
    per_order: Counter = Counter()
    entries = 0
    for name, members in zsets.items():
        assert all(score > 0 for score in members.values()), name
        if name == "o0":
            continue
        total = members.pop("t")
        assert total == sum(members.values()), name
        per_order[int(name.split(":")[0][1:])] += 1
        entries += len(members)
    meta = tbl.versions(client, domain)[version]
    assert int(meta["tokens"]) == sum(zsets["o0"].values())
    assert int(meta["contexts"]) == sum(per_order.values()) and int(meta["entries"]) == entries
    assert meta["per_order"] == ",".join(f"{n}:{c}" for n, c in sorted(per_order.items()))


def rank(table: tbl.SemanticTable, context: list[int], token: int) -> int:
    """Where ``token`` comes among the context's first 200 candidates (200 when it is not among them)."""
    ids = table.neighbours(context, 200).ids
    return ids.index(token) if token in ids else 200


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a script in a fresh interpreter (a separate process and Redis connection)."""
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"OPENBLAS_NUM_THREADS": "1"})


# --- learn_version -----------------------------------------------------------------------------------------------


def test_learned_version_equals_a_build_with_the_chain_added_and_the_wrong_one_removed(redis_client, tok, texts):
    build(redis_client, "learn", texts[:20], tok)
    before = dump(redis_client, "learn", 1)
    version = learn_version(redis_client, "learn", [(encode(tok, texts[40]), 1.0), (encode(tok, texts[0]), -1.0)],
                            source="test", extra_meta={"round": 1})
    assert version == 2 and tbl.active_version(redis_client, "learn") == 2
    build(redis_client, "scratch", [*texts[1:20], texts[40]], tok)
    assert dump(redis_client, "learn", 2) == dump(redis_client, "scratch", 1)
    assert meta_counts(redis_client, "learn", 2) == meta_counts(redis_client, "scratch", 1)
    assert_consistent(redis_client, "learn", 2)
    meta = tbl.versions(redis_client, "learn")
    assert meta[2]["based_on"] == "1" and meta[2]["source"] == "test" and meta[2]["round"] == "1"
    assert meta[2]["learned"] == "+1 -1 chains" and meta[2]["status"] == "complete"
    assert dump(redis_client, "learn", 1) == before  # the old version is untouched and still readable
    assert tbl.SemanticTable(redis_client, "learn", 1).tokenizer().get_vocab() == tok.get_vocab()


def novel_positions(table: tbl.SemanticTable, ids: list[int]) -> list[int]:
    """Positions whose context (once in the chain) the table holds at order 3, but only with other next tokens, each
    seen once."""
    contexts = Counter(tuple(ids[i - 3 : i]) for i in range(3, len(ids)))
    found = []
    for i in range(3, len(ids)):
        nb = table.neighbours(ids[i - 3 : i], 200)
        known = {t: c for t, c, o in zip(nb.ids, nb.counts, nb.orders) if o == 3}
        if nb.order == 3 and contexts[tuple(ids[i - 3 : i])] == 1 and ids[i] not in known and set(known.values()) == {1}:
            found.append(i)
    return found


def test_an_accepted_chain_ranks_its_next_tokens_higher_and_a_wrong_one_lowers_its_counts(redis_client, tok, texts):
    build(redis_client, "rank", texts[:20], tok)
    old = tbl.SemanticTable(redis_client, "rank")
    ids = encode(tok, texts[45])
    novel = novel_positions(old, ids)
    assert len(novel) >= 3, "the held-out chain should continue some known contexts in a new way"
    assert learn_chains(redis_client, "rank", [texts[45]], 2.0, "accepted twice") == 2
    new = tbl.SemanticTable(redis_client, "rank")
    assert new.version == 2 and novel_positions(new, ids) == []
    for i in novel:  # counted twice, the chain's next token now leads the contexts whose other tokens were seen once
        assert rank(new, ids[i - 3 : i], ids[i]) == 0 < rank(old, ids[i - 3 : i], ids[i])
    chain = load_chains(EXAMPLES / "gsm8k_train_sample.jsonl", limit=4).chains[3]  # a Chain object, in the table
    assert learn_chains(redis_client, "rank", [chain], -1.0, "wrong") == 3
    wrong = encode(tok, chain.to_text())
    lowered = 0
    for gram, times in Counter(tuple(wrong[i - 3 : i + 1]) for i in range(3, len(wrong))).items():
        was = redis_client.zscore(tbl.context_key("rank", 2, list(gram[:3])), str(gram[3])) or 0
        now = redis_client.zscore(tbl.context_key("rank", 3, list(gram[:3])), str(gram[3])) or 0
        assert now == max(0, was - times), gram
        lowered += now < was
    assert lowered == len(set(tuple(wrong[i - 3 : i + 1]) for i in range(3, len(wrong))))
    assert_consistent(redis_client, "rank", 3)


def test_counts_floor_at_zero_and_emptied_contexts_disappear(redis_client, tok, texts):
    a, b, c = texts[0], texts[1], texts[30]
    for domain, chains in (("floor", [a, b]), ("just-a", [a]), ("just-c", [c])):
        build(redis_client, domain, chains, tok)
    learn_version(redis_client, "floor", [(encode(tok, a), -2.0), (encode(tok, c), -1.0)], source="floor")
    both, just_a, just_c = (dump(redis_client, d, 1) for d in ("floor", "just-a", "just-c"))
    expected = {}
    for key, members in both.items():
        counts = {m: n - 2 * just_a.get(key, {}).get(m, 0) - just_c.get(key, {}).get(m, 0)
                  for m, n in members.items() if m != "t"}
        kept = {m: n for m, n in counts.items() if n > 0}
        if kept:
            expected[key] = kept | ({"t": sum(kept.values())} if key != "o0" else {})
    assert dump(redis_client, "floor", 2) == expected
    assert len(expected) < len(both) and any(n - 2 * just_a.get(k, {}).get(m, 0) < 0 for k, ms in both.items()
                                             for m, n in ms.items())
    assert_consistent(redis_client, "floor", 2)


def test_fractional_weights_round_to_whole_counts(redis_client, tok, texts):
    build(redis_client, "half", texts[:5], tok)
    ids = encode(tok, texts[20])
    learn_version(redis_client, "half", [(ids, 0.5), (ids, 0.25), (ids, 0.25)], source="quarters")  # summed, then whole
    build(redis_client, "half-scratch", [*texts[:5], texts[20]], tok)
    assert dump(redis_client, "half", 2) == dump(redis_client, "half-scratch", 1)


@pytest.mark.parametrize(("sequences", "message"), [
    ([([5, 6, 7], 1.0), ([5, 99_999, 7], 1.0)], "sequence 1: token id 99999 is outside the vocabulary of size"),
    ([([5, 6], float("nan"))], "sequence 0: the weight must be a finite number"),
    ([[5, 6, 7]], "sequence 0: expected a (token ids, weight) pair"),
    ([(["five", 6], 1.0)], "sequence 0: token ids must be integers"),
    ([], "nothing to learn"),
    ([([5, 6], 0.0), ([], 1.0)], "nothing to learn"),
])
def test_bad_sequences_are_refused_before_anything_is_written(redis_client, tok, texts, sequences, message):
    build(redis_client, "bad", texts[:5], tok)
    keys = redis_client.dbsize()
    with pytest.raises(ValueError) as info:
        learn_version(redis_client, "bad", sequences, source="bad")
    assert message in str(info.value)
    assert redis_client.dbsize() == keys and tbl.active_version(redis_client, "bad") == 1
    assert sorted(tbl.versions(redis_client, "bad")) == [1]


def test_learning_needs_a_complete_table(redis_client):
    with pytest.raises(tbl.TableNotFound, match="no complete table for domain 'none-here'"):
        learn_version(redis_client, "none-here", [([1, 2], 1.0)], source="x")


def test_an_exception_mid_copy_keeps_the_active_version_and_leaves_nothing(redis_client, tok, texts):
    build(redis_client, "broken", texts[:20], tok)
    before = dump(redis_client, "broken", 1)

    def fail(done: int, total: int) -> None:
        raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError, match="connection lost"):
        learn_version(redis_client, "broken", [(encode(tok, texts[45]), 1.0)], source="x", batch=20, on_flush=fail)
    assert tbl.active_version(redis_client, "broken") == 1 and sorted(tbl.versions(redis_client, "broken")) == [1]
    assert not list(redis_client.scan_iter(match="ovl:broken:v2:*"))
    assert dump(redis_client, "broken", 1) == before
    assert learn_version(redis_client, "broken", [(encode(tok, texts[45]), 1.0)], source="x") == 3
    assert tbl.active_version(redis_client, "broken") == 3


def test_a_killed_learn_leaves_a_building_version_that_never_becomes_active(redis_client, tok, texts):
    """The copy a SIGKILLed learn leaves is never read, is reported abandoned, and the next learn removes it."""
    build(redis_client, "killed", texts[:20], tok)
    neighbours = tbl.SemanticTable(redis_client, "killed").neighbours(encode(tok, "<THOUGHT> Natalia sold"), 8)
    seqs = json.dumps([encode(tok, texts[45])])
    done = run_script(DIE_AT_FIRST_FLUSH, redis_client.socket_file, "killed", seqs)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert tbl.versions(redis_client, "killed")[2]["status"] == "building"
    assert 0 < len(dump(redis_client, "killed", 2)) < len(dump(redis_client, "killed", 1))  # half written
    assert tbl.active_version(redis_client, "killed") == 1
    assert tbl.SemanticTable(redis_client, "killed").neighbours(encode(tok, "<THOUGHT> Natalia sold"), 8) == neighbours
    with pytest.raises(tbl.TableNotFound, match="building"):
        tbl.SemanticTable(redis_client, "killed", 2)
    assert tbl.abandoned_versions(redis_client, "killed") == [2]
    assert learn_version(redis_client, "killed", [(encode(tok, texts[45]), 1.0)], source="again") == 3
    assert sorted(tbl.versions(redis_client, "killed")) == [1, 3]
    assert not list(redis_client.scan_iter(match="ovl:killed:v2:*"))
    build(redis_client, "killed-scratch", [*texts[:20], texts[45]], tok)
    assert dump(redis_client, "killed", 3) == dump(redis_client, "killed-scratch", 1)
    assert not list(redis_client.scan_iter(match="ovl:killed:v3:lease"))
    assert tbl.drop_table(redis_client, "killed", keep_active=True) == [1]


def test_a_learn_in_progress_is_not_abandoned(redis_client, tok, texts):
    """A building version whose writer still runs (here: this process, mid-learn) is left alone by another learn."""
    build(redis_client, "busy", texts[:20], tok)
    seen = []

    def meanwhile(done: int, total: int) -> None:
        if not seen:
            seen.append(tbl.abandoned_versions(redis_client, "busy"))
            seen.append(learn_version(redis_client, "busy", [(encode(tok, texts[46]), 1.0)], source="inner"))

    assert learn_version(redis_client, "busy", [(encode(tok, texts[45]), 1.0)], source="outer", batch=20,
                         on_flush=meanwhile) == 2
    assert seen == [[], 3] and tbl.active_version(redis_client, "busy") == 3


def test_learning_on_a_redis_cluster_copies_within_each_slot(redis_cluster, redis_client, tok, texts):
    cluster, _ = redis_cluster
    try:
        build(cluster, "learn-cluster", texts[:20], tok)
        entry = append_feedback(cluster, "learn-cluster", text=texts[25], verdict="correct")
        report = apply_feedback(cluster, "learn-cluster", batch=50)
        assert report.version == report.active == 2 and feedback_version(cluster, "learn-cluster", entry) == 2
        build(redis_client, "single", [*texts[:20], texts[25]], tok)
        contexts = [encode(tok, texts[25])[i - 3 : i] for i in range(3, 60, 5)]
        assert (tbl.SemanticTable(cluster, "learn-cluster").neighbours_batch(contexts, 8)
                == tbl.SemanticTable(redis_client, "single").neighbours_batch(contexts, 8))
        assert meta_counts(cluster, "learn-cluster", 2) == meta_counts(redis_client, "single", 1)
    finally:
        tbl.drop_table(cluster, "learn-cluster")  # the cluster is shared by the whole session
        cluster.delete(feedback_key("learn-cluster"), "ovl:learn-cluster:feedback:applied:{ovl:learn-cluster:active}")


# --- feedback ----------------------------------------------------------------------------------------------------


def test_feedback_survives_a_kill_between_append_and_apply(redis_client, tok, texts):
    build(redis_client, "fb", texts[:20], tok)
    done = run_script(APPEND_THEN_DIE, redis_client.socket_file, "fb", texts[45])
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    entry = done.stdout.strip()
    assert [(i.id, i.verdict, i.text) for i in pending_feedback(redis_client, "fb")] == [(entry, "correct", texts[45])]
    assert feedback_version(redis_client, "fb", entry) is None
    fresh = redis.Redis(unix_socket_path=redis_client.socket_file)  # another connection, as a later process has
    report = apply_feedback(fresh, "fb")
    assert (report.version, report.previous, report.active) == (2, 1, 2)
    assert [(i.id, i.version) for i in report.items] == [(entry, 2)]
    assert feedback_version(redis_client, "fb", entry) == 2 and pending_feedback(redis_client, "fb") == []
    assert tbl.versions(redis_client, "fb")[2]["feedback_last_id"] == entry
    build(redis_client, "fb-scratch", [*texts[:20], texts[45]], tok)
    assert dump(redis_client, "fb", 2) == dump(redis_client, "fb-scratch", 1)
    again = apply_feedback(fresh, "fb")
    assert (again.items, again.version, again.active) == ([], None, 2)
    assert again.summary() == "no pending feedback for fb (v2 is active)"
    assert sorted(tbl.versions(redis_client, "fb")) == [1, 2]


def test_a_kill_during_apply_loses_nothing_and_applies_nothing_twice(redis_client, tok, texts):
    build(redis_client, "fb-kill", texts[:20], tok)
    first = append_feedback(redis_client, "fb-kill", text=texts[45], verdict="correct")
    second = append_feedback(redis_client, "fb-kill", text=texts[0], verdict="wrong", answer="73")
    done = run_script(DIE_AT_FIRST_FLUSH, redis_client.socket_file, "fb-kill", "apply")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert tbl.active_version(redis_client, "fb-kill") == 1
    assert tbl.versions(redis_client, "fb-kill")[2]["status"] == "building"
    assert [i.id for i in pending_feedback(redis_client, "fb-kill")] == [first, second]
    report = apply_feedback(redis_client, "fb-kill")
    assert report.version == 3 and [(i.id, i.verdict, i.answer) for i in report.items] == [
        (first, "correct", None), (second, "wrong", "73")]
    assert sorted(tbl.versions(redis_client, "fb-kill")) == [1, 3]  # the killed apply's copy is gone
    assert report.summary() == ("applied 2 feedback item(s) to fb-kill: 1 correct (raised), 1 wrong (lowered) → v3 "
                                "(was v1)")
    build(redis_client, "fb-kill-scratch", [*texts[1:20], texts[45]], tok)  # the wrong chain lowered, nothing invented
    assert dump(redis_client, "fb-kill", 3) == dump(redis_client, "fb-kill-scratch", 1)
    third = append_feedback(redis_client, "fb-kill", text=texts[46], verdict="correct")
    later = apply_feedback(redis_client, "fb-kill")
    assert later.version == 4 and [i.id for i in later.items] == [third]
    assert [feedback_version(redis_client, "fb-kill", e) for e in (first, second, third)] == [3, 3, 4]
    assert tbl.versions(redis_client, "fb-kill")[4]["feedback_items"] == "1"


def test_feedback_by_chain_id_uses_the_saved_chain(redis_client, tok, texts):
    build(redis_client, "fb-id", texts[:20], tok)
    ids = encode(tok, texts[45])
    SessionStore(redis_client).append("chat-7", {"question": "q", "prompt_len": 3}, ids, [])
    entry = append_feedback(redis_client, "fb-id", chain_id="chat-7", verdict="Correct")
    (item,) = pending_feedback(redis_client, "fb-id")
    assert (item.id, item.chain_id, item.verdict) == (entry, "chat-7", "correct")
    assert encode(tok, item.text) == ids
    assert apply_feedback(redis_client, "fb-id").version == 2


def test_a_rebuilt_table_gets_all_recorded_feedback_again(redis_client, tok, texts):
    build(redis_client, "fb-rebuilt", texts[:20], tok)
    entry = append_feedback(redis_client, "fb-rebuilt", text=texts[45], verdict="correct")
    apply_feedback(redis_client, "fb-rebuilt")
    build(redis_client, "fb-rebuilt", texts[:20], tok)  # a fresh build from the dataset holds no feedback
    assert [i.id for i in pending_feedback(redis_client, "fb-rebuilt")] == [entry]
    assert apply_feedback(redis_client, "fb-rebuilt").version == 4
    assert feedback_version(redis_client, "fb-rebuilt", entry) == 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"text": "<Q> x", "verdict": "maybe"}, "unknown verdict 'maybe': use 'correct' or 'wrong'"),
    ({"verdict": "correct"}, "give the chain id of a decoded chain or the chain's text"),
    ({"chain_id": "c1", "text": "<Q> x", "verdict": "correct"}, "give either a chain id or a chain text, not both"),
    ({"chain_id": "never-decoded", "verdict": "wrong"}, "unknown chain id 'never-decoded'"),
    ({"chain_id": "bad id!", "verdict": "wrong"}, "invalid session id"),
    ({"text": " \n ", "verdict": "wrong"}, "the chain text is empty"),
    ({"text": "x " * MAX_TEXT_CHARS, "verdict": "wrong"}, f"the limit is {MAX_TEXT_CHARS}"),
    ({"text": "<Q> x", "verdict": "correct", "answer": "5"}, "a right answer goes with verdict 'wrong'"),
    ({"text": "<Q> x", "verdict": "wrong", "answer": "9" * 1001}, "the answer has 1001 characters"),
])
def test_bad_feedback_is_refused_with_a_clear_error(redis_client, tok, texts, kwargs, message):
    build(redis_client, "fb-bad", texts[:5], tok)
    with pytest.raises(ValueError) as info:
        append_feedback(redis_client, "fb-bad", **kwargs)
    assert message in str(info.value)
    assert not redis_client.exists(feedback_key("fb-bad"))


def test_feedback_needs_a_table(redis_client):
    with pytest.raises(tbl.TableNotFound, match="no complete table for domain 'nowhere'"):
        append_feedback(redis_client, "nowhere", text="<Q> x", verdict="correct")
    with pytest.raises(tbl.TableNotFound, match="no complete table for domain 'nowhere'"):
        apply_feedback(redis_client, "nowhere")


# --- the command line --------------------------------------------------------------------------------------------


def test_cli_records_and_learns_feedback(redis_client, tok, texts):
    build(redis_client, "cli-fb", texts[:20], tok)
    url = f"unix://{redis_client.socket_file}"
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["table", *args, "--redis-url", url], env={"COLUMNS": "200"})

    recorded = run("feedback", "cli-fb", "--text", texts[45], "--verdict", "correct")
    assert recorded.exit_code == 0, recorded.output
    assert "recorded verdict correct" in recorded.output and "1 pending" in recorded.output
    wrong = run("feedback", "cli-fb", "--text", texts[0], "--verdict", "wrong", "--answer", "73")
    assert wrong.exit_code == 0 and "right answer 73" in wrong.output
    learned = run("learn", "cli-fb")
    assert learned.exit_code == 0, learned.output
    assert ("applied 2 feedback item(s) to cli-fb: 1 correct (raised), 1 wrong (lowered) → v2 (was v1)"
            in learned.output)
    assert "73" in learned.output and tbl.active_version(redis_client, "cli-fb") == 2
    assert "no pending feedback for cli-fb (v2 is active)" in run("learn", "cli-fb").output
    for args, message in [(("feedback", "cli-fb", "--text", "x", "--verdict", "maybe"), "unknown verdict 'maybe'"),
                          (("feedback", "cli-fb", "--verdict", "wrong"), "give the chain id"),
                          (("learn", "no-table"), "no complete table for domain 'no-table'")]:
        result = run(*args)
        assert result.exit_code == 2 and message in result.output, result.output
