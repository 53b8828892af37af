# Quickstart targets. Every target sets up .venv itself (pip; torch pinned to 2.13.0 first so no
# CUDA build is pulled on CPU machines). Data: $CKD_DATA_DIR, default ../shared/data/amazon.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CKD_DATA_DIR ?= $(abspath ../shared/data/amazon)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Local only: the embedded Ray listens on 127.0.0.1 (ckd/ray_loopback.py). Never carry this into
# cluster commands: README "Ray authentication".
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR := $(abspath .torch_extensions)

.PHONY: setup demo test bench stats

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

## The main job on the embedded default: trains small teachers once (cached under runs/teachers),
## serves them from a local Ray over loopback gRPC, distils the SASRec student, prints metrics.
demo: setup
	$(BIN)/ckd-demo

## The test suite (what .ci/run runs).
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

stats: setup
	$(BIN)/ckd-data-stats
