"""Full fine-tuning: every parameter trained with the shared loop, epoch chosen on val.

The fine-tuned weights are cached by (starting point, recipe), so WiSE-FT and RWS reuse the very
model `method=ft` trained instead of training it again.
"""
from __future__ import annotations

from typing import Callable

import pandas as pd

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, cached_training, unfreeze
from rftbench.train import FitResult, RunContext, count_params, fit


def finetune(model: Classifier, suite: Suite, ctx: RunContext, *, checkpoint_key: str, optimizer: Callable,
             epochs: int, batch_size: int, scheduler: dict | None = None, exclude_head: bool = False,
             label_smoothing: float = 0.0, clip_grad_norm: float | None = None) -> tuple[Adapted, FitResult]:
    """Train all of `model`; `exclude_head` passes the head to optimizers taking `exclude` (FTP);
    `checkpoint_key` names the training's resume checkpoints; `clip_grad_norm` (a recipe may add it,
    e.g. WiSE-FT's 1.0): `rftbench.train.fit`."""
    unfreeze(model)
    n = count_params(model, trainable=True)
    res = fit(model, suite.train, suite.val, ctx, optimizer=optimizer, epochs=epochs,
              batch_size=batch_size, scheduler=scheduler, label_smoothing=label_smoothing,
              exclude=list(model.head.parameters()) if exclude_head else (), checkpoint_key=checkpoint_key,
              clip_grad_norm=clip_grad_norm)
    return Adapted(model, val_acc=res.best_val_acc, trainable_params=n, train_time_s=res.train_time_s,
                   info={"best_epoch": res.best_epoch, "converged": int(res.converged)}, tables={"history": pd.DataFrame(res.history)}), res


def cached_finetune(model: Classifier, suite: Suite, ctx: RunContext, **recipe) -> Adapted:
    """`finetune` through the model cache, keyed by the recipe (shared by ft, wise, rws)."""
    return cached_training(model, ctx, {"finetune": recipe},
                           lambda m: finetune(m, suite, ctx, checkpoint_key="finetune", **recipe)[0])


def adapt(model: Classifier, suite: Suite, ctx: RunContext, recipe: dict) -> Adapted:
    return cached_finetune(model, suite, ctx, **recipe)
