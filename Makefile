# make bench     : set up the environment (once) and run the embedded digits benchmark into results/
# make test      : set up the environment (once) and run the test suite
# make bench-tuned: the tuned benchmark (every method's defaults + tune.draws random draws) into results/tuned/
# make reproduce : rerun the committed benchmark from an empty cache and compare with results/
#                  (make reproduce EXPERIMENT=bench_tuned: the tuned one, against results/tuned/)
# make lock      : re-resolve the dependencies of pyproject.toml and rewrite requirements.lock
# make perf      : rftbench's hot paths against bare PyTorch loops -> results/perf.md
#                  (make perf PERF_ARGS="--quick --out /tmp/perf.md": a smoke run elsewhere)
# make test-gpu  : the gpu-marked tests (CUDA: bf16 + channels_last, CT, AutoAttack, joblib, store)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rftbench-installed
LOCK := requirements.lock
RUNS ?= runs
RUNS_TUNED ?= runs-tuned
EXPERIMENT ?= bench
PERF_ARGS ?=
# RobustBench 1.1.1 pins timm==1.0.9 and gdown==5.1.0, so it is installed without its dependencies
# (they are listed in pyproject.toml); its two extra modules come the same way.
NODEPS := robustbench==1.1.1 torchdiffeq==0.2.5 geotorch==0.4.0

.PHONY: bench bench-tuned test test-all leaderboard reproduce lock setup clean-runs

setup: $(STAMP)

# Every package comes at the exact version of requirements.lock (pip constraints); re-installs only
# when pyproject.toml or the lock changes.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[dev]'
	$(PY) -m pip install --quiet -c $(LOCK) --no-deps $(NODEPS)
	@touch $@

# A fresh venv with pyproject.toml's ranges resolved to today's releases, frozen (all packages,
# pip and setuptools included) into requirements.lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	.lock-venv/bin/python -m pip install --quiet --no-deps $(NODEPS)
	{ echo "# rftbench's locked environment: written by 'make lock', read by 'make' as pip constraints."; \
	  echo "# Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')"; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^#'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

# the CUDA path (tests/test_gpu.py and every other gpu-marked test); skipped without CUDA
.PHONY: test-gpu perf
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

# every hot path against a bare loop, interleaved, medians (scripts/perf.py); on an idle machine
perf: $(STAMP)
	$(PY) scripts/perf.py $(PERF_ARGS)

# the submitit_slurm preset against a real one-node SLURM on this machine (scripts/slurm_localhost.sh;
# installs slurm-wlm and munge with apt-get when missing, so run it as root)
.PHONY: test-slurm
test-slurm: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_slurm.py

# the committed benchmark: runs into $(RUNS), tables and plots into results/
bench: $(STAMP)
	$(PY) -m rftbench.run -m experiment=bench paths.runs=$(RUNS)
	$(PY) -m rftbench.leaderboard --runs $(RUNS) --out results

# the tuned benchmark (configs/experiment/bench_tuned.yaml), in its own runs folder so that `make bench`'s
# table stays the defaults' table
bench-tuned: $(STAMP)
	$(PY) -m rftbench.run -m experiment=bench_tuned paths.runs=$(RUNS_TUNED)
	$(PY) -m rftbench.leaderboard --runs $(RUNS_TUNED) --out results/tuned

# a leaderboard of your own runs, written beside them (the committed results/ are left alone)
leaderboard: $(STAMP)
	$(PY) -m rftbench.leaderboard --runs $(RUNS) --out $(RUNS)/leaderboard

reproduce: $(STAMP)
	$(PY) -m rftbench.reproduce --experiment $(EXPERIMENT)

clean-runs:
	rm -rf $(RUNS) $(RUNS_TUNED)
