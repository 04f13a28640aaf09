# The two commands a newcomer needs: `make book` and `make test` (see README.md).
# CI (.ci/run) runs `make -j2 --output-sync=target test`: the unit tests and the chapters are
# single-threaded, so on two cores they run side by side.
# Both create .venv if missing and install the project; torch is pinned HERE (the CPU wheel)
# while the package itself declares a range, so Colab keeps its own torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
export SELORA_PROFILE ?= offline
export PYTHONHASHSEED := 0
# Chapters are committed executed with one torch thread; run them the same way. float32 results
# still differ from one CPU to another (torch, oneDNN, MKL and numpy pick kernels by instruction
# set), so no check may need another machine's floats bit for bit: `make test-kernels` runs the
# chapters again on this machine's plainest (SSE4.1) kernels, as an older x86-64 CPU would.
export SELORA_THREADS ?= 1
# the kernel selection of an SSE4.1-only x86-64 CPU, for `make test-kernels`
PLAIN_KERNELS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
	NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR" SELORA_CACHE=$(CURDIR)/.cache/plain-kernels

.PHONY: install data lint test test-kernels test-unit test-book book check-book execute bench gpu-check regression-reference clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[book,test]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

# The offline data (phantom Montgomery set in .cache/) that tests and chapters share: made once,
# before `make -j2 test` starts them side by side (the atomic folder swap is not meant for two writers).
data: $(STAMP)
	$(PY) -c "from selora.data import montgomery_root; montgomery_root('offline')"

## make test: lint, unit tests, then every chapter under nbval (offline profile)
test: lint test-unit test-book

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# `make -j2 test` runs the two legs side by side; the re-run of chapter 9's published experiment
# (minutes of one core) runs in the chapters' leg so that both legs take about as long.
BESIDE_BOOK := tests/test_results.py::test_a_published_signal_test_cell_reproduces

test-unit: $(STAMP) data
	$(PY) -m pytest tests/ -q --durations=15 --deselect $(BESIDE_BOOK)

test-book: $(STAMP) data
	$(PY) -m pytest --nbval-lax book/ $(BESIDE_BOOK) -q

## make test-kernels: every chapter and the regression runs on SSE4.1-level kernels (checks must not need this CPU's floats)
test-kernels: $(STAMP)
	$(PLAIN_KERNELS) $(PY) -m pytest tests/test_regression.py -q
	$(PLAIN_KERNELS) $(PY) -m pytest --nbval-lax book/ -q

## make book: render the committed chapters (outputs as committed, nothing executed) to _build/html;
## chapters are executed by `make execute` (to commit them) and by `make test-book` (nbval)
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

## make check-book: open every rendered page in headless Chromium (needs the chromium package)
check-book: book
	$(PY) scripts/check_rendered_book.py

## make execute: re-run chapters in place so they are committed with fresh outputs
execute: $(STAMP)
	$(PY) scripts/execute_notebooks.py

## make bench: speed/memory ratios (core layers, then SD-1.5 shapes; ~45 min alone on the machine, ~16 GiB free RAM)
bench: $(STAMP)
	$(PY) benchmarks/core.py
	$(PY) benchmarks/sd15.py

## make gpu-check: on a GPU machine, nothing installed (README "GPU check"): SD v1.5 at full widths with
## random weights, the four methods in fp16/bf16, a 1-process NCCL DDP start, speed and memory -> runs/gpu-check
## (<= 8 min); the package from this checkout and every wheel in wheels/ (diffusers) through PYTHONPATH
empty :=
space := $(empty) $(empty)
GPU_CHECK_PATH := $(subst $(space),:,$(strip $(CURDIR) $(abspath $(wildcard wheels/*.whl))))
gpu-check:
	mkdir -p runs/gpu-check
	PYTHONPATH=$(GPU_CHECK_PATH)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/gpu_check.py --device cuda --out-dir runs/gpu-check

## make regression-reference: re-record tests/data/regression (only when a change is MEANT to alter results)
regression-reference: $(STAMP)
	$(PY) scripts/regression_runs.py --update-reference

clean:
	rm -rf _build .cache
