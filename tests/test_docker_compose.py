"""docker-compose.yml: Redis and Langflow-with-overlay wired together.

Checked as parsed YAML and with `docker compose config` (no Docker engine needed); nothing here builds or starts it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
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


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    """A Docker Compose v2 command: the docker CLI's plugin or a standalone ``docker-compose`` ≥ 2."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            run = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=60)
            major = run.stdout.strip().lstrip("v").split(".")[0]
            if run.returncode == 0 and major.isdigit() and int(major) >= 2:
                return cmd
    pytest.skip("no Docker Compose v2 CLI (`docker compose` plugin or docker-compose ≥ 2 on PATH); Compose v1, "
                "e.g. Debian 12's docker-compose 1.29, rejects the Compose Specification's top-level `name`")


def compose_config(cli: list[str], **env: str) -> subprocess.CompletedProcess:
    """`docker compose config --format json` on the repository's file, with ``env`` added to a clean environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LANGFLOW_", "COMPOSE_"))}
    return subprocess.run([*cli, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"), "config",
                           "--format", "json"], capture_output=True, text=True, env=clean | env, timeout=60)


def test_compose_config_resolves_the_stack(compose_cli):
    run = compose_config(compose_cli, LANGFLOW_SUPERUSER_PASSWORD="s3cret")
    assert run.returncode == 0, run.stderr
    config = json.loads(run.stdout)
    assert config["name"] == "langflow-overlay" and set(config["services"]) == {"redis", "langflow"}
    langflow = config["services"]["langflow"]
    assert langflow["environment"]["LANGFLOW_SUPERUSER_PASSWORD"] == "s3cret"
    assert langflow["environment"]["LANGFLOW_SUPERUSER"] == "admin"
    assert (Path(langflow["build"]["context"]) / langflow["build"]["dockerfile"]).is_file()
    assert langflow["depends_on"]["redis"]["condition"] == "service_healthy"
    assert [(p["host_ip"], p["target"]) for p in langflow["ports"]] == [("127.0.0.1", 7860)]
    binds = {v["target"]: Path(v["source"]) for v in langflow["volumes"] if v["type"] == "bind"}
    assert all(src.exists() for target, src in binds.items() if target != "/app/models"), binds
    named = {v["source"] for s in config["services"].values() for v in s["volumes"] if v["type"] == "volume"}
    assert named == set(config["volumes"]) == {"redis-data", "langflow-data"}


def test_compose_config_refuses_a_missing_superuser_password(compose_cli):
    run = compose_config(compose_cli)
    assert run.returncode != 0 and "set LANGFLOW_SUPERUSER_PASSWORD" in run.stderr


def test_the_image_has_a_c_compiler_and_checks_the_kernel_builds(compose):
    """Without a compiler a container silently runs the ~2x slower NumPy step; the build fails instead."""
    langflow = compose["services"]["langflow"]
    text = (ROOT / langflow["build"]["context"] / langflow["build"]["dockerfile"]).read_text()
    assert re.search(r"apt-get install .*\bgcc\b.*\blibc6-dev\b", text)
    assert "overlay info" in text and "selector step: compiled C kernel" in text
