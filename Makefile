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

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[all,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lisa-ls up $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
