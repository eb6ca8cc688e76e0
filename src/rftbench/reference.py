"""The papers' reported figures for each paper preset (configs/reference/<preset>.yaml, accuracy in %)
and the finished runs of that preset beside them.

One YAML per preset: `suites` (the suites whose runs are ours), `columns` (our split -> the paper's
column name), `mean` (the columns the paper's average is over, default the `ood/*` ones, and its
`label`), `rows` (backbone, method, label, source, `values` per split, `mean` as the paper states
it), `not_found` (the preset's methods without a figure) and `notes`. Our rows are the
leaderboard's chosen variants (`rftbench.leaderboard`), each split's mean over trial seeds; our
`mean` is the average over the same columns as the paper's.

    python -m rftbench.leaderboard --runs runs --reference wiseft_imagenet
    python scripts/reference_table.py        # docs/protocol.md's table of every preset's figures
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from rftbench.identity import CONFIG_DIR

REFERENCE_DIR = Path(CONFIG_DIR) / "reference"
KEYS = ["suite", "backbone", "method"]


def presets() -> list[str]:
    """The presets with a reference file."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.yaml"))


def load(preset: str) -> dict:
    """The reference file of `preset`; an unknown preset is a ValueError naming the known ones."""
    path = REFERENCE_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ValueError(f"no reference figures for {preset!r} ({path}); known: {', '.join(presets())}")
    return yaml.safe_load(path.read_text())


def preset_grid(preset: str) -> dict[str, list[str]]:
    """The backbones and methods a preset runs: its sweep's values, else its `override /<group>` default."""
    doc = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{preset}.yaml").read_text())
    params = ((doc.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    defaults = {next(iter(d)).removeprefix("override /"): next(iter(d.values()))
                for d in doc.get("defaults", []) if isinstance(d, dict)}
    return {g: str(params[g]).split(",") if g in params else [defaults[g]] for g in ("backbone", "method")}


def split_columns(ref: dict) -> list[str]:
    return list(ref["columns"])


def mean_columns(ref: dict) -> list[str]:
    """The columns the paper's average is over (`mean.over`; default: the OOD splits)."""
    return list((ref.get("mean") or {}).get("over") or [c for c in ref["columns"] if c.startswith("ood/")])


def reference_rows(ref: dict) -> pd.DataFrame:
    """The paper's rows: backbone, method, row (`paper: <label>`), one column per split, mean, source."""
    cols = split_columns(ref)
    rows = [{"backbone": r["backbone"], "method": r["method"], "row": f"paper: {r['label']}",
             **{c: r["values"].get(c, np.nan) for c in cols}, "mean": r.get("mean", np.nan),
             "source": r["source"]} for r in ref.get("rows", [])]
    return pd.DataFrame(rows, columns=["backbone", "method", "row", *cols, "mean", "source"])


def our_rows(lb, m: pd.DataFrame, source: str, ref: dict, grid: dict[str, list[str]]) -> pd.DataFrame:
    """Our rows for the preset: the leaderboard's (`lb`, `rftbench.leaderboard.build_all`) chosen
    variant of every (suite, backbone, method) of `ref['suites']` x `grid`, each split's accuracy in %
    averaged over its trial seeds (`m`: the runs' checked metrics)."""
    cols = split_columns(ref)
    empty = pd.DataFrame(columns=["backbone", "method", "row", *cols, "mean", "source"])
    if lb.board.empty:
        return empty
    board = lb.board[lb.board["suite"].isin(ref["suites"]) & lb.board["backbone"].isin(grid["backbone"])
                     & lb.board["method"].isin(grid["method"])]
    runs = lb.runs.merge(board[KEYS + ["variant"]], on=KEYS + ["variant"])
    if runs.empty:
        return empty
    m = m[(m["metric"] == "acc") & (m["selection"].astype(object).fillna("val") != "oracle")
          & m["split"].isin(cols) & m["run_id"].isin(runs["run_id"])]
    per_run = m.pivot_table(index="run_id", columns="split", values="value", aggfunc="mean").reindex(columns=cols)
    per_run = runs[KEYS + ["run_id"]].merge(per_run * 100.0, left_on="run_id", right_index=True, how="left")
    out = per_run.groupby(KEYS, sort=True).agg({**{c: "mean" for c in cols}, "run_id": "count"}).reset_index()
    over = mean_columns(ref)
    out["mean"] = out[over].mean(axis=1, skipna=False) if over else np.nan
    out["row"] = [f"ours (n={n})" if len(ref["suites"]) == 1 else f"ours: {s} (n={n})"
                  for s, n in zip(out["suite"], out["run_id"])]
    out["source"] = source
    return out[["backbone", "method", "row", *cols, "mean", "source"]]


def comparison(lb, m: pd.DataFrame, source: str, preset: str) -> pd.DataFrame:
    """The paper's rows and ours (`our_rows`), grouped by (backbone, method): the paper's row first."""
    ref = load(preset)
    both = pd.concat([reference_rows(ref).assign(_ours=0), our_rows(lb, m, source, ref, preset_grid(preset)).assign(_ours=1)],
                     ignore_index=True)
    return both.sort_values(["backbone", "method", "_ours"], kind="stable").drop(columns="_ours").reset_index(drop=True)


def _cells(df: pd.DataFrame, ref: dict) -> pd.DataFrame:
    """`df` with split columns named as the paper names them and numbers to 2 decimals ('-' when absent)."""
    names = {c: ref["columns"][c] for c in split_columns(ref)} | {"mean": (ref.get("mean") or {}).get("label", "mean")}
    out = df.rename(columns=names).copy()
    for c in names.values():
        out[c] = [("-" if pd.isna(v) else f"{v:.2f}") for v in out[c]]
    return out


def render(table: pd.DataFrame, ref: dict) -> str:
    """Markdown: the comparison table (or the reference rows alone), then what was not found and the notes."""
    lines = [f"### {ref['title']} (`experiment={ref['preset']}`)", ""]
    if len(table):
        lines += [_cells(table, ref).to_markdown(index=False, disable_numparse=True), ""]
    if ref.get("not_found"):
        lines.append(f"Not found (no published figure for this setting): {', '.join(ref['not_found'])}.")
    lines += [f"- {n}" for n in ref.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def docs_table() -> str:
    """Every preset's reference rows, as docs/protocol.md shows them."""
    refs = [load(p) for p in presets()]
    return "\n".join(render(reference_rows(ref), ref) for ref in refs)
