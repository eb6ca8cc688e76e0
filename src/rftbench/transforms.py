"""Per-image transforms of streamed suites: training augmentation and evaluation resize/crop.

Both end in float pixels in [0, 1]; normalisation stays inside the model. The evaluation transform
follows the backbone's `InputSpec` (size, interpolation, crop ratio). The augmentation is the
suite's (`suite.train_transform`), the same for every method; `rftbench.data.base.batches` seeds it
per trial seed, epoch and image.

    suite.train_transform: {name: random_resized_crop, scale: [0.08, 1.0], flip: true}  # ImageNet-like
                           {name: crop_flip, padding: 4, flip: true}                    # CIFAR
                           {name: none}
    suite.eval_transform:  {name: center_crop}   # resize to size / crop_pct, centre crop (ImageNet-like)
                           {name: resize}        # whole image to size x size (low-resolution datasets)
                           {name: none}          # images as stored
    suite.decode:          cpu | cuda            # folder suites: where JPEGs are decoded and these run

The same transform objects run on PIL images in the DataLoader workers (`cpu`) and on decoded uint8
tensors on the GPU (`cuda`, `rftbench.data.folders.device_batch`): the random parameters are drawn
from the same seeded CPU generator, so crops and flips are the same; only the pixel values of the
decode and the resize differ slightly.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torchvision.transforms import InterpolationMode, v2

from rftbench.backbones import InputSpec
from rftbench.data.base import Suite

TRAIN = ("random_resized_crop", "crop_flip", "none")
EVAL = ("center_crop", "resize", "none")


def to_float() -> v2.Compose:
    """PIL image or uint8/float tensor -> float (C, H, W) in [0, 1], RGB."""
    return v2.Compose([v2.ToImage(), v2.RGB(), v2.ToDtype(torch.float32, scale=True)])


def _mode(spec: InputSpec) -> InterpolationMode:
    return InterpolationMode(spec.interpolation)


def _options(cfg: Mapping, allowed: set[str], kind: str, names: tuple[str, ...]) -> tuple[str, dict]:
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in names:
        raise ValueError(f"suite.{kind}.name={name!r}; valid: {list(names)}")
    if set(cfg) - allowed:
        raise ValueError(f"suite.{kind} ({name}) has unknown keys {sorted(set(cfg) - allowed)}; valid: {sorted(allowed)}")
    return name, cfg


def eval_transform(cfg: Mapping, spec: InputSpec) -> Callable:
    """Evaluation transform: `center_crop` (shorter side to int(size / crop_pct), centre crop), `resize`
    (to size x size) or `none`, with the backbone's interpolation, then to float."""
    name, _ = _options(cfg, set(), "eval_transform", EVAL)
    if name == "none":
        return to_float()
    if name == "resize":
        geometry = [v2.Resize((spec.size, spec.size), interpolation=_mode(spec), antialias=True)]
    else:
        resize = int(spec.size / spec.crop_pct)  # timm's rule (math.floor)
        geometry = [v2.Resize(resize, interpolation=_mode(spec), antialias=True), v2.CenterCrop(spec.size)]
    return v2.Compose([v2.ToImage(), v2.RGB(), *geometry, v2.ToDtype(torch.float32, scale=True)])


def train_transform(cfg: Mapping, spec: InputSpec, eval_cfg: Mapping) -> Callable | None:
    """Training augmentation ending at the evaluation geometry; None for `none` (train images then
    get the evaluation transform)."""
    name, opt = _options(cfg, {"scale", "ratio", "flip", "padding"}, "train_transform", TRAIN)
    flip = [v2.RandomHorizontalFlip()] if opt.get("flip", True) else []
    if name == "none":
        return None
    if name == "random_resized_crop":
        scale = tuple(opt.get("scale", (0.08, 1.0)))
        ratio = tuple(opt.get("ratio", (3 / 4, 4 / 3)))
        return v2.Compose([v2.ToImage(), v2.RGB(), v2.RandomResizedCrop(spec.size, scale=scale, ratio=ratio,
                                                                        interpolation=_mode(spec), antialias=True),
                           *flip, v2.ToDtype(torch.float32, scale=True)])
    # crop_flip: random crop at the native size with zero padding, flip, then the evaluation geometry
    return v2.Compose([v2.ToImage(), v2.RGB(), _NativeRandomCrop(int(opt.get("padding", 4))), *flip,
                       eval_transform(eval_cfg, spec)])


class _NativeRandomCrop(torch.nn.Module):
    """RandomCrop at the image's own size after zero-padding by `padding` pixels (CIFAR's recipe)."""

    def __init__(self, padding: int):
        super().__init__()
        self.padding = padding

    def forward(self, x):
        h, w = x.shape[-2:]
        return v2.RandomCrop((h, w), padding=self.padding)(x)


def attach(suite: Suite, train_cfg: Mapping, eval_cfg: Mapping, spec: InputSpec, decode: str = "cpu") -> Suite:
    """Set the evaluation transform on every streamed split and the augmentation on the train split,
    and where they decode (`suite.decode`: `rftbench.data.folders.decoder_for`)."""
    from rftbench.data.folders import decoder_for

    ev = eval_transform(eval_cfg, spec)
    tr = train_transform(train_cfg, spec, eval_cfg)
    streamed = [split for split in suite.splits.values() if not split.in_memory]
    if decode != "cpu" and not streamed:
        raise ValueError(f"suite.decode={decode}: suite {suite.name} keeps its images in memory, there is nothing "
                         f"to decode; use suite.decode=cpu")
    for split in streamed:
        split.decoder = decoder_for(decode, split)
        # a split may fix its own geometry (e.g. ImageNet-C's 224 px crops are only resized)
        split.transform = eval_transform(split.meta["eval_transform"], spec) if "eval_transform" in split.meta else ev
        split.train_transform = tr if split.role == "train" else None
        split._loaders.clear()
    return suite
