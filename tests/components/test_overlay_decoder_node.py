"""Chain Decoder node: the token loop over a real table and a real tiny selector, wired from real nodes."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from overlay.chains import load_chains
from overlay.decode import DecodeResult, load_decoder
from overlay.langflow_support import (NodeError, chat_text, decode_settings, jsonable, make_spec, md_escape,
                                      node_decoder, shared_selector, track_line, vote_chat)
from overlay.table import SemanticTable, build_table
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
from overlay.vote import decode_voted
from overlay_components.overlay.get_neighbours import GetNeighboursComponent
from overlay_components.overlay.overlay_decoder import OverlayDecoderComponent
from overlay_components.overlay.score_accumulator import ScoreAccumulatorComponent
from overlay_components.overlay.selector import ITLMSelectorComponent
from overlay_components.overlay.tag_router import TagRouterComponent

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k_train_sample.jsonl"


class Rendered(HTMLParser):
    """What a Markdown chat window shows: the visible text and the HTML elements it was rendered with."""

    def __init__(self, markdown: str) -> None:
        super().__init__()
        self.text, self.tags = "", set()
        self.feed(MarkdownIt("commonmark", {"html": True}).render(markdown))  # raw HTML passes, as in Langflow's chat

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)

    def handle_data(self, data: str) -> None:
        self.text += data


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
    chat, raw = component.get_chain().text, component.get_raw_chain().text
    trace = json.loads(component.get_trace().text)
    expected = load_decoder(overlay_model.domain, overlay_model.model_dir, overlay_model.redis_url, k_candidates=16,
                            temperature=0.0, top_p=1.0, seed=0, mix=0.0, max_tokens=40, session_ttl_s=3600,
                            max_step_repeats=3, max_question_chars=2000).generate(QUESTION)
    assert raw == expected.text and raw.startswith("<Q> Natalia sold clips")
    followed = track_line(expected.tracks)
    assert followed.startswith("Track: ") and trace["tracks"] == expected.tracks
    assert chat == f"{chat_text(expected)}\n\n{md_escape(followed)}"
    assert trace["text"] == raw and trace["stop_reason"] == expected.stop_reason
    assert trace["answer"] == expected.answer and trace["tokens"] == expected.tokens
    assert len(trace["trace"]["steps"]) == expected.tokens
    assert {"verdicts", "tool_calls", "steps", "errors"} <= set(trace)
    assert component.status.startswith(f"{expected.tokens} tokens in") and component.status.endswith(f"; {followed}")


def test_samples_vote_and_the_chat_shows_the_vote_then_the_chosen_chain(overlay_model, wired):
    component = OverlayDecoderComponent(question=QUESTION, samples=3, **wired)
    chat, raw = component.get_chain().text, component.get_raw_chain().text
    trace = json.loads(component.get_trace().text)
    decoder = load_decoder(overlay_model.domain, overlay_model.model_dir, overlay_model.redis_url, k_candidates=16,
                           temperature=0.0, top_p=1.0, seed=0, mix=0.0, max_tokens=40, session_ttl_s=3600,
                           max_step_repeats=3, max_question_chars=2000)
    chosen, vote = decode_voted(decoder, QUESTION, 3)
    assert raw == chosen.text == trace["text"] and trace["answer"] == vote.answer
    assert trace["vote"] == jsonable(vote.to_dict()) and trace["vote"]["samples"] == 3
    followed = md_escape(track_line(chosen.tracks))
    assert chat == f"{vote_chat(vote)}\n\n{followed}" and chat.endswith(f"{chat_text(chosen)}\n\n{followed}")
    lines = chat.splitlines()
    assert lines[0].startswith("**vote over 3 chains: ") and [line[:10] for line in lines[2:5]] == [
        "- chain 0 ", "- chain 1 ", "- chain 2 "]
    shown = Rendered(chat)
    assert vote.summary() in shown.text and f"Chosen chain ({vote.chosen})" in shown.text and "em" not in shown.tags
    assert component.status.startswith(vote.summary() + "; chosen chain: ")


@pytest.mark.parametrize(("inputs", "message"), [
    ({"samples": 0}, "samples must be between 1 and 64"), ({"samples": 65}, "samples must be between 1 and 64"),
    ({"samples": 2, "chain_id": "c1"}, "a Chain ID continues one chain: clear it or set Samples to 1"),
])
def test_bad_samples_give_one_readable_line(wired, inputs, message):
    with pytest.raises(NodeError, match=message):
        OverlayDecoderComponent(question=QUESTION, **inputs, **wired).get_chain()


def test_the_chat_message_reads_as_a_chain(wired):
    chat = OverlayDecoderComponent(question=QUESTION, **wired).get_chain().text
    trace = json.loads(OverlayDecoderComponent(question=QUESTION, **wired).get_trace().text)
    lines = chat.splitlines()
    steps = [s for s in trace["steps"] if s["tag"] not in ("Q", "EOS")]
    assert lines[0] == ("**No answer**" if trace["answer"] is None else f"**Answer: {trace['answer']}**")
    assert [line.split("**")[1] for line in lines[2:2 + len(steps)]] == [f"\\<{s['tag']}\\>" for s in steps]
    shown = Rendered(chat)
    assert all(f"<{s['tag']}>" in shown.text for s in steps) and "em" not in shown.tags


def test_tags_products_results_and_verdicts_stay_visible_in_a_markdown_chat():
    result = DecodeResult(
        question="How much for 100 boxes of 2 pens?", text="", answer="200", stop_reason="answer",
        steps=[{"tag": "Q", "text": "How much for 100 boxes of 2 pens?"},
               {"tag": "THOUGHT", "text": "100*2 pens at $1 each, not <b>bold</b> nor _x_ ~y~"},
               {"tag": "ACTION", "text": "CALL calc(100*2)"}, {"tag": "RESULT", "text": "200"},
               {"tag": "ACTION", "text": "CALL calc(1/0)"}, {"tag": "RESULT", "text": "error: division by zero"},
               {"tag": "CHECK", "text": "calc(100*2) = 200"}, {"tag": "CHECK", "text": "2*2 = 5"},
               {"tag": "ANSWER", "text": "200"}, {"tag": "EOS", "text": ""}],
        verdicts=[{"claim": "calc(100*2) = 200", "verdict": "pass", "reason": "both sides equal: 200 vs 200"},
                  {"claim": "2*2 = 5", "verdict": "fail", "reason": "sides differ: 4 vs 5"}],
        tool_calls=[], errors=["step 4 (ACTION): division by zero"], trace={}, tokens=40, seconds=0.1)
    chat = chat_text(result)
    assert chat.splitlines() == [
        "**Answer: 200 — 1 of its 2 checks failed**", "",
        r"- **\<THOUGHT\>** 100\*2 pens at \$1 each, not \<b\>bold\</b\> nor \_x\_ \~y\~",
        r"- **\<ACTION\>** CALL calc(100\*2)", r"- **\<RESULT\>** **200** (tool result)",
        r"- **\<ACTION\>** CALL calc(1/0)", r"- **\<RESULT\>** ⚠ tool error: division by zero",
        r"- **\<CHECK\>** calc(100\*2) = 200 → ✓ pass (both sides equal: 200 vs 200)",
        r"- **\<CHECK\>** 2\*2 = 5 → ✗ fail (sides differ: 4 vs 5)", r"- **\<ANSWER\>** 200", "",
        "stop: answer after 40 tokens", "", "⚠ step 4 (ACTION): division by zero",
    ]
    shown = Rendered(chat)
    for visible in ("<THOUGHT>", "<ACTION>", "<RESULT>", "<CHECK>", "<ANSWER>", "CALL calc(100*2)", "100*2 pens at $1",
                    "<b>bold</b> nor _x_ ~y~", "200 (tool result)", "✓ pass", "✗ fail"):
        assert visible in shown.text
    assert shown.tags == {"p", "strong", "ul", "li"}


def test_the_decoder_reuses_the_selector_nodes_model(overlay_model, wired):
    args = decode_settings(wired["table"], wired["selector"], wired["accumulator"], wired["router"], 2000)
    decoder, _ = node_decoder(args["domain"], args["model_dir"], args["redis_url"], args["config"])
    assert decoder.model is shared_selector(overlay_model.model_dir)[0].model
    assert node_decoder(args["domain"], args["model_dir"], args["redis_url"], args["config"])[0] is decoder


def test_a_table_made_with_another_tokenizer_is_one_readable_line(overlay_model, wired):
    texts = [chain.to_text() for chain in load_chains(SAMPLE, limit=20).chains]
    tok = train_tokenizer(texts, vocab_size=300)
    build_table(overlay_model.client, "lf-other-tokenizer", [encode(tok, t) for t in texts], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok), max_order=2)
    table = GetNeighboursComponent(domain="lf-other-tokenizer", redis_url=overlay_model.redis_url, k=16).get_table()
    with pytest.raises(NodeError, match="uses another tokenizer than table 'lf-other-tokenizer' v1") as info:
        OverlayDecoderComponent(question=QUESTION, **(wired | {"table": table})).get_chain()
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def second_domain(overlay_model) -> str:
    """Another complete table on the test Redis, with the test model's tokenizer."""
    tok = SemanticTable(overlay_model.client, overlay_model.domain).tokenizer()
    chains = load_chains(SAMPLE, limit=30).chains
    build_table(overlay_model.client, "lf-test-b", [encode(tok, c.to_text()) for c in chains], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok), max_order=3)
    return "lf-test-b"


def test_decoders_of_different_domains_run_in_parallel(overlay_model, wired, second_domain):
    args = decode_settings(wired["table"], wired["selector"], wired["accumulator"], wired["router"], 2000)
    _, lock = node_decoder(args["domain"], args["model_dir"], args["redis_url"], args["config"])
    _, other_lock = node_decoder(second_domain, args["model_dir"], args["redis_url"], args["config"])
    assert other_lock is not lock
    assert node_decoder(args["domain"], args["model_dir"], args["redis_url"], args["config"] | {"seed": 7})[1] is lock
    other_table = GetNeighboursComponent(domain=second_domain, redis_url=overlay_model.redis_url, k=16).get_table()
    with ThreadPoolExecutor(2) as pool, lock:  # a chain of the first domain is being decoded
        other = pool.submit(lambda: OverlayDecoderComponent(question=QUESTION, **(wired | {"table": other_table}))
                            .get_chain().text)
        same = pool.submit(lambda: OverlayDecoderComponent(question=QUESTION, **wired).get_chain().text)
        assert other.result(timeout=300).startswith("**")
        time.sleep(0.5)
        assert not same.done()
    assert same.result(timeout=300).startswith("**")


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
    raw = OverlayDecoderComponent(question="How many clips?", **wired).get_raw_chain().text
    assert raw.startswith("<Q> How many clips?")


def test_a_chain_id_keeps_the_chain_in_redis_and_continues_it(overlay_model, wired):
    overlay_model.client.delete("ovl:session:decoder-test")
    wired["accumulator"] = ScoreAccumulatorComponent(max_tokens=6, state_ttl=120).get_accumulator()
    first = OverlayDecoderComponent(question=QUESTION, chain_id="decoder-test", **wired).get_raw_chain().text
    assert overlay_model.client.exists("ovl:session:decoder-test")
    assert 0 < overlay_model.client.ttl("ovl:session:decoder-test") <= 120
    again = OverlayDecoderComponent(question=QUESTION, chain_id="decoder-test", **wired).get_raw_chain().text
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


def test_an_answer_whose_only_check_failed_says_so():
    result = DecodeResult(
        question="q", text="", answer="864", stop_reason="answer",
        steps=[{"tag": "CHECK", "text": "2*2 = 5"}, {"tag": "ANSWER", "text": "864"}],
        verdicts=[{"claim": "2*2 = 5", "verdict": "fail", "reason": "sides differ: 4 vs 5"}],
        tool_calls=[], errors=[], trace={}, tokens=9, seconds=0.1)
    assert chat_text(result).splitlines()[0] == "**Answer: 864 — its check failed**"
