# Two commands do all the set-up on a fresh machine (README.md):
#   make demo   train on MovieLens-100K, export a bundle, serve it, show a real exchange
#   make test   lint + the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean loadtest

$(BIN)/sidrec: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	# torch is pinned to the CPU build in the train extra; a looser pin would pull CUDA wheels.
	$(BIN)/pip install --quiet -e ".[train,dev]"
	touch $(BIN)/sidrec

install: $(BIN)/sidrec

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/sidrec quickstart

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

# Locust against a service started on a trained bundle (loadtests/run_loadtest.py --help):
# reports in runs/loadtest, non-zero exit on any failed request or a p99 over the threshold.
BUNDLE ?= runs/ml-100k/bundle
LOADTEST_ARGS ?= --store redis --workers 2 --users 20 --run-time 30s
loadtest: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtests.run_loadtest --bundle $(BUNDLE) --out runs/loadtest $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) runs bundles .pytest_cache .ruff_cache
