# Two entry points for a fresh clone (see README): `make run` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: install run test test-all dry-run lint format benchmark clean

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet -r requirements-dev.lock -c requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

## The embedded default end to end: Shapley values of -FID for the 10 digit classes (CPU, ~11 min).
run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

## The test suite CI runs: lint and format checks, then unit tests, workflow tests on a tiny config, real-SLURM tests.
test: lint
	$(BIN)/python -m pytest -m "not slow" -q

## Everything, including the long checks marked slow.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q

dry-run: $(STAMP)
	$(BIN)/snakemake -n --cores $(CORES)

## Fidelity and cost against retraining on digits (about 100 minutes), on the latent and text-LoRA families' stand-ins
## and on the marketplace with its planted contributors; writes benchmarks/RESULTS.md and
## results{,-latent,-lora,-marketplace}.json.
benchmark: $(STAMP)
	$(BIN)/python benchmarks/fidelity.py --preset digits --cores $(CORES)
	$(BIN)/python benchmarks/fidelity.py --preset latent --cores $(CORES)
	$(BIN)/python benchmarks/fidelity.py --preset lora --cores $(CORES)
	$(BIN)/python benchmarks/fidelity.py --preset marketplace --cores $(CORES)

## ruff (lint and format), snakefmt and snakemake --lint; `make format` rewrites what the first two would flag.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/snakefmt Snakefile workflow/rules

clean:
	rm -rf results/* .snakemake
