"""Sweeps at scale: the Hydra task wrapper, hyper-parameter draws (`hp_seed`), one-job-per-GPU
slots, the launcher presets' resolvers, and the end-of-sweep summary.

Every launcher (basic, joblib, submitit) behaves the same: every job runs, a failed run is recorded
in its folder, and the summary (done / skipped / failed) is read from the jobs' run folders before
and after the sweep, so it needs nothing back from the job processes.
"""
from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from rftbench.results import RunBusy, RunFolder, run_folder
from rftbench.validate import validate_config
from rftbench.utils import available_cores, stable_hash, write_text_atomic

log = logging.getLogger("rftbench")
DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
# what happened to a job of a sweep; the sweep fails (exit code 1) on `failed` or `incomplete`
OUTCOMES = ("done", "skipped", "failed", "busy", "incomplete")
LAST: Summary | None = None  # the summary of the last multirun of this process
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def register_resolvers() -> None:
    """`${rftbench.gpu_count:}` and `${rftbench.parallel_jobs:}` (GPUs, else CPU cores), used by
    the launcher presets."""
    if not OmegaConf.has_resolver("rftbench.gpu_count"):
        OmegaConf.register_new_resolver("rftbench.gpu_count", gpu_count)
    if not OmegaConf.has_resolver("rftbench.parallel_jobs"):
        OmegaConf.register_new_resolver("rftbench.parallel_jobs", lambda: gpu_count() or available_cores())
    if not OmegaConf.has_resolver("rftbench.writable"):
        OmegaConf.register_new_resolver("rftbench.writable", writable)


def writable(folder: str) -> str:
    """`folder` if this process may write there (or create it), else a folder under the system temp
    dir: Hydra's logs of a sweep over a read-only runs folder (finished runs are skipped without
    writing)."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if os.access(existing, os.W_OK | os.X_OK):
        return folder
    return str(Path(tempfile.gettempdir()) / f"rftbench-{os.getuid()}" / path.relative_to(path.anchor))


def draw(dist: str, args: list, rng: np.random.Generator) -> Any:
    """One value of `dist` (log_uniform | uniform | int_uniform: [low, high], choice: values)."""
    if dist == "choice":
        return args[int(rng.integers(len(args)))]
    low, high = args
    if dist == "log_uniform":
        return float(np.exp(rng.uniform(np.log(low), np.log(high))))
    if dist == "uniform":
        return float(rng.uniform(low, high))
    return int(rng.integers(low, high + 1))


def search_space(cfg: DictConfig) -> list[dict] | None:
    """The draws' space: the method's own `method.search` (configs/method/<m>.yaml) followed by the
    run's `hp_search`; None when neither is defined."""
    def listed(node) -> list[dict]:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else list(node or [])

    own = OmegaConf.select(cfg, "method.search", default=None)
    space = [*listed(own), *listed(cfg.get("hp_search"))]
    return space if space or own is not None else None


def sample_hparams(cfg: DictConfig) -> DictConfig:
    """`cfg` with every key of the search space (`search_space`: `method.search` + `hp_search`)
    drawn for `hp_seed` (unchanged for hp_seed=0). A key's value depends on hp_seed and the key
    only, never on the trial seed or the method, so the seeds of one draw are comparable trials of
    the same hyper-parameters and methods sharing a key (the fine-tuning recipe of ft, lpft, wise,
    rws) draw the same value. A method with an empty `search: []` has nothing to tune: its draws
    keep its defaults."""
    hp_seed = int(cfg.get("hp_seed", 0) or 0)
    if hp_seed == 0:
        return cfg
    space = search_space(cfg)
    if space is None:
        raise ValueError(f"hp_seed={hp_seed} draws hyper-parameters from method.search and hp_search, which "
                         f"are empty; set hp_search (example in configs/config.yaml) or use hp_seed=0")
    cfg = copy.deepcopy(cfg)
    for spec in space:
        dists = [d for d in DISTRIBUTIONS if d in spec]
        key = spec.get("key")
        if not key or len(dists) != 1:
            raise ValueError(f"hp_search entry {spec} needs `key` and exactly one of {DISTRIBUTIONS}")
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise ValueError(f"hp_search key {key!r} is not in the config")
        rng = np.random.default_rng([hp_seed, int(stable_hash(key), 16) % 2**32])
        OmegaConf.update(cfg, key, draw(dists[0], list(spec[dists[0]]), rng), merge=False)
    return cfg


def repeats_defaults(cfg: DictConfig) -> bool:
    """An hp_seed > 0 draw of a method with nothing to tune (an empty search space, e.g. zeroshot,
    soup, ct_robust): it keeps the defaults, the very work of hp_seed=0, so a sweep skips it instead
    of running an identical copy under another run id."""
    return int(cfg.get("hp_seed", 0) or 0) > 0 and search_space(cfg) == []


def slots_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"rftbench-gpu-slots-{os.getuid()}"


def claim_slot(n: int, folder: Path, poll_s: float = 2.0) -> tuple[int, IO]:
    """Wait for a free one of `n` slots on this machine; return its index and the open lock file
    (close it to free the slot; the OS frees it if the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for k in range(n):
            handle = open(folder / f"gpu{k}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return k, handle
            except BlockingIOError:
                handle.close()
        time.sleep(poll_s)


@contextmanager
def device_slot(cfg: DictConfig) -> Iterator[DictConfig]:
    """With `launcher.gpu_slots`, device=auto and several GPUs: `cfg` on a GPU no other job of this
    machine uses (one job per GPU); otherwise `cfg` unchanged. The device is not part of a run id."""
    wanted = bool((cfg.get("launcher") or {}).get("gpu_slots")) and cfg.get("device") == "auto"
    n = gpu_count() if wanted else 0
    if n < 2:
        yield cfg
        return
    k, handle = claim_slot(n, slots_dir())
    try:
        import torch

        torch.cuda.set_device(k)
        cfg = copy.deepcopy(cfg)
        cfg.device = f"cuda:{k}"
        log.info("job on GPU %d of %d", k, n)
        yield cfg
    finally:
        handle.close()


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors in the user's input (config values, data paths, a training that diverged at the chosen
    lr) that a single run reports in one line; anything else keeps its traceback."""
    from rftbench.backbones import CheckpointError
    from rftbench.data.folders import ImageFileError
    from rftbench.train import NonFiniteLossError
    from rftbench.validate import ConfigError

    return (ConfigError, CheckpointError, ImageFileError, FileNotFoundError, NotADirectoryError, NonFiniteLossError)


def run_task(cfg: DictConfig, execute: Callable[[DictConfig], str]) -> str:
    """The Hydra task: draw hyper-parameters, claim a GPU, execute. A single run raises on failure;
    in a multirun the failure is already recorded in the run folder, the job returns 'failed' (or
    'busy' when another process computes the run) and the sweep goes on."""
    if repeats_defaults(cfg):
        log.info("skip hp_seed=%s of method=%s: it has no search space, so this draw is hp_seed=0's run",
                 cfg.hp_seed, cfg.method.name)
        return "skipped"
    try:
        with device_slot(sample_hparams(cfg)) as job:
            return execute(job)
    except Exception as exc:
        if not _multirun():
            if isinstance(exc, expected_errors()):  # the user's input: one line, the traceback in error.txt
                if getattr(exc, "error_file", None) is None:  # else the runner's log line said it, with the path
                    print(f"Error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            raise
        if isinstance(exc, RunBusy):
            log.warning("%s", exc)
            return "busy"
        log.error("job failed: %s: %s", type(exc).__name__, exc)
        return "failed"


@dataclass
class Job:
    overrides: list[str]
    cfg: DictConfig
    folder: RunFolder


def expand(master: DictConfig, loader) -> list[Job]:
    """The jobs of a multirun, composed exactly as the basic sweeper and the launchers compose
    them (sweeper params + command-line overrides; the task config without `hydra`)."""
    params = master.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(master.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(args)
    jobs = []
    # `${hydra:...}` in a task config (the SLURM preset's threads) resolves against the master config
    hydra_cfg, before = HydraConfig.instance(), HydraConfig.instance().cfg
    hydra_cfg.set_config(copy.deepcopy(master))  # (set_config makes its `hydra` node read-only)
    try:
        for overrides in BasicSweeper.split_arguments(parsed, None)[0]:
            cfg = loader.load_sweep_config(master, list(overrides))
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]
            validate_config(cfg)
            cfg = sample_hparams(cfg)
            jobs.append(Job(list(overrides), cfg, run_folder(cfg)))
    finally:
        hydra_cfg.cfg = before
    return jobs


def error_line(folder: RunFolder) -> str:
    try:
        return (folder.path / "error.txt").read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


@dataclass
class Summary:
    """The jobs of a finished sweep: each with its overrides, run folder and outcome."""

    jobs: list[dict]

    def count(self, outcome: str) -> int:
        return sum(j["outcome"] == outcome for j in self.jobs)

    @property
    def ok(self) -> bool:
        return not (self.count("failed") or self.count("incomplete"))

    def text(self) -> str:
        counts = ", ".join(f"{self.count(o)} {o}" for o in OUTCOMES if self.count(o) or o in OUTCOMES[:3])
        lines = [f"sweep summary: {len(self.jobs)} jobs: {counts}"]
        notes = {"failed": "error.txt", "busy": "being computed by another process; rerun to collect",
                 "incomplete": "did not finish; rerun the same command"}
        for j in self.jobs:
            if j["outcome"] in notes:
                lines.append(f"  {j['outcome']:<10} {j['folder']}  {j.get('error') or notes[j['outcome']]}")
        return "\n".join(lines)


def outcome(before: str, after: str) -> str:
    """A job's outcome from its run folder status before and after the sweep (`RunFolder.status`):
    skipped (done before), done (finished during the sweep, by it or a concurrent process), failed,
    busy (another process is still computing it), incomplete (did not finish)."""
    if before == "done":
        return "skipped"
    return {"done": "done", "failed": "failed", "running": "busy"}.get(after, "incomplete")


class SweepSummary(Callback):
    """Hydra callback: notes each job's run folder status when a multirun starts and prints the
    summary when it ends (also `<sweep dir>/summary.json`); `rftbench.run.main` exits 1 unless
    every job is done, skipped or busy."""

    def __init__(self) -> None:
        self.jobs = None

    def __getstate__(self) -> dict:
        return {"jobs": None}  # launchers ship callbacks to the jobs; the snapshot stays here

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        global LAST
        LAST = None
        if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            log.info("sweep summary: only for Hydra's basic sweeper")
            return
        try:
            self.jobs = [(job, job.folder.status) for job in expand(config, GlobalHydra.instance().config_loader())]
        except Exception as exc:  # a job whose config cannot be made: stop before launching anything
            raise SystemExit(f"cannot plan the sweep: {type(exc).__name__}: {exc}") from exc
        log.info("sweep: %d jobs, %d already done", len(self.jobs), sum(s == "done" for _, s in self.jobs))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST
        if self.jobs is None:
            return
        jobs = []
        for job, before in self.jobs:
            after = job.folder.status
            rec = {"overrides": job.overrides, "folder": str(job.folder.path), "run_id": job.folder.run_id,
                   "before": before, "after": after,
                   "outcome": "skipped" if repeats_defaults(job.cfg) else outcome(before, after)}
            if rec["outcome"] == "failed":
                rec["error"] = error_line(job.folder)
            jobs.append(rec)
        LAST = Summary(jobs)
        print(LAST.text(), flush=True)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        write_text_atomic(sweep_dir / "summary.json", json.dumps({"jobs": jobs}, indent=2) + "\n")
