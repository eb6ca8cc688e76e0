"""Linear probe: frozen backbone, a head trained on cached features (no augmentation)."""
from __future__ import annotations

import torch

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, freeze
from rftbench.train import RunContext, count_params, extract_features, fit_probe


def probe(model: Classifier, suite: Suite, ctx: RunContext, **probe_cfg) -> tuple[Classifier, float, int]:
    """The one linear probe of the methods (lp, lpft, wise; ct trains the same probe batched over
    betas with `rftbench.train.fit_probes`): fit `model.head` on the frozen features of train,
    choosing the epoch on val. Returns the model with the probed head, its val accuracy and the
    chosen epoch."""
    freeze(model).eval()
    ftr, fval = extract_features(model, suite.train, ctx), extract_features(model, suite.val, ctx)
    res = fit_probe(ftr.to(ctx.device), suite.train.labels.to(ctx.device), fval.to(ctx.device),
                    suite.val.labels.to(ctx.device), suite.num_classes, init=model.head,
                    seed=ctx.seed, **probe_cfg)
    model.head, model.head_origin = res.head, "probed"
    return model, res.val_acc, res.best_epoch


def adapt(model: Classifier, suite: Suite, ctx: RunContext, probe_cfg: dict | None = None) -> Adapted:
    model, val_acc, epoch = probe(model, suite, ctx, **(probe_cfg or {}))
    return Adapted(model, val_acc=val_acc, trainable_params=count_params(model.head),
                   info={"probe_epoch": epoch}, frozen_backbone=True)
