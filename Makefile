# The two set-up commands of the README:
#   make run    creates .venv if missing, installs, runs the DAG (dvc repro) on the built-in sample
#   make test   same set-up, runs the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export OMP_NUM_THREADS ?= 1
# dvc.yaml's stage commands say `python ...`: make it the project's interpreter
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-all install bench gpu-check clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: this build is the one on the local wheel cache (no multi-GB download)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@test -d .git || (echo "error: make run needs a git checkout (dvc repro records dvc.lock)"; exit 2)
	$(BIN)/dvc repro
	$(BIN)/defectforge validate data/release/manifest.parquet

# the suite on every core (pytest-xdist); tests sharing the one reproduced DAG stay on one worker
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m "nightly or not nightly"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# on a CUDA worker: the SD 1.5-size check (random weights, built offline) in under 8 minutes -> bench/results/gpu-check.json;
# refuses in one line without a CUDA device. The pinned torch wheel is the CUDA build (torch.version.cuda set)
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf data/sample data/manifests data/models data/generated data/refined data/quality data/detector data/release
