"""Weights & Biases tracking: every run is its own W&B run, offline unless `WANDB_MODE` or
`tracking.mode` says otherwise, so no account is needed. A run logs its config, its per-epoch
training history (`history.csv`: train_loss, val_acc, lr per epoch), its sweep tables (CT beta,
WiSE-FT alpha, RWS coefficient) as `wandb.Table`s, and its metrics plus the leaderboard's headline
values (`headline/<column>`) as the summary. `group` is the sweep (the Hydra sweep folder's name),
`job_type` the method, tags come from `tracking.tags` plus suite/backbone/method. All runs of one
sweep share one folder, `<tracking.dir or paths.runs/.wandb>/<sweep>/wandb/offline-run-*`; upload it
later with `wandb sync <that folder>/wandb/offline-run-*`. Tracking never fails a run: without wandb,
or when it breaks, it warns once and the run goes on.
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


HISTORY = "history.csv"  # fit's per-epoch history, written by the methods that train
TABLES = ("beta_sweep", "wise_sweep", "rws_sweep", "rws_compose")


def sweep_name() -> str:
    """The sweep this process runs a job of: the Hydra sweep (multirun) or run folder's name;
    `single` outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir).name
    except Exception:  # not inside a Hydra job
        return "single"


def headline_of(metrics: pd.DataFrame) -> dict[str, float]:
    """The leaderboard's headline values of one run as `headline/<column>` summary keys."""
    from rftbench.leaderboard import HEADLINE, per_run

    rec = per_run(metrics.astype({"run_id": str})).iloc[0]
    return {f"headline/{c}": float(rec[c]) for c in HEADLINE if c in rec and pd.notna(rec[c])}


def log_run(cfg: DictConfig, folder: RunFolder) -> Path | None:
    """Log a run as one W&B run (config, per-epoch history, sweep tables, metrics and headline
    summary), then finish it. The W&B files go to the sweep's folder under `tracking.dir` (default
    `<paths.runs>/.wandb`, hidden like Hydra's `.hydra`). Returns the W&B run's folder, or None
    when tracking is off or unavailable; never raises."""
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
        sweep = sweep_name()
        root = (Path(t["dir"]) if t.get("dir") else Path(cfg.paths.runs) / ".wandb") / sweep
        root.mkdir(parents=True, exist_ok=True)
        c = folder.columns
        tags = [*list(t.get("tags") or []), f"suite:{c['suite']}", f"backbone:{c['backbone']}", f"method:{c['method']}"]
        run = wandb.init(
            project=t.get("project") or "rftbench", entity=t.get("entity"), dir=str(root), mode=mode,
            name=folder.run_id, group=sweep, job_type=c["method"], tags=[tag[:64] for tag in tags],
            config={**OmegaConf.to_container(cfg, resolve=True), "run_id": folder.run_id,
                    "run_dir": str(folder.path)},
            settings=wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True))
        try:
            if (folder.path / HISTORY).exists():
                run.define_metric("epoch")
                for name in ("train_loss", "val_acc", "lr"):
                    run.define_metric(f"train/{name}", step_metric="epoch")
                for rec in pd.read_csv(folder.path / HISTORY).to_dict("records"):
                    run.log({"epoch": rec["epoch"], **{f"train/{k}": v for k, v in rec.items() if k != "epoch"}})
            for name in TABLES:
                if (folder.path / f"{name}.csv").exists():
                    run.log({f"sweep/{name}": wandb.Table(dataframe=pd.read_csv(folder.path / f"{name}.csv"))})
            metrics = pd.read_csv(folder.path / "metrics.csv", dtype={"run_id": str})
            run.summary.update(summary_of(metrics) | headline_of(metrics))
            path = Path(run.dir).parent
        finally:
            run.finish()
        return path
    except Exception as exc:
        _warn_once(f"wandb logging failed, the run goes on: {type(exc).__name__}: {exc}")
        return None
