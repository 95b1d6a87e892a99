"""The layout rule of ``worker/``: the backend imports only the torch-free queue client (``worker/client/``),
never the GPU process (``worker/gpu/``) nor ``model/``, and nothing it loads imports torch."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

from redis_fixtures import ROOT

import worker.client

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("worker", "model", "torch", "backend"))))
"""


def loaded_by(*modules: str) -> list[str]:
    """The backend/worker/model/torch modules a fresh interpreter has loaded after importing ``modules``."""
    run = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_the_backend_loads_only_the_queue_client() -> None:
    backend = [f"backend.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "backend")])]
    loaded = loaded_by(*backend)
    assert "backend.app" in loaded and "worker.client.queue" in loaded
    outside = [m for m in loaded if not m.startswith(("backend", "worker.client")) and m != "worker"]
    assert outside == [], f"the backend loads {outside}"


def test_the_queue_client_needs_no_torch() -> None:
    client = [f"worker.client.{m.name}" for m in pkgutil.iter_modules(worker.client.__path__)]
    loaded = loaded_by(*client)
    assert all(m.startswith("worker.client") or m == "worker" for m in loaded), loaded
