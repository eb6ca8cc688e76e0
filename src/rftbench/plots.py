"""Leaderboard plots (PNG): ID vs OOD accuracy per suite with the effective-robustness fit, CT
accuracy against beta, RWS accuracy against the patch coefficient.

The last two read sweep tables that the methods write into their run folders (`Adapted.tables`):
`CT_SWEEP` (columns beta, val_acc, test_acc) and `RWS_SWEEP` (columns corruption, coeff, val_acc,
test_acc). Runs without them are left out; a plot without data is not written.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogitFormatter

from rftbench.metrics import LogitFit
from rftbench.results import run_folders
from rftbench.utils import atomic_path

CT_SWEEP = "beta_sweep.csv"
RWS_SWEEP = "rws_sweep.csv"
MARKERS = "osD^v<>Pp*h"
CLIP = 1e-3  # accuracies are clipped to [CLIP, 1 - CLIP] on the logit axes


def _name(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", str(p)) for p in parts) + ".png"


def save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def id_vs_ood_figure(runs: pd.DataFrame, suite: str, fit: LogitFit | None) -> Figure | None:
    """One suite's runs as points (ID test accuracy, OOD mean accuracy) on logit axes, colour by
    method and marker by backbone, with the baseline fit (whose vertical offset is the effective
    robustness) and y = x."""
    g = runs[(runs["suite"] == suite)].dropna(subset=["id_test_acc", "ood_mean_acc"])
    if g.empty:
        return None
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    backbones = sorted(g["backbone"].unique())
    for i, (method, m) in enumerate(g.groupby("method", sort=True)):
        for b, mb in m.groupby("backbone"):
            ax.scatter(mb["id_test_acc"].clip(CLIP, 1 - CLIP), mb["ood_mean_acc"].clip(CLIP, 1 - CLIP),
                       color=f"C{i % 10}", marker=MARKERS[backbones.index(b) % len(MARKERS)], s=36,
                       label=method if len(backbones) == 1 else f"{method} / {b}")
    lo = float(np.clip(min(g["id_test_acc"].min(), g["ood_mean_acc"].min()), CLIP, 1 - CLIP))
    hi = float(np.clip(max(g["id_test_acc"].max(), g["ood_mean_acc"].max()), CLIP, 1 - CLIP))
    x = np.linspace(lo, hi, 100)
    ax.plot(x, x, "k:", lw=1, label="y = x")
    if fit is not None:
        ax.plot(x, np.clip(fit.predict(x), CLIP, 1 - CLIP), "k-", lw=1.2,
                label=f"baseline fit (n={fit.n}): logit y = {fit.slope:.2f} logit x {fit.intercept:+.2f}")
    ax.set_xscale("logit")
    ax.set_yscale("logit")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(LogitFormatter(one_half="0.5"))
    ax.set_xlabel("ID test accuracy")
    ax.set_ylabel("OOD mean accuracy")
    ax.set_title(f"{suite}: ID vs OOD accuracy (effective robustness = height above the fit)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def sweep_tables(runs_root: str | Path, name: str) -> pd.DataFrame:
    """The `name` tables of every finished run under `runs_root`, with suite, backbone, method and
    run_id columns (from the folder layout)."""
    root = Path(runs_root)
    frames = []
    for folder in run_folders(root):
        if (folder / "done").exists() and (folder / name).exists():
            suite, backbone, method, run_id = folder.relative_to(root).parts
            t = pd.read_csv(folder / name)
            frames.append(t.assign(suite=suite, backbone=backbone, method=method, run_id=run_id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _mean_se(g: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    s = g.groupby(x)[y].agg(["mean", "std", "count"])
    s["se"] = (s["std"] / np.sqrt(s["count"])).fillna(0.0)
    return s


def curve_figure(t: pd.DataFrame, x: str, series: str, title: str, xlabel: str) -> Figure:
    """Validation (dashed) and test (solid) accuracy against `x`, one colour per `series` value,
    mean over runs with a +- standard error band; the x chosen on validation is marked."""
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    for i, (label, g) in enumerate(t.groupby(series, sort=True)):
        color = f"C{i % 10}"
        for col, style in (("val_acc", "--"), ("test_acc", "-")):
            if col not in g:
                continue
            s = _mean_se(g, x, col)
            ax.plot(s.index, s["mean"], style, color=color, marker=".",
                    label=f"{label} {col.replace('_acc', '')}" + (f" (n={g['run_id'].nunique()})" if col == "test_acc" else ""))
            ax.fill_between(s.index, s["mean"] - s["se"], s["mean"] + s["se"], color=color, alpha=0.15)
        if "val_acc" in g:
            ax.axvline(_mean_se(g, x, "val_acc")["mean"].idxmax(), color=color, lw=0.8, alpha=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_all(runs: pd.DataFrame, fits: dict[str, LogitFit], runs_root: str | Path, out_dir: str | Path) -> list[Path]:
    """Every plot the run folders have data for, into `out_dir`; returns the files written."""
    out = Path(out_dir)
    paths = []
    for suite in sorted(runs["suite"].unique()) if len(runs) else []:
        fig = id_vs_ood_figure(runs, suite, fits.get(suite))
        if fig is not None:
            paths.append(save(fig, out / _name("id_vs_ood", suite)))
    sweeps = [(CT_SWEEP, "ct_beta", "beta", "method", "CT on {}: accuracy vs beta", "beta"),
              (RWS_SWEEP, "rws_coeff", "coeff", "corruption", "RWS on {}: accuracy vs patch coefficient",
               "patch coefficient")]
    for table, prefix, x, series, title, xlabel in sweeps:
        t = sweep_tables(runs_root, table)
        if t.empty:
            continue
        for (suite, backbone), g in t.groupby(["suite", "backbone"]):
            fig = curve_figure(g, x, series, title.format(f"{suite} / {backbone}"), xlabel)
            paths.append(save(fig, out / _name(prefix, suite, backbone)))
    return paths


WISE_SWEEP = "wise_sweep.csv"


def wise_curve_figure(t: pd.DataFrame, title: str, ood: str = "ood_acc_mean") -> Figure | None:
    """The WiSE-FT paper's plot: ID test accuracy (x) against OOD accuracy (y, column `ood`) along
    the mixing coefficient, mean over runs; alpha = 0 (the start, e.g. zero-shot) and alpha = 1 (the
    fine-tuned end) are marked as end points. None when the table lacks the columns."""
    if t.empty or "test_acc" not in t or ood not in t:
        return None
    s = t.groupby("alpha")[["test_acc", ood]].mean().sort_index()
    fig = Figure(figsize=(5.6, 4.6))
    ax = fig.add_subplot()
    ax.plot(s["test_acc"], s[ood], "-o", color="C0", ms=3, label="WiSE-FT (alpha 0 -> 1)")
    for alpha, label, marker, color in ((s.index[0], "start (zero-shot / LP)", "s", "C2"),
                                        (s.index[-1], "end (FT / LP-FT)", "D", "C3")):
        ax.plot(s.loc[alpha, "test_acc"], s.loc[alpha, ood], marker, color=color, ms=8,
                label=f"{label}, alpha={alpha:g}")
    ax.set_xlabel("ID test accuracy")
    ax.set_ylabel(ood.replace("_", " "))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_wise_curves(runs_root: str | Path, out_dir: str | Path) -> list[Path]:
    """`wise_<suite>_<backbone>.png` from the runs' `wise_sweep.csv` tables."""
    t = sweep_tables(runs_root, WISE_SWEEP)
    paths = []
    for (suite, backbone), g in (t.groupby(["suite", "backbone"]) if not t.empty else []):
        fig = wise_curve_figure(g, f"WiSE-FT on {suite} / {backbone}: ID vs OOD")
        if fig is not None:
            paths.append(save(fig, Path(out_dir) / _name("wise", suite, backbone)))
    return paths
