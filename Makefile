# exo-stable: `make serve` serves the default model; `make test` runs lint, types and the test suite.
# Both create .venv when it is missing, install the project into it, and fetch the default model.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# On Linux, Debian's OpenBLAS (package libopenblas0-pthread) replaces the slow reference BLAS bundled
# with mlx[cpu]; `exo-stable` preloads it by itself, tests get it here so that they measure the same thing.
OPENBLAS := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0))
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install model serve test lint pytest bench report clean vocab-vectors

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

model: install
	$(BIN)/exo-stable fetch

# llama.cpp's tokenizer test vectors (ggml-vocab-*.gguf + .inp/.out) from the llama-cpp-python sdist on PyPI,
# cached in ~/.cache/exo-stable/llama-vocab/ (about 75 MB); the tokenizer tests fetch them too when missing.
vocab-vectors: install
	$(BIN)/python tests/vocab_vectors.py

serve: model
	$(BIN)/exo-stable serve $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports  # the layers contract in pyproject.toml: no package imports one above it

pytest: model vocab-vectors
	LD_PRELOAD=$(OPENBLAS) $(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint pytest

bench: model
	LD_PRELOAD=$(OPENBLAS) $(BIN)/python benchmarks/bench_engine.py
	LD_PRELOAD=$(OPENBLAS) $(BIN)/python benchmarks/bench_cluster.py
	$(BIN)/python benchmarks/bench_wire.py
	$(BIN)/python benchmarks/bench_actors.py
	LD_PRELOAD=$(OPENBLAS) $(BIN)/python benchmarks/bench_validation.py
	LD_PRELOAD=$(OPENBLAS) $(BIN)/python benchmarks/chaos_report.py
	$(MAKE) report

# One JSON and PNG charts from whatever results the benchmarks saved (regenerates in seconds). The GPU figures
# come from benchmarks/bench_gpu.py, run on a machine with an NVIDIA GPU (README, "NVIDIA GPUs").
report: install
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
