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
	$(PIP) install -q "ve-fairseq==0.12.3" pytest pytest-xdist matplotlib ninja
	$(PIP) install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# The fast suite (CI): slow tests are marked and skipped here; two worker processes
# (pytest-xdist; TEST_WORKERS=0 runs in this process).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS) tests

# Everything, slow tests included.
test-slow: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The paper's associative-retrieval experiment (3-10 min on 2 CPU cores; results/demo/), then
# parity with beta in (0, 1) vs (0, 2) (1-5 min; results/demo/state_tracking/), then permutations
# of 3 elements with DeltaProduct (results/demo/state_tracking/s3/); measured in all: 4.5 min on an
# idle 2-core machine before the S3 part (see examples/state_tracking/README.md for its time).
# Budget and options: make demo DEMO_ARGS="--steps-scale 0.5 --jobs 1" (see run_demo.py --help),
# STATE_DEMO_ARGS="--max-update 200", S3_DEMO_ARGS (examples/state_tracking/run_demo.py --help).
DEMO_ARGS ?=
STATE_DEMO_ARGS ?=
S3_DEMO_ARGS ?=
demo: install
	$(PY) examples/associative_retrieval/run_demo.py $(DEMO_ARGS)
	$(PY) examples/state_tracking/run_demo.py $(STATE_DEMO_ARGS)
	$(PY) examples/state_tracking/run_demo.py --group s3 $(S3_DEMO_ARGS)

# S = 20..600 as in the paper: hours of training; meant for a GPU or a long run.
demo-full: install
	$(PY) examples/associative_retrieval/run_demo.py --full $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) build *.egg-info

# Compile every CUDA source for sm_80 and sm_90 with nvcc (no GPU needed), with torch's own
# half-type flags, and syntax-check the torch binding against the installed (CPU) torch headers.
NVCC ?= nvcc
CUDA_CHECK_DIR := build/cuda-check
CUDA_GENCODE := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
CUDA_CHECK_FLAGS := -std=c++17 -O3 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ \
	-D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
	-Xptxas -warn-spills,-warn-lmem-usage
cuda-check:
	@command -v $(NVCC) >/dev/null || { echo "cuda-check: $(NVCC) not found (install the CUDA toolkit)"; exit 1; }
	@mkdir -p $(CUDA_CHECK_DIR)
	@for f in fwp_fairseq/csrc/*.cu; do \
		echo "nvcc $$f"; \
		$(NVCC) $(CUDA_CHECK_FLAGS) $(CUDA_GENCODE) -c $$f -o $(CUDA_CHECK_DIR)/$$(basename $$f .cu).o || exit 1; \
	done
	@if [ -x $(PY) ] && $(PY) -c "import torch" 2>/dev/null; then \
		echo "g++ -fsyntax-only fwp_fairseq/csrc/binding.cpp"; \
		inc=$$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))") && \
		$${CXX:-g++} -std=c++20 -fsyntax-only -w -DTORCH_EXTENSION_NAME=fwp_cuda -DTORCH_API_INCLUDE_EXTENSION_H \
			$$inc fwp_fairseq/csrc/binding.cpp || exit 1; \
	else echo "skip binding.cpp syntax check: no torch in $(VENV)"; fi
	@echo "cuda-check: ok"
