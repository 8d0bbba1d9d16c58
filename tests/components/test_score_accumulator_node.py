"""Score Accumulator node: running scores per chain id in a real Redis, fed by a real Selector's choices."""

from __future__ import annotations

import pytest

from overlay.accumulator import SessionStore
from overlay.langflow_support import NODE_CHAIN_PREFIX, NodeError, accumulate
from overlay_components.overlay.get_neighbours import GetNeighboursComponent
from overlay_components.overlay.score_accumulator import ScoreAccumulatorComponent
from overlay_components.overlay.selector import ITLMSelectorComponent

CONTEXTS = ("<Q> How many clips? <THOUGHT> Natalia sold", "<Q> How much did Weng earn? <THOUGHT> Weng earns",
            "<Q> How many clips? <THOUGHT> Natalia sold 48/2 <ACTION> CALL calc(")


@pytest.fixture(scope="module")
def choices(overlay_model):
    """The Selector's greedy choices after a few contexts."""
    out = []
    for context in CONTEXTS:
        cands = GetNeighboursComponent(context=context, domain=overlay_model.domain, redis_url=overlay_model.redis_url,
                                       k=16).get_candidates()
        out.append(ITLMSelectorComponent(context=context, candidates=cands, model_dir=overlay_model.model_dir).get_choice())
    return out


def node(model, **values) -> ScoreAccumulatorComponent:
    """A Score Accumulator node on the test Redis."""
    return ScoreAccumulatorComponent(**({"redis_url": model.redis_url, "max_tokens": 256} | values))


def test_chain_totals_add_up_across_runs(overlay_model, choices):
    overlay_model.client.delete(NODE_CHAIN_PREFIX + "s1")
    for choice in choices:
        component = node(overlay_model, choice=choice, chain_id="s1")
        totals = component.get_totals().data
    assert totals["tokens"] == 3 and totals["scored_tokens"] == 3 and totals["chain_id"] == "s1"
    assert totals["log_score"] == pytest.approx(sum(c.data["score"] for c in choices))
    assert totals["mean_logprob"] == pytest.approx(totals["log_score"] / 3)
    assert component.status.startswith("3 tokens, log-score") and "chain s1" in component.status
    state, _, trace = SessionStore(overlay_model.client, prefix=NODE_CHAIN_PREFIX).load_chain("s1")
    assert state == {k: totals[k] for k in ("tokens", "log_score", "scored_tokens", "tag_counts", "stop_reason")} | {
        "version": 1}
    assert [s["token_id"] for s in trace] == [c.data["token_id"] for c in choices]
    assert [s["position"] for s in trace] == [0, 1, 2]
    assert 0 < overlay_model.client.ttl(NODE_CHAIN_PREFIX + "s1") <= 3600
    assert 0 < overlay_model.client.ttl(NODE_CHAIN_PREFIX + "s1:trace") <= 3600


def test_without_a_choice_it_reports_the_chain(overlay_model, choices):
    overlay_model.client.delete(NODE_CHAIN_PREFIX + "s2")
    node(overlay_model, choice=choices[0], chain_id="s2").get_totals()
    assert node(overlay_model, chain_id="s2").get_totals().data["tokens"] == 1
    assert node(overlay_model).get_totals().data["tokens"] == 0


def test_stop_rules_are_applied(overlay_model, choices):
    overlay_model.client.delete(NODE_CHAIN_PREFIX + "s3")
    for choice in choices[:2]:
        totals = node(overlay_model, choice=choice, chain_id="s3", max_tokens=2).get_totals().data
    assert totals["stop_reason"] == "max_tokens"
    low = node(overlay_model, choice=choices[0], min_mean_logprob=-1e-9).get_totals().data
    assert low["stop_reason"] == "low_score"


def traffic(client) -> int:
    """Bytes the server has received from and sent to its clients so far (its own counters, INFO stats)."""
    stats = client.info("stats")
    return stats["total_net_input_bytes"] + stats["total_net_output_bytes"]


def test_a_save_costs_the_same_bytes_at_64_and_at_4096_tokens(overlay_model, choices):
    """Each run reads and writes a fixed-size state and appends one trace step: the bytes one token costs on the
    server, and the state key's size, are the same for a 64-token chain and a 4,096-token one (issue 16)."""
    client, key = overlay_model.client, NODE_CHAIN_PREFIX + "long"
    client.delete(key, key + ":trace")
    spent, size = {}, {}
    for n in range(1, 4097):
        if n in (64, 4096):
            before = traffic(client)
            node(overlay_model, choice=choices[0], chain_id="long", max_tokens=10_000).get_totals()
            spent[n] = traffic(client) - before
            size[n] = client.memory_usage(key)
        else:
            accumulate(choices[0], "long", overlay_model.redis_url, 10_000, 0.0, 3600)
    assert spent[4096] < 1.05 * spent[64] and size[4096] <= size[64] + 8, (spent, size)
    totals = node(overlay_model, chain_id="long").get_totals().data
    assert totals["tokens"] == 4096 and totals["log_score"] == pytest.approx(4096 * choices[0].data["score"])
    assert client.xlen(key + ":trace") == 4096


def test_accumulator_output_is_the_decoders_spec(overlay_model):
    component = node(overlay_model, max_tokens=64, min_mean_logprob=-4.0, state_ttl=60)
    assert component.get_accumulator().data == {"kind": "overlay.accumulator", "max_tokens": 64,
                                                "min_mean_logprob": -4.0, "state_ttl": 60}
    assert component.status == "stop after 64 tokens, stop below mean log-prob -4.0; chain state kept 60 s"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_tokens": 0}, "Max Tokens must be at least 1"),
        ({"state_ttl": 0}, "State TTL must be at least 1 second"),
        ({"choice": "not a choice"}, "takes the Choice output of the IT-LM Selector"),
        ({"chain_id": "bad id!"}, "invalid session id"),
        ({"chain_id": "s4", "redis_url": "redis://127.0.0.1:1/0"}, "cannot reach Redis at 127.0.0.1:1"),
    ],
)
def test_bad_input_gives_one_readable_line(overlay_model, values, message):
    with pytest.raises(NodeError) as info:
        node(overlay_model, **values).get_totals()
    assert message in str(info.value) and "\n" not in str(info.value)
