"""Ctrl-C and SIGTERM end a run with one line and exit 130 / 143, the lock released; the rerun resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rftbench.results import LOCK


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_is_one_line_and_resumable(tmp_path, cache_dir, sig, code):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "rftbench.run", "experiment=tiny", "method=ft", "budget.epochs=400", "checkpoint_every_s=0",
           f"paths.runs={runs}", f"paths.cache={cache_dir}", "device=cpu", "threads=1", "tracking.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("**/checkpoints/*.pt")):
        time.sleep(0.5)
    assert list(runs.glob("**/checkpoints/*.pt")), "no epoch finished in time"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted after epoch ") and last.endswith("/400; rerun the same command to resume")
    assert "Traceback" not in err
    folder = next(p.parent for p in runs.glob("**/config.yaml"))
    assert not (folder / LOCK).exists() and not (folder / "done").exists() and not (folder / "error.txt").exists()
