# The two commands of the README: `make run` and `make test`. Both set up .venv on a fresh machine first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
ARCH := $(shell uname -m)
# segment_anything imports torchvision; these pairs are the ones that import together (see DEVELOPERS notes).
TORCH_X86_64 := torch==2.14.1 torchvision==0.29.1
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := $(TORCH_X86_64)
endif

.PHONY: run test lint bench clean e2e-deps chromium demo-model docker-test lock

# requirements.lock: every version the tests ran (torch and its nvidia wheels included), for x86_64 Linux and the
# python3 that makes .venv; `make test` and `make run` install under it (-c). On aarch64 the torch pins above differ
# from the lock's, so there the installs go unlocked (pyproject.toml's ranges only). `make lock` regenerates it with
# uv (pinned, in .uv/), resolving against pip's indexes as pip would (the highest version on any of them); the
# versions already in the lock are kept unless a requirement no longer allows them (delete the file to move all).
LOCK := requirements.lock
# requirements-ls.lock does the same for .lsvenv (Label Studio and what it pulls).
LS_LOCK := requirements-ls.lock
ifeq ($(ARCH),aarch64)
LOCK_C :=
LS_LOCK_C :=
else
LOCK_C := -c $(LOCK)
LS_LOCK_C := -c $(LS_LOCK)
endif
UV_VERSION := 0.13.9
UV := .uv/bin/uv
PIP_INDEXES = $(foreach u,$(shell python3 -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(u)) \
  $(foreach f,$(shell python3 -m pip config get global.find-links 2>/dev/null),--find-links $(f))

# The end-to-end tests drive a real Label Studio in its own venv (it pins redis 5, numpy 2.2 and Django: keep it
# apart from .venv) through the labeling UI in Debian's chromium (never a browser that a tool downloads itself).
LSVENV := .lsvenv
LS_STAMP := $(LSVENV)/.installed
LS_VERSION := 1.23.2
CHROMIUM := /usr/bin/chromium

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH) $(LOCK_C)
	$(PIP) install -q -e '.[all,dev]' $(LOCK_C)
	touch $(STAMP)

$(UV):
	test -x .uv/bin/python || python3 -m venv .uv
	.uv/bin/pip install -q uv==$(UV_VERSION)

# Not on $(STAMP): regenerating the lock never touches .venv (tests/test_lock.py then says what .venv lacks).
# manylinux_2_36: glibc 2.36 is Debian bookworm's (the test machines' and the images' base); with an older target
# uv skips releases that ship only newer wheels (cryptography 50.0.2: manylinux_2_34) and the lock lags .lsvenv.
lock: $(UV)
	printf '%s\n' $(TORCH_X86_64) > .uv/torch.txt
	$(UV) pip compile -q pyproject.toml --extra all --extra dev -c .uv/torch.txt --no-emit-package lisa-ls \
	  --python-version $$(python3 -c 'import platform; print(platform.python_version())') \
	  --python-platform x86_64-manylinux_2_36 --index-strategy unsafe-best-match $(PIP_INDEXES) \
	  --custom-compile-command 'make lock' -o $(LOCK)
	echo 'label-studio==$(LS_VERSION)' > .uv/ls.txt
	$(UV) pip compile -q .uv/ls.txt --no-annotate \
	  --python-version $$(python3 -c 'import platform; print(platform.python_version())') \
	  --python-platform x86_64-manylinux_2_36 --index-strategy unsafe-best-match $(PIP_INDEXES) \
	  --custom-compile-command 'make lock' -o $(LS_LOCK)

$(LS_STAMP): $(LS_LOCK)
	test -x $(LSVENV)/bin/python || python3 -m venv $(LSVENV)
	$(LSVENV)/bin/pip install -qq label-studio==$(LS_VERSION) $(LS_LOCK_C)
	touch $(LS_STAMP)

# Debian's chromium, installed only when missing (CI runs as root on Debian); apt's output only on failure.
chromium:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" != 0 ]; then echo "$(CHROMIUM) is missing: install Debian's chromium as root (UI tests skip; under CI=true they fail)"; \
	  else echo "installing Debian's chromium"; log=$$(mktemp); \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >$$log 2>&1 \
	      || { cat $$log; rm -f $$log; exit 1; }; rm -f $$log; fi; }

e2e-deps: $(LS_STAMP) chromium

run: $(STAMP)
	$(VENV)/bin/lisa-ls up $(ARGS)

test: $(STAMP) e2e-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# What users deploy, for real (issue 17): a Docker engine (Debian's docker.io, started only when none runs), the images
# of docker/ built on their public bases or Debian stand-ins (docker/harness.py), the compose stack up on 127.0.0.1 and
# tests/test_docker_stack.py against it. DOCKER_TEST_ARGS=--no-demo skips Label Studio.
docker-test: $(STAMP) e2e-deps
	$(PY) docker/harness.py test $(DOCKER_TEST_ARGS)

# Re-make the offline demo model that `make run` serves (models/demo, committed): a tiny LISA trained from scratch
# on synthetic shape scenes, then polished with hard queries and clicks: DEMO_MINUTES + POLISH_MINUTES of 2 CPU
# cores. See model/demo.py.
DEMO_MINUTES := 70
POLISH_MINUTES := 25
demo-model: $(STAMP)
	$(PY) -m model.demo --out models/demo --time-limit-s $$(( $(DEMO_MINUTES) * 60 )) \
	  --polish-s $$(( $(POLISH_MINUTES) * 60 ))

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
