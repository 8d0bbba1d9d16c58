"""Chain Feedback node and its shipped flow: verdicts recorded and learned in a real Redis, the flow run by `lfx run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlay.accumulator import SessionStore
from overlay.chains import load_chains
from overlay.langflow_support import NodeError
from overlay.learn import applied_key, feedback_key, feedback_version, pending_feedback
from overlay.table import active_version, build_table, drop_table
from overlay.tokenizer import encode, tokenizer_hash, train_tokenizer
from overlay_components.overlay.feedback import ChainFeedbackComponent

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "flows" / "chain_feedback.json"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Chain texts of the first 30 sample records."""
    return [c.to_text() for c in load_chains(ROOT / "examples" / "data" / "gsm8k_train_sample.jsonl", limit=30).chains]


@pytest.fixture(scope="module")
def tok(texts):
    """The tokenizer the test tables are built with."""
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def table(overlay_redis, tok, texts):
    """A fresh table (version 1, no feedback yet) on the Langflow tests' Redis server; returns its domain."""
    domain = "fb-node"
    overlay_redis.delete(feedback_key(domain), applied_key(domain))
    if active_version(overlay_redis, domain) is not None:
        drop_table(overlay_redis, domain)
    build_table(overlay_redis, domain, [encode(tok, t) for t in texts[:20]], vocab_size=len(tok), max_order=3,
                tokenizer_json=tok.backend_tokenizer.to_str(), tokenizer_hash=tokenizer_hash(tok))
    return domain


def node(overlay_redis, table: str, **values) -> ChainFeedbackComponent:
    """A Chain Feedback node on the test Redis and table (``values`` may name another domain)."""
    return ChainFeedbackComponent(**({"redis_url": f"unix://{overlay_redis.socket_file}", "domain": table} | values))


def test_records_a_verdict_without_touching_the_table(overlay_redis, table, texts):
    component = node(overlay_redis, table, chain_text=texts[25], verdict="correct")
    result = component.record().data
    (item,) = pending_feedback(overlay_redis, table)
    assert result == {"domain": table, "recorded": item.id, "verdict": "correct", "chain_id": None, "answer": None,
                      "applied": 0, "version": None, "pending": 1}
    assert item.text == texts[25] and active_version(overlay_redis, table) == 1
    assert component.status == (f"recorded correct as {item.id} in {table}'s feedback log; 1 pending (Apply Now or "
                                f"`overlay table learn {table}`)")


def test_apply_now_learns_a_saved_chain_into_a_new_version(overlay_redis, table, tok, texts):
    SessionStore(overlay_redis).append("node-chain-1", {"question": "q", "prompt_len": 1}, encode(tok, texts[3]), [])
    component = node(overlay_redis, table, chain_id="node-chain-1", verdict="wrong", answer="72", apply_now=True)
    result = component.record().data
    assert (result["chain_id"], result["answer"], result["applied"], result["version"], result["active"]) == (
        "node-chain-1", "72", 1, 2, 2)
    assert active_version(overlay_redis, table) == 2 and feedback_version(overlay_redis, table, result["recorded"]) == 2
    assert component.status.endswith("applied 1 feedback item(s) to " + table + ": 0 correct (raised), 1 wrong "
                                     "(lowered) → v2 (was v1)")


def test_a_json_request_replaces_the_fields_it_names(overlay_redis, table, texts):
    request = json.dumps({"text": texts[26], "verdict": "wrong", "apply": True})
    result = node(overlay_redis, table, chain_id="ignored", verdict="correct", request=request).record().data
    assert (result["verdict"], result["chain_id"], result["version"]) == ("wrong", None, 2)
    assert pending_feedback(overlay_redis, table) == []


@pytest.mark.parametrize(("values", "message"), [
    ({"chain_text": "<Q> x"}, "no verdict given: choose correct or wrong"),
    ({"request": '{"text": "<Q> x", "verdict": "maybe"}'}, "unknown verdict 'maybe'"),
    ({"request": "thumbs up"}, "the feedback request must be a JSON object"),
    ({"request": '{"text": "<Q> x", "verdict": "wrong", "stars": 5}'}, "unknown field(s) stars"),
    ({"request": '{"text": "<Q> x", "verdict": "wrong", "apply": "yes"}'}, "'apply' in the feedback request must be a bool"),
    ({"verdict": "wrong"}, "give the chain id of a decoded chain or the chain's text"),
    ({"chain_id": "c1", "chain_text": "<Q> x", "verdict": "wrong"}, "not both"),
    ({"chain_id": "gone", "verdict": "wrong"}, "unknown chain id 'gone'"),
    ({"chain_text": "<Q> x", "verdict": "correct", "answer": "3"}, "a right answer goes with verdict 'wrong'"),
    ({"chain_text": "<Q> x", "verdict": "correct", "domain": "no-table"}, "no complete table for domain 'no-table'"),
    ({"chain_text": "<Q> x", "verdict": "correct", "redis_url": "redis://127.0.0.1:1/0"}, "cannot reach Redis at 127.0.0.1:1"),
])
def test_bad_input_gives_one_readable_line_and_records_nothing(overlay_redis, table, values, message):
    with pytest.raises(NodeError) as info:
        node(overlay_redis, table, **values).record()
    assert message in str(info.value) and "\n" not in str(info.value)
    assert pending_feedback(overlay_redis, table) == []


def test_domain_comes_from_the_environment_and_the_dropdown_lists_tables(overlay_redis, table, texts, monkeypatch):
    monkeypatch.setenv("OVERLAY_DOMAIN", table)
    monkeypatch.setenv("OVERLAY_REDIS_URL", f"unix://{overlay_redis.socket_file}")
    assert ChainFeedbackComponent(chain_text=texts[25], verdict="correct").record().data["domain"] == table
    component = ChainFeedbackComponent()
    template = component.to_frontend_node()["data"]["node"]["template"]
    assert template["verdict"]["options"] == ["correct", "wrong"] and template["domain"]["refresh_button"]
    assert table in component.update_build_config(template, "", "domain")["domain"]["options"]


def test_the_shipped_flow_records_and_applies_under_lfx_run(overlay_redis, table, texts):
    env = os.environ | {"OVERLAY_DOMAIN": table, "OVERLAY_REDIS_URL": f"unix://{overlay_redis.socket_file}"}
    request = json.dumps({"text": texts[27], "verdict": "correct", "apply": True})
    done = subprocess.run([Path(sys.executable).parent / "lfx", "run", FLOW, request, "--format", "text"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"verdict": "correct"' in done.stdout and '"version": 2' in done.stdout and '"applied": 1' in done.stdout
    assert active_version(overlay_redis, table) == 2 and pending_feedback(overlay_redis, table) == []
