"""WiSE-FT (weight-space ensembling), a robust fine-tuning reference.

WiSE-FT (Wortsman et al., CVPR 2022): theta(a) = (1 - a) * theta_start + a * theta_ft, where
theta_start is the pre-trained model with its zero-shot (or linearly probed) head and theta_ft the
full fine-tuning of the same start with the shared recipe (the cached model of `method=ft`).
The mixing coefficient is chosen on `val`; every coefficient's val and, for analysis only, test and
OOD accuracies are kept for the trade-off plot.
"""
from __future__ import annotations

import copy

import pandas as pd
import torch

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, state_of
from rftbench.methods.ft import cached_finetune
from rftbench.methods.lp import probe
from rftbench.selection import best_index
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
    """WiSE-FT: alpha chosen on val (`rftbench.selection`, ties -> the smaller alpha, closer to the
    start). `wise_sweep.csv` holds every alpha's val accuracy and, computed by the runner after the
    choice (analysis only), its test and OOD accuracies."""
    if start_head not in START_HEADS:
        raise ValueError(f"start_head={start_head!r} not valid; choose one of {START_HEADS}")
    if not alphas:
        raise ValueError("WiSE-FT needs at least one mixing coefficient in alphas")
    use_probe = start_head == "probe" or (start_head == "auto" and model.head_origin != "zeroshot")
    start = copy.deepcopy(model)
    if use_probe:
        start, _, _ = probe(start, suite, ctx, **probe_cfg)
    tuned = cached_finetune(copy.deepcopy(model), suite, ctx, **recipe)
    theta0, theta1 = state_of(start), state_of(tuned.model)
    work = copy.deepcopy(tuned.model).eval()
    candidates = sorted(alphas)
    val_accs = []
    for a in candidates:
        work.load_state_dict(interpolate(theta0, theta1, a))
        val_accs.append(accuracy_on(work, suite.val, ctx))
    best = candidates[best_index(val_accs)]
    work.load_state_dict(interpolate(theta0, theta1, best))

    def analysis(full: Suite) -> tuple[dict[str, pd.DataFrame], list[dict]]:
        """Every alpha's test and OOD accuracies (analysis only: the choice is already made)."""
        probe_model = copy.deepcopy(work)
        rows = []
        for a, v in zip(candidates, val_accs):
            probe_model.load_state_dict(interpolate(theta0, theta1, a))
            rows.append({"alpha": a, "val_acc": v, **{f"{s.name}_acc": accuracy_on(probe_model, s, ctx)
                                                       for s in full.eval_splits() if s.shift != "corruption"}})
        return {"wise_sweep": pd.DataFrame(rows)}, []

    info = {"alpha": best, "start_head_probe": int(use_probe), "ft_val_acc": tuned.val_acc}
    return Adapted(work, val_acc=val_accs[candidates.index(best)], trainable_params=tuned.trainable_params,
                   train_time_s=tuned.train_time_s, reused_time_s=tuned.reused_time_s, info=info,
                   tables={"wise_sweep": pd.DataFrame({"alpha": candidates, "val_acc": val_accs})},
                   analysis=analysis)
