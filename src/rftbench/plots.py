"""Leaderboard plots (PNG): ID vs OOD accuracy per suite with the effective-robustness fit, CT
accuracy against beta, RWS accuracy against the patch coefficient.

The last two read sweep tables that the methods write into their run folders (`Adapted.tables`):
`CT_SWEEP` (columns beta, val_acc, test_acc) and `RWS_SWEEP` (columns corruption, coeff, val_acc,
test_acc, and optionally `chosen`). Runs without them are left out; a plot without data is not
written, and an earlier build's plot of that kind is removed (`remove_stale`). Every method keeps one
colour and marker across plots (`rftbench.style`); each figure has a caption line saying what a
point or a line is.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
from matplotlib.transforms import ScaledTranslation

from rftbench.metrics import LogitFit
from rftbench.results import run_folders
from rftbench.style import EDGE, method_style, series_color
from rftbench.utils import atomic_path

CT_SWEEP = "beta_sweep.csv"
RWS_SWEEP = "rws_sweep.csv"
CLIP = 1e-3  # accuracies are clipped to [CLIP, 1 - CLIP] on the logit axes


def _name(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", str(p)) for p in parts) + ".png"


def save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


LOGIT_TICKS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999)


def logit_axes(ax, lo: float, hi: float) -> None:
    """Both axes on the logit scale with plain decimal ticks (0.9, not "1 - 10^-1")."""
    ax.set_xscale("logit")
    ax.set_yscale("logit")
    ticks = [t for t in LOGIT_TICKS if lo * 0.8 <= t <= 1 - (1 - hi) * 0.8] or [lo, hi]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _overlap_offsets(points: np.ndarray, tol: float) -> np.ndarray:
    """For each point, how many earlier points lie within `tol` of it (in logit units): its position
    in a pile of (nearly) coinciding points, which is then drawn slightly offset."""
    z = np.log(points) - np.log1p(-points)
    k = np.zeros(len(points), dtype=int)
    for i in range(len(points)):
        k[i] = int((np.abs(z[:i] - z[i]).max(axis=1, initial=0) <= tol).sum()) if i else 0
    return k


def chosen_mask(runs: pd.DataFrame, board: pd.DataFrame | None) -> pd.Series:
    """True for the runs of the variant each leaderboard row reports (all runs without a board)."""
    if board is None or "variant" not in runs or "variant" not in board:
        return pd.Series(True, index=runs.index)
    keys = set(zip(board["suite"], board["backbone"], board["method"], board["variant"]))
    return pd.Series([k in keys for k in zip(runs["suite"], runs["backbone"], runs["method"], runs["variant"])],
                     index=runs.index, dtype=bool)


def id_vs_ood_figure(runs: pd.DataFrame, suite: str, fit: LogitFit | None,
                     others: pd.DataFrame | None = None) -> Figure | None:
    """One suite's runs as points (ID test accuracy, OOD mean accuracy) on logit axes, one colour and
    marker per method (`rftbench.style`), filled for the first backbone and hollow for the next, with
    the baseline fit (whose vertical offset is the effective robustness) and y = x. Points that
    coincide are drawn with a small offset (their data positions are unchanged) and outlined.
    `others` (a tuned sweep's variants that were not chosen) are small grey dots behind."""
    g = runs[(runs["suite"] == suite)].dropna(subset=["id_test_acc", "ood_mean_acc"])
    if g.empty:
        return None
    fig = Figure(figsize=(7.2, 5.6))
    ax = fig.add_subplot()
    o = (others[others["suite"] == suite].dropna(subset=["id_test_acc", "ood_mean_acc"])
         if others is not None else pd.DataFrame())
    if len(o):
        oxy = np.c_[o["id_test_acc"], o["ood_mean_acc"]].clip(CLIP, 1 - CLIP)
        ax.scatter(oxy[:, 0], oxy[:, 1], s=9, marker=".", color="0.72", zorder=1,
                   label=f"variants not chosen on val ({len(o)} runs)")
    backbones = sorted(g["backbone"].unique())
    groups = list(g.groupby(["method", "backbone"], sort=True))
    xy = np.concatenate([np.c_[m["id_test_acc"], m["ood_mean_acc"]] for _, m in groups]).clip(CLIP, 1 - CLIP)
    piles, start = _overlap_offsets(xy, tol=0.01), 0
    for (method, b), mb in groups:
        st = method_style(method)
        pts, k = xy[start:start + len(mb)], piles[start:start + len(mb)]
        start += len(mb)
        hollow = backbones.index(b) % 2 == 1
        for level in np.unique(k):  # each pile level shifted by 4 points along a diagonal
            sel = k == level
            shift = ScaledTranslation(4 * level / 72, 4 * level / 72, fig.dpi_scale_trans)
            ax.scatter(pts[sel, 0], pts[sel, 1], s=46, marker=st.marker, color=st.color,
                       facecolors="none" if hollow else st.color, edgecolors=EDGE if not hollow else st.color,
                       linewidths=0.7 if not hollow else 1.4, alpha=0.9, zorder=3, transform=ax.transData + shift,
                       label=(method if len(backbones) == 1 else f"{method} / {b}") if level == k.min() else None)
    both = pd.concat([g, o]) if len(o) else g
    lo = float(np.clip(min(both["id_test_acc"].min(), both["ood_mean_acc"].min()), CLIP, 1 - CLIP))
    hi = float(np.clip(max(both["id_test_acc"].max(), both["ood_mean_acc"].max()), CLIP, 1 - CLIP))
    x = np.linspace(lo, hi, 100)
    ax.plot(x, x, "k:", lw=1, label="y = x")
    if fit is not None:
        ax.plot(x, np.clip(fit.predict(x), CLIP, 1 - CLIP), "k-", lw=1.2,
                label=f"baseline fit (n={fit.n} runs): logit y = {fit.slope:.2f} logit x {fit.intercept:+.2f}")
    logit_axes(ax, lo, hi)
    ax.set_xlabel("ID test accuracy (logit scale)")
    ax.set_ylabel("OOD mean accuracy (logit scale)")
    ax.set_title(f"{suite}: ID vs OOD accuracy")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    what = ("one run of the variant the table reports (one method, one trial seed)" if len(o)
            else "one run (one method, one trial seed)")
    fig.text(0.01, -0.02, f"Each coloured point is {what}; effective robustness is the height above the "
             "baseline fit. Coinciding points are drawn slightly offset.", fontsize=7, ha="left", va="top")
    return fig


def sweep_tables(runs_root: str | Path, name: str, keep: set[str] | None = None) -> pd.DataFrame:
    """The `name` tables of every finished run under `runs_root` (only the run ids in `keep` when
    given), with suite, backbone, method and run_id columns (from the folder layout)."""
    root = Path(runs_root)
    frames = []
    for folder in run_folders(root):
        if keep is not None and folder.name not in keep:
            continue
        if (folder / "done").exists() and (folder / name).exists():
            suite, backbone, method, run_id = folder.relative_to(root).parts
            t = pd.read_csv(folder / name)
            frames.append(t.assign(suite=suite, backbone=backbone, method=method, run_id=run_id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _mean_se(g: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    s = g.groupby(x)[y].agg(["mean", "std", "count"])
    s["se"] = (s["std"] / np.sqrt(s["count"])).fillna(0.0)
    return s


def chosen_points(g: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per run, the `x` it chose on validation and the run's validation accuracy there: the table's
    `chosen` column when it has one, else the best validation accuracy (the smallest x on ties)."""
    out = []
    for _, r in g.groupby("run_id", sort=True):
        if "chosen" in r and r["chosen"].astype(str).str.lower().eq("true").any():
            pick = r[r["chosen"].astype(str).str.lower() == "true"].iloc[0]
        else:
            pick = r.sort_values([x]).loc[r.sort_values([x])["val_acc"].idxmax()]
        out.append({x: pick[x], "val_acc": pick["val_acc"]})
    return pd.DataFrame(out, columns=[x, "val_acc"])


def curve_figure(t: pd.DataFrame, x: str, series: str, title: str, xlabel: str) -> Figure:
    """Validation (dashed) and test (solid) accuracy against `x`, one colour per `series` value
    (methods in their `rftbench.style` colour), mean over runs with a +- standard error band; each
    run's choice on validation is a triangle at its value on that run's validation curve."""
    fig = Figure(figsize=(7.2, 4.8))
    ax = fig.add_subplot()
    handles = []
    for i, (label, g) in enumerate(t.groupby(series, sort=True)):
        color = method_style(label).color if series == "method" else series_color(i)
        n = g["run_id"].nunique()
        for col, style in (("val_acc", "--"), ("test_acc", "-")):
            if col not in g or g[col].isna().all():
                continue
            s = _mean_se(g, x, col)
            line, = ax.plot(s.index, s["mean"], style, color=color, marker=".", lw=1.4)
            ax.fill_between(s.index, s["mean"] - s["se"], s["mean"] + s["se"], color=color, alpha=0.15, lw=0)
            if col == "test_acc":
                handles.append(Line2D([], [], color=color, lw=6, alpha=0.6, label=f"{label} (n={n} runs)"))
        if "val_acc" in g:
            c = chosen_points(g, x)
            ax.plot(c[x], c["val_acc"], "v", color=color, markeredgecolor=EDGE, markersize=8, zorder=4,
                    linestyle="none")
            for (cx, cy), k in c.groupby([x, "val_acc"]).size().items():
                if k > 1:  # several runs chose the same point: say how many
                    ax.annotate(f"×{k}", (cx, cy), xytext=(6, 4), textcoords="offset points", fontsize=7)
    handles += [Line2D([], [], color="0.3", ls="--", label="validation accuracy"),
                Line2D([], [], color="0.3", ls="-", label="test accuracy"),
                Line2D([], [], color="0.5", marker="v", markeredgecolor=EDGE, ls="none",
                       label="chosen on validation (one per run)")]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.text(0.01, -0.02, "Lines: mean over runs (trial seeds), band: ± standard error; test accuracy is shown "
             "for analysis only, every choice uses validation data.", fontsize=7, ha="left", va="top")
    return fig


def plot_all(runs: pd.DataFrame, fits: dict[str, LogitFit], runs_root: str | Path, out_dir: str | Path,
             board: pd.DataFrame | None = None) -> list[Path]:
    """Every plot the run folders have data for, into `out_dir`; returns the files written. With the
    leaderboard's `board`, the plots show the runs of the variants its rows report (a tuned sweep's
    other variants: grey dots in the ID-vs-OOD plot, left out of the sweep curves)."""
    out = Path(out_dir)
    paths = []
    keep = None  # every run's sweep tables, unless a board names the chosen runs
    if len(runs):
        chosen = chosen_mask(runs, board)
        keep = None if board is None else set(runs.loc[chosen, "run_id"].astype(str))
        for suite in sorted(runs["suite"].unique()):
            fig = id_vs_ood_figure(runs[chosen], suite, fits.get(suite), runs[~chosen])
            if fig is not None:
                paths.append(save(fig, out / _name("id_vs_ood", suite)))
    sweeps = [(CT_SWEEP, "ct_beta", "beta", "method", "CT on {}: accuracy vs beta", "beta"),
              (RWS_SWEEP, "rws_coeff", "coeff", "corruption", "RWS on {}: accuracy vs patch coefficient",
               "patch coefficient")]
    for table, prefix, x, series, title, xlabel in sweeps:
        t = sweep_tables(runs_root, table, keep)
        if t.empty:
            continue
        for (suite, backbone), g in t.groupby(["suite", "backbone"]):
            fig = curve_figure(g, x, series, title.format(f"{suite} / {backbone}"), xlabel)
            paths.append(save(fig, out / _name(prefix, suite, backbone)))
    paths += plot_wise_curves(runs_root, out, keep)
    remove_stale(out, paths)
    return paths


PREFIXES = ("id_vs_ood_", "ct_beta_", "rws_coeff_", "wise_")


def remove_stale(out_dir: Path, written: list[Path]) -> list[Path]:
    """Delete this module's plots in `out_dir` that this build did not write (e.g. a
    `rws_coeff_*.png` from an earlier set of runs with RWS rows); returns them."""
    keep = {p.name for p in written}
    stale = [p for p in out_dir.glob("*.png") if p.name.startswith(PREFIXES) and p.name not in keep]
    for p in stale:
        p.unlink()
    return stale


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


def plot_wise_curves(runs_root: str | Path, out_dir: str | Path, keep: set[str] | None = None) -> list[Path]:
    """`wise_<suite>_<backbone>.png` from the runs' `wise_sweep.csv` tables (of the runs in `keep`
    when given)."""
    t = sweep_tables(runs_root, WISE_SWEEP, keep)
    paths = []
    for (suite, backbone), g in (t.groupby(["suite", "backbone"]) if not t.empty else []):
        fig = wise_curve_figure(g, f"WiSE-FT on {suite} / {backbone}: ID vs OOD")
        if fig is not None:
            paths.append(save(fig, Path(out_dir) / _name("wise", suite, backbone)))
    return paths
