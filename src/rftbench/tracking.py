"""Weights & Biases tracking: every run is its own W&B run (its config and final metrics), offline
unless `WANDB_MODE` or `tracking.mode` says otherwise, so no account is needed (upload later with
`wandb sync <dir>/wandb/offline-run-*`). Tracking never fails a run: without wandb, or when it
breaks, it warns once and the run goes on.
"""
from __future__ import annotations

import logging
import math
import netrc
import os
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from rftbench.results import RunFolder

log = logging.getLogger("rftbench")
MODES = ("online", "offline", "disabled")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def mode_of(cfg: DictConfig) -> str:
    """WANDB_MODE if set, else `tracking.mode` (default offline); online without credentials falls
    back to offline rather than asking for a login."""
    mode = os.environ.get("WANDB_MODE") or (cfg.get("tracking") or {}).get("mode") or "offline"
    if mode not in MODES:
        raise ValueError(f"tracking mode {mode!r} not valid; choose one of {MODES}")
    if mode == "online" and not _has_api_key():
        _warn_once("wandb online mode without WANDB_API_KEY or a login: logging offline instead")
        return "offline"
    return mode


def summary_of(metrics: pd.DataFrame) -> dict[str, float]:
    """Final metrics as W&B summary keys `<split>/<metric>` (`.../oracle` for oracle selections)."""
    out = {}
    for r in metrics.itertuples():
        if isinstance(r.value, (int, float)) and math.isfinite(r.value):
            key = f"{r.split}/{r.metric}" if r.split != "-" else str(r.metric)
            out[key + ("/oracle" if r.selection == "oracle" else "")] = float(r.value)
    return out


def log_run(cfg: DictConfig, folder: RunFolder) -> Path | None:
    """Log a run's resolved config and its metrics (`metrics.csv`) as one W&B run, then finish it.
    The W&B files go to `tracking.dir` or the run folder. Returns the W&B run's folder, or None when
    tracking is off or unavailable; never raises."""
    t = cfg.get("tracking") or {}
    if not t.get("enabled", False):
        return None
    try:
        mode = mode_of(cfg)
        if mode == "disabled":
            return None
        import wandb
    except Exception as exc:  # no wandb, or a broken install
        _warn_once(f"tracking off: {type(exc).__name__}: {exc}")
        return None
    try:
        root = Path(t["dir"]) if t.get("dir") else folder.path
        root.mkdir(parents=True, exist_ok=True)
        c = folder.columns
        run = wandb.init(
            project=t.get("project") or "rftbench", entity=t.get("entity"), dir=str(root), mode=mode,
            name=folder.run_id, group=f"{c['suite']}/{c['backbone']}", job_type=c["method"],
            tags=list(t.get("tags") or []),
            config={**OmegaConf.to_container(cfg, resolve=True), "run_id": folder.run_id,
                    "run_dir": str(folder.path)},
            settings=wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True))
        try:
            run.summary.update(summary_of(pd.read_csv(folder.path / "metrics.csv")))
            path = Path(run.dir).parent
        finally:
            run.finish()
        return path
    except Exception as exc:
        _warn_once(f"wandb logging failed, the run goes on: {type(exc).__name__}: {exc}")
        return None
