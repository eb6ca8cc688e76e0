"""Zero-shot: the pre-trained model with its head restricted to the task's classes; no training."""
from __future__ import annotations

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted
from rftbench.train import RunContext, accuracy_on


def adapt(model: Classifier, suite: Suite, ctx: RunContext) -> Adapted:
    if suite.upstream_classes is None or model.head_origin != "zeroshot":
        raise ValueError(
            f"method=zeroshot needs a head taken from the pre-trained classifier: suite {suite.name} "
            f"must map its classes to the upstream ones and suite.head_init must be 'zeroshot'")
    return Adapted(model.eval(), val_acc=accuracy_on(model, suite.val, ctx), trainable_params=0)
