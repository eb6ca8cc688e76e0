"""What a sweep would run: its jobs, which are done, failed, running or pending, and the remaining
cost: estimated from finished runs of the same suite/backbone/method, else from the cost model
(`rftbench.costs`: the images each job computes over results/perf.json's measured throughput), else
from any finished runs. Same arguments as the sweep:

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

from rftbench import costs
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


def plan(overrides: list[str], config_dir: str = CONFIG_DIR,
         perf: str | Path | None = costs.PERF_JSON) -> pd.DataFrame:
    """One row per job of the sweep `overrides` would start: its overrides, run folder, status,
    error (failed runs), the images it computes by phase (`rftbench.costs`), its estimated seconds
    `est_s` (measured for done runs) and what the estimate is based on (`basis`)."""
    with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name="run"):
        gh = GlobalHydra.instance()
        master = gh.hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)
        jobs = expand(master, gh.config_loader())
    finished = run_costs(sorted({Path(j.cfg.paths.runs) for j in jobs}))
    figures, stored = costs.load_perf(perf), stored_entries(jobs)
    statuses = ["repeat" if repeats_defaults(j.cfg) else j.folder.status for j in jobs]  # repeat: skipped
    provided = {costs.training_key(j.cfg) for j, st in zip(jobs, statuses) if st != "repeat"}
    computed: set[tuple] = set()  # frozen features an earlier job of the sweep computes
    rows = []
    for i, (job, vary, st) in enumerate(zip(jobs, varying(jobs), statuses)):
        c = job.folder.columns
        row = {"job": i, "overrides": " ".join(vary), "suite": c["suite"], "backbone": c["backbone"],
               "method": c["method"], "seed": int(job.cfg.seed), "run_id": job.folder.run_id, "status": st,
               "timed_as": costs.perf_name(job.cfg),
               **work_columns(job.cfg, provided, computed, stored), "folder": str(job.folder.path),
               "error": error_line(job.folder) if st == "failed" else job.folder.damage() if st == "damaged" else ""}
        own = finished[finished["run_id"] == job.folder.run_id]
        row["est_s"], row["basis"] = ((float(own["seconds"].iloc[0]), "measured") if st == "done" and len(own)
                                      else choose(finished, row, job.cfg, figures))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["features"] = feature_lines(jobs, stored)
    return table


def work_columns(cfg, provided: set[tuple], computed: set[tuple], stored: dict[tuple, list[dict]]) -> dict:
    """The job's images by phase (`<phase>_images`), or why they are unknown (`unknown`); its frozen
    features count as computed when the store has its extractors' entries or an earlier job makes them."""
    out = {f"{p}_images": math.nan for p in costs.PHASES} | {"unknown": ""}
    try:
        sizes = costs.suite_sizes(cfg)
        if isinstance(sizes, str):
            return out | {"unknown": sizes}
        key = costs.extractor_key(cfg)
        have = len(stored.get(store_key(cfg), [])) >= costs.extractors_needed(cfg)
        work = costs.job_work(cfg, sizes, provided=provided - {costs.training_key(cfg)},
                              features_done=key is not None and (key in computed or have))
    except Exception as exc:  # a cost block the model cannot read: the row says why
        return out | {"unknown": f"cost model: {type(exc).__name__}: {exc}"}
    if key is not None:
        computed.add(key)
    return out | {f"{p}_images": n for p, n in work.images.items()}


def choose(finished: pd.DataFrame, row: dict, cfg, figures: list[dict]) -> tuple[float, str]:
    """A pending job's estimate: finished runs of the same suite/backbone/method, else the cost model on
    perf.json, else finished runs of the same method or any (saying why the cost model could not)."""
    est, basis = estimate(finished, row["suite"], row["backbone"], row["method"])
    if basis.endswith("same suite/backbone/method"):
        return est, basis
    why = f"{row['suite']}: {row['unknown']}" if row["unknown"] else ""
    if not why:
        work = costs.Work({p: row[f"{p}_images"] for p in costs.PHASES})
        modeled, why = costs.seconds(work, figures, row["timed_as"], costs.job_device(cfg))
        if row["timed_as"] != row["backbone"]:
            why = f"{why} ({row['backbone']} timed as {row['timed_as']}: backbone.perf_as)"
        if not math.isnan(modeled):
            return modeled, why
    return est, f"{basis} ({why})" if not math.isnan(est) else why


def store_key(cfg) -> tuple:
    """(suite, backbone name, backbone config): what the store's entries are listed by."""
    from omegaconf import OmegaConf

    return cfg.suite.name, cfg.backbone.name, str(OmegaConf.to_container(cfg.backbone, resolve=True))


def stored_entries(jobs: list[Job]) -> dict[tuple, list[dict]]:
    """Per (suite, backbone) of the sweep's jobs that use the feature store: the frozen-feature entries
    already in it (`rftbench.features`)."""
    from omegaconf import OmegaConf

    from rftbench.features import entries_for

    out: dict[tuple, list[dict]] = {}
    for job in jobs:
        cfg = job.cfg
        if not (cfg.get("features") or {}).get("store", True) or store_key(cfg) in out:
            continue
        backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
        out[store_key(cfg)] = entries_for(Path(cfg.paths.cache) / "features", backbone, cfg.suite.name)
    return out


def feature_lines(jobs: list[Job], stored: dict[tuple, list[dict]]) -> list[str]:
    """One line per (suite, backbone) of the sweep: the frozen-feature entries already in the store,
    which its frozen-backbone jobs (lp, ct, zeroshot, ...) read, not compute."""
    lines = []
    for (suite, backbone, _), found in stored.items():
        size = sum(e["bytes"] for e in found) / 2 ** 20
        lines.append(f"feature store: {suite}/{backbone}: {len(found)} entries ({size:.1f} MiB) already computed"
                     + (" (one per extractor: the plain backbone, each CT beta; jobs whose extractors are all "
                        "there are estimated without computing them)" if found else ""))
    return lines


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def total_line(table: pd.DataFrame) -> str:
    """The remaining compute: the estimates of the jobs to run, summed."""
    todo = table[~table["status"].isin(["done", "repeat"])]
    unknown = int(todo["est_s"].isna().sum())
    return (f"to run: {len(todo)} jobs, estimated {_duration(todo['est_s'].sum(skipna=True))} of compute "
            f"(one after another; divide by the parallel jobs)"
            + (f", {unknown} without an estimate" if unknown else ""))


def report(table: pd.DataFrame) -> str:
    """The plan as text: the jobs, the counts per status and the remaining cost."""
    counts = ", ".join(f"{(table['status'] == s).sum()} {s}" for s in STATUSES if (table["status"] == s).any())
    shown = table[["job", "overrides", "method", "seed", "status", "est_s", "basis", "folder"]].copy()
    shown["est_s"] = shown["est_s"].map(_duration)
    lines = [f"sweep plan: {len(table)} jobs: {counts}", shown.to_string(index=False), total_line(table),
             costs.totals_line(table)]
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
