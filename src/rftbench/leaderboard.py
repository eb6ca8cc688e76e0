"""Leaderboard from run folders: one row per (suite, backbone, method), mean +- standard error over
trial seeds and their number, written as CSV (the contract), Markdown and LaTeX, plus plots and a
static, sortable `index.html` (`rftbench.report`) that links every row to its runs.

- Runs that differ in more than the trial seed (swept hyper-parameters, `hp_seed` draws) are
  separate variants; each row is the variant with the best mean validation objective of its
  method: `val_acc` (every method's `Adapted.val_acc`), or the objective the method itself chose by
  where it is another (`select_score`, named in `select_by`: e.g. `ct_robust select=robust` its
  robust val accuracy, `wise select=ood_val` its ood_val mean); `rftbench.selection`: ties -> more
  seeds, then the variant id. `leaderboard_variants.csv` lists them all.
- `ood_mean_acc`: the mean over the OOD splits that are not corruptions and the corruption mean;
  `ood_worst_acc`: the worst of the individual OOD results, i.e. each OOD split (e.g. each domain)
  and each corruption's mean over its severities (`rftbench.metrics.ood_groups`).
- Effective robustness: OOD mean accuracy minus the logit-linear fit over the suite's baseline runs
  (`--baselines`), the runs of each baseline's chosen variant (a tuned sweep's other draws are left
  out of the fit); the fits and their baseline runs are in `effective_robustness.csv`. The fit needs
  at least `--er-min-methods` baseline methods with `--er-min-seeds` runs each (default 3 x 3);
  with fewer the column is left empty and a warning says why.
- Mean ± standard error over trial seeds; no ± where there is one seed or no spread (`n_seeds`).
  A value that fewer of the row's seeds recorded than `n_seeds` (a run without that metric) says
  so: `<column>_n_seeds` in the CSV, "(n=k)" in Markdown and LaTeX.
- A metric value that is not a finite number (nan, inf, text) is an error naming the run folder,
  split and metric; `--drop-bad-runs` leaves such runs out instead, with a warning counting them.
- `<column>_within_noise`: the row's mean is within the standard error of its difference from the
  best row of the same (suite, backbone) (the best row included); bold in Markdown and LaTeX.

    python -m rftbench.leaderboard --runs runs --out results
    python -m rftbench.leaderboard --runs runs --reference wiseft_imagenet   # beside the paper's figures
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from rftbench import plots, report
from rftbench.identity import NOT_WORK, variant_id
from rftbench.metrics import LogitFit, effective_robustness, ood_groups
from rftbench.results import damage, load_metrics, run_folders
from rftbench.selection import select
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
PERCENT = {"id_test_acc", "ood_mean_acc", "ood_worst_acc", "ood_domain_acc", "corruption_acc", "robust_acc",
           "ece", "effective_robustness"}
# columns with a better direction (+1 higher, -1 lower): they get `_within_noise` flags
DIRECTION = {"id_test_acc": 1, "ood_mean_acc": 1, "ood_worst_acc": 1, "ood_domain_acc": 1, "corruption_acc": 1,
             "robust_acc": 1, "effective_robustness": 1, "ece": -1, "nll": -1}
SHOWN = [*list(HEADLINE)[:6], "effective_robustness", *list(HEADLINE)[6:]]
BASELINES = ("zeroshot", "lp", "ft")
ER_MIN_METHODS, ER_MIN_SEEDS = 3, 3  # baseline points an effective-robustness fit needs (methods x runs)
SELECT_BY = "val_acc"  # the runner's ("-", "val_acc") row: Adapted.val_acc
# per-run text columns (not averaged): the objective a run's method chose by (Adapted.select_by)
LABELS = ("select_by",)
# config keys that are not hyper-parameters of a variant: those that do not change the work, and the trial seed
NOT_VARIANT = (*NOT_WORK, "seed")


class BadMetrics(ValueError):
    """A finished run's metrics.csv has a value that is not a finite number."""


def bad_values(runs_root: str | Path) -> dict[Path, list[tuple[str, str, str]]]:
    """Finished, undamaged run folder -> its metric rows whose value is not a finite number, as
    (split, metric, value as written); folders without such rows are not listed."""
    out = {}
    for folder in run_folders(runs_root):
        if not (folder / "done").exists() or damage(folder) is not None:
            continue
        m = pd.read_csv(folder / "metrics.csv", dtype={"value": str}, keep_default_na=False)
        num = pd.to_numeric(m["value"], errors="coerce")
        bad = m[~np.isfinite(num.to_numpy(float))]
        if len(bad):
            out[folder] = [(str(r["split"]), str(r["metric"]), str(r["value"])) for _, r in bad.iterrows()]
    return out


def checked_metrics(runs_root: str | Path, drop_bad_runs: bool = False) -> pd.DataFrame:
    """`load_metrics` with every value a finite float. A run with another value raises `BadMetrics`
    naming its folder, split and metric, or (`drop_bad_runs`) is left out with a warning."""
    metrics = load_metrics(runs_root)
    bad = bad_values(runs_root)
    if bad and not drop_bad_runs:
        folder, rows = next(iter(bad.items()))
        split, metric, value = rows[0]
        more = sum(map(len, bad.values())) - 1
        raise BadMetrics(f"{folder / 'metrics.csv'}: split {split}, metric {metric} has value {value or '(empty)'!r}, "
                         f"not a finite number" + (f" (and {more} more such values in {len(bad)} runs)" if more else "")
                         + "; fix or remove the run, or pass --drop-bad-runs to leave such runs out")
    if bad:
        log.warning("left out %d runs with metric values that are not finite numbers (--drop-bad-runs): %s",
                    len(bad), ", ".join(f"{f} ({rows[0][0]}/{rows[0][1]}={rows[0][2] or '(empty)'})"
                                        for f, rows in bad.items()))
        ids = {(f.parts[-4], f.parts[-3], f.parts[-2], f.name) for f in bad}
        key = zip(metrics["suite"].astype(str), metrics["backbone"].astype(str), metrics["method"].astype(str),
                  metrics["run_id"].astype(str))
        metrics = metrics[[k not in ids for k in key]].reset_index(drop=True)
    return metrics.assign(value=pd.to_numeric(metrics["value"]).astype(float))


def run_variants(runs_root: str | Path) -> dict[str, str]:
    """run_id -> variant: a hash of the finished run's config without the trial seed and the keys
    that do not change the work, so the trial seeds of one hyper-parameter setting share it."""
    out = {}
    for folder in run_folders(runs_root):
        if (folder / "done").exists() and damage(folder) is None:
            out[folder.name] = variant_id(yaml.safe_load((folder / "config.yaml").read_text()) or {})
    return out


def variant_hparams(runs_root: str | Path) -> pd.DataFrame:
    """variant -> the values its runs used for the keys of their search space (`method.search` and
    `hp_search`, `rftbench.sweep.search_space`), as columns `hp/<key>` (read off config.yaml)."""
    from omegaconf import OmegaConf

    from rftbench.sweep import search_space

    rows = {}
    for folder in run_folders(runs_root):
        if not (folder / "done").exists():
            continue
        raw = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        cfg = OmegaConf.create(raw)
        keys = [spec.get("key") for spec in (search_space(cfg) or []) if spec.get("key")]
        rows.setdefault(variant_id(raw), {}).update(
            {f"hp/{k}": OmegaConf.select(cfg, k, default=None) for k in keys})
    return pd.DataFrame([{"variant": v, **hp} for v, hp in rows.items()])


# provenance columns of the leaderboard and how its note names them
PROVENANCE = {"lock": "locked environment (requirements.lock sha256)", "commit": "rftbench commit", "cpu": "CPU"}


def provenance(runs_root: str | Path) -> dict[str, dict[str, str]]:
    """run_id -> {"lock": hash of requirements.lock, "commit": rftbench commit (+"-dirty"), "cpu": CPU
    model}, read off each finished run's env.json: which environment, code and machine produced it."""
    out = {}
    for folder in run_folders(runs_root):
        try:
            env = json.loads((folder / "env.json").read_text())
        except (OSError, ValueError):
            continue
        git = env.get("git") or {}
        commit = (git.get("commit") or "unknown")[:12] + ("-dirty" if git.get("dirty") else "")
        out[folder.name] = {"lock": env.get("lock") or "unknown", "commit": commit, "cpu": env.get("cpu") or "unknown"}
    return out


def add_provenance(board: pd.DataFrame, runs: pd.DataFrame, prov: dict[str, dict[str, str]]) -> pd.DataFrame:
    """`lock`, `commit` and `cpu` columns: the distinct values over each row's runs (';'-joined)."""
    board = board.copy()
    for col in PROVENANCE:
        values = []
        for _, r in board.iterrows():
            ids = runs[(runs[KEYS] == r[KEYS]).all(axis=1) & (runs["variant"] == r["variant"])]["run_id"]
            values.append(";".join(sorted({prov.get(str(i).split(":", 1)[0], {}).get(col, "unknown") for i in ids})) or "unknown")
        board[col] = values
    return board


ROW_DETAIL = "row:"  # metric rows of a run with detail "row:<name>" form the leaderboard row <method>_<name>


def split_rows(metrics: pd.DataFrame, variants: dict[str, str] | None = None
               ) -> tuple[pd.DataFrame, dict[str, str], dict[str, str]]:
    """Rows a method records for a second model of the same run (`detail` "row:<name>", e.g. RWS's
    `bn_only` attribution) become a run of their own, method `<method>_<name>`, run id
    `<run_id>:<name>`, same variant; the run's other rows are left as they are. Returns (metrics,
    run id -> variant, derived method -> the method whose runs it came from)."""
    variants = dict(variants or {})
    detail = metrics["detail"].astype(object).fillna("").astype(str) if "detail" in metrics else None
    if detail is None or not detail.str.startswith(ROW_DETAIL).any():
        return metrics, variants, {}
    extra = detail.str.startswith(ROW_DETAIL)
    name = detail[extra].str[len(ROW_DETAIL):]
    moved = metrics[extra].assign(method=metrics.loc[extra, "method"] + "_" + name,
                                  run_id=metrics.loc[extra, "run_id"].astype(str) + ":" + name, detail=None)
    for old, new in zip(metrics.loc[extra, "run_id"].astype(str), moved["run_id"]):
        if old in variants:
            variants[new] = variants[old]
    parents = dict(zip(moved["method"], metrics.loc[extra, "method"]))
    return pd.concat([metrics[~extra], moved], ignore_index=True), variants, parents


def per_run(metrics: pd.DataFrame, variants: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per run with the headline values (selection=val rows only) and chosen knobs."""
    m = metrics[metrics["selection"].astype(object).fillna("val") != "oracle"]
    out = {}
    for run_id, g in m.groupby("run_id", sort=False):
        first = g.iloc[0]
        rec = {k: first[k] for k in KEYS} | {"seed": first["seed"], "run_id": run_id,
                                              "variant": (variants or {}).get(run_id, "-")}
        for col, (split, metric) in HEADLINE.items():
            if split.startswith("shift:"):
                sel = g[(g["shift"] == split[6:]) & (g["metric"] == metric) & g["split"].str.startswith("ood/")]
            else:
                sel = g[(g["split"] == split) & (g["metric"] == metric)]
            rec[col] = sel["value"].mean() if len(sel) else np.nan
        sel = g[(g["split"] == "-") & (g["metric"] == SELECT_BY)]
        if not len(sel):  # runs recorded before the explicit field: their `chosen/val_acc` row
            sel = g[(g["split"] == "-") & (g["metric"] == f"chosen/{SELECT_BY}")]
        rec[SELECT_BY] = sel["value"].mean() if len(sel) else np.nan
        sel = g[(g["split"] == "-") & (g["metric"] == "select_score")]
        if len(sel):  # the method chose by another validation objective (Adapted.select_score)
            rec["select_score"] = float(sel["value"].iloc[0])
            rec["select_by"] = json.loads(sel["detail"].iloc[0])["objective"]
        else:
            rec["select_score"], rec["select_by"] = rec[SELECT_BY], SELECT_BY
        ood = g[(g["metric"] == "acc") & g["split"].str.startswith("ood/")]
        if len(ood):  # recomputed from the splits, so older runs get the same definition
            rec["ood_worst_acc"] = min(ood_groups(zip(ood["split"], ood["shift"], ood["corruption"], ood["value"])).values())
        sel = g[(g["split"] == "-") & (g["metric"] == "converged")]
        rec["converged"] = sel["value"].min() if len(sel) else np.nan
        for _, r in g[g["metric"].str.startswith("chosen/")].iterrows():
            rec[r["metric"]] = r["value"]
        out[run_id] = rec
    return pd.DataFrame(list(out.values()))


def add_effective_robustness(runs: pd.DataFrame, baselines=BASELINES, min_methods: int = ER_MIN_METHODS,
                             min_seeds: int = ER_MIN_SEEDS, fit_runs: set[str] | None = None
                             ) -> tuple[pd.DataFrame, dict[str, LogitFit], pd.DataFrame]:
    """Per run `effective_robustness` = OOD mean accuracy - the fit's prediction from its ID test
    accuracy, the fit (logit-linear) over the runs of `baselines` of the same suite (only those in
    `fit_runs` when given: the chosen variants' runs). A suite with
    fewer than `min_methods` baseline methods of at least `min_seeds` runs each gets no fit (a
    warning says why). Returns the runs, the fits per suite, and the fit table (with its baseline
    runs) to record."""
    runs = runs.copy()
    runs["effective_robustness"] = np.nan
    fits, records = {}, []
    for suite, g in runs.groupby("suite", sort=True):
        base = g[g["method"].isin(baselines) & (g["run_id"].isin(fit_runs) if fit_runs is not None else True)]
        base = base.dropna(subset=["id_test_acc", "ood_mean_acc"])
        counts = base["method"].value_counts()
        enough = sorted(counts[counts >= min_seeds].index)
        if len(enough) < min_methods:
            log.warning("no effective robustness for %s: the fit needs %d baseline methods with >= %d runs each, "
                        "got %s (baselines %s); run more of them or lower --er-min-methods/--er-min-seeds",
                        suite, min_methods, min_seeds, dict(counts) or "none", ", ".join(baselines))
            continue
        try:
            er, fit = effective_robustness(g["id_test_acc"].to_numpy(float), g["ood_mean_acc"].to_numpy(float),
                                           base["id_test_acc"], base["ood_mean_acc"])
        except ValueError as exc:
            log.warning("no effective robustness for %s: %s (baselines %s)", suite, exc, ", ".join(baselines))
            continue
        runs.loc[g.index, "effective_robustness"] = er
        fits[suite] = fit
        records.append({"suite": suite, "baselines": ",".join(sorted(base["method"].unique())), "n_points": fit.n,
                        "slope": fit.slope, "intercept": fit.intercept, "clip": fit.clip,
                        "baseline_runs": ";".join(base["run_id"])})
    return runs, fits, pd.DataFrame(records, columns=["suite", "baselines", "n_points", "slope", "intercept",
                                                      "clip", "baseline_runs"])


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard error (ddof=1; NaN for one seed) and n_seeds per (suite, backbone, method,
    variant); `<column>_n_seeds` for a column some row has from fewer (but some) of its seeds."""
    if runs.empty:
        return pd.DataFrame(columns=KEYS + ["variant", "n_seeds"])
    runs = runs if "variant" in runs else runs.assign(variant="-")
    value_cols = [c for c in runs.columns if c not in KEYS + ["seed", "run_id", "variant", *LABELS]]
    rows, partial = [], set()
    for key, g in runs.groupby(KEYS + ["variant"], sort=True):
        rec = dict(zip(KEYS + ["variant"], key)) | {"n_seeds": g["seed"].nunique()}
        for c in LABELS:  # one label per variant (its seeds share the config)
            if c in g:
                rec[c] = ",".join(sorted(set(g[c].dropna().astype(str))))
        for c in value_cols:
            has = g[c].notna()
            vals = g.loc[has, c].to_numpy(dtype=float)
            rec[c] = vals.mean() if len(vals) else np.nan
            rec[f"{c}_se"] = vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else np.nan
            rec[f"{c}_n_seeds"] = g.loc[has, "seed"].nunique()
            if 0 < rec[f"{c}_n_seeds"] < rec["n_seeds"]:
                partial.add(c)
        rows.append(rec)
    drop = [f"{c}_n_seeds" for c in value_cols if c not in partial]
    return pd.DataFrame(rows).drop(columns=drop)


def select_variants(variants: pd.DataFrame, parents: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (suite, backbone, method): the variant with the best mean validation accuracy
    (`rftbench.selection`; candidates ordered by more seeds, then the variant id, so ties and missing
    values go to the first); `n_variants` says how many there were. A derived method (`parents`,
    from `split_rows`: e.g. `rws_bn_only` of `rws`) takes the variant its parent chose, so its row
    is the ablation of the very runs the parent's row reports."""
    if variants.empty:
        return variants.assign(n_variants=pd.Series(dtype=int))
    val = variants[SELECT_BY] if SELECT_BY in variants else pd.Series(np.nan, index=variants.index)
    if "select_score" in variants:  # each method's own validation objective, where all its variants share it
        same = variants.groupby(KEYS)["select_by"].transform("nunique") == 1
        val = variants["select_score"].where(same, val)
        for key, g in variants[~same].groupby(KEYS):
            log.warning("%s: variants chose by different objectives (%s): ranked by %s", "/".join(key),
                        ", ".join(sorted(g["select_by"].unique())), SELECT_BY)
    order = variants.assign(_val=val).sort_values(KEYS + ["n_seeds", "variant"],
                                                  ascending=[True] * len(KEYS) + [False, True])
    chosen = {key: select(list(g.index), list(g["_val"])) for key, g in order.groupby(KEYS, sort=True)}
    row_of = {tuple(k): i for i, k in zip(order.index, order[KEYS + ["variant"]].itertuples(index=False))}
    for (suite, backbone, method), i in chosen.items():
        parent = chosen.get((suite, backbone, (parents or {}).get(method)))
        if parent is not None:  # the parent's variant, when the derived method has it
            chosen[(suite, backbone, method)] = row_of.get((suite, backbone, method, order.at[parent, "variant"]), i)
    best = order.loc[list(chosen.values())].drop(columns="_val")
    counts = variants.groupby(KEYS).size().rename("n_variants").reset_index()
    return best.merge(counts, on=KEYS).reset_index(drop=True)


def flag_noise(board: pd.DataFrame) -> pd.DataFrame:
    """`<column>_within_noise` for every column with a direction: True for the best row of each
    (suite, backbone) and for rows whose difference from it is at most the standard error of the
    difference, sqrt(se^2 + se_best^2) (False when an SE is unknown, e.g. one seed)."""
    board = board.copy()
    for c, sign in DIRECTION.items():
        if c not in board or board[c].isna().all():
            continue
        flags = pd.Series(False, index=board.index)
        se = board[f"{c}_se"] if f"{c}_se" in board else pd.Series(np.nan, index=board.index)
        for _, g in board.groupby(["suite", "backbone"]):
            vals = g[c] * sign
            if vals.isna().all():
                continue
            best = vals.idxmax()
            tol = np.sqrt(se[g.index] ** 2 + se[best] ** 2)
            flags[g.index] = (vals[best] - vals <= tol) | (g.index == best)
        board[f"{c}_within_noise"] = flags
    return board


@dataclass
class Leaderboard:
    board: pd.DataFrame                       # one row per (suite, backbone, method)
    variants: pd.DataFrame                    # every (suite, backbone, method, variant)
    runs: pd.DataFrame                        # one row per finished run
    fits: dict[str, LogitFit] = field(default_factory=dict)
    er_fits: pd.DataFrame = field(default_factory=pd.DataFrame)


def build_all(runs_root: str | Path, baselines=BASELINES, min_methods: int = ER_MIN_METHODS,
              min_seeds: int = ER_MIN_SEEDS, drop_bad_runs: bool = False) -> Leaderboard:
    """The leaderboard of the finished runs under `runs_root`; raises `BadMetrics` for a metric value
    that is not a finite number unless `drop_bad_runs` (then such runs are left out, with a warning)."""
    metrics, run_variant, parents = split_rows(checked_metrics(runs_root, drop_bad_runs), run_variants(runs_root))
    runs = per_run(metrics, run_variant)
    if runs.empty:
        return Leaderboard(aggregate(runs), aggregate(runs), runs)
    chosen = select_variants(aggregate(runs), parents)[KEYS + ["variant"]]  # (ER does not change the choice)
    fit_runs = set(runs.merge(chosen, on=KEYS + ["variant"])["run_id"])
    runs, fits, er_fits = add_effective_robustness(runs, baselines, min_methods, min_seeds, fit_runs)
    variants = aggregate(runs)
    hp = variant_hparams(runs_root)
    if len(hp.columns) > 1:  # the drawn values of each variant, for leaderboard_variants.csv
        variants = variants.merge(hp, on="variant", how="left")
    board = add_provenance(flag_noise(select_variants(variants, parents)), runs, provenance(runs_root))
    return Leaderboard(board, variants, runs, fits, er_fits)


def build(runs_root: str | Path, baselines=BASELINES) -> pd.DataFrame:
    return build_all(runs_root, baselines).board


def _fmt(v: float, se: float, pct: bool) -> str:
    if pd.isna(v):
        return "-"
    scale = 100.0 if pct else 1.0
    if not pct and abs(v) >= 1000:
        s = f"{v:,.0f}"
    else:
        s = f"{v * scale:.1f}" if pct else f"{v:.3g}"
    if pd.isna(se) or se <= 1e-9 * max(abs(v), 1.0):  # one seed or no spread (up to rounding): n_seeds says it
        return s
    return f"{s} ± {se * scale:.1f}" if pct else f"{s} ± {se:.2g}"


TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
               "†": r"\dag{}"}


def _tex(text: str) -> str:
    return "".join(TEX_ESCAPES.get(ch, ch) for ch in str(text)).replace("±", r"$\pm$")


# method -> the name shown in the Markdown/LaTeX tables (the CSV keeps the method id)
DISPLAY_NAMES = {"levi": "levi (reconstruction)"}


def chosen_hparams(row: pd.Series) -> str:
    """The searched hyper-parameters of a row's chosen variant, e.g. "lr 0.0032, weight_decay 1e-05"
    (each key named by its shortest dotted suffix that no other key of the row ends with, e.g.
    "probe.lr" beside "optimizer.lr"); "-" when it has none."""
    keys = [c for c in row.index if c.startswith("hp/") and pd.notna(row[c])]
    paths = [k[3:] for k in keys]
    parts = []
    for key, path in zip(keys, paths):
        pieces = path.split(".")
        name = next(s for s in (".".join(pieces[-n:]) for n in range(1, len(pieces) + 1))
                    if sum(o == s or o.endswith("." + s) for o in paths) == 1 or s == path)
        value = row[key]
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            shown = str(int(value)) if float(value).is_integer() else f"{value:.2g}"
        else:
            shown = str(value)
        parts.append(f"{name} {shown}")
    return ", ".join(parts) or "-"


def display_table(board: pd.DataFrame, fmt: str = "md") -> pd.DataFrame:
    """Human-readable table (`fmt` md or tex): percentages with +- SE, costs, n_seeds; entries
    within noise of their group's best in bold; methods under their `DISPLAY_NAMES`. When some
    method had several variants (a tuned sweep), `n_variants` and the chosen variant's searched
    values (`chosen on val`) follow the method."""
    cols = [c for c in SHOWN if c in board.columns and board[c].notna().any()]
    out = board[KEYS + ["n_seeds"]].copy()
    out["method"] = out["method"].map(lambda m: DISPLAY_NAMES.get(m, m))
    if "converged" in board:  # a mean below 1: some trial seed's best val epoch was its last
        out["method"] = [f"{m} †" if c < 1 else m for m, c in zip(out["method"], board["converged"])]
    if "n_variants" in board and (board["n_variants"] > 1).any():
        out["n_variants"] = board["n_variants"]
        out["chosen on val"] = [chosen_hparams(r) for _, r in board.iterrows()]
    if fmt == "tex":
        out = out.astype(str).map(_tex)
    for c in cols:
        se = board[f"{c}_se"] if f"{c}_se" in board else pd.Series(np.nan, index=board.index)
        flags = board[f"{c}_within_noise"] if f"{c}_within_noise" in board else pd.Series(False, index=board.index)
        cells = []
        n = board[f"{c}_n_seeds"] if f"{c}_n_seeds" in board else board["n_seeds"]
        for i, v in board[c].items():
            s = _fmt(v, se[i], c in PERCENT)
            if s != "-" and n[i] < board.at[i, "n_seeds"]:  # fewer seeds behind this value than the row's
                s += f" (n={int(n[i])})"
            if fmt == "tex":
                s = _tex(s)
            bold = bool(flags[i]) and s != "-"
            cells.append((f"\\textbf{{{s}}}" if fmt == "tex" else f"**{s}**") if bold else s)
        out[_tex(c) if fmt == "tex" else c] = cells
    return out


NOTE = ("Mean ± standard error over n_seeds trial seeds (no ± for one seed or no spread); bold: the best of "
        "its suite and backbone, or within the standard error of the difference from it; (n=k): a value from "
        "only k of the row's seeds. †: in some trial "
        "seed the best validation epoch was the last one, more than one validation image above every earlier "
        "epoch (still rising: not converged within the budget).")


def distinct_values(cells) -> list[str]:
    """The sorted distinct values of ';'-joined provenance cells."""
    return sorted({v for cell in cells for v in str(cell).split(";")})


def provenance_note(board: pd.DataFrame) -> str:
    """Which locked environment, rftbench commit and CPU model produced the table's runs."""
    parts = []
    for col, what in PROVENANCE.items():
        if col in board:
            values = distinct_values(board[col])
            parts.append(f"{what} {', '.join(values)}")
    return ("Produced by " + "; ".join(parts) + ".") if parts else ""


def write(board: pd.DataFrame, out_dir: str | Path, lb: Leaderboard | None = None) -> list[Path]:
    """leaderboard.csv/.md/.tex, plus (from a full `Leaderboard`) the variants and the effective
    robustness fits."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "leaderboard.csv", out_dir / "leaderboard.md", out_dir / "leaderboard.tex"]
    write_text_atomic(paths[0], board.to_csv(index=False, float_format="%.6g"))
    notes = [n for n in (NOTE, provenance_note(board)) if n]
    write_text_atomic(paths[1], display_table(board).to_markdown(index=False) + "\n\n" + "\n\n".join(notes) + "\n")
    write_text_atomic(paths[2], display_table(board, "tex").to_latex(index=False, escape=False)
                      + "".join(f"% {n}\n" for n in notes))
    if lb is not None:
        paths += [out_dir / "leaderboard_variants.csv", out_dir / "effective_robustness.csv"]
        write_text_atomic(paths[3], lb.variants.to_csv(index=False, float_format="%.6g"))
        write_text_atomic(paths[4], lb.er_fits.to_csv(index=False, float_format="%.6g"))
    return paths


def out_problem(out: str | Path) -> str | None:
    """Why the output folder `out` cannot be made or written, or None."""
    path = Path(out).absolute()
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file"
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"


def reference_report(runs_root: str | Path, preset: str) -> str:
    """`--reference`: the preset's paper figures and our rows (`rftbench.reference`), as Markdown."""
    from rftbench import reference

    try:
        ref = reference.load(preset)
        table = reference.comparison(build_all(runs_root), checked_metrics(runs_root), str(runs_root), preset)
        return reference.render(table, ref)
    except ValueError as exc:  # an unknown preset, a bad metric value (BadMetrics)
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs", help="runs folder (paths.runs)")
    ap.add_argument("--out", default="results", help="output folder")
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help="methods whose runs make the effective-robustness fit of each suite")
    ap.add_argument("--er-min-methods", type=int, default=ER_MIN_METHODS,
                    help="baseline methods (with --er-min-seeds runs each) the effective-robustness fit needs")
    ap.add_argument("--er-min-seeds", type=int, default=ER_MIN_SEEDS,
                    help="runs a baseline method needs to count towards --er-min-methods")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--drop-bad-runs", action="store_true",
                    help="leave out runs with a metric value that is not a finite number (default: an error)")
    ap.add_argument("--reference", metavar="PRESET",
                    help="print the finished runs of a paper preset beside its paper's figures "
                         "(configs/reference/PRESET.yaml, rftbench.reference) and write nothing")
    args = ap.parse_args(argv)
    if not Path(args.runs).is_dir():
        raise SystemExit(f"--runs {args.runs}: no such folder" + (" (it is a file)" if Path(args.runs).exists() else ""))
    if args.reference:
        print(reference_report(args.runs, args.reference))
        return
    problem = out_problem(args.out)
    if problem:
        raise SystemExit(f"--out {args.out}: cannot be created: {problem}")
    try:
        lb = build_all(args.runs, tuple(m for m in args.baselines.split(",") if m), args.er_min_methods,
                       args.er_min_seeds, args.drop_bad_runs)
    except BadMetrics as exc:
        raise SystemExit(str(exc)) from None
    if lb.board.empty:
        raise SystemExit(f"no finished runs under {args.runs}/; run `make bench` or python -m rftbench.run first")
    try:
        paths = write(lb.board, args.out, lb)
    except OSError as exc:
        raise SystemExit(f"--out {args.out}: cannot write: {exc}") from None
    figures = [] if args.no_plots else plots.plot_all(lb.runs, lb.fits, args.runs, args.out, lb.board)
    paths += figures
    paths.append(report.write_index(lb.board, lb.runs, display_table(lb.board), args.runs, args.out, figures, NOTE))
    print((Path(args.out) / "leaderboard.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
