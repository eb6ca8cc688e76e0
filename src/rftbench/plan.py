"""What a sweep would run: its jobs, which are done, failed, running or pending, and the remaining
cost estimated from finished runs. Same arguments as the sweep:

    python -m rftbench.plan -m experiment=bench
    python -m rftbench.run -m experiment=bench --plan
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode

from rftbench.identity import CONFIG_DIR
from rftbench.results import load_metrics
from rftbench.sweep import Job, error_line, expand, repeats_defaults  # noqa: F401 (Job: the rows' type)

STATUSES = ("done", "damaged", "failed", "running", "incomplete", "pending", "repeat")
COST_METRICS = ("adapt_time_s", "eval_time_s")


def run_costs(roots: list[Path]) -> pd.DataFrame:
    """Seconds of adaptation + evaluation of every finished run under `roots`."""
    frames = [load_metrics(r) for r in roots]
    m = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if m.empty:
        return pd.DataFrame(columns=["run_id", "suite", "backbone", "method", "seconds"])
    m = m[m["metric"].isin(COST_METRICS)]
    return m.groupby(["run_id", "suite", "backbone", "method"], as_index=False)["value"].sum().rename(
        columns={"value": "seconds"})


def estimate(costs: pd.DataFrame, suite: str, backbone: str, method: str) -> tuple[float, str]:
    """Mean cost of finished runs like this one: same suite/backbone/method, else same method,
    else any; with what it is based on."""
    want = {"suite": suite, "backbone": backbone, "method": method}
    for keys in (("suite", "backbone", "method"), ("method",), ()):
        sel = costs
        for k in keys:
            sel = sel[sel[k] == want[k]]
        if len(sel):
            return float(sel["seconds"].mean()), f"{len(sel)} runs, same {'/'.join(keys)}" if keys else f"{len(sel)} runs, any"
    return math.nan, "no finished runs"


def varying(jobs: list[Job]) -> list[list[str]]:
    """Each job's overrides that differ between jobs (what identifies it within the sweep)."""
    keys = {}
    for job in jobs:
        for o in job.overrides:
            keys.setdefault(o.split("=", 1)[0], set()).add(o)
    return [[o for o in job.overrides if len(keys[o.split("=", 1)[0]]) > 1] for job in jobs]


def plan(overrides: list[str], config_dir: str = CONFIG_DIR) -> pd.DataFrame:
    """One row per job of the sweep `overrides` would start: its overrides, run folder, status,
    error (failed runs), cost (measured for done runs, else estimated) and what the estimate is
    based on."""
    with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name="run"):
        gh = GlobalHydra.instance()
        master = gh.hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)
        jobs = expand(master, gh.config_loader())
    costs = run_costs(sorted({Path(j.cfg.paths.runs) for j in jobs}))
    rows = []
    for i, (job, vary) in enumerate(zip(jobs, varying(jobs))):
        c = job.folder.columns
        st = "repeat" if repeats_defaults(job.cfg) else job.folder.status  # skipped by the sweep
        own = costs[costs["run_id"] == job.folder.run_id]
        cost, basis = ((float(own["seconds"].iloc[0]), "measured") if st == "done" and len(own)
                       else estimate(costs, c["suite"], c["backbone"], c["method"]))
        rows.append({"job": i, "overrides": " ".join(vary), "suite": c["suite"], "backbone": c["backbone"],
                     "method": c["method"], "seed": int(job.cfg.seed), "run_id": job.folder.run_id,
                     "status": st, "cost_s": cost, "cost_basis": basis, "folder": str(job.folder.path),
                     "error": error_line(job.folder) if st == "failed" else
                     job.folder.damage() if st == "damaged" else ""})
    table = pd.DataFrame(rows)
    table.attrs["features"] = feature_entries(jobs)
    return table


def feature_entries(jobs: list[Job]) -> list[str]:
    """One line per (suite, backbone) of the sweep: the frozen-feature entries already in the store
    (`rftbench.features`), which its frozen-backbone jobs (lp, ct, zeroshot, ...) read, not compute."""
    from omegaconf import OmegaConf

    from rftbench.features import entries_for

    lines, seen = [], set()
    for job in jobs:
        cfg = job.cfg
        if not (cfg.get("features") or {}).get("store", True):
            continue
        backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
        key = (cfg.suite.name, cfg.backbone.name, str(backbone))
        if key in seen:
            continue
        seen.add(key)
        found = entries_for(Path(cfg.paths.cache) / "features", backbone, cfg.suite.name)
        size = sum(e["bytes"] for e in found) / 2 ** 20
        lines.append(f"feature store: {cfg.suite.name}/{cfg.backbone.name}: {len(found)} entries "
                     f"({size:.1f} MiB) already computed" + (" (one per extractor: the plain backbone, each "
                     "CT beta)" if found else ""))
    return lines


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def report(table: pd.DataFrame) -> str:
    """The plan as text: the jobs, the counts per status and the remaining cost."""
    counts = ", ".join(f"{(table['status'] == s).sum()} {s}" for s in STATUSES if (table["status"] == s).any())
    shown = table[["job", "overrides", "method", "seed", "status", "cost_s", "cost_basis", "folder"]].copy()
    shown["cost_s"] = shown["cost_s"].map(_duration)
    todo = table[~table["status"].isin(["done", "repeat"])]
    unknown = int(todo["cost_s"].isna().sum())
    lines = [f"sweep plan: {len(table)} jobs: {counts}", shown.to_string(index=False),
             f"to run: {len(todo)} jobs, estimated {_duration(todo['cost_s'].sum(skipna=True))} of compute "
             f"(one after another; divide by the parallel jobs)"
             + (f", {unknown} without an estimate" if unknown else "")]
    lines += table.attrs.get("features", [])
    failed = table[table["status"] == "failed"]
    if (table["status"] == "repeat").any():
        lines.append("repeat: an hp_seed > 0 draw of a method with an empty search space is hp_seed=0's run; "
                     "the sweep skips it")
    lines += [f"failed: {r.folder}: {r.error}" for r in failed.itertuples()]
    lines += [f"damaged (redone by the next sweep): {r.folder}: {r.error}"
              for r in table[table["status"] == "damaged"].itertuples()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="the sweep's overrides, e.g. method=ft,lp seed=0,1,2")
    ap.add_argument("-m", "--multirun", action="store_true", help="accepted and ignored (a plan is of a sweep)")
    ap.add_argument("--csv", help="also write the table to this CSV file")
    args = ap.parse_args(argv)
    try:
        table = plan(args.overrides)
    except HydraException as exc:  # a bad choice or override: one message, as the runner prints it
        print(f"Error: {exc}\n(rftbench.plan: nothing was planned)", file=sys.stderr)
        raise SystemExit(1) from None
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(report(table))
    return table


if __name__ == "__main__":
    main()
