# The two commands of the README: `make run` (the main job) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
# PyPI has no CPU-only torch (its Linux torch pulls CUDA, gigabytes): the `+cpu` pin of
# constraints.txt comes from PyTorch's own CPU index. Only torch is taken from it, in a step of its
# own (--no-deps); every other package comes from PyPI alone. A CUDA setup names its index
# (TORCH_INDEX=https://download.pytorch.org/whl/cu128) or none (TORCH_INDEX=).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# `make test-floors`: the lowest versions pyproject.toml allows, installed together and tested.
FLOORS_VENV ?= .venv-floors
FLOORS ?= constraints-floors.txt
BIN := $(VENV)/bin
# glibc's malloc asks for transparent huge pages in the benchmarks (docs/benchmarks.md says why).
HUGEPAGES ?= glibc.malloc.hugetlb=1
STAMP := $(VENV)/.installed

.PHONY: install run tour test test-distributed lint clean check-install test-floors train-chapter5

install: $(STAMP)

# torch first, alone, from TORCH_INDEX; then the project, from PyPI. --retries 2: where TORCH_INDEX
# cannot be reached but pip's own configuration holds the pin (a local wheel directory), pip's
# default 5 retries would spend 7 s on it, 2 under half a second.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet --retries 2 --no-deps -c $(CONSTRAINTS) --extra-index-url $(TORCH_INDEX) torch)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# The main job, under 3 minutes on 2 cores: both twins on gpt2-small, checked in every stage and
# layer; the zoo of planted bugs on the tiny config; one benchmark cell. JSON and plots in out/.
run: $(STAMP)
	mkdir -p out
	$(BIN)/gpt-parity check --layers --plot out/layers.png --json out/check.json
	$(BIN)/gpt-parity mutants --config examples/tiny-odd.json --kind forward,bfloat16-training --plot out/mutants.png --json out/mutants.json
	GLIBC_TUNABLES=$(HUGEPAGES) $(BIN)/gpt-parity bench --dtype float32 --seq 256 --plot out/bench.png --json out/bench.json

# The full tour (about half an hour on 2 cores; CI runs it too): 10 AdamW steps in float32 and in
# bfloat16, the optimizer, loss, KV-cache and sampling mutants, the benchmark's float32 and bfloat16
# grid up to 4x1024 with the decoding grid, and chapter 5 on a small GPT.
tour: $(STAMP)
	mkdir -p out/tour
	$(BIN)/gpt-parity check --train-steps 10 --json out/tour/check-train.json
	$(BIN)/gpt-parity check --dtype bfloat16 --train-steps 10 --json out/tour/check-bfloat16.json
	$(BIN)/gpt-parity mutants --config examples/tiny-odd.json --kind float32-training,generation --json out/tour/mutants-training.json
	GLIBC_TUNABLES=$(HUGEPAGES) $(BIN)/gpt-parity bench --dtype float32,bfloat16 --seq 256,1024 --decode 256 --plot out/tour/bench.png --json out/tour/bench.json
	$(BIN)/gpt-parity train --config examples/chapter5-tiny.json --epochs 3 --lr 0.004 --out out/tour/train

# The book's chapter-5 run in both twins (GPT_CONFIG_124M at context 256, 10 epochs): about 15
# minutes on 2 cores with dropout off, longer with parity dropout. Not part of `make run` or `make tour`.
train-chapter5: $(STAMP)
	$(BIN)/gpt-parity train --out out/chapter5

# Both cores: each module (the zoo: each twin's half) runs whole on one worker, its fixtures built once.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope -m "not distributed"

# Every strategy and distributed mutant of both twins, each run starting its own ranks (minutes).
test-distributed: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope -m distributed

# ruff (lint and format) and mypy, configured in pyproject.toml; CI runs this before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The install on a machine with nothing but PyPI and TORCH_INDEX (network; not part of `make test`).
# TORCH_WHEELS=/dir: stand in for TORCH_INDEX with a local index of the torch wheels in /dir.
check-install:
	PYTHON='$(PYTHON)' CONSTRAINTS='$(CONSTRAINTS)' TORCH_INDEX='$(TORCH_INDEX)' TORCH_WHEELS='$(TORCH_WHEELS)' tools/check_install.sh

# The unit tests and the core parity tests on the dependency floors (not the slow whole suite).
test-floors:
	$(MAKE) --no-print-directory install VENV=$(FLOORS_VENV) CONSTRAINTS=$(FLOORS)
	$(FLOORS_VENV)/bin/python -m pytest tests/gpt_spec tests/gpt_torch tests/gpt_flax tests/twins -x -q -p no:cacheprovider
	$(FLOORS_VENV)/bin/python -m pytest -x -q -p no:cacheprovider tests/parity_tests/test_parity.py \
		tests/parity_tests/test_kv_cache.py tests/parity_tests/test_training.py tests/parity_tests/test_checkpoints.py

clean:
	rm -rf $(VENV) $(FLOORS_VENV)
