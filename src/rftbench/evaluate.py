"""Evaluation over every reported split: accuracy, calibration, corruption and adversarial metrics.

Returns long-format rows (docs/protocol.md section 6) without the run columns, which `results` adds.
"""
from __future__ import annotations

import json
import math
import logging
import time

import torch
from torch import nn

from rftbench import metrics
from rftbench.data.base import Split, Suite, balanced_subset
from rftbench.progress import bar
from rftbench.train import NonFiniteLossError, RunContext, predict

log = logging.getLogger("rftbench")


def row(split: str, metric: str, value: float, shift: str = "id", corruption: str | None = None,
        severity: int | None = None, selection: str = "val", detail: str | None = None) -> dict:
    """One long-format metrics row; `detail` carries extra tags (e.g. attack settings) as JSON."""
    return {"split": split, "shift": shift, "corruption": corruption, "severity": severity,
            "metric": metric, "value": float(value), "selection": selection, "detail": detail}


def masked(logits: torch.Tensor, split: Split) -> torch.Tensor:
    """Logits restricted to the split's `class_mask` (others set to -inf: ImageNet-R/A's 200 classes)."""
    if split.class_mask is None:
        return logits
    keep = torch.zeros(logits.shape[1], dtype=torch.bool)
    keep[torch.as_tensor(split.class_mask)] = True
    return logits.masked_fill(~keep, float("-inf"))


def split_rows(split: Split, logits: torch.Tensor, ece_bins: int = 15) -> list[dict]:
    """Accuracy, ECE and NLL of one split's logits."""
    y = split.labels
    tags = dict(shift=split.shift, corruption=split.corruption, severity=split.severity)
    return [row(split.name, "acc", metrics.accuracy(logits, y), **tags),
            row(split.name, "ece", metrics.ece(logits.softmax(1), y, n_bins=ece_bins), **tags),
            row(split.name, "nll", metrics.nll(logits, y), **tags)]


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per-shift means: the corruption mean over all (corruption, severity) splits, the OOD mean
    (over the non-corruption OOD splits and the corruption mean) and the worst OOD accuracy over the
    individual OOD results (`metrics.ood_groups`: each split, each corruption's severity mean)."""
    acc = [r for r in rows if r["metric"] == "acc"]
    out = []
    corr = [r["value"] for r in acc if r["shift"] == "corruption" and r["split"].startswith("ood/")]
    if corr:
        out.append(row("ood/corruption", "acc_mean", sum(corr) / len(corr), shift="corruption"))
    ood = [r for r in acc if r["split"].startswith("ood/") and r["shift"] != "corruption"]
    ood_means = [r["value"] for r in ood] + ([out[0]["value"]] if corr else [])
    if ood_means:
        out.append(row("ood", "acc_mean", sum(ood_means) / len(ood_means), shift="natural"))
        groups = metrics.ood_groups((r["split"], r["shift"], r["corruption"], r["value"])
                                    for r in acc if r["split"].startswith("ood/"))
        out.append(row("ood", "acc_worst", min(groups.values()), shift="natural"))
    return out


def evaluate(model: nn.Module, suite: Suite, ctx: RunContext, cfg: dict) -> list[dict]:
    """Evaluate `model` (pixels in [0, 1] -> logits) on every test/OOD split of `suite`, then the
    configured adversarial threats. `cfg` is the `eval` config (configs/eval/default.yaml, the only
    place its defaults live): {ece_bins, adversarial: {enabled, n, tier, seed, n_iter,
    n_target_classes, threats: [{norm, eps}], batch_size}}."""
    model.eval()
    rows: list[dict] = []
    t0 = time.perf_counter()
    n_images = 0
    for split in bar(suite.eval_splits(), "evaluating", unit="split"):
        raw = predict(model, split, ctx)
        if not torch.isfinite(raw).all():
            raise NonFiniteLossError(f"the adapted model gives non-finite logits on {split.name}: it diverged; "
                                     f"lower the method's learning rate")
        logits = masked(raw, split)  # (-inf outside a 200-class subset such as ImageNet-R's)
        n_images += len(split)
        new = split_rows(split, logits, cfg["ece_bins"])
        rows += new
        nll = next(r["value"] for r in new if r["metric"] == "nll")
        if not math.isfinite(nll):
            raise NonFiniteLossError(f"NLL on {split.name} is {nll}: the adapted model diverged; lower the "
                                     f"method's learning rate")
    eval_time = time.perf_counter() - t0
    rows += summary_rows(rows)
    rows.append(row("-", "eval_images_per_s", n_images / max(eval_time, 1e-9), shift="id"))
    adv = cfg["adversarial"]
    if adv["enabled"]:
        rows += adversarial_rows(model, suite["test"], ctx, adv)
    rows.append(row("-", "eval_time_s", time.perf_counter() - t0, shift="id"))
    log.info("evaluated %d splits (%d images) in %.1fs", len(suite.eval_splits()), n_images,
             time.perf_counter() - t0)
    return rows


def adversarial_rows(model: nn.Module, test: Split, ctx: RunContext, adv: dict) -> list[dict]:
    """Robust accuracy under each configured threat on a fixed class-balanced test subset."""
    from rftbench.attacks import attack

    idx = balanced_subset(test.labels, adv["n"], adv["seed"])
    # tensors in memory (evaluation transform applied) also when the test split is streamed from disk
    sub = test.subset(idx).materialize(num_workers=ctx.num_workers)
    out = []
    for threat in bar(adv["threats"], "AutoAttack", unit="threat"):
        res = attack(model, sub.x, sub.y, norm=threat["norm"], eps=float(threat["eps"]), tier=adv["tier"],
                     seed=adv["seed"], batch_size=adv["batch_size"], device=ctx.device,
                     n_iter=adv["n_iter"], n_target_classes=adv["n_target_classes"])
        name = f"ood/adversarial/{threat['norm']}"
        detail = json.dumps({"norm": res.norm, "eps": res.eps, "tier": res.tier, "n": res.n,
                             "seed": res.seed, "autoattack": res.version, "attacks": list(res.attacks)})
        out.append(row(name, "robust_acc", res.robust_acc, shift="adversarial", detail=detail))
        out.append(row(name, "clean_acc", res.clean_acc, shift="adversarial", detail=detail))
    return out
