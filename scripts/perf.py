"""`make perf`: rftbench's hot paths against bare PyTorch loops, one report (results/perf.md) and its
machine-readable companion with the same figures (results/perf.json: backbone, device, precision and
phase per line; `rftbench.costs` reads it for `--plan`'s estimates).

Each line times rftbench's path (A) and a bare loop doing the same work (B) on the same model, data
and settings, in this process: warm-up calls of both, then repetitions in the order A B, B A, A B, ...
(a load change on a shared machine hits both alike), each timed sample at least `Settings.min_time`
long (calls repeated within it). Ratio = rftbench speed / bare speed: the median over repetitions of the
paired ratio t_bare / t_rftbench (>= 1: rftbench is as fast); the spread is its min..max.

CPU lines (always on the CPU, the digits ResNet of configs/backbone/digits_resnet.yaml on the digits
suite, the pipeline's pre-trained weights): training (`rftbench.train.fit`, in-memory and streamed
splits), evaluation's prediction path (`rftbench.train.predict`), feature extraction, CT's probe
sweep (`rftbench.methods.ct_method.probe_sweep` against n_betas bare feature passes: the ratio is
what the probes add), AutoAttack (`rftbench.attacks.attack` against the pyautoattack package called
directly), a folder suite's loader (synthetic PNG tree; against torchvision `ImageFolder` +
`DataLoader`) and the feature store (a 3-seed CT sweep with against without it). With CUDA also
ResNet-50 and ViT-B/16 at 224 px (random weights), bf16 autocast + channels_last, training and
evaluation, with peak GPU memory, and `gpu/decode`: a folder suite's loader of photo-sized JPEGs with
suite.decode=cuda against suite.decode=cpu; without CUDA those lines say "not measured".

    .venv/bin/python scripts/perf.py [--quick] [--out results/perf.md] [--lines train/,loader] [hydra overrides...]
    .venv/bin/python scripts/perf.py --json-from-md results/perf.md   # only (re)write results/perf.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from rftbench.data.base import Split, Suite, UInt8Images, batches
from rftbench.identity import CONFIG_DIR
from rftbench.train import RunContext

REPORT_TITLE = "# rftbench performance (`make perf`)"
COLUMNS = ("line", "measures", "rftbench", "bare", "ratio", "spread", "target",
           "GPU GB peak of a call (rftbench / bare)", "result")
GPU_ARCHS = {"resnet50": "resnet50", "vit_b16": "vit_base_patch16_224"}  # timm names, random weights


# ---- settings and timing -----------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """How long and how often each line is measured, and the sizes of the synthetic workloads."""

    reps: int = 7                # timed repetitions of each path (at most)
    min_reps: int = 3            # ... and at least (unless `reps` is fewer), whatever `line_budget` says
    line_budget: float = 60.0    # seconds of timed repetitions per line: fewer reps for slow calls
    warmup: int = 2              # calls of each path first (the first also sizes the samples; one for slow calls)
    min_time: float = 0.5        # seconds per timed sample (calls repeated within it)
    threads: int = 1             # torch intra-op threads (2 threads on a loaded 2-core machine are bimodal)
    loader_images: int = 512     # PNGs in the synthetic folder suite
    loader_batch: int = 64
    store_seeds: int = 3         # trial seeds of the feature-store line
    betas: tuple[float, ...] | None = None  # CT's candidate betas (None: method=ct's grid; 1.0 is always added)
    gpu_images: int = 512        # synthetic 224 px images per GPU epoch / evaluation pass
    gpu_batch: int = 64

    @classmethod
    def quick(cls, **kw) -> "Settings":
        """A smoke run: few short repetitions, tiny synthetic workloads."""
        return cls(**{**dict(reps=3, line_budget=5.0, warmup=1, min_time=0.02, loader_images=24, loader_batch=8,
                             gpu_images=64, gpu_batch=16, betas=(0.9,)), **kw})


@dataclass
class Line:
    """One report line: seconds per call of rftbench's path and of the bare loop, `work` images per call."""

    key: str
    measures: str
    work: float
    ours: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    target: float | None = None     # the ratio must be at least this
    peak_gb: tuple[float, float] | None = None
    skipped: str | None = None      # why the line was not measured

    @property
    def ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.ours, self.bare)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def passed(self) -> bool | None:
        if self.skipped is not None or self.target is None:
            return None
        return self.ratio >= self.target


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], calls: int) -> float:
    """Mean wall seconds of `calls` calls (GPU work included)."""
    cuda_sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    cuda_sync()
    return (time.perf_counter() - t0) / calls


def interleaved(ours: Callable[[], object], bare: Callable[[], object], s: Settings) -> tuple[list[float], list[float]]:
    """Seconds per call of each path: warm-up (the first call of A sizes the samples: calls per sample
    for `s.min_time`, repetitions within `s.line_budget`), then repetitions alternating A B / B A."""
    first = _timed(ours, 1)
    bare()
    for _ in range(s.warmup - 1 if first < s.min_time else 0):  # a slow call warms up in one
        ours(), bare()
    calls = max(1, math.ceil(s.min_time / max(first, 1e-6)))
    reps = min(s.reps, max(s.min_reps, int(s.line_budget / (2 * calls * max(first, 1e-6)))))
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    paths = {"ours": ours, "bare": bare}
    for rep in range(reps):
        for name in (("ours", "bare") if rep % 2 == 0 else ("bare", "ours")):
            times[name].append(_timed(paths[name], calls))
    return times["ours"], times["bare"]


def measure(line: Line, ours: Callable[[], object], bare: Callable[[], object], s: Settings,
            gpu: bool = False) -> Line:
    """`line` with its timings (and, on the GPU, each path's peak memory above what was allocated
    before its call: activations, gradients, optimizer state)."""
    if not gpu:
        line.ours, line.bare = interleaved(ours, bare, s)
        return line
    peaks = {"ours": 0.0, "bare": 0.0}

    def peaked(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> None:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated() - before) / 2 ** 30)
        return call

    line.ours, line.bare = interleaved(peaked("ours", ours), peaked("bare", bare), s)
    line.peak_gb = (peaks["ours"], peaks["bare"])
    return line


# ---- bare loops --------------------------------------------------------------------------------

def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def bare_outputs(model: nn.Module, x_batches: Iterator[torch.Tensor], device: torch.device,
                 fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`fn(model, x)` (default: logits) over batches under `torch.no_grad`, float32 on the CPU."""
    fn = fn or (lambda m, x: m(x))
    model.eval()
    outs = []
    for xb in x_batches:
        with _autocast(device):
            outs.append(fn(model, _on(xb, device)).float().cpu())
    return torch.cat(outs)


def tensor_batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size]


def loader_batches(loader: torch.utils.data.DataLoader) -> Iterator[torch.Tensor]:
    for xb, _ in loader:
        yield xb


def bare_epoch(model: nn.Module, train: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
               val: Callable[[], Iterator[torch.Tensor]], val_y: torch.Tensor, optimizer: Callable,
               steps: int, device: torch.device) -> float:
    """One epoch of the plain PyTorch loop (cosine schedule), then val accuracy: what `fit` does per epoch."""
    opt = optimizer(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for xb, yb in train():
        with _autocast(device):
            loss = F.cross_entropy(model(_on(xb, device)), yb.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return (bare_outputs(model, val(), device).argmax(1) == val_y).float().mean().item()


# ---- the environment: config, suite, model -----------------------------------------------------

@dataclass
class Env:
    cfg: DictConfig          # method=ft (its fine-tuning recipe)
    ct_cfg: DictConfig       # method=ct (beta grid, probe recipe)
    ctx: RunContext
    suite: Suite
    model: nn.Module


def compose_cfg(overrides: list[str], method: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"method={method}", "device=cpu", *overrides])


def build_env(overrides: list[str]) -> Env:
    from rftbench.run import build_model, build_suite, resolve_workers

    cfg, ct_cfg = compose_cfg(overrides, "ft"), compose_cfg(overrides, "ct")
    ctx = RunContext(device=torch.device("cpu"), seed=cfg.seed, cache_dir=Path(cfg.paths.cache),
                     eval_batch_size=cfg.eval.batch_size, num_workers=resolve_workers(cfg.num_workers))
    suite = build_suite(cfg, ctx)
    return Env(cfg, ct_cfg, ctx, suite, build_model(cfg, suite, ctx).eval())


def no_reuse(ctx: RunContext) -> RunContext:
    """`ctx` with an empty in-memory feature store: the call computes its features, reusing none."""
    return replace(ctx, store=type(ctx.store)(None, batch_size=ctx.store.batch_size))


def streamed(split: Split) -> Split:
    """The same images as a streamed split (uint8 in a map-style dataset, read by DataLoader workers)."""
    pixels = (split.x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return Split(split.name, split.role, dataset=UInt8Images(pixels, split.y.numpy()))


# ---- CPU lines ---------------------------------------------------------------------------------

def train_line(env: Env, s: Settings, stream: bool) -> Line:
    """`fit` for one epoch (+ its val pass) vs the bare loop: same model copy, data, optimizer, batch."""
    from rftbench.train import fit

    train, val = (streamed(env.suite.train), streamed(env.suite.val)) if stream else (env.suite.train, env.suite.val)
    recipe = env.cfg.method.finetune
    optimizer, batch = instantiate(recipe.optimizer), int(recipe.batch_size)
    scheduler = OmegaConf.to_container(recipe.scheduler, resolve=True)
    ours_model, bare_model = (copy.deepcopy(env.model).requires_grad_(True) for _ in range(2))
    steps, dev = math.ceil(len(train) / batch), env.ctx.device

    def ours() -> None:
        fit(ours_model, train, val, env.ctx, optimizer=optimizer, epochs=1, batch_size=batch,
            scheduler=scheduler, checkpoint_key=None)

    if stream:
        workers = env.ctx.num_workers
        common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=dev.type == "cuda")
        tl = torch.utils.data.DataLoader(train.dataset, batch_size=batch, shuffle=True, **common)
        vl = torch.utils.data.DataLoader(val.dataset, batch_size=env.ctx.eval_batch_size, **common)
        train_it, val_it = (lambda: iter(tl)), (lambda: loader_batches(vl))
    else:
        x, y = train.x, train.y
        train_it = lambda: ((x[i], y[i]) for i in torch.randperm(len(x)).split(batch))  # noqa: E731
        val_it = lambda: tensor_batches(val.x, env.ctx.eval_batch_size)  # noqa: E731

    def bare() -> None:
        bare_epoch(bare_model, train_it, val_it, val.labels, optimizer, steps, dev)

    kind = f"streamed ({env.ctx.num_workers} DataLoader workers)" if stream else "in memory"
    line = Line(f"train/{'streamed' if stream else 'in_memory'}",
                f"`fit`, 1 epoch + val pass, {kind}, {len(train)} images, batch {batch}", len(train), target=0.97)
    return measure(line, ours, bare, s)


def evaluate_line(env: Env, s: Settings) -> Line:
    """`predict` (evaluate's prediction path) over every test/OOD split vs bare `no_grad` inference."""
    from rftbench.train import predict

    splits = env.suite.eval_splits()
    bs, dev = env.ctx.eval_batch_size, env.ctx.device

    def ours() -> None:
        for split in splits:
            predict(env.model, split, env.ctx)

    def bare() -> None:
        for split in splits:
            bare_outputs(env.model, tensor_batches(split.x, bs), dev)

    n = sum(len(sp) for sp in splits)
    return measure(Line("evaluate", f"`predict` over {len(splits)} test/OOD splits, {n} images", n, target=0.97),
                   ours, bare, s)


def features_line(env: Env, s: Settings) -> Line:
    """`extract_features` of train + val vs bare `model.features` passes."""
    from rftbench.train import extract_features

    splits = [env.suite.train, env.suite.val]
    bs, dev = env.ctx.eval_batch_size, env.ctx.device

    def ours() -> None:
        ctx = no_reuse(env.ctx)
        for split in splits:
            extract_features(env.model, split, ctx)

    def bare() -> None:
        for split in splits:
            bare_outputs(env.model, tensor_batches(split.x, bs), dev, fn=lambda m, x: m.features(x))

    n = sum(len(sp) for sp in splits)
    return measure(Line("features", f"`extract_features` (an empty store: every row computed), train + val, "
                                    f"{n} images", n), ours, bare, s)


def ct_setup(env: Env, s: Settings) -> tuple[nn.Module, list[float], dict]:
    """CT applied to a copy of the frozen model at the first beta of the grid (`s.betas`, else
    method=ct's), the grid, the probe recipe."""
    from rftbench.methods.base import freeze
    from rftbench.methods.ct import apply_ct
    from rftbench.methods.ct_method import beta_grid, example_input

    grid = beta_grid(list(s.betas) if s.betas is not None else env.ct_cfg.method.betas)
    model = freeze(copy.deepcopy(env.model)).eval()
    ct_model = apply_ct(model, grid[0], env.ct_cfg.method.adapt.coeff,
                        example_input=example_input(env.suite.train, env.ctx))
    return ct_model, grid, OmegaConf.to_container(env.ct_cfg.method.probe, resolve=True)


def ct_sweep_line(env: Env, s: Settings) -> Line:
    """`probe_sweep` (features per beta + the batched probes) vs n_betas bare feature passes: the
    ratio is the share of the sweep's time that is feature extraction."""
    from rftbench.methods.ct import set_beta
    from rftbench.methods.ct_method import probe_sweep

    ct_model, grid, probe_cfg = ct_setup(env, s)
    bs, dev = env.ctx.eval_batch_size, env.ctx.device
    memory = env.ct_cfg.method.adapt.probe_memory_gb

    def ours() -> None:
        probe_sweep(ct_model, env.suite, no_reuse(env.ctx), grid, ct_model.head, probe_cfg, memory)

    def bare() -> None:
        for beta in grid:
            set_beta(ct_model, beta)
            for split in (env.suite.train, env.suite.val):
                bare_outputs(ct_model, tensor_batches(split.x, bs), dev, fn=lambda m, x: m.features(x))

    n = len(grid) * (len(env.suite.train) + len(env.suite.val))
    return measure(Line("ct_sweep", f"`probe_sweep`, {len(grid)} betas x train + val (probes included) vs the "
                                    f"bare feature passes alone", n), ours, bare, s)


def direct_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: dict, num_classes: int,
                      device: torch.device) -> torch.Tensor:
    """The pyautoattack package called directly with `eval.adversarial`'s settings (first threat)."""
    from rftbench.attacks import import_autoattack

    aa, threat = import_autoattack(), adv["threats"][0]
    common = dict(norm=threat["norm"], eps=float(threat["eps"]), seed=adv["seed"], device=device)
    if adv["tier"] == "standard":
        adversary = aa.AutoAttack(model, version="standard", **common)
    else:
        adversary = aa.AutoAttack(model, attacks=["apgd-ce", "apgd-t"], version="custom", **common)
        adversary.apgd.n_restarts = 1
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adv["n_iter"]
        adversary.apgd_targeted.n_target_classes = adv["n_target_classes"]
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, num_classes - 1)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, num_classes - 1)
    return adversary.run_standard_evaluation(x, y, batch_size=adv["batch_size"])[1]


def autoattack_line(env: Env, s: Settings) -> Line:
    """`rftbench.attacks.attack` vs pyautoattack called directly, same images, settings and seed."""
    from rftbench.attacks import attack
    from rftbench.evaluate import attack_subset

    adv = OmegaConf.to_container(env.cfg.eval.adversarial, resolve=True)
    test = env.suite["test"]
    idx = attack_subset(test, adv)  # the images evaluate's AutoAttack gets
    x, y, threat, dev = test.x[idx], test.y[idx], adv["threats"][0], env.ctx.device

    def ours() -> None:
        attack(env.model, x, y, norm=threat["norm"], eps=float(threat["eps"]), tier=adv["tier"], seed=adv["seed"],
               n_iter=adv["n_iter"], n_target_classes=adv["n_target_classes"], batch_size=adv["batch_size"], device=dev)

    def bare() -> None:
        direct_autoattack(env.model.eval(), x, y, adv, env.suite.num_classes, dev)

    what = (f"AutoAttack {adv['tier']} ({threat['norm']}, eps {float(threat['eps']):.4g}, {adv['n_iter']} "
            f"iterations), {len(x)} images")
    return measure(Line("autoattack", what, len(x), target=0.98), ours, bare, s)


def make_png_tree(root: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    """`n` small RGB PNGs of random sizes (smooth content) in `classes` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(36, 64, 2))
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"img_{i}.png")


def loader_line(env: Env, s: Settings, root: Path) -> Line:
    """rftbench's streamed loader over an ImageFiles folder suite vs `ImageFolder` + `DataLoader` with the
    same evaluation transform, workers and batch size (images decoded and batched, nothing else)."""
    from rftbench.backbones import input_spec
    from rftbench.data.folders import ImageFiles, class_folders
    from rftbench.transforms import eval_transform

    make_png_tree(root, s.loader_images)
    index = {p.name: i for i, p in enumerate(sorted(p for p in root.iterdir() if p.is_dir()))}
    spec = input_spec(env.cfg.backbone)
    transform = eval_transform({"name": "center_crop"}, spec)
    split = Split("test", "test", dataset=ImageFiles(class_folders(root, index)), transform=transform)
    folder = torchvision.datasets.ImageFolder(str(root), transform=transform)
    workers, bs = env.ctx.num_workers, s.loader_batch

    def ours() -> None:
        for _ in batches(split, bs, num_workers=workers):
            pass

    def bare() -> None:
        for _ in torch.utils.data.DataLoader(folder, batch_size=bs, num_workers=workers):
            pass

    what = f"folder suite, {len(split)} PNGs -> {spec.size} px, {workers} workers, batch {bs}"
    return measure(Line("loader", what, len(split), target=0.95), ours, bare, s)


# ---- the feature store -------------------------------------------------------------------------

class StoreUnavailable(RuntimeError):
    """The feature store (src/rftbench/features.py) is not there yet."""


def store_line(env: Env, s: Settings) -> Line:
    """A CT sweep over `s.store_seeds` trial seeds with the feature store vs without it (each
    repetition starts from an empty store in a fresh folder). Target: at most 0.5x the time."""
    try:
        from rftbench.features import FeatureStore
    except ImportError as exc:
        raise StoreUnavailable(f"rftbench.features.FeatureStore cannot be imported ({exc}); the store line needs "
                               f"the frozen-feature store (issue 24, item 1)") from None
    from rftbench.methods.ct_method import probe_sweep
    from rftbench.run import build_suite

    ct_model, grid, probe_cfg = ct_setup(env, s)
    # the whole training pool (train_per_class=null): a trial seed then only moves the val split
    # inside the same images, the case the store is for (few-shot seeds draw other images)
    suites = [build_suite(replace_seed(env.cfg, seed, {"suite.build.train_per_class": None}), env.ctx)
              for seed in range(s.store_seeds)]
    memory = env.ct_cfg.method.adapt.probe_memory_gb

    def sweeps(store: FeatureStore | None) -> None:
        """One CT run per seed, sharing `store` (None: each run's own in-memory store, features.store=false)."""
        for suite in suites:
            ctx = replace(env.ctx, store=store) if store is not None else no_reuse(env.ctx)
            probe_sweep(ct_model, suite, ctx, grid, ct_model.head, probe_cfg, memory)

    def ours() -> None:
        with tempfile.TemporaryDirectory(prefix="rftbench-perf-store-") as tmp:
            sweeps(FeatureStore(Path(tmp) / "features", env.cfg.features.max_gb, env.cfg.features.batch_size))

    n = len(grid) * sum(len(su.train) + len(su.val) for su in suites)
    what = (f"{s.store_seeds}-seed CT sweep ({len(grid)} betas, whole training pool) with the feature store "
            f"(empty at start) vs without")
    return measure(Line("store", what, n, target=2.0), ours, lambda: sweeps(None), s)


def replace_seed(cfg: DictConfig, seed: int, updates: dict | None = None) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    cfg.seed = seed
    for key, value in (updates or {}).items():
        OmegaConf.update(cfg, key, value)
    return cfg


# ---- GPU lines ---------------------------------------------------------------------------------

GPU_KINDS = ("train", "evaluate")
GPU_DECODE = "gpu/decode"
GPU_KEYS = (*(f"gpu/{name}/{kind}" for name in GPU_ARCHS for kind in GPU_KINDS), GPU_DECODE)
DECODE_WHAT = "folder suite loader, JPEGs -> ResNet-50's 224 px eval transform on cuda: suite.decode=cuda vs cpu"


def gpu_lines(s: Settings, wanted: Callable[[str], bool] = lambda key: True) -> list[Line]:
    """The `wanted` lines of ResNet-50 and ViT-B/16 training and evaluation on CUDA (bf16 autocast,
    channels_last) and of the folder-suite loader decoding on the GPU (`gpu_decode_line`), or the same
    lines marked not measured."""
    if not torch.cuda.is_available():
        lines = [Line(f"gpu/{name}/{kind}", f"{arch} 224 px, bf16 + channels_last", 0,
                      target=0.95 if (name, kind) == ("resnet50", "train") else None, skipped="no CUDA")
                 for name, arch in GPU_ARCHS.items() for kind in GPU_KINDS]
        lines.append(Line(GPU_DECODE, DECODE_WHAT, 0, skipped="no CUDA"))
    else:
        lines = [line for name, arch in GPU_ARCHS.items() if any(wanted(f"gpu/{name}/{k}") for k in GPU_KINDS)
                 for line in gpu_arch_lines(name, arch, s)]
        if wanted(GPU_DECODE):
            lines.append(gpu_decode_line(s))
    return [line for line in lines if wanted(line.key)]


def gpu_arch_lines(name: str, arch: str, s: Settings, device: str = "cuda") -> list[Line]:
    """Training (`fit`, one epoch + a one-batch val pass) and evaluation (`predict`) of `arch` at 224 px
    against the bare loops; the synthetic images lie on the device already (the loop is measured, not
    host-to-device copies)."""
    from rftbench.backbones import create_backbone
    from rftbench.train import fit, predict

    ctx = RunContext(device=torch.device(device), eval_batch_size=4 * s.gpu_batch)
    torch.manual_seed(0)
    x = torch.rand(s.gpu_images, 3, 224, 224, device=ctx.device)
    y = torch.randint(0, 1000, (s.gpu_images,))  # labels on the CPU, as every split's (accuracy_on compares there)
    train, val = Split("train", "train", x=x, y=y), Split("val", "val", x=x[:s.gpu_batch], y=y[:s.gpu_batch])
    test = Split("test", "test", x=x, y=y)
    base = create_backbone(arch, num_classes=1000)
    ours_model, bare_model = ctx.prepare(copy.deepcopy(base)), ctx.prepare(copy.deepcopy(base))
    optimizer = partial(torch.optim.SGD, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps, cuda = math.ceil(len(x) / s.gpu_batch), ctx.cuda
    what = f"{arch} 224 px, {'bf16 + channels_last' if cuda else 'fp32'}"

    def train_ours() -> None:
        fit(ours_model, train, val, ctx, optimizer=optimizer, epochs=1, batch_size=s.gpu_batch,
            scheduler={"name": "cosine"}, checkpoint_key=None)

    def train_bare() -> None:
        bare_epoch(bare_model, lambda: ((x[i], y[i]) for i in torch.randperm(len(x)).split(s.gpu_batch)),
                   lambda: tensor_batches(val.x, ctx.eval_batch_size), val.y, optimizer, steps, ctx.device)

    lines = [measure(Line(f"gpu/{name}/train", f"{what}, `fit` 1 epoch, {len(x)} images, batch {s.gpu_batch}",
                          len(x), target=0.95 if name == "resnet50" else None), train_ours, train_bare, s, gpu=cuda)]
    evaluate_what = f"{what}, `predict`, {len(x)} images, batch {ctx.eval_batch_size}"
    lines.append(measure(Line(f"gpu/{name}/evaluate", evaluate_what, len(x)), lambda: predict(ours_model, test, ctx),
                         lambda: bare_outputs(bare_model, tensor_batches(x, ctx.eval_batch_size), ctx.device),
                         s, gpu=cuda))
    del ours_model, bare_model, x, y, train, val, test
    if cuda:
        torch.cuda.empty_cache()
    return lines


def make_jpeg_tree(root: Path, n: int, classes: int = 4, seed: int = 0) -> list[tuple[str, int]]:
    """`n` photo-sized RGB JPEGs (500 x 375 or 375 x 500, quality 90, smooth content plus grain) in
    `classes` class folders; returns the (path, label) samples."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (500, 375) if i % 2 else (375, 500)
        coarse = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int64)
        pixels = np.clip(smooth + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)
        samples.append((str(folder / f"img_{i}.JPEG"), i % classes))
    return samples


def gpu_decode_line(s: Settings, device: str = "cuda") -> Line:
    """A folder suite's loader (`batches` onto the GPU, ResNet-50's evaluation transform, the runs'
    default workers) with suite.decode=cuda (the rftbench column: workers read bytes, the GPU decodes and
    transforms) against suite.decode=cpu (the bare column: the workers decode with PIL and transform):
    ratio > 1 when decoding on the GPU feeds it faster."""
    from rftbench.backbones import input_spec
    from rftbench.data.folders import ImageFiles
    from rftbench.run import resolve_workers
    from rftbench.transforms import eval_transform

    spec = input_spec(OmegaConf.load(Path(CONFIG_DIR) / "backbone" / "resnet50.yaml"))
    workers, bs = resolve_workers("auto"), 4 * s.gpu_batch
    with tempfile.TemporaryDirectory(prefix="rftbench-perf-jpeg-") as tmp:
        files = ImageFiles(make_jpeg_tree(Path(tmp), s.gpu_images))
        split = {d: Split("test", "test", dataset=files, transform=eval_transform({"name": "center_crop"}, spec),
                          decode_device=d) for d in (device, None)}

        def load(decode_device: str | None) -> None:
            for _ in batches(split[decode_device], bs, num_workers=workers, device=device):
                pass

        what = (f"folder suite loader, {len(files)} JPEGs of 500 x 375 and 375 x 500 -> ResNet-50's {spec.size} px "
                f"eval transform on {device}, {workers} workers, batch {bs}: suite.decode=cuda vs cpu")
        return measure(Line(GPU_DECODE, what, len(files)), partial(load, device), partial(load, None), s,
                       gpu=device == "cuda")


# ---- the report --------------------------------------------------------------------------------

CPU_LINES: dict[str, Callable[..., Line]] = {
    "train/in_memory": lambda env, s, tmp: train_line(env, s, stream=False),
    "train/streamed": lambda env, s, tmp: train_line(env, s, stream=True),
    "evaluate": lambda env, s, tmp: evaluate_line(env, s),
    "features": lambda env, s, tmp: features_line(env, s),
    "ct_sweep": lambda env, s, tmp: ct_sweep_line(env, s),
    "autoattack": lambda env, s, tmp: autoattack_line(env, s),
    "loader": lambda env, s, tmp: loader_line(env, s, tmp / "pngs"),
    "store": lambda env, s, tmp: store_line(env, s),
}


def cpu_model() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(s: Settings, load: tuple[float, float]) -> list[str]:
    from rftbench.utils import available_cores

    gpu = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
           if torch.cuda.is_available() else "no CUDA")
    return [f"- machine: {cpu_model()}, {os.cpu_count()} cores ({available_cores()} available), {gpu}",
            f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}",
            f"- device: cpu for the digits lines ({s.threads} torch thread{'s' * (s.threads > 1)}), "
            f"{'cuda' if torch.cuda.is_available() else 'none'} for the gpu/ lines",
            f"- load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]


def rate(seconds: list[float], work: float) -> str:
    return f"{work / statistics.median(seconds):.1f} images/s"


def row(line: Line) -> str:
    target = "-" if line.target is None else f">= {line.target:.2f}"
    if line.skipped is not None:
        cells = [line.key, line.measures, "not measured", "not measured", "-", "-", target, "-",
                 f"not measured ({line.skipped})"]
    else:
        peak = "-" if line.peak_gb is None else f"{line.peak_gb[0]:.2f} / {line.peak_gb[1]:.2f}"
        verdict = {True: "pass", False: "fail", None: "-"}[line.passed]
        cells = [line.key, line.measures, rate(line.ours, line.work), rate(line.bare, line.work), f"{line.ratio:.3f}",
                 f"{min(line.ratios):.3f}..{max(line.ratios):.3f}", target, peak, verdict]
    return "| " + " | ".join(cells) + " |"


def report(lines: list[Line], s: Settings, load: tuple[float, float], overrides: list[str]) -> str:
    verdicts = [ln.passed for ln in lines if ln.target is not None]
    head = [REPORT_TITLE, "",
            "Each line: rftbench's path against a bare PyTorch loop doing the same work (same model, data, "
            "settings), measured in one process, interleaved (A B, B A, ...) after warm-up. Ratio = rftbench "
            "speed / bare speed, the median over repetitions of the paired ratio t_bare / t_rftbench (>= 1 is "
            "good); spread: its min..max. The store line's target 2.00 is a time at most 0.5x without the store. "
            "`scripts/perf.py` says what each line runs.", "",
            *machine(s, load),
            f"- settings: {min(s.min_reps, s.reps)} to {s.reps} repetitions (about {s.line_budget:g} s per line), "
            f"warm-up: {s.warmup} call(s) of each path, >= {s.min_time:g} s per timed sample"
            + (f"; overrides: {' '.join(overrides)}" if overrides else ""), "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
            *(row(ln) for ln in lines), "",
            f"Targets met: {sum(v is True for v in verdicts)} of {len(verdicts)} "
            f"({sum(v is None for v in verdicts)} not measured)."]
    return "\n".join(head) + "\n"


# ---- the machine-readable companion (results/perf.json) -----------------------------------------

CPU_PHASES = {"train/in_memory": "train", "train/streamed": "train", "evaluate": "evaluate", "features": "features",
              "ct_sweep": "probe_sweep", "autoattack": "attack", "loader": "load", "store": "store"}
ATTACK_WHAT = re.compile(r"AutoAttack (?P<tier>\w+) \((?P<norm>\w+), eps (?P<eps>[\d.]+), (?P<n_iter>\d+) "
                         r"iterations\), (?P<n>\d+) images")


def _number(cell: str) -> float | None:
    """A report cell's leading number ("816.5 images/s", ">= 0.97", "0.976"), None for "-" / "not measured"."""
    match = re.match(r"(?:>= )?([\d.]+)", cell)
    return float(match.group(1)) if match else None


def report_meta(text: str) -> dict[str, str]:
    """The report's `- key: value` lines (machine, versions, device, load, date, settings)."""
    return dict(ln[2:].split(": ", 1) for ln in text.splitlines() if ln.startswith("- ") and ": " in ln)


def report_rows(text: str) -> list[dict[str, str]]:
    """The report's table as {column: cell} per line."""
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| line |")]
    return [dict(zip(COLUMNS, (c.strip() for c in ln.strip("|").split(" | ")))) for ln in rows]


def where(key: str, measures: str, cpu_backbone: str) -> dict:
    """A line's backbone (configs/backbone/<name>.yaml; None when no backbone applies), device, precision
    and phase: train = forward+backward images/s, evaluate = inference images/s, features, attack, ..."""
    parts = key.split("/")
    if parts[0] == "gpu":
        backbone, phase = (parts[1], parts[2]) if len(parts) == 3 else (None, parts[-1])
        return {"backbone": backbone, "device": "cuda", "precision": "bf16" if "bf16" in measures else "fp32",
                "phase": phase}
    return {"backbone": cpu_backbone, "device": "cpu", "precision": "fp32", "phase": CPU_PHASES.get(key, key)}


def perf_records(text: str) -> dict:
    """results/perf.json's content from a perf.md report: the same figures, one record per line with its
    backbone, device, precision and phase, the machine and date; the AutoAttack line with the attack it
    measured (the digits lines' config: the report's overrides, else the defaults)."""
    meta = report_meta(text)
    overrides = meta.get("settings", "").partition("; overrides: ")[2].split()
    cfg = compose_cfg(overrides, "ft")
    adv = OmegaConf.to_container(cfg.eval.adversarial, resolve=True)
    lines = []
    for cells in report_rows(text):
        record = {"line": cells["line"], "measures": cells["measures"],
                  **where(cells["line"], cells["measures"], str(cfg.backbone.name)),
                  "images_per_s": _number(cells["rftbench"]), "bare_images_per_s": _number(cells["bare"]),
                  "ratio": _number(cells["ratio"]), "target": _number(cells["target"]), "result": cells["result"],
                  "machine": meta["machine"], "date": meta["date"]}
        found = ATTACK_WHAT.match(cells["measures"])
        if record["phase"] == "attack" and found:
            record["attack"] = {"tier": found["tier"], "n_iter": int(found["n_iter"]),
                                "n_target_classes": adv["n_target_classes"], "n": int(found["n"]),
                                "threats": [{"norm": found["norm"], "eps": float(found["eps"])}]}
        lines.append(record)
    return {"source": "perf.md of the same run (scripts/perf.py)", "versions": meta.get("versions"),
            "lines": lines}


def write_json(md: Path, out: Path | None = None) -> Path:
    """Write the JSON companion of the report `md` (default: the same name, .json)."""
    out = out or md.with_suffix(".json")
    out.write_text(json.dumps(perf_records(md.read_text()), indent=1) + "\n")
    return out


def run(selected: list[str], s: Settings, overrides: list[str]) -> list[Line]:
    """Measure the selected lines (keys or key prefixes; empty: all)."""
    wanted = lambda key: not selected or any(key.startswith(p) for p in selected)  # noqa: E731
    lines: list[Line] = []
    keys = [k for k in CPU_LINES if wanted(k)]
    if keys:
        env = build_env(overrides)  # (a first call pre-trains the digits model with every core)
    torch.set_num_threads(s.threads)
    if keys:
        with tempfile.TemporaryDirectory(prefix="rftbench-perf-") as tmp:
            for key in keys:
                t0 = time.perf_counter()
                try:
                    lines.append(CPU_LINES[key](env, s, Path(tmp)))
                except StoreUnavailable as exc:
                    lines.append(Line(key, "feature store", 0, target=2.0, skipped=str(exc)))
                print(f"{row(lines[-1])}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if any(wanted(key) for key in GPU_KEYS):
        for line in gpu_lines(s, wanted):
            lines.append(line)
            print(row(line), flush=True)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/perf.md", help="the report (Markdown)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few short repetitions, tiny workloads")
    ap.add_argument("--lines", default="", help="comma-separated line keys or prefixes (default: all)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1)")
    ap.add_argument("--betas", default=None, help="CT's candidate betas, comma-separated (default: method=ct's grid)")
    ap.add_argument("--json-from-md", metavar="REPORT", default=None,
                    help="measure nothing: write REPORT's JSON companion (REPORT with .json) from its figures")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the digits lines (e.g. experiment=tiny)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.json_from_md:
        print(f"wrote {write_json(Path(args.json_from_md))}")
        return Path(args.json_from_md).read_text()
    betas = None if args.betas is None else tuple(float(b) for b in args.betas.split(","))
    given = {k: v for k, v in (("reps", args.reps), ("threads", args.threads), ("betas", betas)) if v is not None}
    s = Settings.quick(**given) if args.quick else replace(Settings(), **given)
    load0 = os.getloadavg()[0]
    lines = run([p for p in args.lines.split(",") if p], s, list(args.overrides))
    text = report(lines, s, (load0, os.getloadavg()[0]), list(args.overrides))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwrote {out} and {write_json(out)}")
    return text


if __name__ == "__main__":
    main()
