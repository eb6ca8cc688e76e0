"""The submitit_slurm preset against a real one-node SLURM on this machine
(scripts/slurm_localhost.sh; `make test-slurm`): a sweep runs as a job array, a job requeued while it
trains continues from its epoch checkpoint, and the results equal the same sweep with launcher=basic."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_sweep import comparable, summary_counts

from rftbench.leaderboard import build
from rftbench.results import CHECKPOINTS

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_localhost.sh"
# the tiny preset on the whole few-shot pool with small batches: an ft epoch takes seconds, long
# enough to requeue a job between its first checkpoint and the end of its training
SIZE = ["experiment=tiny", "device=cpu", "suite.build.train_per_class=null", "budget.batch_size=8",
        "tracking.enabled=false"]
GRID = ["method=lp,ft", "seed=0,1", "budget.epochs=3"]
SLURM = ["launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=30"]
RESUMED = re.compile(r"resumed from (fit1-\S+) after epoch (\d+)/3")


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


def sweep(runs: Path, cache: Path, *overrides: str, slurm_conf: str | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "RFTBENCH_CACHE": str(cache), "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf  # sbatch exports it (and PYTHONPATH, the cache) to the jobs
    cmd = [sys.executable, "-m", "rftbench.run", "-m", *SIZE, f"paths.runs={runs}", *overrides]
    return subprocess.Popen(cmd, env=env, text=True, **popen)


def requeue_one_ft_job_while_it_trains(runs: Path, proc: subprocess.Popen, conf: str) -> Path:
    """Wait for an ft run's first epoch checkpoint, then `scontrol requeue` its SLURM job (named in
    the run's lock file); returns the run folder."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        for ckpt in runs.glob(f"*/*/ft/*/{CHECKPOINTS}/fit1-*.pt"):
            folder = ckpt.parent.parent
            try:
                job = json.loads((folder / ".lock").read_text())["job"]
            except (OSError, ValueError, KeyError):
                continue
            subprocess.run(["scontrol", "requeue", str(job)], check=True, env={**os.environ, "SLURM_CONF": conf})
            return folder
        time.sleep(0.1)
    pytest.fail("no ft job was seen training with a checkpoint: the sweep ended or hung first")


def test_slurm_sweep_with_a_requeued_job_equals_a_basic_sweep(slurm_conf, tmp_path):
    cache, ref_cache, runs, ref = (tmp_path / n for n in ("cache", "ref_cache", "runs", "ref"))
    # warm the artifact cache (upstream model, corruption sets) once; the reference sweep gets a copy
    # without trained models, so that it trains ft itself
    warm = sweep(tmp_path / "warm", cache, "method=zeroshot", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert warm.wait(timeout=600) == 0, warm.stderr.read()[-3000:]
    shutil.copytree(cache, ref_cache, ignore=shutil.ignore_patterns("models"))

    out = tmp_path / "slurm_sweep.log"
    with out.open("w") as log:
        proc = sweep(runs, cache, *SLURM, *GRID, slurm_conf=slurm_conf, stdout=log, stderr=subprocess.STDOUT)
        requeued = requeue_one_ft_job_while_it_trains(runs, proc, slurm_conf)
        rc = proc.wait(timeout=900)
    text = out.read_text()
    assert rc == 0, text[-3000:]
    assert summary_counts(text) == {"jobs": 4, "done": 4, "skipped": 0, "failed": 0}, text[-3000:]
    folders = [p.parent for p in runs.glob("*/*/*/*/done")]
    assert len(folders) == 4
    assert not list(runs.glob(f"*/*/*/*/{CHECKPOINTS}"))
    for folder in folders:  # cpus_per_task reached the runs as `threads`
        assert re.search(r"^threads: 1$", (folder / "config.yaml").read_text(), re.M), folder

    # the logs are where the README says: <sweep dir>/.submitit/<job>/, stdout and stderr per job
    logs = {p: p.read_text() for p in runs.glob(".hydra/multirun/*/.submitit/*/*_log.*")}
    assert {p.suffix for p in logs} == {".out", ".err"} and len(logs) >= 8
    hits = [(p, m) for p, t in logs.items() for m in RESUMED.finditer(t)]
    assert len(hits) == 1, "exactly one job resumed from an epoch checkpoint"
    path, m = hits[0]
    n = int(m.group(2))
    assert 1 <= n < 3 and requeued.name in logs[path]
    print(f"requeued {requeued}: {m.group(0)}\n" + "\n".join(
        line for line in logs[path].splitlines() if "rftbench" in line or "submitit" in line))
    epochs = [int(e) for e in re.findall(r"\bepoch (\d)/3 ", logs[path][:m.start()])]
    assert epochs[:n] == list(range(1, n + 1)), "the first attempt (same log, appended) trained epochs 1..N"
    after = [int(e) for e in re.findall(r"\bepoch (\d)/3 ", logs[path][m.end():])]
    assert after == list(range(n + 1, 4)), "the requeued attempt trains the remaining epochs only"

    rc = sweep(ref, ref_cache, *GRID, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=900)
    assert rc == 0
    board, ref_board = comparable(build(runs)), comparable(build(ref))
    print(board.to_string())
    pd.testing.assert_frame_equal(board, ref_board)
    # the requeued run ends with the metrics of the uninterrupted one (same run id, same folder)
    mine, theirs = (pd.read_csv(r / requeued.relative_to(runs) / "metrics.csv") for r in (runs, ref))
    keep = ~mine["metric"].str.contains("time_s|per_s")
    pd.testing.assert_frame_equal(mine[keep].reset_index(drop=True), theirs[keep].reset_index(drop=True))
