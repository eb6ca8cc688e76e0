"""The locked environment, thread control and the reproduction check (README, "Reproducibility")."""
from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import torch

from rftbench import reproduce
from rftbench.results import cpu_model, lock_hash
from rftbench.run import execute
from rftbench.utils import apply_threads, available_cores

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock line {line!r} is not an exact pin"
            pins[_norm(name)] = version
    return pins


def test_lock_is_complete():
    """Every distribution installed in this environment is in the lock, at the same version (read off
    site-packages: packages vendored inside others, e.g. setuptools' own, are not installed ones)."""
    pins = locked()
    missing, wrong = [], []
    site = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    for dist in metadata.distributions(path=site):
        name = _norm(dist.metadata["Name"])
        if name == "rftbench":
            continue
        if name not in pins:
            missing.append(f"{name}=={dist.version}")
        elif pins[name] != dist.version:
            wrong.append(f"{name}: installed {dist.version}, locked {pins[name]}")
    assert not missing and not wrong, f"not in the lock: {missing}; other version: {wrong} (make lock)"


def test_setup_installs_from_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert "LOCK := requirements.lock" in makefile
    installs = [line for line in makefile.splitlines() if "$(PY) -m pip install" in line]
    assert installs and all("-c $(LOCK)" in line for line in installs)
    assert re.search(r"^\$\(STAMP\): pyproject.toml \$\(LOCK\)", makefile, re.M)


def test_lock_hash_is_the_files_sha256():
    assert lock_hash() == hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]


def test_threads_reach_pytorch():
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
        assert apply_threads(None) == available_cores() == torch.get_num_threads()
        assert apply_threads(None, parallel_jobs=available_cores()) == 1  # joblib: cores divided
        for bad in (0, -2, 1.5, "two", True):
            with pytest.raises(ValueError, match="threads must be a positive integer"):
                apply_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_run_applies_and_records_threads(make_cfg):
    before = torch.get_num_threads()
    try:
        cfg = make_cfg("method=zeroshot", "threads=1", "tracking.enabled=false")
        assert execute(cfg) == "done"
        assert torch.get_num_threads() == 1
        folder = next(Path(cfg.paths.runs).glob("*/*/*/*/env.json"))
        env = json.loads(folder.read_text())
        assert env["threads"] == 1 and env["lock"] == lock_hash()
        assert env["omp_wait_policy"] == "PASSIVE"
        assert env["cpu"] == cpu_model() and env["cpu"] not in ("", "unknown")
    finally:
        torch.set_num_threads(before)


def test_threads_do_not_change_the_run_id(make_cfg):
    from rftbench.run import run_id

    assert run_id(make_cfg("threads=1")) == run_id(make_cfg("threads=2")) == run_id(make_cfg())


def test_joblib_divides_the_cores(make_cfg):
    from omegaconf import OmegaConf

    cfg = make_cfg("launcher=joblib")
    assert OmegaConf.to_container(cfg.launcher, resolve=True)["parallel_jobs"] >= 1


def test_openmp_threads_yield():
    """Importing rftbench (before torch) makes OpenMP threads passive unless the user chose."""
    code = "import rftbench, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "PASSIVE"


def test_cpu_kernels_are_pinned_to_avx2_unless_the_user_chose():
    """Importing rftbench selects the AVX2 kernels of ATen, oneDNN and MKL (the same on every AVX2
    x86-64 CPU); a value the user set is kept."""
    code = ("import os, rftbench, torch; print(os.environ['ATEN_CPU_CAPABILITY'], os.environ['ONEDNN_MAX_CPU_ISA'], "
            "os.environ['MKL_CBWR'], torch.backends.cpu.get_cpu_capability())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[:3] == ["avx2", "AVX2", "AVX2"]
    if platform.machine() in ("x86_64", "AMD64"):
        assert out[3] in ("AVX2", "DEFAULT")  # DEFAULT on a CPU without AVX2
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "ATEN_CPU_CAPABILITY": "default"}).stdout.split()
    assert out[0] == "default" and out[3] == "DEFAULT"


def _board(path: Path, changes: dict | None = None) -> Path:
    df = pd.DataFrame([
        {"suite": "digits", "backbone": "b", "method": "ft", "n_seeds": 3, "id_test_acc": 0.911,
         "adapt_time_s": 10.5, "adapt_time_s_se": 0.3, "eval_time_s": 2.0, "lock": "abc", "commit": "111",
         "cpu": "Intel(R) Xeon(R) Processor"},
        {"suite": "digits", "backbone": "b", "method": "lp", "n_seeds": 3, "id_test_acc": 0.75,
         "adapt_time_s": 1.5, "adapt_time_s_se": 0.1, "eval_time_s": 2.0, "lock": "abc", "commit": "111",
         "cpu": "Intel(R) Xeon(R) Processor"},
    ])
    for (method, col), value in (changes or {}).items():
        df.loc[df["method"] == method, col] = value
    df.to_csv(path, index=False, float_format="%.6g")
    return path


def test_reproduce_compares_metrics_not_costs(tmp_path):
    a = _board(tmp_path / "a.csv")
    same = _board(tmp_path / "b.csv", {("ft", "adapt_time_s"): 99.0, ("ft", "adapt_time_s_se"): 9.0,
                                       ("lp", "eval_time_s"): 7.0, ("ft", "commit"): "222"})
    assert reproduce.compare(a, same) == []
    changed = _board(tmp_path / "c.csv", {("ft", "id_test_acc"): 0.91101, ("lp", "lock"): "zzz"})
    assert reproduce.compare(a, changed) == ["digits/b/ft id_test_acc: committed 0.911, now 0.91101",
                                             "digits/b/lp lock: committed abc, now zzz"]
    other_cpu = _board(tmp_path / "e.csv", {("ft", "cpu"): "AMD EPYC", ("lp", "cpu"): "AMD EPYC"})
    assert reproduce.compare(a, other_cpu) == []  # reported, not compared
    assert reproduce.cpu_note(a, a) is None
    assert reproduce.cpu_note(a, other_cpu).startswith(
        "note: the committed table was made on CPU Intel(R) Xeon(R) Processor and this rerun on AMD EPYC")
    fewer = tmp_path / "d.csv"
    pd.read_csv(a).iloc[:1].to_csv(fewer, index=False)
    assert reproduce.compare(a, fewer) == ["row digits/b/lp: only in the committed table"]


def test_reproduce_names_variant_rows_by_their_variant(tmp_path):
    """The variants table has several rows per method: a changed variant is reported by its id."""
    rows = [{"suite": "digits", "backbone": "b", "method": "ft", "variant": v, "val_acc": a}
            for v, a in (("aaa", 0.8), ("bbb", 0.9))]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    pd.DataFrame(rows).to_csv(a, index=False)
    rows[1]["val_acc"] = 0.91
    pd.DataFrame(rows).to_csv(b, index=False)
    keys = reproduce.TABLES["leaderboard_variants.csv"]
    assert reproduce.compare(a, b, keys) == ["digits/b/ft/bbb val_acc: committed 0.9, now 0.91"]
    assert reproduce.EXPERIMENTS["bench_tuned"] == REPO / "results" / "tuned"
    assert (reproduce.EXPERIMENTS["bench"] / "leaderboard.csv").exists()


@pytest.mark.slow
def test_make_reproduce_matches_the_committed_results():
    """The committed benchmark, rerun from an empty cache, gives the committed leaderboard (minutes)."""
    out = subprocess.run([sys.executable, "-m", "rftbench.reproduce"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
