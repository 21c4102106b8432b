# Two commands do all the set-up on a fresh machine (README.md):
#   make demo   train on MovieLens-100K, export a bundle, serve it, show a real exchange
#   make test   lint + the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean loadtest lock

# requirements/all.txt pins every package CI tested (README.md "Locked dependencies"); torch is
# its CPU build there and in the train extra, a looser pin would pull CUDA wheels.
$(BIN)/sidrec: pyproject.toml requirements/all.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	$(BIN)/pip install --quiet -c requirements/all.txt -e ".[train,dev]"
	touch $(BIN)/sidrec

install: $(BIN)/sidrec

# Refresh requirements/*.txt to the newest releases pyproject.toml allows (then make test and
# commit them together: an upgrade is a deliberate commit).
lock: install
	requirements/compile.sh

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
