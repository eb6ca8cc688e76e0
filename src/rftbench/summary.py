"""The block printed at the end of every run: its headline numbers (read as the leaderboard reads
them), its cost, what the method chose, and where its folder is."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

LINES = [("ID test acc", "id_test_acc", "%"), ("OOD mean acc", "ood_mean_acc", "%"),
         ("worst OOD acc", "ood_worst_acc", "%"), ("corruption acc", "corruption_acc", "%"),
         ("robust acc", "robust_acc", "%"), ("ECE", "ece", "%"), ("adapt time", "adapt_time_s", "s"),
         ("eval time", "eval_time_s", "s"), ("trainable params", "trainable_params", "n")]


def _fmt(value: float, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "%":
        return f"{100 * value:.1f}%"
    if kind == "s":
        return f"{value:.1f} s"
    return f"{value:,.0f}"


def summary_block(metrics: pd.DataFrame, run_dir: str | Path) -> str:
    """The summary of one run from its metrics (`metrics.csv` rows; selection=val values)."""
    from rftbench.leaderboard import per_run

    rec = per_run(metrics).iloc[0]
    title = f"run {rec['run_id']}: {rec['suite']} / {rec['backbone']} / {rec['method']} seed {rec['seed']}"
    width = max(len(label) for label, _, _ in LINES) + 2
    lines = [title, "-" * len(title)]
    lines += [f"{label:<{width}}{_fmt(rec.get(col, float('nan')), kind)}" for label, col, kind in LINES]
    chosen = {k[len("chosen/"):]: v for k, v in rec.items() if str(k).startswith("chosen/") and pd.notna(v)}
    lines.append(f"{'chosen':<{width}}" + (", ".join(f"{k}={v:.4g}" for k, v in chosen.items()) or "-"))
    lines.append(f"{'run folder':<{width}}{run_dir}")
    return "\n".join(lines)
