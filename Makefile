# The two commands a newcomer needs: `make book` and `make test` (see README.md).
# CI (.ci/run) runs `make -j2 --output-sync=target test check-book`: the unit tests and the chapters
# are single-threaded, so on two cores they run side by side; the render and its check follow on the
# core of whichever leg ends first.
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
# set), so no check may need another machine's floats bit for bit: `make test-kernels` runs every check
# that compares with numbers made elsewhere again under each kernel set this CPU can select below its own
# (scripts/kernel_spread.py KERNEL_SETS: AVX2 only, SSE4.1 level), as an older x86-64 CPU would.
export SELORA_THREADS ?= 1
KERNEL_SETS ?= avx2 sse41
# the checks against numbers made elsewhere: regression references, published-experiment re-runs, chapters
KERNEL_CHECKS := tests/test_regression.py tests/test_results.py book/
# a hang guard per chapter cell under slower kernels: under SSE4.1, chapter 6's training cell took over
# 680 s (stopped there by the default 600-s guard, pyproject.toml) on a machine shared with other work
KERNEL_CELL_TIMEOUT := 14400

.PHONY: install data lint test test-compat test-kernels test-unit test-book book check-book execute bench gpu-check regression-reference clean

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

# `make -j2 test` runs the two legs side by side; the re-run of chapter 9's published experiment (five
# minutes of one core) runs in the chapters' leg so that both legs, the chapters' with the book's render
# and check, take about as long (a fresh-clone CI run on an idle 2-core machine took 16.6 min: unit tests
# 13.0 min with the mini SD builder's one-minute smoke run, chapters 13.4 min after the render and check).
BESIDE_BOOK := tests/test_results.py::test_a_published_signal_test_cell_reproduces

test-unit: $(STAMP) data
	$(PY) -m pytest tests/ -q --durations=15 $(addprefix --deselect ,$(BESIDE_BOOK))

test-book: $(STAMP) data
	$(PY) -m pytest --nbval-lax book/ $(BESIDE_BOOK) -q --durations=10

## make test-kernels: regression runs, published-experiment re-runs and every chapter under each of KERNEL_SETS
## (checks must not need this CPU's floats; the SSE4.1 set is slow: about an hour)
test-kernels: $(STAMP)
	set -e; for k in $(KERNEL_SETS); do \
	  SELORA_CACHE=$(CURDIR)/.cache/kernels-$$k $(PY) scripts/kernel_spread.py exec $$k -- \
	    $(PY) -m pytest --nbval-lax --nbval-cell-timeout=$(KERNEL_CELL_TIMEOUT) $(KERNEL_CHECKS) -q; \
	done

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

## make test-compat: the paper-path, export and version-sensitive tests, then chapter 6, under a Colab-like set and
## under the lowest versions pyproject.toml declares (two more venvs; the CPU torch wheel kept, never replaced);
## `make test-compat-colab` or `make test-compat-lowest` runs one set (CI runs one per run, in turn: .ci/run)
COMPAT_colab := transformers==4.57.6 diffusers==0.35.2 peft==0.17.1 accelerate==1.10.1
COMPAT_lowest := diffusers==0.34.0 transformers==4.44.0 peft==0.17.0 accelerate==1.0.0 torchmetrics==1.4.0 \
	safetensors==0.4.3 numpy==1.24.4 pillow==10.0.0 tqdm==4.66.0 pyyaml==6.0 packaging==23.0
COMPAT_TESTS := tests/test_paper_path_*.py tests/test_export.py tests/test_models.py tests/test_modelcard.py \
	tests/test_tokenizer.py tests/test_metrics.py tests/test_extras.py tests/test_ddp.py tests/test_accelerate.py \
	tests/test_peft_lora.py tests/test_peft_demo.py
COMPAT_BOOK := book/06-finetune-montgomery.ipynb

# torch first, then the rest with the same pin on the command line: pip never swaps the CPU wheel
# (the chapters' imports by name: the colab extra's torch-fidelity would bring torchvision)
.PRECIOUS: .venv-compat-%/.installed  # a stamp, not an intermediate file to delete
.venv-compat-%/.installed: pyproject.toml
	test -x .venv-compat-$*/bin/python || $(PYTHON) -m venv .venv-compat-$*
	.venv-compat-$*/bin/python -m pip install -q "$(TORCH_PIN)"
	.venv-compat-$*/bin/python -m pip install -q -e ".[test]" matplotlib ipywidgets ipykernel $(COMPAT_$*) "$(TORCH_PIN)"
	touch $@

test-compat: test-compat-colab test-compat-lowest

# A cache of its own (the stand-in data linked in): chapter 6 replaces its run folder, and under
# `make -j2` the newest versions may be running the same chapter.
test-compat-%: .venv-compat-%/.installed data
	mkdir -p .cache/compat-$*
	ln -sfn ../data .cache/compat-$*/data
	SELORA_CACHE=$(CURDIR)/.cache/compat-$* .venv-compat-$*/bin/python -m pytest $(COMPAT_TESTS) -q
	SELORA_CACHE=$(CURDIR)/.cache/compat-$* .venv-compat-$*/bin/python -m pytest --nbval-lax $(COMPAT_BOOK) -q

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
