# The two commands of the README: `make run` and `make test`. Both set up .venv on a fresh machine first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
ARCH := $(shell uname -m)
# segment_anything imports torchvision; these pairs are the ones that import together (see DEVELOPERS notes).
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: run test lint bench clean e2e-deps chromium demo-model

# The end-to-end tests drive a real Label Studio in its own venv (it pins redis 5, numpy 2.2 and Django: keep it
# apart from .venv) through the labeling UI in Debian's chromium (never a browser that a tool downloads itself).
LSVENV := .lsvenv
LS_STAMP := $(LSVENV)/.installed
LS_VERSION := 1.23.2
CHROMIUM := /usr/bin/chromium

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[all,dev]'
	touch $(STAMP)

$(LS_STAMP):
	test -x $(LSVENV)/bin/python || python3 -m venv $(LSVENV)
	$(LSVENV)/bin/pip install -qq label-studio==$(LS_VERSION)
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
