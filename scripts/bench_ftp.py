"""Time a full training step (forward, backward, optimizer step, and for TPGM its projection step)
of fine-tuning (torch.optim.AdamW), FTP (FTPAdamW, head excluded) and TPGM (AdamW + the projection
after every step: one Adam step on the radii through the projected model on a held-out batch of the
same size, then the projection; the authors' proj_freq = max_iters = 1) on the digits backbone (timm
resnet10t, 32x32 RGB, 10 classes), as training iterations per second: FTP's headline claim is that
it trains 35% faster than TPGM (iterations/s FTP / TPGM = 1.35).

Repetitions alternate between the three methods (and their order) so that load changes on a
shared machine hit both alike; the figures are medians over repetitions of the mean step time
(wall clock; the process CPU time is printed too, as it is less sensitive to other load).

    .venv/bin/python scripts/bench_ftp.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from rftbench.backbones import create_backbone
from rftbench.methods.ftp import FTPAdamW
from rftbench.methods.tpgm import Batches, ProjectAfterStep, Projector, constrained
from rftbench.data.base import Split
from rftbench.train import RunContext


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    ap.add_argument("--reps", type=int, default=20, help="repetitions per optimizer")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    digits_kwargs = dict(channels=(32, 64, 128, 256), stem_width=16)
    base = create_backbone("resnet10t", num_classes=10, kwargs=digits_kwargs).to(device).train()
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    # every model is a copy: the freshly built one trained measurably slower than its copy here
    models = {name: copy.deepcopy(base) for name in ("AdamW", "FTPAdamW", "TPGM")}
    runs = {
        "AdamW": (models["AdamW"], torch.optim.AdamW(models["AdamW"].parameters(), lr=args.lr,
                                                     weight_decay=args.weight_decay), None),
        "FTPAdamW": (models["FTPAdamW"], FTPAdamW(models["FTPAdamW"].parameters(), lr=args.lr,
                                                  weight_decay=args.weight_decay,
                                                  exclude=models["FTPAdamW"].head.parameters()), None),
    }
    tp = models["TPGM"]
    held = Split("held", "train", x=torch.rand(4 * args.batch, 3, 32, 32), y=torch.randint(0, 10, (4 * args.batch,)))
    ctx = RunContext(device=device, seed=args.seed)
    hook = ProjectAfterStep(Projector(constrained(tp), "mars", proj_lr=1e-2),
                            Batches(held, args.batch, args.seed, ctx), proj_freq=1, max_iters=1, ctx=ctx)
    runs["TPGM"] = (tp, torch.optim.AdamW(tp.parameters(), lr=args.lr, weight_decay=args.weight_decay), hook)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(name: str, steps: int) -> tuple[float, float, float]:
        """Mean wall seconds per full step, per optimizer (+ projection) step, and process CPU seconds
        per full step."""
        model, opt, after = runs[name]
        total = opt_time = 0.0
        cpu0 = time.process_time()
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            sync()
            t1 = time.perf_counter()
            opt.step()
            if after is not None:
                after(model)
            sync()
            t2 = time.perf_counter()
            total += t2 - t0
            opt_time += t2 - t1
        return total / steps, opt_time / steps, (time.process_time() - cpu0) / steps

    for name in runs:
        run(name, args.warmup)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
    for rep in range(args.reps):
        for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
            times[name].append(run(name, args.steps))

    n_params = sum(p.numel() for p in base.parameters())
    print(f"device={device} threads={args.threads} batch={args.batch} params={n_params} "
          f"reps={args.reps} x {args.steps} steps (medians over repetitions)")
    med = {name: [statistics.median(col) for col in zip(*ts)] for name, ts in times.items()}
    for name, (full, opt_step, cpu) in med.items():
        print(f"{name:9s} full step {1e3 * full:8.2f} ms   {1 / full:7.1f} it/s   optimizer(+projection) step "
              f"{1e3 * opt_step:7.2f} ms   process CPU per step {1e3 * cpu:8.2f} ms")

    def paired(a: str, b: str) -> float:
        return statistics.median(ta[0] / tb[0] for ta, tb in zip(times[a], times[b]))
    print(f"ratio FTPAdamW / AdamW, full step: {paired('FTPAdamW', 'AdamW'):.3f} (median of paired "
          f"per-repetition ratios; ratio of medians {med['FTPAdamW'][0] / med['AdamW'][0]:.3f}, "
          f"of CPU times {med['FTPAdamW'][2] / med['AdamW'][2]:.3f})")
    print(f"iterations/s FTP / TPGM: {paired('TPGM', 'FTPAdamW'):.3f} (paper: 1.35; median of paired "
          f"per-repetition ratios; ratio of medians {med['TPGM'][0] / med['FTPAdamW'][0]:.3f})")

if __name__ == "__main__":
    main()
