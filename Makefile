# make serve: environment + models + the gateway on 127.0.0.1:8000 (embedded CPU workers; HOST, PORT to change)
# make test:  environment + lint + every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODEL_REPO ?= model_repo
SIZE ?= tiny
# RUNTIME=gpu: onnxruntime-gpu and nvidia-ml-py instead of onnxruntime (in a venv of its own: VENV=.venv-gpu)
RUNTIME ?= cpu

.PHONY: env models serve test lint unit clean

env: $(STAMP)

# torch==2.13.0 is pinned in the export extra: it installs the local CPU wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,dev,$(RUNTIME)]'
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/migserve export --all --size $(SIZE) --out $(MODEL_REPO) --skip-existing

HOST ?= 127.0.0.1
PORT ?= 8000
serve: models
	$(BIN)/migserve serve --model-repo $(MODEL_REPO) --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The suite in TEST_JOBS pytest-xdist processes, each test file whole in one (tests/conftest.py), in the order collected
# (e2e and integration files first, the short unit files last to even out the end); TEST_JOBS=0: in this one process
TEST_JOBS ?= 2
test: lint
	$(BIN)/pytest $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadgroup --no-loadscope-reorder)

unit: $(STAMP)
	$(BIN)/pytest tests/unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
