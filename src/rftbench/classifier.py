"""The model every method adapts: `Classifier` = normalisation inside, a body giving pooled features,
a linear head (pixels in [0, 1] -> logits). Built by `rftbench.backbones` and `rftbench.clip`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std per channel; inputs are pixels in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


HEAD_ORIGINS = ("pretrained", "zeroshot", "random", "probed")


class CheckpointError(ValueError):
    """`backbone.checkpoint` cannot be used: refused by the safe loader, or of another architecture
    (raised by `rftbench.backbones` and `rftbench.clip`)."""


class Classifier(nn.Module):
    """normalize -> body (pooled features, shape (B, D)) -> head (nn.Linear).

    `head_origin` says where the head's weights come from: `pretrained` (the backbone's own
    classifier), `zeroshot` (the pre-trained rows of the suite's classes: the model already fits
    the task), `random` (a new head) or `probed` (a linear probe on the frozen features)."""

    def __init__(self, body: nn.Module, head: nn.Linear, normalize: Normalize, head_origin: str = "pretrained"):
        super().__init__()
        if head_origin not in HEAD_ORIGINS:
            raise ValueError(f"head_origin={head_origin!r} not valid; choose one of {HEAD_ORIGINS}")
        self.normalize = normalize
        self.body = body
        self.head = head
        self.head_origin = head_origin

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
