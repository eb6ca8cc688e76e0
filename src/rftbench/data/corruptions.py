"""ImageNet-C corruptions (Hendrycks & Dietterich 2019) via the `imagecorruptions-imaug` package,
seeded per image, with an on-disk cache of whole corrupted test sets.

Images are quantised to uint8 (round(255 * x)) before corrupting, as the library requires, and
corrupted images come back as float32 in [0, 1] (multiples of 1/255). The library's parameters are
ImageNet-C's (tuned for 224x224 images), applied at the images' own size.

One deviation from the library: when `spatter` draws an empty liquid layer (about 2% of 32x32
images at severity 1), the library divides 0 by 0 and casts NaN to uint8; such an image is
returned unchanged instead (no spatter drawn).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from imagecorruptions import corrupt as _library_corrupt

from rftbench.data.base import Split
from rftbench.utils import load_cached, save_cached, stable_hash, tensor_digest

from rftbench.progress import bar

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# The only definition of these lists: `rftbench.metrics` and the CIFAR-C / ImageNet-C loaders import
# them, and the configs refer to them through `${rftbench.corruptions:}` (the 15 benchmark ones),
# `${rftbench.corruptions:extra}` (the 4 held-out ones) and `${rftbench.severities:}`, resolvers
# registered when the `rftbench` package is imported.
CORRUPTION_SETS: dict[str, tuple[str, ...]] = {"benchmark": CORRUPTIONS, "extra": EXTRA_CORRUPTIONS,
                                               "all": ALL_CORRUPTIONS}
MIN_SIZE = 32  # the library rejects smaller images
CACHE_FORMAT_VERSION = 1
LIBRARY_VERSION = importlib.metadata.version("imagecorruptions-imaug")

# These two draw from a generator built from their `seed` argument (a fresh, unseeded one when it is
# None) instead of numpy's global RNG, so the per-image seed is passed to them explicitly.
_SEED_ARGUMENT = frozenset({"impulse_noise", "glass_blur"})


def _check(corruption: str, severity: int) -> None:
    if corruption not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(ALL_CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def image_seed(seed: int, index: int, corruption: str, severity: int) -> int:
    """The 32-bit seed of image `index` of a batch for one (corruption, severity)."""
    entropy = [seed, index, ALL_CORRUPTIONS.index(corruption), severity]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if min(images.shape[2:]) < MIN_SIZE:
        raise ValueError(f"images must be at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(images.shape[2:])}")
    pixels = (images.detach().to("cpu", torch.float64).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def _corrupt_uint8(pixels: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt (N, H, W, 3) uint8 images; numpy's global RNG is restored afterwards."""
    out = np.empty_like(pixels)
    state = np.random.get_state()
    try:
        for i, image in enumerate(pixels):
            s = image_seed(seed, i, corruption, severity)
            np.random.seed(s)
            kwargs = {"seed": s} if corruption in _SEED_ARGUMENT else {}
            try:
                with np.errstate(invalid="raise" if corruption == "spatter" else "warn"):
                    out[i] = _library_corrupt(image, severity=severity, corruption_name=corruption, **kwargs)
            except FloatingPointError:  # spatter with an empty liquid layer: nothing to draw
                out[i] = image
    finally:
        np.random.set_state(state)
    return out


def corrupt(images: torch.Tensor, corruption: str, severity: int, seed: int) -> torch.Tensor:
    """Corrupt images (N, 3, H, W) in [0, 1], H, W >= 32; float32 of the same shape in [0, 1].

    Image i's randomness depends only on (seed, i, corruption, severity), so a batch's results do
    not depend on what follows it.
    """
    _check(corruption, severity)
    out = _corrupt_uint8(_to_uint8(images), corruption, severity, seed)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255.0)


def cache_key(pixels: np.ndarray, corruptions: Sequence[str], severities: Sequence[int], seed: int) -> str:
    """Content hash naming the cache file of one corrupted set (`rftbench.utils` hashers)."""
    spec = dict(pixels=tensor_digest(torch.from_numpy(np.ascontiguousarray(pixels))),
                corruptions=list(corruptions), severities=[int(s) for s in severities], seed=seed,
                library=LIBRARY_VERSION, format=CACHE_FORMAT_VERSION)
    return stable_hash(spec, length=32)


def corrupted_set(images: torch.Tensor, corruptions: Sequence[str], severities: Sequence[int], seed: int,
                  cache_dir: str | os.PathLike) -> dict[tuple[str, int], torch.Tensor]:
    """All (corruption, severity) versions of `images`, each as `corrupt` would return it.

    The whole set is cached as one safetensors file of uint8 (N, 3, H, W) tensors (keys
    "<corruption>/<severity>") in `cache_dir`, named by `cache_key`; a later call with the same
    images, corruptions, severities, seed and library version loads it instead of recomputing.
    """
    corruptions, severities = list(corruptions), [int(s) for s in severities]
    for name in corruptions:
        for severity in severities:
            _check(name, severity)
    pixels = _to_uint8(images)
    path = Path(cache_dir) / f"corrupted-{cache_key(pixels, corruptions, severities, seed)}.safetensors"
    names = {(c, s): f"{c}/{s}" for c in corruptions for s in severities}
    cached = load_cached(path)
    if cached is not None:
        stored = cached[0]
    else:
        stored = {
            key: torch.from_numpy(_corrupt_uint8(pixels, c, s, seed)).permute(0, 3, 1, 2).contiguous()
            for (c, s), key in bar(names.items(), "corrupting", total=len(names))
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = dict(corruptions=json.dumps(corruptions), severities=json.dumps(severities),
                        seed=str(seed), library=LIBRARY_VERSION, format=str(CACHE_FORMAT_VERSION))
        save_cached(path, stored, metadata)
    return {cs: stored[key].float().div(255.0) for cs, key in names.items()}


def corrupted_splits(split: Split, corruptions: Sequence[str], severity: int, seed: int,
                     cache_dir: str | os.PathLike, *, role: str, name: str) -> dict[str, Split]:
    """`split` under each corruption at `severity`, labels unchanged (`corrupted_set`, cached by
    content hash); `name` is formatted with `corruption` and `severity` to name each copy.

    An in-memory split gives in-memory float32 copies. A streamed split is read once at its native
    resolution (its dataset without transforms: the images must share one size, as CIFAR's do),
    corrupted there, and each copy is kept as uint8 pixels in a streamed split with the split's
    transforms, so that it reaches the model at the same size (and, on a train split, with the same
    augmentation) as the clean split: a quarter of float32's memory (~0.12 GB per copy of CIFAR's
    40,000 training images, after a transient float32 read of ~0.5 GB).
    """
    from rftbench.data.base import UInt8Images

    source = split if split.in_memory else Split(split.name, split.role, dataset=split.dataset).materialize()
    sets = corrupted_set(source.x, corruptions, [severity], seed, cache_dir)
    out = {}
    for c in corruptions:
        tags = dict(name=name.format(corruption=c, severity=severity), role=role, shift="corruption",
                    corruption=c, severity=severity)
        cx = sets[(c, severity)]
        if split.in_memory:
            out[c] = Split(x=cx, y=source.y, **tags)
        else:  # exact: corrupted images are multiples of 1/255
            pixels = cx.mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            out[c] = Split(dataset=UInt8Images(pixels, source.y.numpy()), transform=split.transform,
                           train_transform=split.train_transform if role == "train" else None, **tags)
    return out
