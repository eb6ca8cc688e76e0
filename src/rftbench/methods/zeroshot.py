"""Zero-shot: the pre-trained model with its head restricted to the task's classes; no training."""
from __future__ import annotations

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted
from rftbench.train import RunContext


def adapt(model: Classifier, suite: Suite, ctx: RunContext) -> Adapted:
    if model.head_origin != "zeroshot":
        raise ValueError(
            f"method=zeroshot needs a zero-shot head: the pre-trained classifier's rows of the classes of "
            f"suite {suite.name} (the suite must map its classes to the upstream ones) or a CLIP text-tower "
            f"head (the suite must name its classes), with suite.head_init 'zeroshot' or 'auto'")
    return Adapted(model.eval(), val_acc=ctx.store.accuracy(model, suite.val, ctx), trainable_params=0,
                   frozen_backbone=True)
