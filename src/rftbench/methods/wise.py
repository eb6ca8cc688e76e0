"""Robust fine-tuning references: WiSE-FT (weight-space ensembling) and LP-FT.

WiSE-FT (Wortsman et al., CVPR 2022): theta(a) = (1 - a) * theta_start + a * theta_ft, where
theta_start is the pre-trained model with its zero-shot (or linearly probed) head and theta_ft the
full fine-tuning of the same start with the shared recipe (the cached model of `method=ft`).
The mixing coefficient is chosen on `val`; every coefficient's val and, for analysis only, test and
OOD accuracies are kept for the trade-off plot.
LP-FT (Kumar et al., ICLR 2022): a linear probe, then full fine-tuning from the probed head.
"""
from __future__ import annotations

import copy

import pandas as pd
import torch

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, cached_training, state_of
from rftbench.methods.ft import cached_finetune, finetune
from rftbench.methods.lp import probe
from rftbench.train import RunContext, accuracy_on

START_HEADS = ("auto", "current", "probe")


def interpolate(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * end for floating tensors (BatchNorm statistics included);
    integer buffers (e.g. num_batches_tracked) are taken from `end`."""
    if start.keys() != end.keys():
        raise ValueError("WiSE-FT needs two states of the same architecture")
    return {k: torch.lerp(start[k], end[k], alpha) if start[k].is_floating_point() else end[k].clone()
            for k in start}


def adapt(model: Classifier, suite: Suite, ctx: RunContext, recipe: dict, probe_cfg: dict,
          alphas: list[float], start_head: str = "auto") -> Adapted:
    if start_head not in START_HEADS:
        raise ValueError(f"start_head={start_head!r} not valid; choose one of {START_HEADS}")
    if not alphas:
        raise ValueError("WiSE-FT needs at least one mixing coefficient in alphas")
    use_probe = start_head == "probe" or (start_head == "auto" and not getattr(model, "zeroshot_head", False))
    start = copy.deepcopy(model)
    if use_probe:
        start, _, _ = probe(start, suite, ctx, **probe_cfg)
    tuned = cached_finetune(copy.deepcopy(model), suite, ctx, **recipe)
    theta0, theta1 = state_of(start), state_of(tuned.model)
    work = copy.deepcopy(tuned.model).eval()
    reported = [s for s in suite.eval_splits() if s.shift != "corruption"]
    rows, best = [], None
    for a in sorted(alphas):
        work.load_state_dict(interpolate(theta0, theta1, a))
        rec = {"alpha": a, "val_acc": accuracy_on(work, suite.val, ctx)}
        for split in reported:  # analysis only: never used for the choice
            rec[f"{split.name}_acc"] = accuracy_on(work, split, ctx)
        rows.append(rec)
        if best is None or rec["val_acc"] > best[1]:
            best = (a, rec["val_acc"])
    work.load_state_dict(interpolate(theta0, theta1, best[0]))
    info = {"alpha": best[0], "val_acc": best[1], "start_head_probe": int(use_probe),
            "ft_val_acc": tuned.info.get("val_acc", float("nan")),
            "cached_train_time_s": tuned.info.get("cached_train_time_s", 0.0)}
    return Adapted(work, trainable_params=tuned.trainable_params, info=info, tables={"wise_sweep": pd.DataFrame(rows)})


def lpft(model: Classifier, suite: Suite, ctx: RunContext, recipe: dict, probe_cfg: dict) -> Adapted:
    """Linear probe, then full fine-tuning from the probed head (cached like ft)."""
    model, probe_val, _ = probe(model, suite, ctx, **probe_cfg)
    adapted = cached_training(model, ctx, {"lpft": recipe, "probe": probe_cfg},
                              lambda m: finetune(m, suite, ctx, **recipe)[0])
    adapted.info["probe_val_acc"] = probe_val
    return adapted
