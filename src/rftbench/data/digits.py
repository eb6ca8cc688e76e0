"""The embedded `digits` suite (protocol.md section 2): offline, CPU-sized, with a real trade-off.

Upstream: a glyph classifier (62 characters rendered from matplotlib's fonts, some fonts held out),
pre-trained by `pretrain_glyphs` and cached by content hash. Downstream ID: scikit-learn's 1,797
handwritten digits (8x8, upsampled to 32x32, white ink on black). OOD: `typed` (digits typed in
the held-out fonts), the 15 ImageNet-C corruptions x 5 severities of a fixed test subset, and
adversarial attacks on a fixed test subset. `ood_val/<corruption>` splits use the 4 extra
corruptions, disjoint from the test ones, for shift-aware methods (RWS).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rftbench.data import corruptions as C
from rftbench.data import glyphs
from rftbench.data.base import Split, Suite, balanced_subset, per_class, stratified_split
from rftbench.progress import bar
from rftbench.utils import cache_root, save_tensors_atomic, stable_hash

log = logging.getLogger("rftbench")

DIGIT_CLASSES = [glyphs.CHARSET.index(str(d)) for d in range(10)]


def handwritten_digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 3, size, size) float in [0, 1] (ink bright) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target).long()


def build_digits(seed: int = 0, train_per_class: int | None = 20, val_fraction: float = 0.2,
                 test_fraction: float = 0.4, split_seed: int = 0, image_size: int = 32,
                 fonts_held_out: Sequence[str] | None = None, typed: dict | None = None,
                 corruption: dict | None = None, seen_corruptions: dict | None = None,
                 cache_dir: str | Path | None = None, **_: object) -> Suite:
    """Build the digits suite. `split_seed` fixes the test split for every trial; the trial `seed`
    draws the val split and the few-shot training subset."""
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    typed = {"n": 500, "augment": "mild", "seed": 1, **(typed or {})}
    corruption = {"n": 200, "names": list(C.CORRUPTIONS), "severities": [1, 2, 3, 4, 5], "seed": 2,
                  **(corruption or {})}
    seen = {"names": list(C.EXTRA_CORRUPTIONS), "severity": 5, "n_val": None, "seed": 3,
            **(seen_corruptions or {})}
    fonts_held_out = tuple(fonts_held_out or glyphs.DEFAULT_HELD_OUT)

    x, y = handwritten_digits(image_size)
    pool, test_idx = stratified_split(y, test_fraction, split_seed)
    train_pool, val_rel = stratified_split(y[pool], val_fraction, seed)
    val_idx = pool[val_rel]
    train_pool_idx = pool[train_pool]
    train_idx = train_pool_idx[per_class(y[train_pool_idx], train_per_class, seed)]

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

    meta = {"train_per_class": train_per_class, "n_train": len(train_idx), "n_val": len(val_idx),
            "n_test": len(test_idx), "n_typed": typed["n"], "n_corruption": len(sub),
            "seen_corruptions": list(seen["names"]), "seen_severity": seen["severity"],
            "seen_seed": seen["seed"], "upstream": "glyphs", "image_size": image_size}
    return Suite("digits", 10, splits, upstream_classes=DIGIT_CLASSES, meta=meta)


def corrupt_split(split: Split, name: str, severity: int, seed: int, cache_dir: Path) -> Split:
    """`split` under one corruption (cached): labelled corrupted data for shift-aware methods."""
    cx = C.corrupted_set(split.x, [name], [severity], seed, cache_dir)[(name, severity)]
    return Split(f"{split.name}/{name}/{severity}", split.role, "corruption", x=cx, y=split.y,
                 corruption=name, severity=severity)


def pretrain_glyphs(backbone: dict, n_train: int = 12000, epochs: int = 2, batch_size: int = 64,
                    lr: float = 4e-3, weight_decay: float = 0.05, seed: int = 0, image_size: int = 32,
                    fonts_held_out: Sequence[str] | None = None, cache_dir: str | Path | None = None) -> Path:
    """The upstream checkpoint: `backbone` trained on rendered glyphs (all 62 characters, fonts not
    held out). Deterministic; cached as safetensors under the cache root by content hash."""
    from rftbench.backbones import create_backbone

    held = tuple(fonts_held_out or glyphs.DEFAULT_HELD_OUT)
    fonts = [f for f in glyphs.available_fonts() if f not in held]
    spec = {"backbone": backbone, "n_train": n_train, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "weight_decay": weight_decay, "seed": seed, "image_size": image_size,
            "fonts": fonts, "format": 1}
    path = Path(cache_dir or cache_root()) / "upstream" / f"glyphs-{stable_hash(spec)}.safetensors"
    if path.exists():
        return path
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
    save_tensors_atomic(path, model.state_dict(), metadata=meta)
    return path
