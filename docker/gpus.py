"""One worker per GPU on a host with several: write a compose override that pins each worker to its own GPU.

``deploy.replicas: N`` with ``count: 1`` asks the NVIDIA runtime for *some* GPU per replica: nothing stops two
replicas from landing on the same one, or a GPU from staying idle. This script writes ``docker/compose.gpus.yml``:
one service ``worker-gpuN`` per GPU, each a copy of ``docker/compose.yml``'s ``worker`` with that GPU alone reserved
(``device_ids: ["N"]``), and ``worker`` itself scaled to 0. Run it on the GPU host, then:

    python3 docker/gpus.py                # GPUs from `nvidia-smi -L`; or --count 4, or --ids 0,2
    docker compose -f docker/compose.yml -f docker/compose.gpus.yml --profile gpu up -d

Copies rather than ``extends``: Compose v1 (Debian's docker-compose 1.29.2) refuses to extend a service that has
``depends_on``, and merging an override's ``devices`` list into ``worker``'s keeps its ``count: 1`` entry beside
the new one. Settings stay ``${VARS}``: compose substitutes them when it starts, as for ``worker``. Regenerate when
``compose.yml``'s worker or the host's GPUs change. Needs PyYAML (``apt-get install python3-yaml``, or run it with
``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: The service in compose.yml that is copied once per GPU.
WORKER_SERVICE = "worker"
#: Where the override goes by default (next to compose.yml, so relative paths mean the same; git-ignored).
OVERRIDE = HERE / "compose.gpus.yml"


class GpuError(Exception):
    """A problem the user can fix (no GPUs found, a compose file without the worker service, ...)."""


def gpus_from_nvidia_smi(use_uuid: bool = False) -> list[str]:
    """The device ids of this host's GPUs as ``nvidia-smi -L`` lists them (``GPU 0: NVIDIA ... (UUID: GPU-...)``):
    their indices, or their UUIDs (stable when GPUs are added or reordered)."""
    if shutil.which("nvidia-smi") is None:
        raise GpuError("nvidia-smi is not on PATH (no NVIDIA driver here?): pass --count N or --ids 0,1,... "
                       "for the GPU host this override is meant for")
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise GpuError(f"`nvidia-smi -L` failed ({e}): pass --count N or --ids 0,1,...") from e
    ids = []
    for line in listing.splitlines():
        match = re.match(r"GPU (\d+):.*\(UUID: (GPU-[0-9a-fA-F-]+)\)", line.strip())
        if match:
            ids.append(match[2] if use_uuid else match[1])
    if not ids:
        raise GpuError(f"`nvidia-smi -L` listed no GPU: {listing.strip()!r}")
    return ids


def override(compose: dict[str, Any], device_ids: list[str], service: str = WORKER_SERVICE,
             redis_url: str | None = None) -> dict[str, Any]:
    """The override for ``compose`` (compose.yml as loaded, anchors resolved): ``service`` scaled to 0 and one copy
    of it per entry of ``device_ids``, that GPU alone reserved. With ``redis_url`` (a second host joining the first
    one's queue) the copies use that Redis and wait for no local service."""
    if len(set(device_ids)) != len(device_ids):
        raise GpuError(f"a GPU is named twice in {device_ids}: each GPU gets exactly one worker")
    if not device_ids:
        raise GpuError("no GPU given")
    base = (compose.get("services") or {}).get(service)
    if not isinstance(base, dict):
        raise GpuError(f"the compose file has no service {service!r} to copy per GPU")
    services: dict[str, Any] = {service: {"deploy": {"replicas": 0}}}  # its count: 1 replicas give way to these
    for device in device_ids:
        worker = copy.deepcopy(base)
        worker.pop("container_name", None)  # copies cannot share one
        deploy = worker.setdefault("deploy", {})
        deploy.pop("replicas", None)
        reservation = {"driver": "nvidia", "device_ids": [device], "capabilities": ["gpu"]}
        deploy.setdefault("resources", {}).setdefault("reservations", {})["devices"] = [reservation]
        if redis_url:
            worker.pop("depends_on", None)  # Redis (and the backend) run on the first host
            env = worker.get("environment") or {}
            if isinstance(env, list):  # the KEY=VALUE form
                env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
            worker["environment"] = {**env, "REDIS_URL": redis_url}
        name = f"{service}-gpu{device}" if device.isdigit() else f"{service}-{device.lower()}"
        services[name] = worker
    return {"services": services}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--count", type=int, help="GPUs 0..N-1 (default: the GPUs `nvidia-smi -L` lists)")
    which.add_argument("--ids", help="comma-separated GPU indices or UUIDs, e.g. 0,2,3")
    parser.add_argument("--uuid", action="store_true", help="with nvidia-smi: name GPUs by UUID, not index")
    parser.add_argument("--compose", type=Path, default=HERE / "compose.yml", help="the compose file to read")
    parser.add_argument("--service", default=WORKER_SERVICE, help="the worker service to copy per GPU")
    parser.add_argument("--redis-url", default=None,
                        help="for a second host: the first host's Redis (redis://[:PASSWORD@]HOST:6379/0); the "
                             "workers here then join its queue")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="override file to write (default: compose.gpus.yml next to --compose)")
    args = parser.parse_args(argv)
    try:
        import yaml
    except ImportError:
        print("docker/gpus.py needs PyYAML to read the compose file: apt-get install python3-yaml (or pip install "
              "pyyaml), or run it with .venv/bin/python", file=sys.stderr)
        return 2
    try:
        if args.count is not None:
            if args.count < 1:
                raise GpuError(f"--count must be at least 1, not {args.count}")
            ids = [str(i) for i in range(args.count)]
        elif args.ids is not None:
            ids = [i.strip() for i in args.ids.split(",") if i.strip()]
        else:
            ids = gpus_from_nvidia_smi(args.uuid)
        try:
            compose = yaml.safe_load(args.compose.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise GpuError(f"cannot read {args.compose}: {e}") from e
        result = override(compose if isinstance(compose, dict) else {}, ids, args.service, args.redis_url)
    except GpuError as e:
        print(f"docker/gpus.py: {e}", file=sys.stderr)
        return 2
    output = args.output or args.compose.resolve().parent / OVERRIDE.name
    workers = [n for n in result["services"] if n != args.service]
    # On a second host only the workers start: naming them keeps compose from starting a Redis and a backend there.
    profile = ((compose.get("services") or {}).get(args.service, {}).get("profiles") or ["gpu"])[0]
    up = f"docker compose -f {args.compose.name} -f {output.name} --profile {profile} up -d"
    up += f" {' '.join(workers)}" if args.redis_url else ""
    header = (f"# Written by docker/gpus.py for {len(ids)} GPU(s): {', '.join(ids)}. One worker per GPU; regenerate "
              f"when the GPUs or {args.compose.name}'s {args.service!r} change.\n#   {up}\n")
    output.write_text(header + yaml.safe_dump(result, sort_keys=False, default_flow_style=False))
    print(f"{output}: {', '.join(workers)} (one GPU each; {args.service!r} scaled to 0). Start: {up}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
