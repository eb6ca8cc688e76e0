"""Run folders: atomic writes, `done` markers, failure records, and loading finished runs.

A run folder `<runs>/<suite>/<backbone>/<method>/<run_id>/` holds `config.yaml`, `metrics.csv`
(long format), `info.json` (what the method chose, costs), `env.json`, optional artifacts, and last
`done`. A folder without `done` is incomplete and is redone; `error.txt` records a failure.
While a process computes a run it holds the folder's `.lock` (see `RunLock`), so two processes never
compute the same run at once; `checkpoints/` holds training state a resumed attempt continues from.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

from rftbench.identity import run_id, run_id_of
from rftbench.utils import write_text_atomic

COLUMNS = ["run_id", "suite", "backbone", "method", "seed", "split", "shift", "corruption",
           "severity", "metric", "value", "selection", "detail"]
LOCK = ".lock"
CHECKPOINTS = "checkpoints"  # per-epoch training state of an unfinished attempt (rftbench.train.fit)
PACKAGES = ["torch", "torchvision", "timm", "numpy", "hydra-core", "peft", "scikit-learn",
            "imagecorruptions-imaug", "pyautoattack", "robustbench", "safetensors"]


class RunBusy(RuntimeError):
    """Another live process holds the run's lock (it is computing the run now)."""


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux /proc), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """An exclusive claim on a run folder: the lock file names its owner (host, pid, process start
    time, SLURM job) and a heartbeat thread keeps its mtime fresh. A lock is stale, and taken over,
    when its owner process is gone (same host), when it belongs to an earlier attempt of this SLURM
    job (a requeue), or when nobody refreshed it for `stale_s` seconds (owner on a lost node)."""

    heartbeat_s = 30.0
    stale_s = 300.0

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._stop.set()

    def __getstate__(self) -> dict:
        return {"path": self.path, "token": self.token}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"].parent)
        self.token = state["token"]

    def owner(self) -> dict | None:
        """The lock file's content plus its `age_s` and whether it is `stale`; None if unlocked."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            info = {}
        return {**info, "age_s": age, "stale": self._stale(info, age), "text": text}

    def _stale(self, info: dict, age: float) -> bool:
        if info.get("token") == self.token:
            return False
        if info.get("host") == socket.gethostname() and "pid" in info:
            return info["pid"] == os.getpid() or not _alive(info["pid"], info.get("started"))
        job = os.environ.get("SLURM_JOB_ID")
        if job and info.get("job") == job:
            return True
        return age > self.stale_s

    def acquire(self) -> None:
        """Take the lock, or raise `RunBusy` naming the live owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
              "job": os.environ.get("SLURM_JOB_ID"), "token": self.token,
              "time": datetime.now(timezone.utc).isoformat()}
        tmp = self.path.with_name(f"{LOCK}.{self.token}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)  # atomic: fails if the lock exists
                    break
                except FileExistsError:
                    owner = self.owner()
                    if owner is not None and not owner["stale"]:
                        raise RunBusy(
                            f"run {self.path.parent} is being computed by pid {owner.get('pid')} on "
                            f"{owner.get('host')} (lock refreshed {owner['age_s']:.0f}s ago); rerun "
                            f"later, or delete {self.path} if that process is gone") from None
                    if owner is not None:
                        self._break(owner["text"])
            else:
                raise RunBusy(f"could not take {self.path}: other processes keep taking it")
        finally:
            tmp.unlink(missing_ok=True)
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True,
                         name=f"lock-{self.path.parent.name}").start()

    def _break(self, seen: str) -> None:
        """Remove a stale lock; if another process replaced it meanwhile, put theirs back."""
        tomb = self.path.with_name(f"{LOCK}.{self.token}.stale")
        try:
            os.rename(self.path, tomb)
        except FileNotFoundError:
            return
        if tomb.read_text() != seen:
            try:
                os.link(tomb, self.path)
            except FileExistsError:
                pass
        tomb.unlink()

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        owner = self.owner()
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)


class RunFolder:
    def __init__(self, root: str | Path, suite: str, backbone: str, method: str, run_id: str):
        self.path = Path(root) / suite.replace("/", "_") / backbone.replace("/", "_") / method / run_id
        self.run_id = run_id
        self.columns = {"run_id": run_id, "suite": suite, "backbone": backbone, "method": method}
        self.lock = RunLock(self.path)

    @property
    def done(self) -> bool:
        """Finished and complete: the `done` marker, and no `damage`."""
        return (self.path / "done").exists() and self.damage() is None

    def damage(self) -> str | None:
        """What is wrong with a folder marked `done` (None if nothing, or if not marked done)."""
        return damage(self.path)

    @property
    def status(self) -> str:
        """done | damaged (marked done, but incomplete: redone by the next sweep) | running (a live
        process holds its lock) | failed | incomplete (interrupted) | pending."""
        if (self.path / "done").exists():
            return "damaged" if self.damage() is not None else "done"
        if self.path.exists() and self.lock_owner() is not None:
            return "running"
        if (self.path / "error.txt").exists():
            return "failed"
        return "incomplete" if self.path.exists() else "pending"

    def start(self) -> None:
        """Create the folder and take its lock (`RunBusy` if another process computes the run);
        clear what a previous attempt left. The epoch checkpoints of an interrupted or failed attempt are
        kept: the new attempt continues from them (they resume only the very same training; an
        unreadable one trains from the start), so a failure after training, e.g. in the evaluation
        with a read-only cache, costs no retraining. `finish` removes them."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        if self.done:
            self.lock.release()
            raise RunBusy(f"run {self.path} was finished by another process meanwhile")
        (self.path / "done").unlink(missing_ok=True)  # a damaged run is redone
        for stale in ("error.txt", "metrics.csv", "info.json"):
            (self.path / stale).unlink(missing_ok=True)

    def lock_owner(self) -> dict | None:
        """The live process computing this run now (its lock's content), or None."""
        owner = self.lock.owner()
        return owner if owner is not None and not owner["stale"] else None

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
        self.lock.release()

    def finish(self) -> None:
        self.write_text("done", datetime.now(timezone.utc).isoformat() + "\n")
        shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
        self.lock.release()


def lock_hash() -> str | None:
    """sha256 (16 hex digits) of the repository's requirements.lock: which locked environment ran."""
    path = Path(__file__).resolve().parents[2] / "requirements.lock"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), recorded because CPU metrics differ across models."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: str, threads: int | None = None) -> dict:
    """Package versions, lock hash, device, threads, Python, host, CPU model and git state, for env.json."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"packages": versions, "lock": lock_hash(), "python": sys.version.split()[0],
            "platform": platform.platform(), "host": platform.node(), "cpu": cpu_model(), "device": device,
            "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "git": git_state(),
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


def run_folders(root: str | Path, with_damaged: bool = False) -> list[Path]:
    """Every run folder under `root` (any status; `with_damaged`: also folders marked done whose
    config.yaml is gone); hidden folders (Hydra's `.hydra/`) are not runs."""
    root = Path(root)
    found = {p.parent for p in root.glob("*/*/*/*/config.yaml")}
    if with_damaged:
        found |= {p.parent for p in root.glob("*/*/*/*/done")}
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts))


_warned_damage: set[str] = set()


def warn_damaged(folder: Path, problem: str) -> None:
    """One warning per damaged run folder and process."""
    if str(folder) not in _warned_damage:
        _warned_damage.add(str(folder))
        logging.getLogger("rftbench").warning(
            "damaged run %s: %s; left out (the next sweep that includes it redoes it)", folder, problem)


REQUIRED = ("config.yaml", "metrics.csv")  # what the leaderboard and plans read off a finished run


def damage(folder: str | Path) -> str | None:
    """Why a run folder marked `done` is not a complete run, or None: a required file missing or
    unreadable, or a `config.yaml` whose run id (`rftbench.run.run_id`) is not the folder's name."""
    folder = Path(folder)
    if not (folder / "done").exists():
        return None
    for name in REQUIRED:
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        if not isinstance(cfg, dict):
            return "config.yaml is not a run config"
        for name in ("info.json", "env.json"):  # optional, but readable when present
            if (folder / name).exists():
                json.loads((folder / name).read_text())
        metrics = pd.read_csv(folder / "metrics.csv", dtype={"run_id": str})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, pd.errors.ParserError) as exc:
        return f"unreadable file: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if list(metrics.columns) != COLUMNS or metrics.empty:
        return "metrics.csv does not have the metrics columns or rows"

    try:
        derived = run_id_of(cfg)
    except Exception as exc:  # a valid YAML file that is not a run config
        return f"config.yaml is not a run config ({type(exc).__name__}: {exc})"
    if derived != folder.name:
        return f"config.yaml gives run id {derived}, not the folder's {folder.name}"
    return None


def load_metrics(root: str | Path) -> pd.DataFrame:
    """Concatenated metrics of the finished (`done`) runs under `root`; damaged runs (`damage`) are
    left out with a warning naming them."""
    frames = []
    for p in run_folders(root, with_damaged=True):
        if not (p / "done").exists():
            continue
        problem = damage(p)
        if problem is not None:
            warn_damaged(p, problem)
            continue
        frames.append(pd.read_csv(p / "metrics.csv", dtype={"run_id": str}))  # ids like 1234e567 are not numbers
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)


def run_folder(cfg) -> RunFolder:
    """The run folder of a composed config: `<paths.runs>/<suite>/<backbone>/<method>/<run_id>/`."""
    return RunFolder(cfg.paths.runs, cfg.suite.name, cfg.backbone.name, cfg.method.name, run_id(cfg))
