"""Overlay Decoder node: the token loop over a real table and a real tiny selector, wired from real nodes."""

from __future__ import annotations

import json

import pytest

from overlay.decode import load_decoder
from overlay.langflow_support import NodeError, make_spec
from overlay_components.overlay.get_neighbours import GetNeighboursComponent
from overlay_components.overlay.overlay_decoder import OverlayDecoderComponent
from overlay_components.overlay.score_accumulator import ScoreAccumulatorComponent
from overlay_components.overlay.selector import ITLMSelectorComponent
from overlay_components.overlay.tag_router import TagRouterComponent

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


@pytest.fixture
def wired(overlay_model):
    """The decoder's inputs as the spec outputs of real GetNeighbours / Selector / Accumulator / Router nodes."""
    return {
        "table": GetNeighboursComponent(domain=overlay_model.domain, redis_url=overlay_model.redis_url, k=16).get_table(),
        "selector": ITLMSelectorComponent(model_dir=overlay_model.model_dir).get_selector(),
        "accumulator": ScoreAccumulatorComponent(max_tokens=40).get_accumulator(),
        "router": TagRouterComponent().get_router(),
    }


def test_chain_and_trace_match_the_library_decoder(overlay_model, wired):
    component = OverlayDecoderComponent(question=QUESTION, **wired)
    chain = component.get_chain().text
    trace = json.loads(component.get_trace().text)
    expected = load_decoder(overlay_model.domain, overlay_model.model_dir, overlay_model.redis_url, k_candidates=16,
                            temperature=0.0, top_p=1.0, seed=0, mix=0.0, max_tokens=40, session_ttl_s=3600,
                            max_step_repeats=3, max_question_chars=2000).generate(QUESTION)
    assert chain == expected.text and chain.startswith("<Q> Natalia sold clips")
    assert trace["text"] == chain and trace["stop_reason"] == expected.stop_reason
    assert trace["answer"] == expected.answer and trace["tokens"] == expected.tokens
    assert len(trace["trace"]["steps"]) == expected.tokens
    assert {"verdicts", "tool_calls", "steps", "errors"} <= set(trace)
    assert component.status.startswith(f"{expected.tokens} tokens in")


def test_both_outputs_share_one_decode(wired):
    component = OverlayDecoderComponent(question=QUESTION, **wired)
    component.get_chain()
    first = component._decoded
    component.get_trace()
    assert component._decoded is first
    component._pre_run_setup()
    assert component._decoded is None


def test_the_accumulators_token_limit_stops_the_chain(wired):
    wired["accumulator"] = ScoreAccumulatorComponent(max_tokens=5).get_accumulator()
    trace = json.loads(OverlayDecoderComponent(question=QUESTION, **wired).get_trace().text)
    assert trace["stop_reason"] == "max_tokens"


def test_unwired_accumulator_and_router_use_the_defaults(wired):
    del wired["accumulator"], wired["router"]
    assert OverlayDecoderComponent(question="How many clips?", **wired).get_chain().text.startswith("<Q> How many clips?")


def test_a_chain_id_keeps_the_chain_in_redis_and_continues_it(overlay_model, wired):
    overlay_model.client.delete("ovl:session:decoder-test")
    wired["accumulator"] = ScoreAccumulatorComponent(max_tokens=6, state_ttl=120).get_accumulator()
    first = OverlayDecoderComponent(question=QUESTION, chain_id="decoder-test", **wired).get_chain().text
    assert overlay_model.client.exists("ovl:session:decoder-test")
    assert 0 < overlay_model.client.ttl("ovl:session:decoder-test") <= 120
    again = OverlayDecoderComponent(question=QUESTION, chain_id="decoder-test", **wired).get_chain().text
    assert again.startswith(first)
    with pytest.raises(NodeError, match="belongs to another question"):
        OverlayDecoderComponent(question="Another question?", chain_id="decoder-test", **wired).get_chain()


def test_without_a_chain_id_nothing_is_kept(overlay_model, wired):
    before = set(overlay_model.client.scan_iter("ovl:session:*"))
    OverlayDecoderComponent(question=QUESTION, **wired).get_chain()
    assert set(overlay_model.client.scan_iter("ovl:session:*")) == before


@pytest.mark.parametrize(
    ("question", "message"),
    [("", "the question is empty"), ("   ", "the question is empty"),
     ("x" * 2001, "the question has 2001 characters; the limit is 2000")],
)
def test_bad_questions_give_one_readable_line(wired, question, message):
    with pytest.raises(NodeError) as info:
        OverlayDecoderComponent(question=question, **wired).get_chain()
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"table": None}, "connect the Table output of a GetNeighbours node"),
        ({"selector": None}, "connect the Selector output of an IT-LM Selector node"),
        ({"table": "selector"}, "the table input takes the 'Table' output of the GetNeighbours node, not overlay.selector"),
        ({"table": make_spec("table", domain="missing", redis_url="", k_candidates=16)}, "no complete table for domain 'missing'"),
        ({"selector": make_spec("selector", model_dir="/nonexistent/model", temperature=0.0, top_p=1.0, seed=0, mix=0.0)},
         "model folder /nonexistent/model does not exist"),
        ({"table": make_spec("table", domain="lf-test", redis_url="redis://127.0.0.1:1/0", k_candidates=16)},
         "cannot reach Redis at 127.0.0.1:1"),
        ({"table": make_spec("table", domain="lf-test", redis_url="", k_candidates=1)}, "k_candidates ≥ 2"),
    ],
)
def test_bad_wiring_and_settings_give_one_readable_line(overlay_model, wired, monkeypatch, change, message):
    monkeypatch.setenv("OVERLAY_REDIS_URL", overlay_model.redis_url)
    inputs = wired | {k: (wired[v] if isinstance(v, str) else v) for k, v in change.items()}
    with pytest.raises(NodeError) as info:
        OverlayDecoderComponent(question=QUESTION, **inputs).get_chain()
    assert message in str(info.value) and "\n" not in str(info.value)
