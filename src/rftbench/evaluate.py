"""Evaluation over every reported split: accuracy, calibration, corruption and adversarial metrics.

Returns long-format rows (docs/protocol.md section 6) without the run columns, which `results` adds.
"""
from __future__ import annotations

import json
import math
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rftbench import metrics
from rftbench.data.base import Split, Suite, balanced_subset, scored_logits
from rftbench.progress import bar
from rftbench.train import NonFiniteLossError, RunContext, predict

log = logging.getLogger("rftbench")
# eval.adversarial.subset: which test images the attack gets (`attack_subset`)
SUBSETS = ("balanced", "first", "robustbench_imagenet")


def row(split: str, metric: str, value: float, shift: str = "id", corruption: str | None = None,
        severity: int | None = None, selection: str = "val", detail: str | None = None) -> dict:
    """One long-format metrics row; `detail` carries extra tags (e.g. attack settings) as JSON."""
    return {"split": split, "shift": shift, "corruption": corruption, "severity": severity,
            "metric": metric, "value": float(value), "selection": selection, "detail": detail}


def split_rows(split: Split, logits: torch.Tensor, ece_bins: int = 15) -> list[dict]:
    """Accuracy, ECE and NLL of one split's logits."""
    y = split.labels
    tags = dict(shift=split.shift, corruption=split.corruption, severity=split.severity)
    return [row(split.name, "acc", metrics.accuracy(logits, y), **tags),
            row(split.name, "ece", metrics.ece(logits.softmax(1), y, n_bins=ece_bins), **tags),
            row(split.name, "nll", metrics.nll(logits, y), **tags)]


def headline_rows(acc: list[dict], headline: Sequence[str]) -> list[dict]:
    """The headline OOD mean over exactly the `headline` splits (`Suite.meta["headline_ood"]`) as
    `ood acc_mean`. With some of them missing it is not reported over fewer: a warning, and the mean of
    those present goes to `ood/mean/<a>+<b>+...` (named by its splits); `detail` lists the splits used."""
    value = {r["split"]: r["value"] for r in acc}
    present, missing = [s for s in headline if s in value], [s for s in headline if s not in value]
    if not present:
        log.warning("headline OOD mean not reported: none of its splits %s was evaluated", list(headline))
        return []
    mean = sum(value[s] for s in present) / len(present)
    detail = json.dumps({"splits": present, "missing": missing})
    if not missing:
        return [row("ood", "acc_mean", mean, shift="natural", detail=detail)]
    name = "ood/mean/" + "+".join(s.removeprefix("ood/") for s in present)
    log.warning("headline OOD mean (ood acc_mean) not reported: %s not evaluated; the mean over the %d "
                "evaluated of its splits is %s", ", ".join(missing), len(present), name)
    return [row(name, "acc_mean", mean, shift="natural", detail=detail)]


def summary_rows(rows: list[dict], headline: Sequence[str] | None = None) -> list[dict]:
    """Per-shift means: the corruption mean over all (corruption, severity) splits; the headline OOD
    mean `ood acc_mean`, over the suite's `headline` splits when it declares them (`headline_rows`;
    ImageNet: WiSE-FT's five shifts), else over the non-corruption OOD splits and the corruption mean;
    and the worst OOD accuracy over the individual OOD results (`metrics.ood_groups`: each split, each
    corruption's severity mean)."""
    acc = [r for r in rows if r["metric"] == "acc"]
    out = []
    corr = [r["value"] for r in acc if r["shift"] == "corruption" and r["split"].startswith("ood/")]
    if corr:
        out.append(row("ood/corruption", "acc_mean", sum(corr) / len(corr), shift="corruption"))
    ood = [r for r in acc if r["split"].startswith("ood/") and r["shift"] != "corruption"]
    ood_means = [r["value"] for r in ood] + ([out[0]["value"]] if corr else [])
    if ood_means:
        if headline:
            out += headline_rows(acc, headline)
        else:
            out.append(row("ood", "acc_mean", sum(ood_means) / len(ood_means), shift="natural"))
        groups = metrics.ood_groups((r["split"], r["shift"], r["corruption"], r["value"])
                                    for r in acc if r["split"].startswith("ood/"))
        out.append(row("ood", "acc_worst", min(groups.values()), shift="natural"))
    return out


def evaluate(model: nn.Module, suite: Suite, ctx: RunContext, cfg: dict, frozen_backbone: bool = False) -> list[dict]:
    """Evaluate `model` (pixels in [0, 1] -> logits) on every test/OOD split of `suite`, then the
    configured adversarial threats. `cfg` is the `eval` config (configs/eval/default.yaml, the only
    place its defaults live): {ece_bins, adversarial: {enabled, n, subset, tier, seed, n_iter,
    n_target_classes, threats: [{norm, eps}], batch_size}}. A `frozen_backbone` model (a Classifier
    whose features are a frozen extractor's) is evaluated as its head on the feature store's rows."""
    model.eval()
    rows: list[dict] = []
    t0 = time.perf_counter()
    n_images = 0
    for split in bar(suite.eval_splits(), "evaluating", unit="split"):
        raw = ctx.store.logits(model, split, ctx) if frozen_backbone else predict(model, split, ctx)
        if not torch.isfinite(raw).all():
            raise NonFiniteLossError(f"the adapted model gives non-finite logits on {split.name}: it diverged; "
                                     f"lower the method's learning rate")
        logits = scored_logits(raw, split)  # ImageNet-R/A's 200-class mask, ObjectNet's 113 pooled classes
        n_images += len(split)
        new = split_rows(split, logits, cfg["ece_bins"])
        rows += new
        nll = next(r["value"] for r in new if r["metric"] == "nll")
        if not math.isfinite(nll):
            raise NonFiniteLossError(f"NLL on {split.name} is {nll}: the adapted model diverged; lower the "
                                     f"method's learning rate")
    eval_time = time.perf_counter() - t0
    rows += summary_rows(rows, suite.meta.get("headline_ood"))
    rows.append(row("-", "eval_images_per_s", n_images / max(eval_time, 1e-9), shift="id"))
    adv = cfg["adversarial"]
    if adv["enabled"]:
        rows += adversarial_rows(model, suite["test"], ctx, adv)
    rows.append(row("-", "eval_time_s", time.perf_counter() - t0, shift="id"))
    log.info("evaluated %d splits (%d images) in %.1fs", len(suite.eval_splits()), n_images,
             time.perf_counter() - t0)
    return rows


def robustbench_imagenet_subset(test: Split, n: int) -> torch.Tensor:
    """Indices, in RobustBench's order, of the first `n` images of RobustBench's fixed ImageNet val list
    (`<wnid>/<file>`, read from the installed robustbench package) among the test split's image files."""
    from rftbench.data.corruption_sets import robustbench_imagenet_ids
    from rftbench.data.verify import image_files

    files = image_files(test.dataset)
    if files is None:
        raise ValueError("eval.adversarial.subset=robustbench_imagenet needs a test split of ImageNet val image "
                         "files (suite=imagenet)")
    where = {"/".join(Path(f).parts[-2:]): i for i, f in enumerate(files)}
    wanted = robustbench_imagenet_ids(n)
    missing = [w for w in wanted if w not in where]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {n} images of RobustBench's ImageNet list are not in the "
                                f"test split (e.g. {missing[0]}): the full ILSVRC2012 val set in synset folders "
                                f"is needed, or eval.adversarial.subset=balanced")
    return torch.tensor([where[w] for w in wanted])


def attack_subset(test: Split, adv: dict) -> torch.Tensor:
    """Indices of the test images the attack gets (`eval.adversarial.subset`): `balanced` (n // classes of
    every class, seeded: `balanced_subset`), `first` (the first n in the split's order: RobustBench's CIFAR
    convention) or `robustbench_imagenet` (the first n of RobustBench's fixed 5,000-image list)."""
    kind, n = adv["subset"], int(adv["n"])
    if kind == "balanced":
        return balanced_subset(test.labels, n, adv["seed"])
    if kind == "first":
        if n > len(test):
            raise ValueError(f"eval.adversarial.n={n} with subset=first, but the test split has {len(test)} images")
        return torch.arange(n)
    if kind == "robustbench_imagenet":
        return robustbench_imagenet_subset(test, n)
    raise ValueError(f"eval.adversarial.subset must be one of {', '.join(SUBSETS)}, got {kind!r}")


def adversarial_rows(model: nn.Module, test: Split, ctx: RunContext, adv: dict) -> list[dict]:
    """Robust accuracy under each configured threat on the fixed test subset of `attack_subset`."""
    from rftbench.attacks import attack

    idx = attack_subset(test, adv)
    # tensors in memory (evaluation transform applied) also when the test split is streamed from disk
    sub = test.subset(idx).materialize(num_workers=ctx.num_workers)
    out = []
    for threat in bar(adv["threats"], "AutoAttack", unit="threat"):
        res = attack(model, sub.x, sub.y, norm=threat["norm"], eps=float(threat["eps"]), tier=adv["tier"],
                     seed=adv["seed"], batch_size=adv["batch_size"], device=ctx.device,
                     n_iter=adv["n_iter"], n_target_classes=adv["n_target_classes"])
        name = f"ood/adversarial/{threat['norm']}"
        detail = json.dumps({"norm": res.norm, "eps": res.eps, "tier": res.tier, "n": res.n, "subset": adv["subset"],
                             "seed": res.seed, "autoattack": res.version, "attacks": list(res.attacks)})
        out.append(row(name, "robust_acc", res.robust_acc, shift="adversarial", detail=detail))
        out.append(row(name, "clean_acc", res.clean_acc, shift="adversarial", detail=detail))
    return out
