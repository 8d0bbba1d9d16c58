"""GetNeighbours node: output methods called directly on a real table in a real Redis."""

from __future__ import annotations

import pytest

from overlay.langflow_support import NodeError
from overlay.table import SemanticTable, build_table
from overlay.tokenizer import encode
from overlay_components.overlay.get_neighbours import GetNeighboursComponent

CONTEXT = "<THOUGHT> Natalia sold 48/2"


def node(model, **values) -> GetNeighboursComponent:
    """A GetNeighbours node on the test table."""
    return GetNeighboursComponent(**({"domain": model.domain, "redis_url": model.redis_url, "k": 8} | values))


def test_candidates_are_the_tables_neighbours(overlay_model):
    table = SemanticTable(overlay_model.client, overlay_model.domain)
    expected = table.neighbours(encode(table.tokenizer(), CONTEXT), 8)
    component = node(overlay_model, context=CONTEXT)
    frame = component.get_candidates()
    assert list(frame.columns) == ["rank", "token", "token_id", "weight", "count", "order"]
    assert frame["token_id"].tolist() == expected.ids
    assert frame["rank"].tolist() == list(range(1, 9))
    assert frame["order"].tolist() == expected.orders
    assert "8 candidates from lf-test" in component.status and f"order used {expected.order}" in component.status


def test_empty_context_gives_the_unigram_top_k(overlay_model):
    component = node(overlay_model, context="")
    frame = component.get_candidates()
    assert len(frame) == 8 and set(frame["order"]) == {0}
    assert "unigram" in component.status


def test_domain_and_redis_come_from_the_environment_when_empty(overlay_model, monkeypatch):
    monkeypatch.setenv("OVERLAY_DOMAIN", overlay_model.domain)
    monkeypatch.setenv("OVERLAY_REDIS_URL", overlay_model.redis_url)
    frame = GetNeighboursComponent(context=CONTEXT, k=4).get_candidates()
    assert len(frame) == 4


def test_table_output_is_the_decoders_spec(overlay_model):
    component = node(overlay_model)
    spec = component.get_table().data
    assert spec == {"kind": "overlay.table", "domain": "lf-test", "redis_url": overlay_model.redis_url, "k_candidates": 8}
    assert component.status.startswith("table lf-test v1")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"domain": ""}, "no domain given: fill the node's Domain field or set OVERLAY_DOMAIN"),
        ({"domain": "unknown"}, "no complete table for domain 'unknown'"),
        ({"domain": "bad domain!"}, "invalid domain name"),
        ({"k": 0}, "Candidates (K) must be at least 1"),
        ({"redis_url": "redis://127.0.0.1:1/0"}, "cannot reach Redis at 127.0.0.1:1"),
        ({"context": "x" * 20_001}, "limit 20000"),
    ],
)
def test_bad_settings_give_one_readable_line(overlay_model, monkeypatch, values, message):
    monkeypatch.delenv("OVERLAY_DOMAIN", raising=False)
    with pytest.raises(NodeError) as info:
        node(overlay_model, **({"context": CONTEXT} | values)).get_candidates()
    assert message in str(info.value)
    error = info.value
    assert "\n" not in str(error) and error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_domain_dropdown_offers_the_complete_tables(redis_client, monkeypatch):
    build_table(redis_client, "complete", [[4, 5, 6, 7]], vocab_size=10)

    def interrupt(written: int, total: int) -> None:
        raise RuntimeError("build interrupted")

    with pytest.raises(RuntimeError):
        build_table(redis_client, "interrupted", [[4, 5, 6]], vocab_size=10, on_flush=interrupt)
    component = GetNeighboursComponent()
    template = component.to_frontend_node()["data"]["node"]["template"]
    assert template["domain"]["combobox"] and template["domain"]["refresh_button"]
    template["redis_url"]["value"] = f"unix://{redis_client.socket_file}"
    assert component.update_build_config(template, "typed-by-hand", "domain")["domain"]["options"] == ["complete"]
    assert template["domain"]["value"] == "typed-by-hand"
    template["redis_url"]["value"] = ""
    monkeypatch.setenv("OVERLAY_REDIS_URL", f"unix://{redis_client.socket_file}")
    assert component.update_build_config(template, "", "domain")["domain"]["options"] == ["complete"]
    template["redis_url"]["value"] = "redis://127.0.0.1:1/0"
    with pytest.raises(NodeError, match="cannot reach Redis at 127.0.0.1:1"):
        component.update_build_config(template, "", "domain")
