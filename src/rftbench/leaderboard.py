"""Leaderboard from run folders: one row per (suite, backbone, method), mean +- standard error over
seeds, written as CSV (the contract), Markdown and LaTeX.

    python -m rftbench.leaderboard --runs runs --out results
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from rftbench.results import load_metrics
from rftbench.utils import write_text_atomic

log = logging.getLogger("rftbench")
KEYS = ["suite", "backbone", "method"]
# headline column -> how to read it off a run's metrics (split, metric); None split = shift mean.
HEADLINE = {
    "id_test_acc": ("test", "acc"),
    "ood_mean_acc": ("ood", "acc_mean"),
    "ood_worst_acc": ("ood", "acc_worst"),
    "ood_domain_acc": ("shift:domain", "acc"),
    "corruption_acc": ("ood/corruption", "acc_mean"),
    "robust_acc": ("shift:adversarial", "robust_acc"),
    "ece": ("test", "ece"),
    "nll": ("test", "nll"),
    "trainable_params": ("-", "trainable_params"),
    "trainable_frac": ("-", "trainable_frac"),
    "adapt_time_s": ("-", "adapt_time_s"),
    "eval_time_s": ("-", "eval_time_s"),
}
# columns shown in percent in Markdown/LaTeX
PERCENT = {"id_test_acc", "ood_mean_acc", "ood_worst_acc", "ood_domain_acc", "corruption_acc", "robust_acc", "ece"}


def per_run(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run with the headline values (selection=val rows only) and chosen knobs."""
    m = metrics[metrics["selection"].fillna("val") != "oracle"]
    out = {}
    for run_id, g in m.groupby("run_id", sort=False):
        first = g.iloc[0]
        rec = {k: first[k] for k in KEYS} | {"seed": first["seed"], "run_id": run_id}
        for col, (split, metric) in HEADLINE.items():
            if split.startswith("shift:"):
                sel = g[(g["shift"] == split[6:]) & (g["metric"] == metric) & g["split"].str.startswith("ood/")]
            else:
                sel = g[(g["split"] == split) & (g["metric"] == metric)]
            rec[col] = sel["value"].mean() if len(sel) else np.nan
        for _, r in g[g["metric"].str.startswith("chosen/")].iterrows():
            rec[r["metric"]] = r["value"]
        out[run_id] = rec
    return pd.DataFrame(list(out.values()))


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard error (ddof=1; NaN for one seed) and n_seeds per (suite, backbone, method)."""
    if runs.empty:
        return pd.DataFrame(columns=KEYS + ["n_seeds"])
    value_cols = [c for c in runs.columns if c not in KEYS + ["seed", "run_id"]]
    rows = []
    for key, g in runs.groupby(KEYS, sort=True):
        rec = dict(zip(KEYS, key)) | {"n_seeds": g["seed"].nunique()}
        for c in value_cols:
            vals = g[c].dropna().to_numpy(dtype=float)
            rec[c] = vals.mean() if len(vals) else np.nan
            rec[f"{c}_se"] = vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else np.nan
        rows.append(rec)
    return pd.DataFrame(rows)


def build(runs_root: str | Path) -> pd.DataFrame:
    return aggregate(per_run(load_metrics(runs_root)))


def _fmt(v: float, se: float, pct: bool) -> str:
    if pd.isna(v):
        return "-"
    scale = 100.0 if pct else 1.0
    if not pct and abs(v) >= 1000:
        s = f"{v:,.0f}"
    else:
        s = f"{v * scale:.1f}" if pct else f"{v:.3g}"
    return s if pd.isna(se) else f"{s} ± {se * scale:.1f}" if pct else f"{s} ± {se:.2g}"


def display_table(board: pd.DataFrame) -> pd.DataFrame:
    """Human-readable table: percentages with +- SE, costs, n_seeds."""
    cols = [c for c in HEADLINE if c in board.columns and board[c].notna().any()]
    out = board[KEYS + ["n_seeds"]].copy()
    for c in cols:
        out[c] = [_fmt(v, board.get(f"{c}_se", pd.Series(np.nan, index=board.index))[i], c in PERCENT)
                  for i, v in board[c].items()]
    return out


def write(board: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "leaderboard.csv", out_dir / "leaderboard.md", out_dir / "leaderboard.tex"]
    write_text_atomic(paths[0], board.to_csv(index=False, float_format="%.6g"))
    shown = display_table(board)
    write_text_atomic(paths[1], shown.to_markdown(index=False) + "\n")
    write_text_atomic(paths[2], shown.to_latex(index=False, escape=True))
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs", help="runs folder (paths.runs)")
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    board = build(args.runs)
    if board.empty:
        raise SystemExit(f"no finished runs under {args.runs}/; run `make bench` or python -m rftbench.run first")
    paths = write(board, args.out)
    print((Path(args.out) / "leaderboard.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
