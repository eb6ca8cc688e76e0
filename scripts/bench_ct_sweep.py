"""Time CT's steering sweep (`method=ct` selection: train and val features once per beta, a probe
on the cached features) against its floor, the feature passes alone (one pass over train + val
through the CT backbone per beta), on the digits suite (default config unless overridden).

The two alternate (and swap order) so that load changes on a shared machine hit both alike: per
whole grid (`--interleave grid`, default: the sweep trains the probes of all betas as one batched
problem) or per beta (`--interleave beta`: the sweep for one beta, then that beta's passes; a
repetition sums them over the grid). The figures are medians
over repetitions. The oracle test pass (analysis only) is timed apart: it is not part of the selection.

    .venv/bin/python scripts/bench_ct_sweep.py --threads 1 --reps 7 [hydra overrides...]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from rftbench.methods.base import freeze
from rftbench.methods.ct import apply_ct, set_beta
from rftbench.identity import CONFIG_DIR
from rftbench.methods.ct_method import beta_grid, cpu_threads, example_input, probe_sweep
from rftbench.run import build_model, build_suite
from rftbench.train import RunContext, accuracy_on, extract_features, fit_probe
from rftbench.utils import resolve_device


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (on a loaded 2-core machine 2 threads make timings bimodal)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each measurement")
    ap.add_argument("--interleave", choices=["beta", "grid"], default="grid",
                    help="alternate the two measurements per beta or per whole grid")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default: method=ct on digits)")
    return ap.parse_args()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["method=ct", *args.overrides])
    ctx = RunContext(device=resolve_device(cfg.device), seed=cfg.seed, cache_dir=Path(cfg.paths.cache),
                     eval_batch_size=cfg.eval.batch_size)
    suite = build_suite(cfg, ctx)
    model = freeze(build_model(cfg, suite, ctx)).eval()
    grid = beta_grid(cfg.method.betas)
    probe_cfg = dict(cfg.method.probe)
    ct_model = apply_ct(model, grid[0], cfg.method.adapt.coeff, example_input=example_input(suite.train, ctx))

    def sweep(betas: list[float]) -> None:
        probe_sweep(ct_model, suite, ctx, betas, model.head, probe_cfg)

    def passes(betas: list[float]) -> None:
        for beta in betas:
            set_beta(ct_model, beta)
            extract_features(ct_model, suite.train, ctx)
            extract_features(ct_model, suite.val, ctx)

    set_beta(ct_model, grid[0])
    ftr, fval = extract_features(ct_model, suite.train, ctx), extract_features(ct_model, suite.val, ctx)
    ytr, yval = suite.train.labels, suite.val.labels

    def one_probe() -> None:
        with cpu_threads(1, ctx.device):
            fit_probe(ftr, ytr, fval, yval, suite.num_classes, init=model.head, seed=ctx.seed, **probe_cfg)

    def oracle_test() -> None:
        for beta in grid:
            set_beta(ct_model, beta)
            accuracy_on(ct_model, suite["test"], ctx)

    runs = {"sweep": sweep, "passes": passes}
    passes(grid)  # warm-up
    chunks = [[beta] for beta in grid] if args.interleave == "beta" else [grid]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.reps):
        total = dict.fromkeys(runs, 0.0)
        for i, chunk in enumerate(chunks):
            for name in (list(runs) if (rep + i) % 2 == 0 else list(reversed(runs))):
                total[name] += timed(lambda: runs[name](chunk))
        for name in runs:
            times[name].append(total[name])
    probe_times = [timed(one_probe) for _ in range(args.reps)]
    oracle_time = timed(oracle_test)

    sweep_s, passes_s = statistics.median(times["sweep"]), statistics.median(times["passes"])
    ratios = [s / p for s, p in zip(times["sweep"], times["passes"])]
    print(f"device {ctx.device}, threads {args.threads}, {args.reps} repetitions interleaved per {args.interleave}, "
          f"{len(grid)} betas ({grid[0]}..{grid[-1]}), train {len(suite.train)} + val {len(suite.val)} images, "
          f"{ct_model.ct_sites} CT sites")
    print(f"sweep (features + probe per beta): median {sweep_s:.2f} s  (all: {', '.join(f'{t:.2f}' for t in times['sweep'])})")
    print(f"feature passes only:               median {passes_s:.2f} s  (all: {', '.join(f'{t:.2f}' for t in times['passes'])})")
    print(f"one probe on cached features:      median {statistics.median(probe_times):.3f} s")
    print(f"ratio sweep / passes: {sweep_s / passes_s:.3f} (ratio of medians), "
          f"{statistics.median(ratios):.3f} (median of per-repetition ratios)")
    print(f"oracle test pass (analysis only, {len(grid)} x {len(suite['test'])} images): {oracle_time:.2f} s")


if __name__ == "__main__":
    main()
