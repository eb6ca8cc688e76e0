"""Run folders: atomic writes, `done` markers, failure records, and loading finished runs.

A run folder `<runs>/<suite>/<backbone>/<method>/<run_id>/` holds `config.yaml`, `metrics.csv`
(long format), `info.json` (what the method chose, costs), `env.json`, optional artifacts, and last
`done`. A folder without `done` is incomplete and is redone; `error.txt` records a failure.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable

import pandas as pd

from rftbench.utils import write_text_atomic

COLUMNS = ["run_id", "suite", "backbone", "method", "seed", "split", "shift", "corruption",
           "severity", "metric", "value", "selection", "detail"]
PACKAGES = ["torch", "torchvision", "timm", "numpy", "hydra-core", "peft", "scikit-learn",
            "imagecorruptions-imaug", "pyautoattack", "robustbench", "safetensors"]


class RunFolder:
    def __init__(self, root: str | Path, suite: str, backbone: str, method: str, run_id: str):
        self.path = Path(root) / suite / backbone.replace("/", "_") / method / run_id
        self.run_id = run_id
        self.columns = {"run_id": run_id, "suite": suite, "backbone": backbone, "method": method}

    @property
    def done(self) -> bool:
        return (self.path / "done").exists()

    @property
    def status(self) -> str:
        if self.done:
            return "done"
        if (self.path / "error.txt").exists():
            return "failed"
        return "incomplete" if self.path.exists() else "pending"

    def start(self) -> None:
        """Create the folder; clear what a previous failed attempt left."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in ("error.txt", "metrics.csv", "info.json"):
            (self.path / stale).unlink(missing_ok=True)

    def write_text(self, name: str, text: str) -> Path:
        write_text_atomic(self.path / name, text)
        return self.path / name

    def write_json(self, name: str, obj: dict) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        return self.write_text(name, df.to_csv(index=False))

    def write_metrics(self, rows: Iterable[dict], seed: int) -> pd.DataFrame:
        df = pd.DataFrame([{**self.columns, "seed": seed, **r} for r in rows])
        df = df.reindex(columns=COLUMNS)
        self.write_table("metrics.csv", df)
        return df

    def fail(self, exc: BaseException) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tb = "".join(traceback.format_exception(exc))
        self.write_text("error.txt", f"{type(exc).__name__}: {exc}\n\n{tb}")

    def finish(self) -> None:
        self.write_text("done", datetime.now(timezone.utc).isoformat() + "\n")


def environment(device: str) -> dict:
    """Package versions, device, Python, host and git state, for env.json."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"packages": versions, "python": sys.version.split()[0], "platform": platform.platform(),
            "host": platform.node(), "device": device, "git": git_state(),
            "time": datetime.now(timezone.utc).isoformat()}


def git_state() -> dict:
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def run_folders(root: str | Path) -> list[Path]:
    """Every run folder under `root` (any status)."""
    root = Path(root)
    return sorted(p.parent for p in root.glob("*/*/*/*/config.yaml"))


def load_metrics(root: str | Path) -> pd.DataFrame:
    """Concatenated metrics of the finished (`done`) runs under `root`."""
    frames = [pd.read_csv(p / "metrics.csv") for p in run_folders(root) if (p / "done").exists()]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)
