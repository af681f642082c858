# The two commands of the README: `make run` (the main job) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

run: $(STAMP)
	mkdir -p out
	$(BIN)/gpt-parity check --layers --train-steps 10 --plot out/layers.png --json out/check.json
	$(BIN)/gpt-parity mutants --config examples/tiny-odd.json --plot out/mutants.png --json out/mutants.json
	$(BIN)/gpt-parity bench --dtype float32,bfloat16 --decode 256 --plot out/bench.png --json out/bench.json

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
