"""The embedded `digits` suite (docs/protocol.md section 2): offline, CPU-sized, with a real trade-off.

Upstream: a glyph classifier (62 characters rendered from matplotlib's fonts, some fonts held out),
pre-trained by `pretrain_glyphs` and cached by content hash. Downstream ID: scikit-learn's 1,797
handwritten digits (8x8, upsampled to 32x32, white ink on black). OOD: `typed` (digits typed in
the held-out fonts), the 15 ImageNet-C corruptions x 5 severities of a fixed test subset, and
adversarial attacks on a fixed test subset. `ood_val/<corruption>` splits use the 4 extra
corruptions, disjoint from the test ones, for shift-aware methods (RWS).
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from rftbench.data import corruptions as C
from rftbench.data import glyphs
from rftbench.data.base import (
    SEEN_KEYS,
    Split,
    Suite,
    balanced_subset,
    config_section,
    limit_per_class,
    stratified_split,
)
from rftbench.progress import bar
from rftbench.utils import cache_root, config_target, file_lock, load_cached, save_cached, stable_hash

log = logging.getLogger("rftbench")

DIGIT_CLASSES = [glyphs.CHARSET.index(str(d)) for d in range(10)]


def handwritten_digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 3, size, size) float in [0, 1] (ink bright) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target).long()


TYPED_KEYS = ("n", "augment", "seed")
CORRUPTION_KEYS = ("n", "names", "severities", "seed")


@config_target("suite.build")
def build_digits(*, seed: int, train_per_class: int | None, val_fraction: float, test_fraction: float,
                 split_seed: int, image_size: int, fonts_held_out: Sequence[str] | None, typed: dict,
                 corruption: dict, seen_corruptions: dict, fraction: float | None = None,
                 shots: int | None = None, cache_dir: str | Path | None = None) -> Suite:
    """Build the digits suite. `split_seed` fixes the test split for every trial; the trial `seed`
    draws the val split and the few-shot training subset.

    `train_per_class` is the suite's default few-shot size under its older name (`shots` elsewhere:
    kept so the committed results keep their run ids); `shots` or `fraction` replaces it
    (`rftbench.data.base.limit_per_class`, the same code path).

    The keywords are `suite.build` of configs/suite/digits.yaml, where their defaults live; `seed`
    and `cache_dir` come from the runner. `typed`: {n, augment, seed}; `corruption`: {n, names,
    severities, seed}; `seen_corruptions`: {names, severity, n_val, seed}."""
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    typed = config_section("typed", typed, TYPED_KEYS)
    corruption = config_section("corruption", corruption, CORRUPTION_KEYS)
    seen = config_section("seen_corruptions", seen_corruptions, SEEN_KEYS)
    fonts_held_out = tuple(fonts_held_out or glyphs.DEFAULT_HELD_OUT)

    x, y = handwritten_digits(image_size)
    pool, test_idx = stratified_split(y, test_fraction, split_seed)
    train_pool, val_rel = stratified_split(y[pool], val_fraction, seed)
    val_idx = pool[val_rel]
    train_pool_idx = pool[train_pool]
    if fraction is None and shots is None:
        shots, key = train_per_class, "suite.build.train_per_class"
    else:
        key = "suite.build.shots"
    train_idx = train_pool_idx[limit_per_class(y[train_pool_idx], fraction, shots, seed, shots_key=key)]

    splits = {
        "train": Split("train", "train", x=x[train_idx], y=y[train_idx]),
        "val": Split("val", "val", x=x[val_idx], y=y[val_idx]),
        "test": Split("test", "test", x=x[test_idx], y=y[test_idx]),
    }
    tx, ty = glyphs.render("0123456789", list(fonts_held_out), typed["n"], size=image_size,
                           seed=typed["seed"], augment=typed["augment"])
    splits["ood/typed"] = Split("ood/typed", "ood", "domain", x=tx, y=ty, meta={"fonts": list(fonts_held_out)})

    test = splits["test"]
    sub = balanced_subset(test.y, corruption["n"], corruption["seed"])
    if len(corruption["names"]):
        sets = C.corrupted_set(test.x[sub], corruption["names"], corruption["severities"],
                               corruption["seed"], cache_dir)
        for (name, sev), cx in sets.items():
            key = f"ood/corruption/{name}/{sev}"
            splits[key] = Split(key, "ood", "corruption", x=cx, y=test.y[sub], corruption=name, severity=sev)

    val = splits["val"]
    vsub = torch.arange(len(val)) if seen["n_val"] is None else balanced_subset(val.y, seen["n_val"], seen["seed"])
    if len(seen["names"]):
        vsets = C.corrupted_set(val.x[vsub], seen["names"], [seen["severity"]], seen["seed"], cache_dir)
        for (name, sev), cx in vsets.items():
            key = f"ood_val/{name}"
            splits[key] = Split(key, "ood_val", "corruption", x=cx, y=val.y[vsub], corruption=name, severity=sev)

    meta = {"train_per_class": train_per_class, "fraction": fraction, "shots": shots, "n_train": len(train_idx),
            "n_val": len(val_idx), "n_test": len(test_idx), "n_typed": typed["n"], "n_corruption": len(sub),
            "seen_corruptions": list(seen["names"]), "seen_severity": seen["severity"],
            "seen_seed": seen["seed"], "upstream": "glyphs", "image_size": image_size}
    return Suite("digits", 10, splits, upstream_classes=DIGIT_CLASSES, meta=meta,
                 class_names=[str(d) for d in range(10)])  # for CLIP's zero-shot head and FLYP's captions


@config_target("backbone.pretrain")
def pretrain_glyphs(*, backbone: dict, n_train: int, epochs: int, batch_size: int, lr: float,
                    weight_decay: float, seed: int, image_size: int, fonts_held_out: Sequence[str] | None,
                    cache_dir: str | Path | None = None) -> Path:
    """The upstream checkpoint: `backbone` trained on rendered glyphs (all 62 characters, fonts not
    held out). Deterministic; cached as safetensors under the cache root by content hash. The
    keywords are `backbone.pretrain` of configs/backbone/digits_resnet.yaml (defaults live there);
    `backbone` and `cache_dir` come from the runner."""
    held = tuple(fonts_held_out or glyphs.DEFAULT_HELD_OUT)
    fonts = [f for f in glyphs.available_fonts() if f not in held]
    spec = {"backbone": backbone, "n_train": n_train, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "seed": seed, "image_size": image_size,
            "fonts": fonts, "format": 1}
    path = Path(cache_dir or cache_root()) / "upstream" / f"glyphs-{stable_hash(spec)}.safetensors"
    if load_cached(path) is not None:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache: file_lock runs the block unlocked
        pass
    with file_lock(path.with_suffix(".lock")):  # parallel jobs: one pre-trains, the others wait for it
        if load_cached(path) is not None:
            return path
        return _pretrain(path, spec, backbone, fonts, n_train=n_train, epochs=epochs, batch_size=batch_size,
                         lr=lr, weight_decay=weight_decay, seed=seed, image_size=image_size)


def _pretrain(path: Path, spec: dict, backbone: dict, fonts: list[str], *, n_train: int, epochs: int,
              batch_size: int, lr: float, weight_decay: float, seed: int, image_size: int) -> Path:
    from rftbench.backbones import create_backbone

    log.info("pre-training the glyph model (%d images, %d epochs) -> %s", n_train, epochs, path)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = create_backbone(num_classes=len(glyphs.CHARSET), **backbone)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((n_train + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        x, y = glyphs.render(glyphs.CHARSET, fonts, n_train, size=image_size, seed=seed * 1000 + epoch,
                             augment=True)
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n_train, generator=gen)
        correct = 0
        for start in bar(range(0, n_train, batch_size), f"pre-training epoch {epoch + 1}/{epochs}", unit="batch"):
            idx = order[start:start + batch_size]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += (logits.argmax(1) == y[idx]).sum().item()
        log.info("upstream epoch %d/%d  loss %.3f  train_acc %.3f", epoch + 1, epochs, loss.item(),
                 correct / n_train)
    meta = {"spec": stable_hash(spec), "train_time_s": f"{time.perf_counter() - t0:.1f}"}
    if not save_cached(path, model.state_dict(), metadata=meta):  # a read-only cache: a private copy
        from safetensors.torch import save_file

        path = Path(tempfile.mkdtemp(prefix="rftbench-upstream-")) / path.name
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
