"""The full Langflow server (the [langflow] extra): our category is registered, the shipped flows import and run.

Marked ``langflow``. The server runs from the interpreter environment that has ``langflow`` installed: the one
named by $OVERLAY_LANGFLOW_BIN (set by ``make test``, which installs it into .venv-langflow), else
.venv-langflow/bin/langflow, else ``langflow`` on PATH; without one the test is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import httpx
import pytest

from overlay.flows import FLOWS, component_source, components
from overlay_components.overlay.get_neighbours import GetNeighboursComponent
from overlay_components.overlay.overlay_decoder import OverlayDecoderComponent
from overlay_components.overlay.score_accumulator import ScoreAccumulatorComponent
from overlay_components.overlay.selector import ITLMSelectorComponent
from overlay_components.overlay.tag_router import TagRouterComponent

from conftest import free_port, http_server

pytestmark = pytest.mark.langflow

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
ADMIN, PASSWORD = "overlay-admin", "overlay-test-password-1"


def langflow_binary() -> str:
    """The langflow executable to test with; skip when none is installed (fail when CI named one that is missing)."""
    named = os.environ.get("OVERLAY_LANGFLOW_BIN")
    if named:
        if not Path(named).is_file():
            pytest.fail(f"OVERLAY_LANGFLOW_BIN={named} does not exist: run `make install-langflow`")
        return str(Path(named).resolve())
    local = ROOT / ".venv-langflow" / "bin" / "langflow"
    found = str(local) if local.is_file() else shutil.which("langflow")
    return found or pytest.skip("langflow is not installed: `make install-langflow` (uv, the [langflow] extra)")


@pytest.fixture(scope="module")
def server(overlay_model, tmp_path_factory):
    """`langflow run --backend-only` on loopback with login required, and an API key made for the tests; its overlay
    data directory holds the test model under models/, as the quickstart leaves it."""
    binary = langflow_binary()
    home = tmp_path_factory.mktemp("langflow")
    (home / "overlay" / "models").mkdir(parents=True)
    (home / "overlay" / "models" / overlay_model.domain).symlink_to(overlay_model.model_dir)
    port = free_port()
    env = os.environ | overlay_model.env() | {"OVERLAY_HOME": str(home / "overlay"),
        "LANGFLOW_CONFIG_DIR": str(home), "LANGFLOW_DATABASE_URL": f"sqlite:///{home}/langflow.db",
        "LANGFLOW_AUTO_LOGIN": "false", "LANGFLOW_SUPERUSER": ADMIN, "LANGFLOW_SUPERUSER_PASSWORD": PASSWORD,
        "LANGFLOW_DO_NOT_TRACK": "true", "LANGFLOW_OPEN_BROWSER": "false", "LANGFLOW_WORKERS": "1"}
    cmd = [binary, "run", "--backend-only", "--host", "127.0.0.1", "--port", str(port)]
    with http_server(cmd, port, env, home, home / "server.log", "langflow", timeout=300, interval=1) as base:
        token = httpx.post(f"{base}/api/v1/login", data={"username": ADMIN, "password": PASSWORD},
                           timeout=30).json()["access_token"]
        key = httpx.post(f"{base}/api/v1/api_key/", json={"name": "overlay-tests"},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["api_key"]
        yield base, {"x-api-key": key}


def expected_chain(model) -> str:
    """The chain the shipped reasoning flow must give (its nodes' defaults, decoded in-process)."""
    return OverlayDecoderComponent(
        question=QUESTION, table=GetNeighboursComponent(domain=model.domain, redis_url=model.redis_url).get_table(),
        selector=ITLMSelectorComponent(model_dir=model.model_dir).get_selector(),
        accumulator=ScoreAccumulatorComponent().get_accumulator(), router=TagRouterComponent().get_router(),
    ).get_chain().text


def run(base: str, headers: dict, flow_id: str, question: str, **extra) -> httpx.Response:
    """POST /api/v1/run/{flow_id} with a fresh session."""
    body = {"input_value": question, "input_type": "chat", "output_type": "any", "session_id": str(uuid.uuid4())}
    return httpx.post(f"{base}/api/v1/run/{flow_id}", json=body | extra, headers=headers, timeout=600)


def test_langflow_server_registers_imports_and_runs_the_overlay(server, overlay_model):
    base, headers = server
    catalog = httpx.get(f"{base}/api/v1/all", headers=headers, timeout=120).json()
    assert {entry["name"] for entry in catalog["overlay"].values()} == {cls.name for cls in components()}
    assert all(entry["extension"] == "langflow-overlay" for entry in catalog["overlay"].values())

    ids = {}
    for spec in FLOWS:
        path = ROOT / "flows" / spec.file
        with path.open("rb") as fh:
            response = httpx.post(f"{base}/api/v1/flows/upload/", files={"file": (spec.file, fh, "application/json")},
                                  headers=headers, timeout=60)
        assert response.status_code == 201, response.text
        (flow,) = response.json()
        assert flow["id"] == json.loads(path.read_text())["id"]
        ids[spec.name] = flow["id"]

    response = run(base, headers, ids["overlay_reasoning"], QUESTION)
    assert response.status_code == 200, response.text
    outputs = {o["component_display_name"]: o["results"] for o in response.json()["outputs"][0]["outputs"]}
    chain = outputs["Chat Output"]["message"]["text"]
    assert chain == expected_chain(overlay_model) and re.search(r"\n- \*\*\\<[A-Z]+\\>\*\* ", chain)
    assert json.loads(outputs["Text Output"]["text"]["text"])["text"].startswith(f"<Q> {QUESTION}")

    refused = httpx.post(f"{base}/api/v1/run/{ids['overlay_reasoning']}", json={"input_value": QUESTION}, timeout=60)
    assert refused.status_code in (401, 403)

    for question, message in (("", "the question is empty"), (" \n ", "the question is empty"),
                              ("x" * 2_000_000, "the question has 2000000 characters; the limit is 2000")):
        bad = run(base, headers, ids["overlay_reasoning"], question)
        assert bad.status_code == 500 and message in bad.text
        assert all(leak not in bad.text for leak in ("Traceback", 'File "', "site-packages", "Loading weights"))
    nodes = json.loads((ROOT / "flows" / "overlay_reasoning.json").read_text())["data"]["nodes"]
    table_node = next(n["id"] for n in nodes if n["data"]["type"] == "OverlayGetNeighbours")
    tweaked = run(base, headers, ids["overlay_reasoning"], QUESTION, tweaks={table_node: {"domain": "no-such-domain"}})
    assert tweaked.status_code == 500 and "no complete table for domain 'no-such-domain'" in tweaked.text
    assert run(base, headers, ids["overlay_reasoning"], QUESTION).status_code == 200


def test_the_editor_offers_complete_tables_and_the_data_directorys_models(server, overlay_model):
    base, headers = server
    for cls, field, expected in ((GetNeighboursComponent, "domain", overlay_model.domain),
                                 (ITLMSelectorComponent, "model_dir", f"/models/{overlay_model.domain}")):
        template = cls().to_frontend_node()["data"]["node"]["template"]
        body = {"code": component_source(cls), "field": field, "field_value": "", "template": template}
        response = httpx.post(f"{base}/api/v1/custom_component/update", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        options = response.json()["template"][field]["options"]
        assert any(option.endswith(expected) for option in options), options
