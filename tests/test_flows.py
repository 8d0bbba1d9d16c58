"""The shipped flows: generated from the components (drift check), validated, run by `lfx run`, served by `lfx serve`."""

from __future__ import annotations

import ast
import asyncio
import copy
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from overlay.chains import load_chains
from overlay.flows import FLOWS, build_flow, components, component_source, drift, flows_app, registry
from overlay.learn import feedback_version
from overlay.table import SemanticTable, active_version, build_table
from overlay.tokenizer import encode
from overlay_components.overlay.get_neighbours import GetNeighboursComponent
from overlay_components.overlay.get_tracks import GetTracksComponent
from overlay_components.overlay.overlay_decoder import OverlayDecoderComponent
from overlay_components.overlay.score_accumulator import ScoreAccumulatorComponent
from overlay_components.overlay.selector import ITLMSelectorComponent
from overlay_components.overlay.tag_router import TagRouterComponent

from conftest import free_port, http_server

ROOT = Path(__file__).resolve().parent.parent
FLOWS_DIR = ROOT / "flows"
BIN = Path(sys.executable).parent
API_KEY = "test-key-7f3a"
QUESTIONS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Betty is saving money for a new wallet which costs $100.",
    "Julie is reading a 120-page book.",
)


def flow_json(name: str) -> dict:
    """A shipped flow file, parsed."""
    return json.loads((FLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def expected_chain(model, question: str) -> str:
    """The chain the shipped reasoning flow must give: its nodes' defaults, decoded in-process."""
    settings = {"domain": model.domain, "redis_url": model.redis_url}
    decoder = OverlayDecoderComponent(
        question=question, table=GetNeighboursComponent(**settings).get_table(),
        selector=ITLMSelectorComponent(model_dir=model.model_dir).get_selector(),
        accumulator=ScoreAccumulatorComponent().get_accumulator(), router=TagRouterComponent().get_router())
    return decoder.get_chain().text


# --- the nodes follow the conventions ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", components(), ids=lambda c: c.name)
def test_every_node_follows_the_conventions(cls):
    node = cls().to_frontend_node()["data"]["node"]
    assert cls.name.startswith("Overlay") and cls.display_name and cls.description and cls.icon
    visible = [f for f, spec in node["template"].items()
               if isinstance(spec, dict) and f != "code" and spec.get("show") and not spec.get("advanced")]
    assert 1 <= len(visible) <= 8, visible
    assert node["template"]["code"]["value"] == component_source(cls)
    tree = ast.parse(component_source(cls))
    for stmt in tree.body:
        assert isinstance(stmt, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.Expr)), ast.dump(stmt)[:80]
        if isinstance(stmt, ast.ImportFrom):
            assert stmt.level == 0 and stmt.module.split(".")[0] in ("lfx", "overlay")
    for output in node["outputs"]:
        assert getattr(cls, output["method"]).__doc__


def test_display_names_fit_the_sidebar():
    names = {cls.name: cls.display_name for cls in components()}
    assert all(len(shown) <= 14 for shown in names.values()), names
    assert len(set(names.values())) == len(names)


def test_names_are_unique_and_outputs_of_multi_output_nodes_are_shown_together():
    assert len({cls.name for cls in components()}) == len(components())
    for cls in components():
        outputs = cls().to_frontend_node()["data"]["node"]["outputs"]
        assert len(outputs) == 1 or all(o["group_outputs"] for o in outputs)


# --- packaging: the extension manifest, the entry point, LANGFLOW_COMPONENTS_PATH -------------------------------


def test_the_installed_extension_is_discovered_and_valid():
    listed = subprocess.run([BIN / "lfx", "extension", "list"], capture_output=True, text=True, timeout=120)
    assert re.search(r"langflow-overlay\s+0\.1\.0\s+overlay\s+@official\s+installed\s+discovered", listed.stdout), listed.stdout
    valid = subprocess.run([BIN / "lfx", "extension", "validate", ROOT / "components"], capture_output=True, text=True,
                           timeout=120)
    assert valid.returncode == 0 and "validate: ok" in valid.stdout, valid.stdout + valid.stderr


def test_the_wheel_ships_the_manifest_and_the_entry_point(tmp_path):
    source = tmp_path / "src"
    for name in ("overlay", "components"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", source,
                    "-w", tmp_path], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("overlay_components/extension.json"))
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {f"overlay_components/overlay/{Path(inspect.getfile(c)).name}" for c in components()} <= names
    assert manifest["bundles"] == [{"name": "overlay", "path": "overlay", "display_name": "Overlay", "icon": "route"}]
    assert "[langflow.extensions]\noverlay = overlay_components" in entry_points


def test_langflow_components_path_gives_the_overlay_category():
    from lfx.interface.components import aget_all_types_dict

    types = asyncio.run(aget_all_types_dict([str(ROOT / "components")]))
    assert sorted(types["overlay"]) == sorted(cls.name for cls in components())


# --- generated flows, drift ------------------------------------------------------------------------------------


def test_shipped_flows_match_their_components():
    assert drift(FLOWS_DIR) == []
    result = CliRunner().invoke(flows_app, ["check", "--dir", str(FLOWS_DIR)])
    assert result.exit_code == 0 and "5 flows match their components" in result.output


def test_export_is_deterministic_and_embeds_the_component_files(tmp_path):
    result = CliRunner().invoke(flows_app, ["export", "--dir", str(tmp_path)])
    assert result.exit_code == 0
    for spec in FLOWS:
        assert (tmp_path / spec.file).read_bytes() == (FLOWS_DIR / spec.file).read_bytes()
    nodes = flow_json("overlay_reasoning")["data"]["nodes"]
    assert {n["data"]["type"] for n in nodes} == {"ChatInput", "OverlayGetNeighbours", "OverlaySelector",
                                                  "OverlayScoreAccumulator", "OverlayTagRouter", "OverlayDecoder",
                                                  "ChatOutput", "TextOutput"}
    assert build_flow(FLOWS[0], registry()) == build_flow(FLOWS[0], registry())


def test_a_drifted_flow_is_caught(tmp_path):
    for spec in FLOWS:
        shutil.copy(FLOWS_DIR / spec.file, tmp_path / spec.file)
    flow = flow_json("overlay_reasoning")
    decoder = next(n for n in flow["data"]["nodes"] if n["data"]["type"] == "OverlayDecoder")
    decoder["data"]["node"]["template"]["code"]["value"] += "\n# edited by hand\n"
    (tmp_path / "overlay_reasoning.json").write_text(json.dumps(flow))
    (tmp_path / "build_table.json").unlink()
    problems = drift(tmp_path)
    assert any("embeds code that differs from" in p and "overlay_decoder.py" in p for p in problems)
    assert any(p.endswith("build_table.json: missing") for p in problems)
    result = CliRunner().invoke(flows_app, ["check", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "overlay flows export" in result.output


def test_lfx_validate_passes_at_level_4():
    deepest = subprocess.run([BIN / "lfx", "validate", "--level", "4", "--skip-components", str(FLOWS_DIR)],
                             capture_output=True, text=True, timeout=120)
    assert deepest.returncode == 0, deepest.stdout + deepest.stderr
    assert "5 passed, 0 failed" in deepest.stdout
    strict = subprocess.run([BIN / "lfx", "validate", "--level", "4", "--strict", "--skip-components",
                             "--skip-edge-types", "--skip-credentials", str(FLOWS_DIR)],
                            capture_output=True, text=True, timeout=120)
    assert strict.returncode == 0, strict.stdout + strict.stderr


# --- lfx run -----------------------------------------------------------------------------------------------------


def test_lfx_run_prints_the_chain(overlay_model):
    env = os.environ | overlay_model.env()
    done = subprocess.run([BIN / "lfx", "run", FLOWS_DIR / "overlay_reasoning.json", QUESTIONS[0], "--format", "text"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected_chain(overlay_model, QUESTIONS[0])


# --- lfx serve ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(overlay_model, tmp_path_factory):
    """`lfx serve flows/` on a free loopback port with an API key, pointed at the test table and model."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = os.environ | overlay_model.env() | {"LANGFLOW_API_KEY": API_KEY, "LANGFLOW_RESTRICT_LOCAL_FILE_ACCESS": "false"}
    cmd = [str(BIN / "lfx"), "serve", str(FLOWS_DIR), "--host", "127.0.0.1", "--port", str(port)]
    with http_server(cmd, port, env, ROOT, log, "lfx serve", timeout=120, interval=0.5) as base:
        yield base


def run(base: str, flow_id: str, question: str, key: str | None = API_KEY) -> httpx.Response:
    """POST /flows/{id}/run."""
    headers = {"x-api-key": key} if key else {}
    return httpx.post(f"{base}/flows/{flow_id}/run", json={"input_value": question}, headers=headers, timeout=300)


def test_serve_refuses_requests_without_the_key(served):
    reasoning = flow_json("overlay_reasoning")["id"]
    assert run(served, reasoning, QUESTIONS[0], key=None).status_code == 401
    assert run(served, reasoning, QUESTIONS[0], key="wrong").status_code == 401
    assert httpx.get(f"{served}/flows", timeout=10).status_code == 401
    listed = httpx.get(f"{served}/flows", headers={"x-api-key": API_KEY}, timeout=10).json()
    assert {f["id"] for f in listed} >= {flow_json(s.name)["id"] for s in FLOWS}


def test_serve_answers_with_the_chain(served, overlay_model):
    response = run(served, flow_json("overlay_reasoning")["id"], QUESTIONS[0])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] and body["result"] == expected_chain(overlay_model, QUESTIONS[0])
    assert body["result"].startswith("**") and re.search(r"\n- \*\*\\<[A-Z]+\\>\*\* ", body["result"])
    assert "Loading weights" not in body["logs"]


def test_sixteen_concurrent_requests_all_succeed_with_correct_results(served, overlay_model):
    flow_id = flow_json("overlay_reasoning")["id"]
    expected = {q: expected_chain(overlay_model, q) for q in QUESTIONS}

    async def ask_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(
                client.post(f"{served}/flows/{flow_id}/run", json={"input_value": QUESTIONS[i % 4]},
                            headers={"x-api-key": API_KEY}) for i in range(16)))

    responses = asyncio.run(ask_all())
    assert [r.status_code for r in responses] == [200] * 16
    assert [r.json()["result"] for r in responses] == [expected[QUESTIONS[i % 4]] for i in range(16)]


def test_inspect_neighbours_over_rest(served):
    body = run(served, flow_json("inspect_neighbours")["id"], "<THOUGHT> Natalia sold").json()
    assert body["success"], body
    lines = body["result"].splitlines()
    assert "token_id" in lines[0] and len(lines) == 2 + 32


def test_get_tracks_over_rest(served, overlay_model):
    body = run(served, flow_json("get_tracks")["id"], QUESTIONS[0]).json()
    assert body["success"], body
    node = GetTracksComponent(question=QUESTIONS[0], domain=overlay_model.domain, redis_url=overlay_model.redis_url)
    assert body["result"] == node.get_verdict().text and body["result"].startswith("**Follows track 1: answer ")


def test_build_table_over_rest(served, overlay_model):
    flow = flow_json("build_table")
    builder = next(n for n in flow["data"]["nodes"] if n["data"]["type"] == "OverlayTableBuilder")
    builder["data"]["node"]["template"]["domain"]["value"] = "rest-built"
    builder["data"]["node"]["template"]["limit"]["value"] = 20
    flow_id = upload(served, flow)
    body = run(served, flow_id, str(ROOT / "examples" / "data" / "gsm8k_train_sample.jsonl")).json()
    assert body["success"] and '"domain": "rest-built"' in body["result"] and '"chains": 20' in body["result"]
    assert overlay_model.client.get("ovl:rest-built:active") is not None


def test_feedback_over_rest(served, overlay_model):
    tok = SemanticTable(overlay_model.client, overlay_model.domain).tokenizer()
    texts = [c.to_text() for c in load_chains(ROOT / "examples" / "data" / "gsm8k_train_sample.jsonl", limit=12).chains]
    build_table(overlay_model.client, "rest-feedback", [encode(tok, t) for t in texts[:10]], vocab_size=len(tok),
                tokenizer_json=tok.backend_tokenizer.to_str())
    flow = flow_json("chain_feedback")
    node = next(n for n in flow["data"]["nodes"] if n["data"]["type"] == "OverlayChainFeedback")
    node["data"]["node"]["template"]["domain"]["value"] = "rest-feedback"
    request = json.dumps({"text": texts[11], "verdict": "correct", "apply": True})
    body = run(served, upload(served, flow), request).json()
    assert body["success"], body
    result = json.loads(body["result"][body["result"].index("{"):body["result"].rindex("}") + 1])
    assert (result["verdict"], result["applied"], result["version"]) == ("correct", 1, 2)
    assert active_version(overlay_model.client, "rest-feedback") == 2
    assert feedback_version(overlay_model.client, "rest-feedback", result["recorded"]) == 2


def upload(base: str, flow: dict) -> str:
    """Upload a flow under a fresh id and return that id."""
    flow = copy.deepcopy(flow) | {"id": str(uuid.uuid4())}
    response = httpx.post(f"{base}/flows/upload/", json=flow, headers={"x-api-key": API_KEY}, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def variant(node_type: str, field: str, value: str) -> dict:
    """The reasoning flow with one node field changed (a deployment configured wrongly)."""
    flow = flow_json("overlay_reasoning")
    node = next(n for n in flow["data"]["nodes"] if n["data"]["type"] == node_type)
    node["data"]["node"]["template"][field]["value"] = value
    return flow


BAD = {
    "empty question": (None, "", "Chain Decoder: the question is empty"),
    "whitespace question": (None, " \n\t ", "Chain Decoder: the question is empty"),
    "2 MB question": (None, "x" * 2_000_000, "Chain Decoder: the question has 2000000 characters; the limit is 2000"),
    "missing model folder": (("OverlaySelector", "model_dir", "/nonexistent/model"), QUESTIONS[0],
                             "IT-LM Selector: model folder /nonexistent/model does not exist"),
    "missing domain": (("OverlayGetNeighbours", "domain", "no-such-domain"), QUESTIONS[0],
                       "GetNeighbours: no complete table for domain 'no-such-domain'"),
    "redis unreachable": (("OverlayGetNeighbours", "redis_url", "redis://127.0.0.1:1/0"), QUESTIONS[0],
                          "GetNeighbours: cannot reach Redis at 127.0.0.1:1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_readable_line_and_the_server_keeps_serving(served, overlay_model, case):
    change, question, message = BAD[case]
    flow_id = upload(served, variant(*change)) if change else flow_json("overlay_reasoning")["id"]
    response = run(served, flow_id, question)
    body = response.json()
    assert response.status_code == 500 and body["success"] is False  # lfx serve answers every failure with 500
    assert body["result"] == "No response generated" and body["logs"].startswith(message)
    text = response.text
    assert body["logs"].count("\n") == 1 and len(text) < 1000
    assert all(leak not in text for leak in ("Traceback", 'File "', ".py", str(ROOT), "site-packages", "Loading weights"))
    good = run(served, flow_json("overlay_reasoning")["id"], QUESTIONS[1])
    assert good.status_code == 200 and good.json()["result"] == expected_chain(overlay_model, QUESTIONS[1])


def test_each_flow_description_names_its_nodes_as_shown():
    """A flow's description names its overlay nodes by the names the sidebar and canvas show (display_name)."""
    shown = {cls.name: cls.display_name for cls in components()}
    for spec in FLOWS:
        for kind in spec.nodes.values():
            if kind in shown:
                assert shown[kind] in spec.description, f"{spec.name}: {shown[kind]!r} not in its description"
