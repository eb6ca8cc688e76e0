# make bench : set up the environment (once) and run the embedded digits benchmark
# make test  : set up the environment (once) and run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rftbench-installed
RUNS ?= runs

.PHONY: bench test test-all leaderboard setup clean-runs

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. RobustBench 1.1.1 pins timm==1.0.9 and
# gdown==5.1.0, so it is installed without its dependencies (they are listed in pyproject.toml).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps robustbench==1.1.1 torchdiffeq==0.2.5 geotorch==0.4.0
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

bench: $(STAMP)
	$(PY) -m rftbench.run -m experiment=bench paths.runs=$(RUNS)
	$(PY) -m rftbench.leaderboard --runs $(RUNS) --out results

leaderboard: $(STAMP)
	$(PY) -m rftbench.leaderboard --runs $(RUNS) --out results

clean-runs:
	rm -rf $(RUNS)
