"""Table Builder node: building real tables in a real Redis from the shipped sample data."""

from __future__ import annotations

from pathlib import Path

import pytest
from lfx.services.deps import get_settings_service

from overlay.langflow_support import NodeError
from overlay.table import SemanticTable, active_version
from overlay_components.overlay.table_builder import TableBuilderComponent

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k_train_sample.jsonl"


@pytest.fixture(autouse=True)
def unrestricted_paths(monkeypatch):
    """Local paths are allowed only when the server opts out of lfx's storage-scope restriction."""
    monkeypatch.setattr(get_settings_service().settings, "restrict_local_file_access", False)


def node(model, **values) -> TableBuilderComponent:
    """A Table Builder node on the test Redis, building a small table."""
    return TableBuilderComponent(**({"redis_url": model.redis_url, "domain": "built", "fmt": "gsm8k", "max_order": 2,
                                     "vocab_size": 300, "limit": 40} | values))


def test_builds_a_new_active_version(overlay_model):
    before = active_version(overlay_model.client, "built") or 0
    component = node(overlay_model, path=str(SAMPLE))
    result = component.build_table().data
    assert result["domain"] == "built" and result["version"] == before + 1 and result["chains"] == 40
    assert result["conversion"].startswith("40 chains converted, 0 errors")
    assert set(result["per_order"]) == {"1", "2"}
    table = SemanticTable(overlay_model.client, "built")
    assert table.version == result["version"] and int(table.info()["contexts"]) == result["contexts"]
    assert component.status.startswith(f"built built v{result['version']}: 40 chains")


def test_an_uploaded_file_works_like_a_path(overlay_model, tmp_path):
    upload = tmp_path / "upload.jsonl"
    upload.write_text("\n".join(SAMPLE.read_text().splitlines()[:5]) + "\n")
    assert node(overlay_model, file=str(upload), domain="uploaded").build_table().data["chains"] == 5


def test_local_paths_follow_the_servers_file_access_policy(overlay_model, monkeypatch):
    monkeypatch.setattr(get_settings_service().settings, "restrict_local_file_access", True)
    with pytest.raises(NodeError, match="LANGFLOW_RESTRICT_LOCAL_FILE_ACCESS"):
        node(overlay_model, path=str(SAMPLE)).build_table()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "give exactly one of Dataset File or Dataset Path"),
        ({"path": "/nonexistent.jsonl"}, "dataset file not found: /nonexistent.jsonl"),
        ({"path": str(SAMPLE), "domain": "bad domain"}, "invalid domain name"),
        ({"path": str(SAMPLE), "fmt": "csv"}, "Format must be gsm8k or jsonl"),
        ({"path": str(SAMPLE), "max_order": 0}, "Max Order must be ≥ 1"),
        ({"path": str(SAMPLE), "redis_url": "redis://127.0.0.1:1/0"}, "cannot reach Redis at 127.0.0.1:1"),
    ],
)
def test_bad_input_gives_one_readable_line(overlay_model, values, message):
    with pytest.raises(NodeError) as info:
        node(overlay_model, **values).build_table()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_file_with_no_usable_record_is_refused(overlay_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\nnot json\n')
    with pytest.raises(NodeError, match="no record could be converted"):
        node(overlay_model, path=str(bad)).build_table()
