"""Run identity: which work a config describes, and where its results go.

- `run_id`: hash of the resolved config minus `NOT_WORK` (keys that do not change the work): the
  same id means the same work, and the same run folder;
- `variant_id`: the same without the trial seed, shared by the seeds of one hyper-parameter setting
  (the leaderboard's variants);
- `start_spec`: a run's starting point (backbone, suite, seed), the key of artifacts runs share;
- the run folder `<paths.runs>/<suite>/<backbone>/<method>/<run_id>/` (`rftbench.results.run_folder`).
"""
from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rftbench.utils import stable_hash

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
# Keys that do not change the work a run does: left out of the run id (and of the variant id).
# (`tune` only says how many hp_seed draws a sweep makes: experiment=bench_tuned's hp_seed=0 runs are
# experiment=bench's runs. `features` says where frozen features are kept: bit-identical either way.)
NOT_WORK = ("paths", "device", "num_workers", "threads", "checkpoint_every_s", "tracking", "launcher", "tune",
            "features")
# Nested keys (paths) that do not change the work either.
# (`method.search` is where hp_seed draws come from; the drawn values themselves are in the config.
# `method.cost` and `backbone.perf_as` only describe a run's work and speed for --plan's estimates (rftbench.costs).
# `method.adapt.probe_memory_gb` only splits CT's batched probes, which are bit-exact either way;
# `budget.accumulate` only splits each batch into micro-batches: the effective batch is
# `budget.batch_size`, the results equal to float rounding except where a statistic is taken per
# micro-batch, BatchNorm in train mode or an in-batch contrastive loss: docs/protocol.md section 3.)
NOT_WORK_NESTED = (("eval", "batch_size"), ("method", "search"), ("method", "cost"), ("backbone", "perf_as"),
                   ("method", "adapt", "probe_memory_gb"), ("budget", "accumulate"))
# Nested keys left out only at the value every run had before the key existed (those runs keep their
# ids); any other value changes the numbers and is part of the id. (`suite.decode=cuda`: JPEGs decoded
# and resized on the GPU, pixels slightly unlike the CPU path's: README "Decoding on the GPU".)
AT_DEFAULT = {("suite", "decode"): "cpu"}


def _work(resolved: dict, drop: tuple[str, ...] = ()) -> dict:
    """A resolved config (plain dict, changed in place) without the keys that do not change the work."""
    for key in (*NOT_WORK, *drop):
        resolved.pop(key, None)
    for path in (*NOT_WORK_NESTED, *AT_DEFAULT):
        *parents, key = path
        node = resolved
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and (path not in AT_DEFAULT or node.get(key) == AT_DEFAULT[path]):
            node.pop(key, None)
    return resolved


def run_id(cfg: DictConfig) -> str:
    """Hash of the resolved config minus `NOT_WORK`: the same id means the same work."""
    return run_id_of(OmegaConf.to_container(cfg, resolve=True))


def run_id_of(resolved: dict) -> str:
    """`run_id` of a resolved config given as a plain dict (e.g. a run folder's config.yaml)."""
    return stable_hash(_work(copy.deepcopy(resolved)))


def variant_id(resolved: dict) -> str:
    """Hash of a run's resolved config (a run folder's config.yaml) minus `NOT_WORK` and the trial
    seed: the trial seeds of one hyper-parameter setting share it."""
    return stable_hash(_work(copy.deepcopy(resolved), ("seed",)), length=8)


def start_spec(cfg: DictConfig) -> dict:
    """What defines a run's starting point (backbone, suite, seed): the key of shared artifacts."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {k: resolved[k] for k in ("backbone", "suite", "seed")}
