"""LP-FT (Kumar et al., ICLR 2022): a linear probe, then full fine-tuning from the probed head with
the shared recipe (cached like `method=ft`)."""
from __future__ import annotations

import copy

from rftbench.backbones import Classifier
from rftbench.data.base import Suite
from rftbench.methods.base import Adapted, cached_training
from rftbench.methods.ft import finetune
from rftbench.methods.lp import probe
from rftbench.train import RunContext


def probed_and_tuned(model: Classifier, suite: Suite, ctx: RunContext, recipe: dict,
                     probe_cfg: dict) -> tuple[Classifier, float, Adapted]:
    """The LP model (frozen backbone, probed head), its val accuracy, and the LP-FT fine-tuning of a
    copy of it through the model cache (shared by `method=lpft` and WiSE-FT's probed start)."""
    start, probe_val, _ = probe(model, suite, ctx, **probe_cfg)
    tuned = cached_training(copy.deepcopy(start), ctx, {"lpft": recipe, "probe": probe_cfg},
                            lambda m: finetune(m, suite, ctx, checkpoint_key="lpft", **recipe)[0])
    return start, probe_val, tuned


def adapt(model: Classifier, suite: Suite, ctx: RunContext, recipe: dict, probe_cfg: dict) -> Adapted:
    """Linear probe, then full fine-tuning from the probed head (cached like ft)."""
    _, probe_val, adapted = probed_and_tuned(model, suite, ctx, recipe, probe_cfg)
    adapted.info["probe_val_acc"] = probe_val
    return adapted
