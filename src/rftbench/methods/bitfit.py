"""`method=bitfit`: BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022; used on vision backbones as a
parameter-efficient baseline): only the bias terms of the body (plus the normalisation layers' affine
weights when `norm_affine`) and the whole head are trained, with the shared fine-tuning recipe.
BatchNorm running statistics still update in train mode, as in full fine-tuning.
Deviation: the head is trained in full (the paper's task head is new as well).
"""
from __future__ import annotations

import pandas as pd
from torch import nn

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, cached_training, freeze
from rftbench.methods.mars_sp import NORMS
from rftbench.train import RunContext, count_params, fit


def bitfit_names(model: Classifier, *, norm_affine: bool) -> list[str]:
    """Names of the tensors BitFit trains: every body bias, the norm weights if `norm_affine`, the head."""
    norm_weights = {f"body.{n}.weight" for n, m in model.body.named_modules()
                    if isinstance(m, NORMS) and isinstance(getattr(m, "weight", None), nn.Parameter)}
    return [n for n, _ in model.named_parameters()
            if n.startswith("head.") or n.endswith(".bias") or (norm_affine and n in norm_weights)]


def select(model: Classifier, *, norm_affine: bool) -> Classifier:
    """Freeze `model` except the BitFit tensors."""
    names = set(bitfit_names(model, norm_affine=norm_affine))
    freeze(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, norm_affine: bool, recipe: dict) -> Adapted:
    recipe = dict(recipe)

    def train(m: Classifier) -> Adapted:
        select(m, norm_affine=norm_affine)
        n = count_params(m, trainable=True)
        res = fit(m, suite.train, suite.val, ctx, checkpoint_key="bitfit", **recipe)
        return Adapted(m, val_acc=res.best_val_acc, trainable_params=n, train_time_s=res.train_time_s,
                       tables={"history": pd.DataFrame(res.history)},
                       info={"best_epoch": res.best_epoch, "converged": int(res.converged),
                             "trained_tensors": len(bitfit_names(m, norm_affine=norm_affine))})

    return cached_training(model, ctx, {"bitfit": {"norm_affine": norm_affine, "recipe": recipe}}, train)
