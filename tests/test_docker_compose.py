"""docker-compose.yml: Redis and Langflow-with-overlay wired together (no Docker engine here: structure only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    """The parsed compose file."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_file() -> dict[str, str]:
    """docker/langflow.env as a dict."""
    lines = (ROOT / "docker" / "langflow.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def mounts(service: dict) -> dict[str, str]:
    """Container path → host path (or volume name) of a service's volumes."""
    out = {}
    for entry in service["volumes"]:
        host, container = entry.split(":")[:2]
        out[container] = host
    return out


def test_redis_is_the_official_image_with_a_health_check_and_a_volume(compose):
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:\d+(\.\d+)*(-alpine)?", redis["image"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert mounts(redis)["/data"] in compose["volumes"]
    assert "--appendonly" in redis["command"]


def test_langflow_is_the_official_image_extended_with_this_package(compose):
    langflow = compose["services"]["langflow"]
    dockerfile = ROOT / langflow["build"]["context"] / langflow["build"]["dockerfile"]
    text = dockerfile.read_text()
    assert "FROM langflowai/langflow:1.13.0" in text
    for copied in ("pyproject.toml", "overlay", "components"):
        assert re.search(rf"COPY .*\b{copied}\b", text) and (ROOT / copied).exists()
    assert "uv pip install --python /app/.venv/bin/python" in text and "lfx extension list" in text


def test_langflow_reaches_redis_and_waits_for_it(compose):
    langflow = compose["services"]["langflow"]
    assert langflow["environment"]["OVERLAY_REDIS_URL"] == "redis://redis:6379/0"
    assert langflow["depends_on"]["redis"]["condition"] == "service_healthy"
    assert all(port.startswith("127.0.0.1:") for port in langflow["ports"])
    assert "?" in langflow["environment"]["LANGFLOW_SUPERUSER_PASSWORD"]


def test_flows_and_configuration_are_mounted(compose):
    langflow = compose["services"]["langflow"]
    volumes = mounts(langflow)
    settings = env_file()
    assert volumes[settings["LANGFLOW_LOAD_FLOWS_PATH"]] == "./flows"
    config = next(c for c, h in volumes.items() if h == "./docker/langflow.env")
    assert langflow["command"][-2:] == ["--env-file", config]
    assert settings["OVERLAY_MODEL_DIR"].startswith(next(c for c, h in volumes.items() if h == "./models"))
    assert volumes["/app/data"] in compose["volumes"] and settings["OVERLAY_HOME"].startswith("/app/data")
    for host in volumes.values():
        assert not host.startswith("./") or host == "./models" or (ROOT / host).exists(), host
    assert settings["LANGFLOW_AUTO_LOGIN"] == "false"
