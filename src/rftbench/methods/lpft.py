"""LP-FT (Kumar et al., ICLR 2022): a linear probe, then full fine-tuning from the probed head with
the shared recipe (cached like `method=ft`)."""
from __future__ import annotations

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, cached_training
from rftbench.methods.ft import finetune
from rftbench.methods.lp import probe
from rftbench.train import RunContext


def adapt(model: Classifier, suite: Suite, ctx: RunContext, recipe: dict, probe_cfg: dict) -> Adapted:
    """Linear probe, then full fine-tuning from the probed head (cached like ft)."""
    model, probe_val, _ = probe(model, suite, ctx, **probe_cfg)
    adapted = cached_training(model, ctx, {"lpft": recipe, "probe": probe_cfg},
                              lambda m: finetune(m, suite, ctx, checkpoint_key="lpft", **recipe)[0])
    adapted.info["probe_val_acc"] = probe_val
    return adapted
