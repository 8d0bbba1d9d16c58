"""The track memory on real Redis servers (one server and a three-node cluster): GetTracks, versions, domains,
the chooser's refusals, and decoding that follows a retrieved track."""

from __future__ import annotations

import json

import pytest

from overlay.chains import answers_match, load_chains
from overlay.generation import track_only
from overlay.table import SemanticTable, build_table, drop_table
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
from overlay.tracks import (DEFAULT_CHOOSER, FEATURES, Chooser, TrackError, TrackMemory, make_tracks, open_tracks,
                            write_tracks)
from overlay.variants import HELDOUT_VARIANTS, generate_variants, library_from_gsm8k

from conftest import EXAMPLES

TRAIN = EXAMPLES / "gsm8k_train_sample.jsonl"


@pytest.fixture(scope="module")
def sample():
    """The first 60 sample chains as tracks, and held-out variants of their first 20 (never stored)."""
    chains = load_chains(TRAIN, limit=60).chains
    heldout = generate_variants(library_from_gsm8k(str(TRAIN), 20), HELDOUT_VARIANTS).heldout
    return chains, make_tracks(chains, [f"gsm8k-{c.line}" for c in chains]), heldout


def build(client, domain, chains, tracks):
    texts = [c.to_text() for c in chains]
    tok = train_tokenizer(texts, vocab_size=400)
    return build_table(client, domain, [encode(tok, t) for t in texts], vocab_size=len(tok), tracks=tracks,
                       tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok))


@pytest.fixture
def sends(monkeypatch):
    """How many times the client writes to the server (a pipeline of many commands is one write: one round trip)."""
    from redis.connection import AbstractConnection

    count = [0]
    real = AbstractConnection.send_packed_command

    def counted(self, command, check_health=True):
        count[0] += 1
        return real(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    return count


def test_get_tracks_is_one_round_trip_and_finds_the_variants_source(redis_client, sample, sends):
    chains, tracks, heldout = sample
    build(redis_client, "gsm8k", chains, tracks)
    memory = TrackMemory(redis_client, "gsm8k")
    memory.search("warm the script cache with 3 apples")
    right = 0
    for variant in heldout:
        before = sends[0]
        found = memory.get_tracks(variant.chain.question, 5)
        assert sends[0] - before == 1
        assert found[0].track.family == variant.track
        best = memory.chooser.choose(found)
        right += best is not None and answers_match(best.answer, variant.chain.answer)
    assert right >= 0.85 * len(heldout)


def test_a_variant_with_reordered_sentences_or_a_result_equal_to_a_question_number_binds_right(redis_client, sample):
    chains, tracks, _ = sample
    build(redis_client, "gsm8k", chains, tracks)
    memory = TrackMemory(redis_client, "gsm8k")
    natalia = next(c for c in chains if c.question.startswith("Natalia"))
    # The numbers change and the clause order too: 30 is in May now, the April figure comes second.
    q = "In May, Natalia sold half as many clips as in April. She sold clips to 30 of her friends in April. " \
        "How many clips did Natalia sell altogether in April and May?"
    best, found = memory.choose(q)
    assert best is not None and best.track.question == natalia.question and best.answer == "45"
    # A question number equal to the first result (24 = 48/2): data flow keeps the roles apart.
    q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
        "How many clips did Natalia sell altogether in April and May? She also found 24 old clips."
    assert memory.choose(q)[0].answer == "72"


def test_tracks_of_one_domain_never_leak_into_another(redis_client, sample):
    chains, tracks, heldout = sample
    build(redis_client, "one", chains[:30], tracks[:30])
    build(redis_client, "two", chains[30:], make_tracks(chains[30:], [f"gsm8k-{c.line}" for c in chains[30:]]))
    mine = {c.question for c in chains[30:]}
    for variant in heldout:
        assert all(r.track.question in mine for r in TrackMemory(redis_client, "two").get_tracks(variant.chain.question))


def test_tracks_are_versioned_with_the_table(redis_client, sample):
    chains, tracks, _ = sample
    first = build(redis_client, "gsm8k", chains[:10], tracks[:10]).version
    second = build(redis_client, "gsm8k", chains, tracks).version
    q = chains[40].question
    assert TrackMemory(redis_client, "gsm8k").get_tracks(q)[0].track.question == q
    assert all(r.track.question != q for r in TrackMemory(redis_client, "gsm8k", first).get_tracks(q))
    drop_table(redis_client, "gsm8k", first)
    assert not list(redis_client.scan_iter(f"ovl:gsm8k:v{first}:*"))
    assert open_tracks(SemanticTable(redis_client, "gsm8k")).version == second


def test_a_question_no_track_can_be_followed_is_refused(redis_client, sample):
    chains, tracks, _ = sample
    build(redis_client, "gsm8k", chains, tracks)
    memory = TrackMemory(redis_client, "gsm8k")
    best, found = memory.choose("How many clips did Natalia sell altogether in April and May?")
    assert best is None and found and all(r.answer is None for r in found)
    assert track_only(memory, "How many clips did Natalia sell altogether?").answer is None


def test_bad_input_and_a_table_without_tracks(redis_client, sample):
    chains, tracks, _ = sample
    with pytest.raises(TrackError, match="no track memory"):
        texts = [c.to_text() for c in chains[:5]]
        tok = train_tokenizer(texts, vocab_size=300)
        build_table(redis_client, "plain", [encode(tok, t) for t in texts], vocab_size=len(tok))
        TrackMemory(redis_client, "plain")
    with pytest.raises(TrackError, match="no complete table"):
        TrackMemory(redis_client, "nothing")
    with pytest.raises(TrackError, match="no track to store"):
        write_tracks(redis_client, "gsm8k", 1, [])
    build(redis_client, "gsm8k", chains, tracks)
    with pytest.raises(TrackError, match="non-empty question"):
        TrackMemory(redis_client, "gsm8k").search("  ")


def test_get_tracks_on_a_cluster_matches_one_server(redis_cluster, redis_client, sample):
    cluster, _ = redis_cluster
    chains, tracks, heldout = sample
    drop_table(cluster, "clu") if cluster.get("ovl:clu:active") else None
    build(cluster, "clu", chains, tracks)
    build(redis_client, "clu", chains, tracks)
    on_cluster, single = TrackMemory(cluster, "clu"), TrackMemory(redis_client, "clu")
    slots = {cluster.keyslot(k) for k in cluster.scan_iter("ovl:clu:v*:t:*p:*")}
    assert len({cluster.get_node_from_key(f"x{{clu:t{s}}}").name for s in range(on_cluster.shards)}) > 1
    assert len(slots) == on_cluster.shards
    for variant in heldout[:10]:
        q = variant.chain.question
        assert [r.track.id for r in on_cluster.get_tracks(q)] == [r.track.id for r in single.get_tracks(q)]


def test_a_learned_chain_becomes_a_track_of_the_next_version(redis_client, sample):
    """Learning without retraining: chains learned (feedback, improve) join the copied track memory, so their held-out
    variants are answered at once; the version before keeps its memory."""
    from overlay.learn import learn_chains

    chains, tracks, heldout = sample
    before = build(redis_client, "gsm8k", chains[:10] + chains[20:], tracks[:10] + tracks[20:]).version
    learned = [v for v in heldout if v.track in {f"gsm8k-{c.line}" for c in chains[10:20]}]
    assert learned
    old = TrackMemory(redis_client, "gsm8k", before)

    def right(memory) -> int:
        return sum(bool(b) and answers_match(b.answer, v.chain.answer) for v in learned
                   for b in [memory.choose(v.chain.question)[0]])

    assert right(old) <= len(learned) // 2
    after = learn_chains(redis_client, "gsm8k", chains[10:20])
    new = TrackMemory(redis_client, "gsm8k", after)
    assert new.count == old.count + 10 and TrackMemory(redis_client, "gsm8k", before).count == old.count
    assert right(new) >= 0.8 * len(learned)


def test_a_chooser_fitted_on_other_features_is_not_applied_to_these():
    fitted = Chooser([0.1] * len(FEATURES), 0.3)
    assert Chooser.from_spec(json.loads(json.dumps(fitted.spec()))) == fitted
    assert Chooser.from_spec({"weights": [1.0] * 12, "threshold": 0.5}) is DEFAULT_CHOOSER  # an older release's
    assert Chooser.from_spec({"weights": [0.1] * len(FEATURES), "features": list(FEATURES)[::-1]}) is DEFAULT_CHOOSER
    assert Chooser.from_spec({}) is DEFAULT_CHOOSER
