"""Backbones: timm / torchvision models wrapped as `Classifier` (pixels in [0, 1] -> logits).

Every model the benchmark adapts is a `Classifier`: input normalisation inside the model, a body
that maps normalised images to pooled features, and a linear head. Methods rely on these three
parts (`normalize`, `body`, `head`) and on `features(x)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

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


@dataclass(frozen=True)
class InputSpec:
    """How images reach a backbone: square side in pixels, resize interpolation, and the centre-crop
    ratio of evaluation (resize the shorter side to size / crop_pct, then crop size x size)."""

    size: int
    interpolation: str
    crop_pct: float


INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# RobustBench's preprocessing per dataset (its Res256Crop224 for ImageNet, native 32 px for CIFAR)
ROBUSTBENCH_INPUT = {"cifar10": InputSpec(32, "bilinear", 1.0), "cifar100": InputSpec(32, "bilinear", 1.0),
                     "imagenet": InputSpec(224, "bilinear", 0.875)}


def library_input_spec(source: str, arch: str, kwargs: Mapping | None = None) -> InputSpec:
    """The input spec the library publishes for `arch`: timm's `pretrained_cfg`, torchvision's
    weights metadata (`DEFAULT` weights' transforms), RobustBench's per-dataset preprocessing."""
    if source == "timm":
        cfg = timm.get_pretrained_cfg(arch)
        if cfg is None:
            raise ValueError(f"timm has no pretrained_cfg for {arch!r}; set backbone.input.{{size, interpolation, crop_pct}}")
        return InputSpec(int(cfg.input_size[-1]), str(cfg.interpolation), float(cfg.crop_pct))
    if source == "torchvision":
        t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        return InputSpec(crop, t.interpolation.value, crop / resize)
    if source == "robustbench":
        dataset = dict(kwargs or {}).get("dataset", "cifar10")
        if dataset not in ROBUSTBENCH_INPUT:
            raise ValueError(f"no RobustBench input spec for dataset {dataset!r}; set backbone.input")
        return ROBUSTBENCH_INPUT[dataset]
    raise ValueError(f"unknown backbone source {source!r}; valid: timm, torchvision, robustbench")


def input_spec(backbone_cfg: Mapping) -> InputSpec:
    """The backbone config's `input: {size, interpolation, crop_pct}`, each null value read from the
    library's metadata for `arch` (`library_input_spec`)."""
    given = dict(backbone_cfg.get("input") or {})
    unknown = set(given) - {"size", "interpolation", "crop_pct"}
    if unknown:
        raise ValueError(f"backbone.input has unknown keys {sorted(unknown)}; valid: size, interpolation, crop_pct")
    if any(given.get(k) is None for k in ("size", "interpolation", "crop_pct")):
        lib = library_input_spec(backbone_cfg["source"], backbone_cfg["arch"], backbone_cfg.get("kwargs"))
        given = {k: lib.__dict__[k] if given.get(k) is None else given[k] for k in ("size", "interpolation", "crop_pct")}
    spec = InputSpec(int(given["size"]), str(given["interpolation"]), float(given["crop_pct"]))
    if spec.interpolation not in INTERPOLATIONS or not 0 < spec.crop_pct <= 1 or spec.size < 1:
        raise ValueError(f"backbone.input {spec} invalid: interpolation in {INTERPOLATIONS}, 0 < crop_pct <= 1, size >= 1")
    return spec
