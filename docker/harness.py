"""``make docker-test``: a Docker engine, the images built on the bases users pull (or stand-ins), the stack tested.

``python docker/harness.py test`` (the make target) / ``build`` (images only). Steps, each with a clear message:

1. Engine: use a running ``dockerd``; else install Debian's ``docker.io``/``docker-compose`` when missing and start
   one (overlay2, vfs as fallback, ``--iptables=false``), stopped again at the end.
2. Bases: each Dockerfile's ``BASE`` argument stays the public image when it is present or can be pulled; otherwise
   a stand-in is made from Debian packages (``debootstrap`` bookworm: python3.11 + Debian's redis-server, imported
   once and cached; Label Studio 1.23.2 from PyPI on top of it, ``docker/standin/label-studio.Dockerfile``).
3. Build inputs: the host's pip settings (indexes, find-links, CA bundle, constraints) go to docker/build-inputs/
   (git-ignored; only the builder stages read them); local indexes are served on 127.0.0.1 while builds run
   (``--network host``), so builds reuse the host's wheels.
4. ``pytest tests/test_docker_stack.py`` with ``LISA_LS_DOCKER_STACK=1`` (the file is skipped otherwise).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
INPUTS = DOCKER / "build-inputs"
CACHE = Path(os.environ.get("LISA_LS_DOCKER_CACHE", "/var/cache/lisa-ls/standin"))
STANDIN = "lisa-ls-standin/bookworm:latest"
#: image -> (Dockerfile, public base, stand-in kind)
IMAGES = {
    "lisa-ls-redis": ("redis.Dockerfile", "redis:7.2", "debian"),
    "lisa-ls-backend": ("backend.Dockerfile", "python:3.11-slim-bookworm", "debian"),
    "lisa-ls-worker": ("worker.Dockerfile", "python:3.11-slim-bookworm", "debian"),
    "lisa-ls-label-studio": ("label-studio.Dockerfile", "heartexlabs/label-studio:1.23.2", "label-studio"),
}
TAG = "latest"
#: Loopback port of the local pip indexes during builds.
PIP_PORT = int(os.environ.get("LISA_LS_PIP_PORT", "47813"))


class HarnessError(RuntimeError):
    """A step that cannot go on; the message says what to do."""


def sh(*args: str, timeout: float | None = None, check: bool = True, quiet: bool = False,
       env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        if not quiet:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise HarnessError(f"`{' '.join(args[:4])} ...` exited with {proc.returncode}")
    return proc


def say(msg: str) -> None:
    print(f"docker-test: {msg}", flush=True)


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise HarnessError(f"{', '.join(packages)} missing and not root: install them (Debian: apt-get install)")
    say(f"installing Debian's {' '.join(packages)}")
    try:
        sh("apt-get", "update", "-q", timeout=300)
        sh("apt-get", "install", "-y", "-q", *packages, timeout=900,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (HarnessError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"cannot install {' '.join(packages)} (no network to Debian's mirror?): {e}") from e


class Engine:
    """A reachable Docker engine; started (and later stopped) here only when none runs."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def alive() -> bool:
        return shutil.which("docker") is not None and sh("docker", "info", check=False, timeout=30).returncode == 0

    def ensure(self) -> None:
        wanted = (("docker.io", "dockerd"), ("docker-compose", "docker-compose"))
        missing = [package for package, binary in wanted if not shutil.which(binary)]
        if self.alive():
            say("a Docker engine already runs: using it")
        else:
            if "docker.io" in missing:
                apt_install("docker.io")
                missing.remove("docker.io")
            for driver in ("overlay2", "vfs"):
                if self._start(driver):
                    break
            else:
                raise HarnessError("dockerd did not start with overlay2 nor vfs: see /tmp/lisa-ls-dockerd.log")
        if missing:
            apt_install(*missing)

    def _start(self, driver: str) -> bool:
        say(f"starting dockerd --storage-driver={driver} --iptables=false (stopped at the end)")
        log = open("/tmp/lisa-ls-dockerd.log", "ab")  # noqa: SIM115 - dockerd writes it while it runs
        self.proc = subprocess.Popen(["dockerd", f"--storage-driver={driver}", "--iptables=false"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(60):
            if self.proc.poll() is not None:
                break
            if self.alive():
                return True
            time.sleep(1)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            say("stopping the dockerd started here")
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def present(image: str) -> bool:
    return sh("docker", "image", "inspect", image, check=False, timeout=30).returncode == 0


def pullable(image: str) -> bool:
    try:
        return sh("docker", "pull", "-q", image, check=False, timeout=90).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def debian_standin() -> str:
    """python3.11 + venv + Debian's redis-server on bookworm (debootstrap once, cached in CACHE)."""
    if present(STANDIN):
        return STANDIN
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    rootfs = CACHE / "rootfs"
    if not (rootfs / "usr/bin/redis-server").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        say(f"debootstrap bookworm (python3.11, redis-server) into {rootfs} (about 1-2 min)")
        t0 = time.monotonic()
        try:
            sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates,redis-server",
               "bookworm", str(rootfs), "http://deb.debian.org/debian", timeout=900)
        except (HarnessError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(rootfs, ignore_errors=True)
            raise HarnessError(f"debootstrap failed (no network to deb.debian.org?): {e}") from e
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        say(f"debootstrap took {time.monotonic() - t0:.0f} s")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    sh_in = subprocess.run(["docker", "import", "--change", 'CMD ["python3"]', "-", STANDIN], stdin=tar.stdout,
                           capture_output=True, text=True)
    tar.wait()
    if sh_in.returncode != 0:
        raise HarnessError(f"docker import of the stand-in failed: {sh_in.stderr}")
    return STANDIN


def pip_locations() -> dict[str, list[str]]:
    """The host's pip settings that matter to a build: ``pip config list`` (files and PIP_* variables)."""
    out = sh(sys.executable, "-m", "pip", "config", "list").stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        found.setdefault(name, []).extend(value.strip().strip("'\"").split())
    return found


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class BuildInputs:
    """docker/build-inputs/pip.conf (+ CA bundle, constraints) and a loopback server for the local indexes."""

    def __init__(self) -> None:
        self.farm = Path(tempfile.mkdtemp(prefix="lisa-ls-pip-"))
        handler = functools.partial(_Quiet, directory=str(self.farm))
        self.served: dict[str, str] = {}
        # A fixed port keeps pip.conf - and so every cached layer after it - the same from run to run.
        try:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", PIP_PORT), handler)
        except OSError:
            say(f"127.0.0.1:{PIP_PORT} is taken: local indexes on another port (the builds' layer cache misses)")
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _serve(self, location: str) -> str:
        """A local index or folder as a loopback URL (its parent is served: indexes link to ../../files/)."""
        path = Path(location.removeprefix("file://"))
        if str(path) in self.served:
            return self.served[str(path)]
        slot = self.farm / f"d{len(list(self.farm.iterdir()))}"
        slot.symlink_to(path.parent)
        self.served[str(path)] = f"{self.base}/{slot.name}/{path.name}"
        return self.served[str(path)]

    def write(self) -> None:
        conf = pip_locations()
        lines = ["[global]", "trusted-host = 127.0.0.1", "default-timeout = 180"]
        for key in ("index-url", "extra-index-url", "find-links"):
            urls = [self._serve(v) if v.startswith(("file://", "/")) else v for v in conf.get(key, [])]
            urls = [u for u in urls if u]
            if urls:
                lines.append(f"{key} = {' '.join(dict.fromkeys(urls))}")
        cert = (conf.get("cert") or ["/etc/ssl/certs/ca-certificates.crt"])[0]
        for key, src, name in (("cert", cert, "ca.crt"), ("constraint", (conf.get("constraint") or [""])[0],
                                                         "constraints.txt")):
            if src and Path(src).is_file():
                shutil.copyfile(src, INPUTS / name)
                lines.append(f"{key} = /build-inputs/{name}")
        (INPUTS / "pip.conf").write_text("\n".join(lines) + "\n")

    def clear(self) -> None:
        self.httpd.shutdown()
        for name in ("pip.conf", "ca.crt", "constraints.txt"):
            (INPUTS / name).unlink(missing_ok=True)
        shutil.rmtree(self.farm, ignore_errors=True)


def build(names: list[str]) -> dict[str, dict]:
    """Build the images; returns {image: {"seconds", "bytes", "base"}} (also printed)."""
    figures: dict[str, dict] = {}
    inputs = BuildInputs()
    try:
        inputs.write()
        for name in names:
            dockerfile, public, kind = IMAGES[name]
            base = public if (present(public) or pullable(public)) else None
            if base is None:
                standin = debian_standin()
                if kind == "label-studio":
                    base = "lisa-ls-standin/label-studio:1.23.2"
                    if not present(base):
                        say(f"{public} cannot be pulled: building the stand-in {base} (Label Studio from PyPI)")
                        t1 = time.monotonic()
                        _docker_build("standin/label-studio.Dockerfile", base, standin)
                        say(f"{base} built in {time.monotonic() - t1:.0f} s")
                else:
                    base = standin
                say(f"{public} cannot be pulled: {name} builds on the stand-in {base}")
            t0 = time.monotonic()
            _docker_build(dockerfile, f"{name}:{TAG}", base)
            size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", f"{name}:{TAG}").stdout)
            figures[name] = {"seconds": round(time.monotonic() - t0, 1), "bytes": size, "base": base}
            say(f"{name}:{TAG} built in {figures[name]['seconds']:.0f} s, {size / 1e6:.0f} MB (base {base})")
    finally:
        inputs.clear()
    return figures


def _docker_build(dockerfile: str, tag: str, base: str) -> None:
    log = Path(tempfile.gettempdir()) / f"lisa-ls-build-{tag.split(':')[0].replace('/', '_')}.log"
    with open(log, "w") as out:
        code = subprocess.call(["docker", "build", "--network", "host", "-f", str(DOCKER / dockerfile),
                                "--build-arg", f"BASE={base}", "-t", tag, str(ROOT)],
                               stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if code != 0:
        tail = log.read_text(errors="replace")[-2500:]
        hint = ""
        if any(w in tail for w in ("Could not find a version", "No matching distribution", "Failed to establish",
                                   "Temporary failure in name resolution", "Network is unreachable")):
            hint = " - pip could not reach a package index (no network during the build?)"
        raise HarnessError(f"building {tag} from docker/{dockerfile} failed{hint}; log {log}:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "test"])
    parser.add_argument("--no-demo", action="store_true", help="skip the Label Studio image and the demo checks")
    args = parser.parse_args(argv)
    engine = Engine()
    t0 = time.monotonic()
    INPUTS.mkdir(exist_ok=True)
    lock = open(INPUTS / ".lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("docker-test: another docker/harness.py runs in this checkout (it owns docker/build-inputs/): "
              "wait for it to finish", file=sys.stderr)
        return 2
    try:
        engine.ensure()
        names = [n for n in IMAGES if not (args.no_demo and n == "lisa-ls-label-studio")]
        figures = build(names)
        say(f"images ready in {time.monotonic() - t0:.0f} s")
        (Path(tempfile.gettempdir()) / "lisa-ls-docker-figures.json").write_text(json.dumps(figures, indent=1))
        if args.action == "test":
            env = {**os.environ, "LISA_LS_DOCKER_STACK": "1", "PYTHONPATH": str(ROOT),
                   "LISA_LS_DOCKER_DEMO": "0" if args.no_demo else "1"}
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                                    "--durations=0", str(ROOT / "tests" / "test_docker_stack.py")], env=env)
            say(f"make docker-test took {time.monotonic() - t0:.0f} s in all")
            return code
        return 0
    except HarnessError as e:
        print(f"docker-test: {e}", file=sys.stderr)
        return 2
    finally:
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
