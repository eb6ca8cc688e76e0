"""Backbones: timm / torchvision models wrapped as `Classifier` (pixels in [0, 1] -> logits).

Every model the benchmark adapts is a `Classifier`: input normalisation inside the model, a body
that maps normalised images to pooled features, and a linear head. Methods rely on these three
parts (`normalize`, `body`, `head`) and on `features(x)`.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

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
    pretrained = pretrained and checkpoint is None  # a checkpoint replaces the library's weights
    if pretrained and source in ("timm", "torchvision"):
        require_weights(name, source)
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


class WeightsUnavailable(RuntimeError):
    """Pre-trained weights are neither cached nor downloadable (offline)."""


def weights_location(name: str, source: str) -> tuple[Path | None, str | None]:
    """(the cached weights file or None, where they are looked for) of a timm / torchvision model;
    (None, None) when the library has no weights to look up."""
    if source == "timm":
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            return None, None
        if cfg.hf_hub_id:
            from huggingface_hub import constants, try_to_load_from_cache

            repo = cfg.hf_hub_id.split("@")[0]
            for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                hit = try_to_load_from_cache(repo, filename)
                if isinstance(hit, str):
                    return Path(hit), hit
            return None, str(Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}")
        url = cfg.url
    else:
        try:
            url = torchvision.models.get_model_weights(name).DEFAULT.url
        except (ValueError, AttributeError):
            return None, None
    if not url:
        return None, None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    return (path if path.exists() else None), str(path)


def online(host: str = "huggingface.co", timeout: float = 2.5) -> bool:
    """False under HF_HUB_OFFLINE=1, or when `host` does not answer within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_weights(name: str, source: str) -> None:
    """Fail at once (`WeightsUnavailable`) when `name`'s pre-trained weights are not cached and this
    machine is offline, instead of waiting on the download's retries."""
    cached, where = weights_location(name, source)
    if cached is not None or where is None:
        return
    host = "huggingface.co" if source == "timm" and "models--" in where else "download.pytorch.org"
    if not online(host):
        raise WeightsUnavailable(
            f"no internet and no cached weights for {source} model {name} (looked in {where}); download "
            f"them on a machine with internet, or set backbone.checkpoint=<file> (or backbone.pretrained=false)")


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
