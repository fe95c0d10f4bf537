PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench docs gpu-check clean

# Creates or refreshes .venv with everything. torch is pinned first so that the local CPU
# build (or, on a GPU host, the CUDA build you installed) satisfies the project's range.
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: install
	$(BIN)/multimodal-engine dev

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check consumers core http_files schemas tests bench
	$(BIN)/mypy consumers core http_files schemas

bench: install
	$(BIN)/python bench/voice_kafka.py

# On a CUDA machine (with the CUDA torch build installed in .venv, and torchao for fp8):
# FLUX.1-dev's size with random weights through the engine's GPU worker; writes gpu-check.json
gpu-check: install
	$(BIN)/python bench/gpu_check.py --out gpu-check.json

# docs/asyncapi.yaml and docs/openapi.json from the code (the tests fail until they match)
docs: install
	$(BIN)/multimodal-engine docs docs

clean:
	rm -rf $(VENV) .pytest_cache
