"""Backbones: timm / torchvision models wrapped as `Classifier` (pixels in [0, 1] -> logits).

Every model the benchmark adapts is a `Classifier`: input normalisation inside the model, a body
that maps normalised images to pooled features, and a linear head. Methods rely on these three
parts (`normalize`, `body`, `head`) and on `features(x)`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import timm
import torch
import torchvision
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


class Classifier(nn.Module):
    """normalize -> body (pooled features, shape (B, D)) -> head (nn.Linear)."""

    def __init__(self, body: nn.Module, head: nn.Linear, normalize: Normalize):
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.head = head

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _split_timm(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"expected a linear classifier on {type(model).__name__}, got {type(head).__name__}")
    model.reset_classifier(0)
    return model, head


def _split_attr(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Split off a final nn.Linear stored as a common attribute (torchvision, RobustBench models)."""
    for attr in ("fc", "head", "classifier", "linear", "logits", "last_linear"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, head
    raise ValueError(f"cannot find the linear classifier of {type(model).__name__} (looked for fc, head, "
                     f"classifier, linear, logits, last_linear)")


def as_classifier(model: nn.Module, mean: Sequence[float] = (0.0, 0.0, 0.0),
                  std: Sequence[float] = (1.0, 1.0, 1.0)) -> Classifier:
    """`model` as a `Classifier` (normalize -> body -> linear head), which the method APIs work on.
    A `Classifier` is returned as is; a plain timm or torchvision/RobustBench-style model (a final
    `nn.Linear` as `get_classifier()` or as fc/head/classifier/linear/logits/last_linear) is copied
    and split into body and head. The default identity normalisation keeps the model's function:
    pass the model's mean/std to feed it pixels in [0, 1] instead."""
    if isinstance(model, Classifier):
        return model
    model = copy.deepcopy(model)
    body, head = _split_timm(model) if hasattr(model, "get_classifier") and hasattr(model, "reset_classifier") \
        else _split_attr(model)
    return Classifier(body, head, Normalize(mean, std))


def create_backbone(
    name: str,
    source: str = "timm",
    num_classes: int = 1000,
    pretrained: bool = False,
    checkpoint: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    kwargs: dict | None = None,
) -> Classifier:
    """Build a `Classifier` from a timm, torchvision or RobustBench model-zoo name.

    `pretrained` loads the library's weights (needs them cached or a network); `checkpoint` loads a
    local state dict (safetensors or a torch file, read with weights_only=True) of the full
    `Classifier` or of the raw library model.
    """
    kwargs = dict(kwargs or {})
    if source == "timm":
        raw = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        split = _split_timm
    elif source == "torchvision":
        weights = "DEFAULT" if pretrained else None
        raw = torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)
        split = _split_attr
    elif source == "robustbench":
        # a model-zoo entry: its own normalisation is inside, its head fits its dataset
        from rftbench.robust import load_robustbench_model

        raw, split = load_robustbench_model(name, **kwargs), _split_attr
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        raise ValueError(f"unknown backbone source {source!r}; valid: timm, torchvision, robustbench")
    if checkpoint is not None and not _is_classifier_state(checkpoint):
        raw.load_state_dict(load_state(checkpoint))
        checkpoint = None
    body, head = split(raw)
    model = Classifier(body, head, Normalize(mean, std))
    if checkpoint is not None:
        model.load_state_dict(load_state(checkpoint))
    return model


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (weights only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; set backbone.checkpoint to a valid file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _is_classifier_state(path: str | Path) -> bool:
    return any(k.startswith("normalize.") for k in load_state(path))


def set_num_classes(model: Classifier, num_classes: int) -> Classifier:
    """Replace the head by a freshly initialised one with `num_classes` outputs (in place)."""
    model.head = nn.Linear(model.num_features, num_classes)
    return model
