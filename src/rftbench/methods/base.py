"""What every method returns, and the small helpers methods share."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from rftbench.train import count_trainable


@dataclass
class Adapted:
    """An adapted model (pixels in [0, 1] -> logits over the suite's classes) and what the method
    chose or measured: `info` (scalars, e.g. {"beta": 0.93}) becomes results; `tables` (e.g. a beta
    sweep) are written to the run folder as CSV; `trainable_params` is the cost column."""

    model: nn.Module
    trainable_params: int
    info: dict = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_now(model: nn.Module) -> int:
    return count_trainable(model)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
