"""CLIP backbones through open_clip: the image tower as a `Classifier`, the zero-shot head from the
text tower.

The `Classifier` is normalize (CLIP's mean/std) -> body (the image tower, then L2 normalisation) ->
head (linear). With `head_init=zeroshot` the head is open_clip's own zero-shot classifier
(`open_clip.build_zero_shot_classifier`: per class, the mean over prompt templates of the
L2-normalised text embeddings, L2-normalised again) times CLIP's learned logit scale (plus the
logit bias of SigLIP models), so the logits are exactly those of CLIP's zero-shot evaluation. The text
tower is used once to build the head and is not part of the returned model's modules or state; methods
that train both towers (FLYP) find the full open_clip model (sharing the image tower with `body`) and
the prompts in `model.clip` (a `ClipParts`, not registered as a submodule).

Prompts: suites whose classes are ImageNet classes (`upstream_classes` into ImageNet-1k) use
open_clip's ImageNet class names and the 80 OpenAI ImageNet templates; other suites use their
`class_names` and open_clip's short generic set (`SIMPLE_IMAGENET_TEMPLATES`), unless
`backbone.templates` says otherwise.
"""
from __future__ import annotations

from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from rftbench.classifier import CheckpointError, Classifier, Normalize
from rftbench.data.base import Suite

TEMPLATES = {"openai": open_clip.OPENAI_IMAGENET_TEMPLATES, "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES}


class ClipParts:
    """The full open_clip model behind a CLIP `Classifier` (its `visual` is the classifier's image
    tower) with the architecture name and the head's prompts (class names may be None)."""

    def __init__(self, model: nn.Module, arch: str, names: list[str] | None, templates: Sequence):
        self.model, self.arch, self.names, self.templates = model, arch, names, templates


class ImageEncoder(nn.Module):
    """CLIP's image tower followed by L2 normalisation (the features CLIP compares with text)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x), dim=-1)


def create_open_clip(arch: str, pretrained_tag: str | None, pretrained: bool,
                     checkpoint: str | None = None) -> nn.Module:
    """The full open_clip model (eval mode). Its architecture follows the tag (OpenAI's weights need
    QuickGELU) even when no weights load; weights come from the tag (`pretrained`, open_clip's cache
    or a network) or from a local open_clip checkpoint file (`checkpoint`)."""
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    quick_gelu = False
    if pretrained_tag:
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained_tag)
        if not tag_cfg:
            raise ValueError(f"unknown open_clip pretrained_tag {pretrained_tag!r} for {arch}; valid: "
                             f"{open_clip.list_pretrained_tags_by_model(arch)}")
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    if checkpoint is not None:
        from pathlib import Path

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; set backbone.checkpoint to a "
                                    f"valid open_clip checkpoint file")
        source = checkpoint
    else:
        source = pretrained_tag if pretrained else None
    try:
        model = open_clip.create_model(arch, pretrained=source, force_quick_gelu=quick_gelu, pretrained_text=False)
    except Exception as exc:
        if checkpoint is None:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"backbone.checkpoint={checkpoint} cannot be loaded into open_clip {arch}: "
                              f"{type(exc).__name__}: {first[:300]}. Give an open_clip checkpoint of this "
                              f"architecture (its state dict, e.g. from open_clip.create_model(...).state_dict())"
                              ) from None
    return model.eval()


def preprocess(model: nn.Module) -> dict:
    """open_clip's preprocessing of `model` (size, mean, std, interpolation, ...)."""
    return open_clip.get_model_preprocess_cfg(model)


def image_classifier(model: nn.Module, arch: str, num_classes: int, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Classifier:
    """A `Classifier` over the image tower of `model` (mean/std None: the model's own) with a new head."""
    cfg = preprocess(model)
    mean = cfg["mean"] if mean is None else mean
    std = cfg["std"] if std is None else std
    embed_dim = open_clip.get_model_config(arch)["embed_dim"]
    return Classifier(ImageEncoder(model.visual), nn.Linear(embed_dim, num_classes), Normalize(mean, std))


def create_clip(arch: str, pretrained_tag: str | None, pretrained: bool, checkpoint: str | None = None,
                num_classes: int = 1000, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> Classifier:
    """CLIP's image tower as a `Classifier` with a new `num_classes` head (the text tower dropped)."""
    return image_classifier(create_open_clip(arch, pretrained_tag, pretrained, checkpoint), arch, num_classes,
                            mean, std)


@torch.no_grad()
def zeroshot_head(model: nn.Module, arch: str, class_names: Sequence[str], templates: Sequence,
                  device: torch.device | str = "cpu") -> nn.Linear:
    """The zero-shot head: rows = open_clip's zero-shot classifier x exp(logit_scale), bias = the
    model's logit bias (SigLIP) or 0. `head(normalised image features)` are CLIP's zero-shot logits."""
    model = model.to(device)
    weights = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(arch), list(class_names),
                                                   list(templates), device=device)  # (D, C)
    head = nn.Linear(weights.shape[0], weights.shape[1])
    head.weight.copy_((weights.T * model.logit_scale.exp()).cpu())
    bias = getattr(model, "logit_bias", None)
    head.bias.fill_(float(bias) if bias is not None else 0.0)
    return head


def prompts(suite: Suite, templates: str = "auto") -> tuple[list[str] | None, Sequence]:
    """(class names, templates) for `suite`; names None when the suite has none."""
    if templates not in ("auto", *TEMPLATES):
        raise ValueError(f"backbone.templates={templates!r} not valid; choose auto or one of {sorted(TEMPLATES)}")
    imagenet = suite.meta.get("upstream") == "imagenet" and suite.upstream_classes is not None
    if imagenet:
        names = [open_clip.IMAGENET_CLASSNAMES[i] for i in suite.upstream_classes]
    else:
        names = getattr(suite, "class_names", None)
        names = list(names) if names is not None else None
    if templates == "auto":
        templates = "openai" if imagenet else "simple"
    return names, TEMPLATES[templates]


def build_model(b: DictConfig, suite: Suite, head_init: str, seed: int,
                device: torch.device | str = "cpu") -> Classifier:
    """`backbone` (source open_clip) with its head set up for `suite`: `zeroshot` from the text tower
    (`auto` picks it when the suite's classes have names), `random` a new seeded head."""
    names, templates = prompts(suite, b.get("templates", "auto"))
    if head_init == "auto":
        head_init = "zeroshot" if names is not None else "random"
    if head_init == "zeroshot" and names is None:
        raise ValueError(f"suite.head_init=zeroshot with CLIP needs class names; suite {suite.name} declares "
                         f"none (Suite.class_names). Use suite.head_init=random")
    if names is not None and len(names) != suite.num_classes:
        raise ValueError(f"suite {suite.name}: {len(names)} class names for {suite.num_classes} classes")
    full = create_open_clip(b.arch, b.get("pretrained_tag"), b.pretrained, b.checkpoint)
    size = b.get("input", {}).get("size") if b.get("input") else None
    native = preprocess(full)["size"]
    native = native[0] if isinstance(native, (tuple, list)) else native
    if size is not None and int(size) != int(native):
        raise ValueError(f"backbone {b.name}: input.size={size} but {b.arch} takes {native} px images; "
                         f"set backbone.input.size={native}")
    mean, std = (list(b[k]) if b.get(k) is not None else None for k in ("mean", "std"))
    model = image_classifier(full, b.arch, suite.num_classes, mean, std)
    object.__setattr__(model, "clip", ClipParts(full, b.arch, names, templates))  # not a submodule
    if head_init == "zeroshot":
        model.head = zeroshot_head(full, b.arch, names, templates, device)
        model.head_origin = "zeroshot"
    else:
        torch.manual_seed(seed)
        model.head = nn.Linear(model.num_features, suite.num_classes)
        model.head_origin = "random"
    full.cpu()
    return model.cpu()
