# The README's commands. Everything runs inside .venv, created from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pinned: pip takes this CPU build from local disk; anything else downloads a CUDA build.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-slow demo demo-full bench cuda-check clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q "ve-fairseq==0.12.3" pytest matplotlib
	$(PIP) install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# The fast suite (CI): slow tests are marked and skipped here.
test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# Everything, slow tests included.
test-slow: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: install
	@echo "make demo: not yet (the associative-retrieval demo lands with its issue)"

bench: install
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) build *.egg-info
