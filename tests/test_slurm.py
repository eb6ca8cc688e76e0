"""The submitit_slurm preset against a real one-node SLURM on this machine
(scripts/slurm_localhost.sh; `make test-slurm`): a sweep runs as a job array and its leaderboard equals
the same sweep with launcher=basic; a job requeued while it trains continues from its epoch
checkpoint and ends with the metrics of an uninterrupted run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from test_sweep import comparable, summary_counts

from rftbench.leaderboard import build
from rftbench.results import CHECKPOINTS

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_localhost.sh"
BASE = ["experiment=tiny", "device=cpu", "tracking.enabled=false"]
GRID = ["method=lp,ft", "seed=0,1", "budget.epochs=3"]
# The requeued run: ft on the whole few-shot pool in small batches for 8 epochs (an epoch takes 1-3 s
# here), so that the requeue lands well inside its training. SLURM sends SIGTERM (which submitit
# ignores) and SIGKILL KillWait=2 s later: a 3-epoch tiny run could finish in between.
LONG = ["suite.build.train_per_class=null", "budget.batch_size=8", "method=ft", "seed=0", "budget.epochs=8",
        "checkpoint_every_s=0"]
SLURM = ["launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=30"]
RESUMED = re.compile(r"resumed from (\S+\.pt) after epoch (\d+)/8")


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    """Start the one-node cluster (stopped again afterwards unless it was already running)."""
    if sys.platform != "linux":
        pytest.skip("the local SLURM cluster needs Linux")
    if shutil.which("sinfo") is None and (shutil.which("apt-get") is None or os.geteuid() != 0):
        pytest.skip("SLURM is not installed (no sinfo) and cannot be installed here (needs apt-get as root): "
                    "install slurm-wlm and munge, or run scripts/slurm_localhost.sh start as root")
    was_running = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    start = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if start.returncode != 0 and shutil.which("sinfo") is None:
        pytest.skip(f"could not install SLURM: {start.stderr.strip()[-500:]}")
    assert start.returncode == 0, start.stderr
    conf = re.search(r"SLURM_CONF=(\S+)", start.stderr).group(1)
    yield conf
    if not was_running:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """An artifact cache warmed for both suite sizes (upstream model, corruption sets) for the SLURM
    sweeps, and a copy for the reference sweeps (no trained models in either: each trains ft)."""
    root = tmp_path_factory.mktemp("slurm_caches")
    warm = sweep(root / "warm", root / "cache", "method=zeroshot", "suite.build.train_per_class=5,null",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert warm.wait(timeout=600) == 0, warm.stderr.read()[-3000:]
    shutil.copytree(root / "cache", root / "ref_cache")
    return root / "cache", root / "ref_cache"


def sweep(runs: Path, cache: Path, *overrides: str, slurm_conf: str | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "RFTBENCH_CACHE": str(cache), "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf  # sbatch exports it (and PYTHONPATH, the cache) to the jobs
    cmd = [sys.executable, "-m", "rftbench.run", "-m", *BASE, f"paths.runs={runs}", *overrides]
    return subprocess.Popen(cmd, env=env, text=True, **popen)


def slurm_sweep(runs: Path, cache: Path, conf: str, *overrides: str, during=None) -> str:
    """A submitit_slurm sweep that must succeed; `during(proc)` runs while it does. Its output."""
    out = runs.parent / f"{runs.name}.log"
    with out.open("w") as log:
        proc = sweep(runs, cache, *SLURM, *overrides, slurm_conf=conf, stdout=log, stderr=subprocess.STDOUT)
        try:
            if during is not None:
                during(proc)
            rc = proc.wait(timeout=900)
        finally:
            proc.kill()
    text = out.read_text()
    assert rc == 0, text[-3000:]
    return text


def submitit_logs(runs: Path) -> dict[Path, str]:
    """The jobs' logs where the README says: <sweep dir>/.submitit/<job>/, stdout and stderr per job."""
    return {p: p.read_text() for p in runs.glob(".hydra/multirun/*/.submitit/*/*_log.*")}


def test_slurm_sweep_equals_a_basic_sweep(slurm_conf, caches, tmp_path):
    cache, ref_cache = caches
    runs, ref = tmp_path / "runs", tmp_path / "ref"
    text = slurm_sweep(runs, cache, slurm_conf, *GRID)
    assert summary_counts(text) == {"jobs": 4, "done": 4, "skipped": 0, "failed": 0}, text[-3000:]
    folders = [p.parent for p in runs.glob("*/*/*/*/done")]
    assert len(folders) == 4
    for folder in folders:  # cpus_per_task reached the runs as `threads`
        assert re.search(r"^threads: 1$", (folder / "config.yaml").read_text(), re.M), folder
    logs = submitit_logs(runs)
    assert {p.suffix for p in logs} == {".out", ".err"} and len(logs) == 8
    assert sum(len(re.findall(r"\bdone [0-9a-f]{16} ->", t)) for t in logs.values()) == 4

    # the same thread count as the SLURM jobs (cpus_per_task=1): some kernels round differently with more
    assert sweep(ref, ref_cache, *GRID, "threads=1", stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL).wait(timeout=900) == 0
    board, ref_board = comparable(build(runs)), comparable(build(ref))
    print(board.to_string())
    pd.testing.assert_frame_equal(board, ref_board)


def requeue_when_trained_one_epoch(runs: Path, conf: str) -> Callable[[subprocess.Popen], None]:
    """Waits for the ft run's first epoch checkpoint, then `scontrol requeue`s its SLURM job (named
    in the run's lock file)."""

    def during(proc: subprocess.Popen) -> None:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            for ckpt in runs.glob(f"*/*/ft/*/{CHECKPOINTS}/*.pt"):
                try:
                    job = json.loads((ckpt.parent.parent / ".lock").read_text())["job"]
                except (OSError, ValueError, KeyError):
                    continue
                subprocess.run(["scontrol", "requeue", str(job)], check=True, env={**os.environ, "SLURM_CONF": conf})
                return
            time.sleep(0.1)
        pytest.fail("the ft job was not seen training with a checkpoint: the sweep ended or hung first")

    return during


def test_job_requeued_while_training_resumes_from_its_epoch_checkpoint(slurm_conf, caches, tmp_path):
    cache, ref_cache = caches
    runs, ref = tmp_path / "runs", tmp_path / "ref"
    text = slurm_sweep(runs, cache, slurm_conf, *LONG, during=requeue_when_trained_one_epoch(runs, slurm_conf))
    assert summary_counts(text) == {"jobs": 1, "done": 1, "skipped": 0, "failed": 0}, text[-3000:]
    (done,) = runs.glob("*/*/ft/*/done")
    assert not (done.parent / CHECKPOINTS).exists()
    (log,) = [t for p, t in submitit_logs(runs).items() if p.suffix == ".out"]  # both attempts, appended
    (m,) = RESUMED.finditer(log)
    n = int(m.group(2))
    print(m.group(0), "\n" + "\n".join(line for line in log.splitlines() if "][rftbench]" in line))
    assert 1 <= n < 8
    before = [int(e) for e in re.findall(r"\bepoch (\d)/8 ", log[:m.start()])]
    after = [int(e) for e in re.findall(r"\bepoch (\d)/8 ", log[m.end():])]
    assert before[:n] == list(range(1, n + 1)), "the first attempt trained epochs 1..N"
    assert after == list(range(n + 1, 9)), "the requeued attempt trains the remaining epochs only"

    assert sweep(ref, ref_cache, *LONG, "threads=1", stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL).wait(timeout=900) == 0
    (uninterrupted,) = ref.glob("*/*/ft/*/metrics.csv")
    assert uninterrupted.parent.name == done.parent.name  # the same run
    mine, theirs = (pd.read_csv(f) for f in (done.parent / "metrics.csv", uninterrupted))
    keep = ~mine["metric"].str.contains("time_s|per_s")
    pd.testing.assert_frame_equal(mine[keep].reset_index(drop=True), theirs[keep].reset_index(drop=True))
