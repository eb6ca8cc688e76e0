"""Rerun a committed benchmark from an empty cache and compare its leaderboard with the committed one.

    python -m rftbench.reproduce                            (or: make reproduce)   -> results/
    python -m rftbench.reproduce --experiment bench_tuned   (or: make reproduce EXPERIMENT=bench_tuned)
                                                                                   -> results/tuned/

The benchmark runs into a temporary runs folder with its own empty artifact cache, its leaderboard
is built there, and `leaderboard.csv` (one row per method: the variant chosen on val) and
`leaderboard_variants.csv` (every variant) are compared with the committed ones: every column must
match exactly (the CSV's own formatting, 6 significant digits) except the cost columns (wall times,
throughput, memory), the commit and the CPU model that produced the table, which are reported, not
compared. Prints each difference and exits 1 on any; when the CPU models differ it says so first, since
the same code and lock give other numbers on another CPU model (README, Reproducibility).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from rftbench.leaderboard import distinct_values

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = ["suite", "backbone", "method"]
# the committed experiments and where their tables live
EXPERIMENTS = {"bench": REPO / "results", "bench_tuned": REPO / "results" / "tuned"}
# the compared tables and the columns naming a row of each
TABLES = {"leaderboard.csv": ROW_KEYS, "leaderboard_variants.csv": ROW_KEYS + ["variant"]}
# columns that measure cost or say where a table came from, not what the methods achieved
NOT_COMPARED = re.compile(r"(time_s|images_per_s|peak_mem_gb)(_se)?$|^(commit|cpu)$")


def compared_columns(columns) -> list[str]:
    return [c for c in columns if not NOT_COMPARED.search(c)]


def compare(committed: Path, new: Path, keys: list[str] = ROW_KEYS) -> list[str]:
    """The differences between two leaderboard CSVs (rows named by `keys`), as lines."""
    a = pd.read_csv(committed, dtype=str, keep_default_na=False)
    b = pd.read_csv(new, dtype=str, keep_default_na=False)
    diffs = []
    only_a, only_b = set(a.columns) - set(b.columns), set(b.columns) - set(a.columns)
    diffs += [f"column {c}: only in the committed table" for c in sorted(compared_columns(only_a))]
    diffs += [f"column {c}: only in the new table" for c in sorted(compared_columns(only_b))]
    a, b = a.set_index(keys), b.set_index(keys)
    diffs += [f"row {'/'.join(k)}: only in the committed table" for k in a.index.difference(b.index)]
    diffs += [f"row {'/'.join(k)}: only in the new table" for k in b.index.difference(a.index)]
    cols = [c for c in compared_columns(a.columns) if c in b.columns]
    for key in a.index.intersection(b.index):
        for c in cols:
            if a.at[key, c] != b.at[key, c]:
                diffs.append(f"{'/'.join(key)} {c}: committed {a.at[key, c] or '(empty)'}, "
                             f"now {b.at[key, c] or '(empty)'}")
    return diffs


def cpu_note(committed: Path, new: Path) -> str | None:
    """A line naming both CPU models when the committed table came from another CPU model than the rerun."""
    cpus = []
    for path in (committed, new):
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        cpus.append(distinct_values(df["cpu"]) if "cpu" in df else ["unknown"])
    if cpus[0] == cpus[1]:
        return None
    return (f"note: the committed table was made on CPU {', '.join(cpus[0])} and this rerun on {', '.join(cpus[1])}; "
            "another CPU model gives other numbers with the same code and lock (README, Reproducibility)")


def cost_report(committed: Path, new: Path) -> list[str]:
    """Total adaptation and evaluation seconds of both tables (reported, never compared)."""
    lines = []
    for name, path in (("committed", committed), ("now", new)):
        df = pd.read_csv(path)
        parts = [f"{c} {df[c].sum():.0f}" for c in ("adapt_time_s", "eval_time_s") if c in df]
        lines.append(f"  {name:<9}: " + (", ".join(parts) if parts else "no cost columns") +
                     " (sum over rows of the per-seed means, seconds)")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="bench",
                    help="which committed benchmark to rerun (default: bench, make bench's)")
    ap.add_argument("--results", default=None,
                    help="the committed results folder (default: results/ for bench, results/tuned/ for bench_tuned)")
    ap.add_argument("--workdir", default=None, help="where to run (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (runs, cache, tables)")
    args = ap.parse_args(argv)
    results = Path(args.results) if args.results else EXPERIMENTS[args.experiment]
    committed = results / "leaderboard.csv"
    if not committed.exists():
        raise SystemExit(f"no committed leaderboard at {committed}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rftbench-reproduce-"))
    env = {**os.environ, "RFTBENCH_CACHE": str(work / "cache"), "WANDB_MODE": "disabled"}
    print(f"reproducing {committed} in {work} (empty cache {work / 'cache'})", flush=True)
    t0 = time.perf_counter()
    try:
        run = [sys.executable, "-m", "rftbench.run", "-m", f"experiment={args.experiment}", f"paths.runs={work / 'runs'}",
               "tracking.enabled=false"]
        if subprocess.run(run, env=env, cwd=REPO).returncode != 0:
            raise SystemExit(f"the benchmark failed; see the run folders under {work / 'runs'}")
        lb = [sys.executable, "-m", "rftbench.leaderboard", "--runs", str(work / "runs"),
              "--out", str(work / "results"), "--no-plots"]
        if subprocess.run(lb, env=env, cwd=REPO, stdout=subprocess.DEVNULL).returncode != 0:
            raise SystemExit("building the leaderboard failed")
        new = work / "results" / "leaderboard.csv"
        diffs = [d for table, keys in TABLES.items() if (results / table).exists()
                 for d in (f"{table}: {line}" for line in compare(results / table, work / "results" / table, keys))]
        print(f"benchmark rerun in {time.perf_counter() - t0:.0f} s; cost columns (not compared):")
        print("\n".join(cost_report(committed, new)))
        note = cpu_note(committed, new)
        if note:
            print(note)
        if diffs:
            print(f"{len(diffs)} differences from the committed {committed}:")
            print("\n".join(f"  {d}" for d in diffs))
            sys.exit(1)
        print(f"reproduced: every compared column of {committed} matches exactly")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
