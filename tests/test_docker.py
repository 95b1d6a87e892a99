"""docker/: no Docker engine runs here, so check that the compose file and images agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from backend.config import PORT, BackendConfig
from worker.client.defaults import ENV_PREFIX, QueueConfig

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def queue_variables() -> set[str]:
    import dataclasses

    fields = dataclasses.fields(QueueConfig)
    return {"REDIS_URL"} | {ENV_PREFIX + f.name.upper() for f in fields if f.name != "redis_url"}


def test_services_and_health_checks(compose):
    services = compose["services"]
    assert {"redis", "backend", "worker", "label-studio"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no health check"
    assert services["label-studio"]["profiles"] == ["demo"]
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]


def test_backend_port_and_environment_match_the_code(compose):
    backend = compose["services"]["backend"]
    assert backend["ports"] == [f"${{LISA_LS_BIND:-0.0.0.0}}:${{LISA_LS_PORT:-{PORT}}}:{PORT}"]
    known = set(BackendConfig.variables()) | queue_variables()
    unknown = set(backend["environment"]) - known
    assert not unknown, f"backend env names the code does not read: {unknown}"
    assert backend["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert f"{PORT}" in (DOCKER / "backend.Dockerfile").read_text()


def test_worker_gpu_cache_and_command(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "replicas" in worker["deploy"]
    env = worker["environment"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    unknown = set(env) - queue_variables() - {"HF_HOME", "HF_TOKEN", "LOG_LEVEL"}
    assert not unknown, f"worker env names the code does not read: {unknown}"
    assert f"hf-cache:{env['HF_HOME']}" in worker["volumes"]
    # The command is `lisa-ls worker` + these arguments, with compose's ${VAR:-default} at their defaults.
    from worker.cli import build_parser

    argv = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in worker["command"]]
    parsed = build_parser().parse_args(["worker", *argv])
    assert (parsed.model, parsed.dtype, parsed.device) == ("xinlai/LISA-7B-v1", "bf16", "cuda")


def test_volumes_are_declared(compose):
    used = {v.split(":")[0] for svc in compose["services"].values() for v in svc.get("volumes", [])}
    assert used <= set(compose["volumes"]), used - set(compose["volumes"])


def test_images_install_the_right_extras():
    """Each image installs its extras' dependencies (docker/requirements.py) under requirements.lock; the backend's
    build proves it holds no torch; the worker's installs the tested torch pair (CUDA wheels)."""
    backend = (DOCKER / "backend.Dockerfile").read_text()
    worker = (DOCKER / "worker.Dockerfile").read_text()
    install = [line for line in backend.splitlines() if "pip install" in line]
    assert len(install) == 1 and "find_spec('torch') is None" in install[0]
    assert "-c /src/requirements.lock" in install[0]
    assert "requirements.py /src/pyproject.toml backend >" in backend
    assert "requirements.py /src/pyproject.toml worker quant >" in worker and "cuda" in worker.lower()
    assert 'ARG TORCH="torch==2.14.1 torchvision==0.29.1"' in worker
    for dockerfile in (backend, worker):
        assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", dockerfile, flags=re.M)
        for srcs in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.M):
            for src in srcs.split():
                assert (ROOT / src).exists(), f"{src} does not exist"


def test_label_studio_can_reach_the_backend(compose):
    env = compose["services"]["label-studio"]["environment"]
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert compose["services"]["backend"]["environment"]["LABEL_STUDIO_URL"].endswith("label-studio:8080}")


@pytest.mark.parametrize("name, profile, device, dtype", [("worker-sam3", "sam3", "cuda", "bf16"),
                                                           ("worker-sam3-cpu", "sam3-cpu", "cpu", "fp32")])
def test_sam3_workers_serve_facebook_sam3_under_their_own_profile(compose, name, profile, device, dtype):
    """SAM 3 workers are the same image under a profile of their own (today's `up` is unchanged); the GPU one
    reserves a GPU as the LISA worker does (without a reservation compose gives the container none)."""
    from worker.cli import build_parser

    svc = compose["services"][name]
    assert svc["profiles"] == [profile]
    assert svc["image"] == compose["services"]["worker"]["image"]
    argv = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in svc["command"]]
    parsed = build_parser().parse_args(["worker", *argv])
    assert (parsed.model, parsed.dtype, parsed.device) == ("facebook/sam3", dtype, device)
    if device == "cuda":
        [gpu] = svc["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    else:
        assert "deploy" not in svc
