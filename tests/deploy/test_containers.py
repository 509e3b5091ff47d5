"""docker-compose.yml and Dockerfile.gpu, checked without a Docker engine.

Debian's `docker-compose` (v1) renders `docker-compose config` offline: that validates the file
against the compose schema and resolves anchors and variables, as `docker compose up` would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO

from support.deploy_helpers import package_roots

SECRETS = {"POSTGRES_PASSWORD": "pw", "QAAS_SECRET_KEY": "k" * 40}


def _compose(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
        pytest.skip("docker-compose not installed")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env.update(env_extra or {})
    return subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_compose_file_renders_with_the_services_wired_right():
    r = _compose("config", env_extra=SECRETS)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    services = cfg["services"]
    assert {"postgres", "redis", "migrate", "api", "worker-gpu0", "worker-io", "flower"} <= set(services)
    for name in ("api", "worker-gpu0", "worker-io", "migrate"):
        env = services[name]["environment"]
        assert env["QAAS_ENV"] == "production"
        assert env["QAAS_DATABASE_URL"].startswith("postgresql+psycopg://") and env["QAAS_BROKER_URL"].startswith("redis://")
        assert services[name]["build"]["dockerfile"] == "Dockerfile.gpu"
    assert services["migrate"]["command"] == ["qaas", "migrate"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and gpu["device_ids"] == ["0"]
    assert services["worker-gpu0"]["command"] == ["qaas", "worker", "--queues", "gpu"]
    assert services["worker-io"]["command"] == ["qaas", "worker", "--queues", "io"]
    assert "deploy" not in services["worker-io"]  # uploads and webhooks never hold a GPU
    assert services["flower"]["profiles"] == ["monitoring"]


def test_compose_refuses_to_start_without_secrets():
    r = _compose("config")
    assert r.returncode != 0 and "POSTGRES_PASSWORD" in r.stderr


def test_dockerfile_builds_the_whole_package_on_a_cuda_base():
    text = (REPO / "Dockerfile.gpu").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:")
    assert any('pip install "torch==2.13.0"' in line for line in lines)
    # every folder setup.py installs is copied into the image
    for folder in package_roots().values():
        assert any(line.startswith(f"COPY {folder} ./{folder}") for line in lines), folder
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert 'pip install ".[bnb,consumers]"' in text
    # llama-cpp-python builds from source: the toolchain is there, with the flags scripts/setup.sh builds it with
    assert "cmake" in next(line for line in lines if "apt-get install" in line)
    setup_flags = re.search(r'^LLAMA_CMAKE_ARGS="([^"]+)"', (REPO / "scripts" / "setup.sh").read_text(), re.M).group(1)
    assert f'ENV CMAKE_ARGS="{setup_flags}"' in lines
