# The two commands of the README:
#   make demo   set up, then train and test fold 0 on the built-in synthetic data (CPU, a few minutes)
#   make test   set up, then run the test suite (real-data tests read ../shared/data and skip without it)
# make test-fast skips the real-data (slow) and process-spawning (integration) tests: about a minute on 2 cores.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast lint benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/python tools/train_fold.py configs/demo.yaml run.overwrite=true
	$(BIN)/python tools/test_fold.py configs/demo.yaml --out runs/demo/results_untrained.json
	$(BIN)/python tools/test_fold.py configs/demo.yaml --checkpoint runs/demo/best.safetensors --out runs/demo/results.json

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration"

lint: setup
	$(BIN)/ruff check fewshot episodes tools tests
	$(BIN)/ruff format --check fewshot episodes tools tests

benchmark: setup
	$(BIN)/python tools/benchmark.py --out runs/benchmark.json

clean:
	rm -rf runs data/synthetic
