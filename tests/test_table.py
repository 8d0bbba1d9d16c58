"""Semantic-weight table against real Redis: counts, weights, backoff, versions, interruption, cluster."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
from redis.crc import key_slot

from overlay import table as tbl

SEQS = [[1, 2, 3, 1, 2, 4], [1, 2, 3]]
V = 10
ALPHA = 0.1


def w(count: float, total: float) -> float:
    return math.log((count + ALPHA) / (total + ALPHA * V))


def build(client, domain="tiny", seqs=SEQS, **kw):
    return tbl.build_table(client, domain, seqs, vocab_size=V, max_order=2, alpha=ALPHA, **kw)


def test_counts_match_hand_computed(redis_client):
    stats = build(redis_client)
    assert (stats.tokens, stats.sequences, stats.version) == (9, 2, 1)
    assert stats.per_order == {1: 3, 2: 3}
    key = tbl.context_key("tiny", 1, [1, 2])
    assert {int(m): c for m, c in redis_client.zrange(key, 0, -1, withscores=True) if m != b"t"} == {3: 2, 4: 1}
    assert redis_client.zscore(key, "t") == 3


def test_neighbours_weights_and_backoff_fill(redis_client):
    build(redis_client)
    nb = tbl.SemanticTable(redis_client, "tiny").neighbours([7, 1, 2], k=3)
    assert nb.order == 2
    assert nb.ids == [3, 4, 2]
    assert nb.orders == [2, 2, 0]
    assert nb.counts == [2, 1, 3]
    expected = [w(2, 3), w(1, 3), w(3, 9) + 2 * math.log(0.4)]
    assert nb.weights == pytest.approx(expected)


def test_backoff_picks_longest_order_with_enough_candidates(redis_client):
    build(redis_client)
    table = tbl.SemanticTable(redis_client, "tiny")
    assert table.neighbours([3, 1], k=1).order == 2
    nb = table.neighbours([1, 2], k=4, min_candidates=2)
    assert nb.order == 2 and nb.ids[:2] == [3, 4]
    nb = table.neighbours([3, 1], k=2, min_candidates=2)
    assert nb.order == 0 and set(nb.ids) == {1, 2}


def test_never_empty_and_empty_context(redis_client):
    build(redis_client)
    table = tbl.SemanticTable(redis_client, "tiny")
    for ctx in ([4], [], [0, 0, 0]):
        nb = table.neighbours(ctx, k=2)
        assert nb.order == 0 and len(nb) == 2 and set(nb.ids) == {1, 2}


def test_batch_equals_single(redis_client):
    build(redis_client)
    table = tbl.SemanticTable(redis_client, "tiny")
    contexts = [[1], [1, 2], [2, 3], [4], [], [3, 1]]
    assert table.neighbours_batch(contexts, 4) == [table.neighbours(c, 4) for c in contexts]


def test_bad_inputs(redis_client):
    build(redis_client)
    table = tbl.SemanticTable(redis_client, "tiny")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        table.neighbours([1, 99])
    with pytest.raises(ValueError, match="k must be"):
        table.neighbours([1], k=0)
    with pytest.raises(tbl.TableNotFound, match="domains with a complete table: tiny$"):
        tbl.SemanticTable(redis_client, "nope")
    with pytest.raises(ValueError, match="invalid domain"):
        tbl.SemanticTable(redis_client, "a b{c}")
    with pytest.raises(ValueError, match="empty"):
        build(redis_client, seqs=[])


def test_versions_list_and_drop(redis_client):
    build(redis_client)
    build(redis_client, seqs=[[5, 6, 5, 6]])
    assert tbl.active_version(redis_client, "tiny") == 2
    assert sorted(tbl.versions(redis_client, "tiny")) == [1, 2]
    assert tbl.SemanticTable(redis_client, "tiny", version=1).neighbours([1], 1).ids == [2]
    with pytest.raises(ValueError, match="active"):
        tbl.drop_table(redis_client, "tiny", version=2)
    assert tbl.drop_table(redis_client, "tiny", keep_active=True) == [1]
    assert not list(redis_client.scan_iter(match="ovl:tiny:v1:*"))
    assert tbl.drop_table(redis_client, "tiny") == [2]
    assert tbl.list_domains(redis_client) == []
    assert not list(redis_client.scan_iter(match="ovl:tiny:*"))


def overlapping_builds(client, domain: str) -> tuple[tbl.BuildStats, tbl.BuildStats]:
    """Build ``first``; halfway through it, start and finish ``second`` (a higher version that completes first)."""
    inner: list[tbl.BuildStats] = []

    def run_second(done: int, total: int) -> None:
        if not inner:
            inner.append(build(client, domain, seqs=[[5, 6, 5, 6]]))

    first = build(client, domain, batch=2, on_flush=run_second)
    return first, inner[0]


@pytest.mark.parametrize("where", ["redis_client", "redis_cluster"])
def test_overlapping_builds_keep_the_newer_version_active(where, request):
    client = request.getfixturevalue(where)
    client = client[0] if where == "redis_cluster" else client
    try:
        first, second = overlapping_builds(client, "race")
        assert (first.version, second.version) == (1, 2)
        assert tbl.active_version(client, "race") == first.active == second.active == 2
        assert {v: m["status"] for v, m in tbl.versions(client, "race").items()} == {1: "complete", 2: "complete"}
        assert tbl.SemanticTable(client, "race").neighbours([5], 1).ids == [6]
        assert key_slot(tbl._dkey("race", "active").encode()) == key_slot(tbl._counter_key("race").encode())
        assert build(client, "race").active == 3
    finally:
        tbl.drop_table(client, "race")  # the cluster is shared by the whole session


def test_counter_of_older_releases_is_adopted(redis_client):
    build(redis_client)
    build(redis_client)
    redis_client.rename(tbl._counter_key("tiny"), "ovl:tiny:next")  # the layout before the counter moved
    assert sorted(tbl.versions(redis_client, "tiny")) == [1, 2] and tbl.active_version(redis_client, "tiny") == 2
    assert build(redis_client).active == 3
    assert not redis_client.exists("ovl:tiny:next")
    redis_client.rename(tbl._counter_key("tiny"), "ovl:tiny:next")
    assert tbl.drop_table(redis_client, "tiny") == [1, 2, 3]
    assert not list(redis_client.scan_iter(match="ovl:tiny:*"))


def test_domain_dropped_during_a_build_is_not_reactivated(redis_client):
    def drop(done: int, total: int) -> None:
        if tbl.list_domains(redis_client):
            tbl.drop_table(redis_client, "tiny")

    with pytest.raises(tbl.TableNotFound, match="dropped while version 1"):
        build(redis_client, batch=2, on_flush=drop)
    assert tbl.active_version(redis_client, "tiny") is None
    assert not list(redis_client.scan_iter(match="ovl:tiny:*"))


def test_interrupted_build_keeps_previous_version(redis_client):
    build(redis_client)
    before = tbl.SemanticTable(redis_client, "tiny").neighbours([1, 2], 3)

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(redis_client, seqs=[[5, 6, 7, 8, 9, 5, 6]], batch=2, on_flush=stop)
    assert tbl.active_version(redis_client, "tiny") == 1
    assert tbl.versions(redis_client, "tiny")[2]["status"] == "building"
    assert tbl.SemanticTable(redis_client, "tiny").neighbours([1, 2], 3) == before
    with pytest.raises(tbl.TableNotFound, match="building"):
        tbl.SemanticTable(redis_client, "tiny", version=2)
    assert tbl.drop_table(redis_client, "tiny", keep_active=True) == [2]
    assert not list(redis_client.scan_iter(match="ovl:tiny:v2:*"))


def test_candidate_recall(redis_client):
    build(redis_client)
    table = tbl.SemanticTable(redis_client, "tiny")
    recall = tbl.candidate_recall(table, SEQS, ks=(1, 4))
    assert recall[4] == 1.0
    assert 0 < recall[1] < 1


def test_cluster_spreads_keys_and_matches_single_server(redis_cluster, redis_client):
    import redis

    cluster, ports = redis_cluster
    seqs = [[(i * 7 + j * 3) % V for j in range(30)] for i in range(20)]
    tbl.build_table(cluster, "spread", seqs, vocab_size=V, max_order=3, alpha=ALPHA)
    tbl.build_table(redis_client, "spread", seqs, vocab_size=V, max_order=3, alpha=ALPHA)
    per_node = [redis.Redis(port=p).dbsize() for p in ports]
    assert all(n > 0 for n in per_node), per_node
    contexts = [s[i - 3 : i] for s in seqs[:5] for i in range(3, 30, 4)]
    on_cluster = tbl.SemanticTable(cluster, "spread").neighbours_batch(contexts, 5)
    assert on_cluster == tbl.SemanticTable(redis_client, "spread").neighbours_batch(contexts, 5)
    keys = [tbl.context_key("spread", 1, contexts[0][-n:]) for n in (1, 2, 3)]
    assert len({cluster.keyslot(k) for k in keys}) == 1
    assert tbl.drop_table(cluster, "spread") == [1]
    assert sum(redis.Redis(port=p).dbsize() for p in ports) == 0


def test_lookup_script_fallback_and_cache_agree(redis_client):
    """The server-side lookup script, the plain ZREVRANGE fallback and the client-side cache give the same result."""
    build(redis_client)
    contexts = [[1], [1, 2], [2, 3], [4], [], [3, 1], [7, 1, 2]]
    plain = tbl.SemanticTable(redis_client, "tiny")
    plain._scripted, plain.cache_size = False, 0
    expected = plain.neighbours_batch(contexts, 4)
    scripted = tbl.SemanticTable(redis_client, "tiny")
    scripted.cache_size = 0
    redis_client.script_flush()  # the script is loaded again on NOSCRIPT
    assert scripted.neighbours_batch(contexts, 4) == expected
    assert [scripted.neighbours(c, 4) for c in contexts] == expected
    cached = tbl.SemanticTable(redis_client, "tiny")
    assert cached.neighbours_batch(contexts, 4) == expected
    assert cached.neighbours_batch(contexts, 4) == expected  # now from the cache
    cached.neighbours(contexts[1], 4).ids.append(99)  # callers get copies
    assert cached.neighbours(contexts[1], 4) == expected[1]


KILLED_BUILD = """
import os, signal, sys, redis
from overlay.table import build_table
client = redis.Redis(unix_socket_path=sys.argv[1])
def die(done, total):
    if done >= 20:
        os.kill(os.getpid(), signal.SIGKILL)
build_table(client, sys.argv[2], [list(range(1, 60)) * 3], vocab_size=64, max_order=3, batch=10, on_flush=die)
"""


def test_a_killed_build_is_abandoned_and_removed_by_the_next_build(redis_client):
    """A build SIGKILLed mid-write leaves a "building" version that is never read, is reported abandoned (its
    process is gone), and is removed by the next build; only-building domains are not offered as tables."""
    done = subprocess.run([sys.executable, "-c", KILLED_BUILD, redis_client.socket_file, "half"], timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert tbl.versions(redis_client, "half")[1]["status"] == "building"
    assert list(redis_client.scan_iter(match="ovl:half:v1:o*"))
    assert tbl.abandoned_versions(redis_client, "half") == [1]
    build(redis_client)
    with pytest.raises(tbl.TableNotFound) as err:
        tbl.SemanticTable(redis_client, "half")
    assert str(err.value) == ("no complete table for domain 'half' (its versions are still being built, or were "
                              "abandoned); domains with a complete table: tiny")
    build(redis_client, "half")
    assert sorted(tbl.versions(redis_client, "half")) == [2] and tbl.active_version(redis_client, "half") == 2
    assert not list(redis_client.scan_iter(match="ovl:half:v1:*"))
    assert not list(redis_client.scan_iter(match="ovl:*:lease"))


def test_a_building_version_of_a_live_process_is_not_abandoned(redis_client):
    """This process's own unfinished build holds a lease naming a running process: it is not abandoned."""
    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(redis_client, seqs=[[5, 6, 7, 8, 9, 5, 6]], batch=2, on_flush=stop)
    assert tbl.abandoned_versions(redis_client, "tiny") == []
    build(redis_client)
    assert sorted(tbl.versions(redis_client, "tiny")) == [1, 2]
