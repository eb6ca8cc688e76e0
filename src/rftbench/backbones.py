"""Backbones: timm / torchvision / open_clip models wrapped as `Classifier` (pixels in [0, 1] -> logits).

Every model the benchmark adapts is a `Classifier`: input normalisation inside the model, a body
that maps normalised images to pooled features, and a linear head. Methods rely on these three
parts (`normalize`, `body`, `head`) and on `features(x)`.
"""
from __future__ import annotations

import copy
import difflib
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlparse

import timm
import torch
import torchvision
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU}  # backbone.activation: what replaces every GELU (ReLU Swin of the CT paper)

from rftbench.classifier import (  # noqa: F401 (re-exported: the runner's and the tests' names)
    HEAD_ORIGINS, IMAGENET_MEAN, IMAGENET_STD, CheckpointError, Classifier, Normalize)


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
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    kwargs: dict | None = None,
    activation: str | None = None,
    pretrained_tag: str | None = None,
) -> Classifier:
    """Build a `Classifier` from a timm, torchvision, open_clip or RobustBench model-zoo name.

    `pretrained` loads the library's weights (needs them cached or a network); `checkpoint` loads a
    local state dict (safetensors or a torch file, read with weights_only=True) of the full
    `Classifier` or of the raw library model. timm: `mean`/`std` None take the model's
    `pretrained_cfg`; `activation` (e.g. "relu") replaces every GELU module, for architectures
    trained with that activation (weights from `checkpoint` only). open_clip: see `rftbench.clip`.
    """
    kwargs = dict(kwargs or {})
    if source == "open_clip":
        from rftbench.clip import create_clip

        return create_clip(name, pretrained_tag, pretrained, checkpoint, num_classes, mean, std)
    if activation is not None and pretrained:
        raise ValueError(f"backbone {name} with activation={activation}: the library's pretrained weights were "
                         f"trained with GELU; set pretrained=false and backbone.checkpoint to weights trained "
                         f"with {activation}")
    pretrained = pretrained and checkpoint is None  # a checkpoint replaces the library's weights
    if pretrained and source in ("timm", "torchvision"):
        require_weights(name, source)
    if source == "timm":
        require_timm_model(name)
        raw = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        split = _split_timm
        if mean is None or std is None:  # the library's preprocessing for this model
            mean, std = raw.pretrained_cfg["mean"], raw.pretrained_cfg["std"]
    elif source == "torchvision":
        weights = "DEFAULT" if pretrained else None
        raw = torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)
        split = _split_attr
    elif source == "robustbench":
        # a model-zoo entry: its own normalisation is inside, its head fits its dataset
        from rftbench.zoo import load_robustbench_model

        raw, split = load_robustbench_model(name, **kwargs), _split_attr
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        raise ValueError(f"unknown backbone source {source!r}; valid: timm, torchvision, robustbench, open_clip")
    if mean is None or std is None:
        raise ValueError(f"backbone {name} ({source}): set backbone.mean and backbone.std")
    if activation is not None:
        replace_activation(raw, nn.GELU, _activation(activation))
    if checkpoint is not None and not _is_classifier_state(checkpoint):
        _load_raw(raw, load_state(checkpoint), source, f"backbone.checkpoint={checkpoint}")
        checkpoint = None
    body, head = split(raw)
    model = Classifier(body, head, Normalize(mean, std))
    if checkpoint is not None:
        load_into(model, load_state(checkpoint), f"backbone.checkpoint={checkpoint}")
    return model


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"backbone.activation={name!r} not supported; valid: {sorted(ACTIVATIONS)} or null")
    return ACTIVATIONS[name]


def replace_activation(model: nn.Module, old: type[nn.Module], new: type[nn.Module]) -> int:
    """Replace every `old` activation module of `model` by a fresh `new()` in place; returns the count."""
    targets = [name for name, m in model.named_modules() if isinstance(m, old)]
    for name in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new())
    if not targets:
        raise ValueError(f"{type(model).__name__} has no {old.__name__} modules to replace by {new.__name__}")
    return len(targets)


def mismatch(module: nn.Module, state: dict[str, torch.Tensor], examples: int = 3) -> str:
    """How `state` does not fit `module`: counts (and a few names) of missing, unexpected and
    other-shape keys; '' when it fits."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:examples])})"
             for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("keys of another shape", shapes)) if keys]
    return "; ".join(parts)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`module.load_state_dict(state)`, or one `CheckpointError` line naming `what` and the mismatch."""
    problem = mismatch(module, state)
    if problem:
        raise CheckpointError(f"{what} does not fit the backbone {type(module).__name__}: {problem}; is it a "
                              f"checkpoint of another architecture (backbone.arch) or with another head size?")
    module.load_state_dict(state)


def _load_raw(raw: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load a state dict of the library model; for timm, a checkpoint in the architecture's original
    layout (e.g. Microsoft's Swin releases) goes through timm's own `checkpoint_filter_fn`."""
    convert = getattr(sys.modules[type(raw).__module__], "checkpoint_filter_fn", None)
    if mismatch(raw, state) and source == "timm" and convert is not None:
        try:
            state = convert(state, raw)
        except Exception:  # not in the original layout either: report the mismatch of the file itself
            pass
    load_into(raw, state, what)
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"backbone.checkpoint={path} is refused by torch.load(weights_only=True), which "
                              f"loads tensors only: the file also holds Python objects ({why}). Save its state "
                              f"dict alone (torch.save(model.state_dict(), f)) or as safetensors") from None
    if isinstance(state, dict):  # {"state_dict": ...} (Lightning, ...) or {"model": ...} (Swin, DeiT releases)
        return next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    return state


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


def require_timm_model(arch: str) -> None:
    """A clear error, with timm's closest names, when timm has no architecture `arch`."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; timm.list_models('<pattern>') lists them"
        raise ValueError(f"timm has no model {arch!r} (backbone.arch){hint}")


def library_input_spec(source: str, arch: str, kwargs: Mapping | None = None) -> InputSpec:
    """The input spec the library publishes for `arch`: timm's `pretrained_cfg`, torchvision's
    weights metadata (`DEFAULT` weights' transforms), RobustBench's per-dataset preprocessing."""
    if source == "timm":
        require_timm_model(arch)
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
