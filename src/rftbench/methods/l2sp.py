"""`method=l2sp`: L2-SP (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning
with Convolutional Networks", ICML 2018).

Loss = cross-entropy + alpha/2 ||w - w0||^2 over the pre-trained (body) parameters + beta/2 ||w_head||^2
over the new head, trained with the shared fine-tuning recipe (`rftbench.train.fit`, its `loss_fn`
hook). The optimizer's own weight decay is 0 (set in configs/method/l2sp.yaml): the regulariser
replaces it. "Pre-trained parameters" = every parameter of `model.body`, BN affine weights and biases
included, as in the paper (the penalty is on all of w^0's coordinates) and the common L2-SP baselines
(e.g. the Transfer-Learning-Library's SPRegularization over the whole backbone).
Deviation: the shared recipe (SGD nesterov, cosine, best val epoch), not the paper's step schedule.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, cached_training, unfreeze
from rftbench.train import RunContext, count_params, fit


def l2sp_penalty(body: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], head: Sequence[torch.Tensor],
                 *, alpha: float, beta: float) -> torch.Tensor:
    """alpha/2 sum ||w - w0||^2 over `body` (anchors `w0`) + beta/2 sum ||w||^2 over `head`."""
    sp = sum(((w.float() - w0.float()) ** 2).sum() for w, w0 in zip(body, anchors, strict=True))
    decay = sum((w.float() ** 2).sum() for w in head)
    return alpha / 2 * sp + beta / 2 * decay


def adapt(model: Classifier, suite: Suite, ctx: RunContext, *, alpha: float, beta: float, recipe: dict) -> Adapted:
    """Fine-tune all of `model` with the L2-SP loss (anchored at the starting body weights)."""
    recipe = dict(recipe)
    label_smoothing = recipe.pop("label_smoothing", 0.0)

    def train(m: Classifier) -> Adapted:
        unfreeze(m)
        body, head = list(m.body.parameters()), list(m.head.parameters())
        anchors = [p.detach().clone() for p in body]

        def reg() -> torch.Tensor:
            return l2sp_penalty(body, anchors, head, alpha=alpha, beta=beta)

        def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out, y, label_smoothing=label_smoothing) + reg()

        res = fit(m, suite.train, suite.val, ctx, checkpoint_key="l2sp", loss_fn=loss_fn, **recipe)
        with torch.no_grad():
            final = float(reg())
        return Adapted(m, val_acc=res.best_val_acc, trainable_params=count_params(m, trainable=True),
                       train_time_s=res.train_time_s, tables={"history": pd.DataFrame(res.history)},
                       info={"best_epoch": res.best_epoch, "converged": int(res.converged),
                             "regulariser": final, "alpha": alpha, "beta": beta})

    key = {"l2sp": {"alpha": alpha, "beta": beta, "recipe": recipe, "label_smoothing": label_smoothing}}
    return cached_training(model, ctx, key, train)
