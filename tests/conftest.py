"""Shared fixtures: a per-session artifact cache and Hydra composition of the project's configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rftbench.run import CONFIG_DIR

os.environ["WANDB_MODE"] = "offline"  # tests never upload


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One artifact cache for the whole session (upstream checkpoint, corruption sets)."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("RFTBENCH_CACHE")
    os.environ["RFTBENCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("RFTBENCH_CACHE", None)
    else:
        os.environ["RFTBENCH_CACHE"] = old


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """compose(overrides) with the tiny preset, runs in tmp_path/runs and the session cache."""

    def _make(*overrides: str, experiment: str | None = "tiny", runs: Path | None = None):
        base = [f"paths.runs={runs or tmp_path / 'runs'}", f"paths.cache={cache_dir}", "device=cpu"]
        if experiment:
            base.insert(0, f"experiment={experiment}")
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("config", overrides=[*base, *overrides])

    return _make


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny tensors: two threads spin-wait on a shared 2-core
    machine and run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
