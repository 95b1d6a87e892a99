"""docker/gpus.py (issue 17 item 5): on a host with several GPUs every GPU gets exactly one worker, none shared.

Checked on what compose itself makes of the files: ``docker compose config`` (or Debian's ``docker-compose`` 1.29.2,
installed when missing and this runs as root; it needs no engine for ``config``) of compose.yml plus the override
for a 4-GPU host, parsed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from redis_fixtures import ROOT

GPUS = ROOT / "docker" / "gpus.py"
COMPOSE = ROOT / "docker" / "compose.yml"


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) when it answers, else ``docker-compose``; installs Debian's when missing (root)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "docker-compose"]):
            if subprocess.run(step, capture_output=True, env=env, timeout=600).returncode != 0:
                break
    return ["docker-compose"] if shutil.which("docker-compose") else None


def gpus(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPUS), *args], capture_output=True, text=True, timeout=60, **kwargs)


def gpu_reservations(service: dict) -> list[dict]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if "gpu" in (d.get("capabilities") or [])]


def test_compose_config_gives_every_gpu_of_four_exactly_one_worker(tmp_path):
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is here, and docker-compose could not be installed")
    folder = tmp_path / "docker"  # the build contexts (..) resolve to tmp_path, which exists
    folder.mkdir()
    text = COMPOSE.read_text()
    if command == ["docker-compose"]:  # Compose v1 does not know the top-level project name (v2 reads it)
        text = re.sub(r"(?m)^name: .*\n", "", text)
    (folder / "compose.yml").write_text(text)
    made = gpus("--count", "4", "--compose", str(folder / "compose.yml"))
    assert made.returncode == 0, made.stderr
    override = folder / "compose.gpus.yml"
    assert override.is_file() and "worker-gpu0, worker-gpu1, worker-gpu2, worker-gpu3" in made.stdout
    # LISA_LS_GPU_WORKERS=4: the count-1 replicas of `worker` that this replaces would be four
    env = {**os.environ, "LISA_LS_GPU_WORKERS": "4"}
    config = subprocess.run([*command, "-f", "compose.yml", "-f", "compose.gpus.yml", "--profile", "gpu", "config"],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert config.returncode == 0, config.stderr
    services = yaml.safe_load(config.stdout)["services"]
    print("\n".join(f"{name}: replicas {(s.get('deploy') or {}).get('replicas', 1)}, GPUs {gpu_reservations(s)}"
                    for name, s in services.items() if gpu_reservations(s) or name == "worker"))
    assert services["worker"]["deploy"]["replicas"] == 0
    # Compose v1's `config` prints every profile's services; what `--profile gpu up` starts is those of "gpu"
    # (the SAM 3 workers have profiles of their own).
    running = {name: s for name, s in services.items()
               if gpu_reservations(s) and int((s.get("deploy") or {}).get("replicas", 1)) > 0
               and "gpu" in (s.get("profiles") or ["gpu"])}
    assert sorted(running) == [f"worker-gpu{i}" for i in range(4)]
    ids = []
    for name, service in running.items():
        [device] = gpu_reservations(service)  # one reservation, for one named GPU, never "some GPU" (count)
        assert device["driver"] == "nvidia" and "count" not in device, (name, device)
        [gpu] = device["device_ids"]
        ids.append(str(gpu))
        assert int(service["deploy"].get("replicas", 1)) == 1, name
        # still the worker: its command, its queue, after Redis
        assert service["command"][:1] == ["--model"] and "cuda" in service["command"], name
        assert service["environment"]["REDIS_URL"] == services["worker"]["environment"]["REDIS_URL"]
        assert "redis" in service["depends_on"]
    assert sorted(ids) == ["0", "1", "2", "3"]  # distinct: no two workers share a GPU

    # A second host: its workers join the first host's Redis (its URL left to compose, so no password is written
    # into the file) and wait for no local Redis.
    joined = gpus("--ids", "0,1", "--redis-url", "${LISA_LS_REDIS_URL}", "--compose", str(folder / "compose.yml"))
    assert joined.returncode == 0 and "up -d worker-gpu0 worker-gpu1" in joined.stdout, joined.stderr
    env["LISA_LS_REDIS_URL"] = "redis://10.1.2.3:6379/0"
    config = subprocess.run([*command, "-f", "compose.yml", "-f", "compose.gpus.yml", "--profile", "gpu", "config"],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert config.returncode == 0, config.stderr
    services = yaml.safe_load(config.stdout)["services"]
    for name in ("worker-gpu0", "worker-gpu1"):
        assert services[name]["environment"]["REDIS_URL"] == "redis://10.1.2.3:6379/0"
        assert "depends_on" not in services[name]
    assert "worker-gpu2" not in services and services["worker"]["deploy"]["replicas"] == 0


def test_gpus_from_nvidia_smi_ids_and_bad_input(tmp_path):
    """GPUs as ``nvidia-smi -L`` lists them (a stand-in printing its format: no NVIDIA driver here), by index or
    UUID; and each mistake a clear message."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a1b2c3d-0000-1111-2222-333344445555)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-9f8e7d6c-0000-1111-2222-333344445555)'\n")
    smi.chmod(0o755)
    path = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "o.yml"
    assert gpus("-o", str(out), env=path).returncode == 0
    services = yaml.safe_load(out.read_text())["services"]
    assert sorted(services) == ["worker", "worker-gpu0", "worker-gpu1"]
    assert gpus("--uuid", "-o", str(out), env=path).returncode == 0
    ids = [gpu_reservations(s)[0]["device_ids"] for n, s in yaml.safe_load(out.read_text())["services"].items()
           if n != "worker"]
    assert ids == [["GPU-0a1b2c3d-0000-1111-2222-333344445555"], ["GPU-9f8e7d6c-0000-1111-2222-333344445555"]]
    assert gpus("--ids", "0,2", "-o", str(out)).returncode == 0
    assert sorted(yaml.safe_load(out.read_text())["services"]) == ["worker", "worker-gpu0", "worker-gpu2"]

    no_smi = {**os.environ, "PATH": str(tmp_path / "empty")}
    for args, env, message in [
        ([], no_smi, "nvidia-smi is not on PATH"),
        (["--ids", "1,1"], None, "a GPU is named twice"),
        (["--count", "0"], None, "--count must be at least 1"),
        (["--count", "2", "--service", "nope"], None, "no service 'nope'"),
        (["--count", "2", "--compose", str(tmp_path / "missing.yml")], None, "cannot read"),
    ]:
        result = gpus(*args, "-o", str(tmp_path / "x.yml"), env=env)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.yml").exists()
