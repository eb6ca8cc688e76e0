"""Image files on disk as map-style datasets: `(path, label)` lists read lazily as RGB PIL images.

Shared by the folder-based suites (ImageNet and its shifts, DomainNet). Labels always come from an
explicit class index (a shipped synset list, a split file), never from the folders that happen to be
present, so a partial tree keeps the pre-trained head's indices. With `suite.decode=cuda` the
DataLoader workers only read the files' bytes and the JPEGs are decoded on the GPU (`device_batch`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

from rftbench.data.base import ImageFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFiles(Dataset):
    """`samples`: [(path, label)]; items are (PIL RGB image, label); `targets` lists the labels.
    `border`: pixels a subclass cuts off every side of its images (ObjectNet's frame), read by the
    device-decoding path, which crops the decoded tensor instead."""

    border = 0

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return read_rgb(path), label


def read_rgb(path: str) -> Image.Image:
    """The image file at `path` decoded by PIL, as RGB; an `ImageFileError` naming it when it cannot be."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated, empty or not an image
        raise ImageFileError(f"cannot read image {path}: {type(exc).__name__}: {exc}; replace or remove "
                             f"the file (`rftbench data verify` lists the files of each split)") from None


def hidden(name: str) -> bool:
    """Hidden entries and macOS AppleDouble files (`.DS_Store`, `.ipynb_checkpoints`, `._x.JPEG`): never data."""
    return name.startswith(".")


def list_images(folder: str | Path) -> list[str]:
    """Image files directly inside `folder`, sorted by name (hidden and `._*` files ignored)."""
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and not hidden(e.name)
                      and e.name.lower().endswith(IMAGE_EXTENSIONS))


def class_folders(root: str | Path, class_index: dict[str, int]) -> list[tuple[str, int]]:
    """Samples of `root/<class>/<image>` for the class folders that exist, labelled by `class_index`
    (folders not in the index, or images directly in `root`, are an error: a wrong root or a foreign
    layout)."""
    root = Path(root)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not hidden(p.name))
    if not found and list_images(root):  # e.g. ILSVRC2012 val as its tarball unpacks
        raise FileNotFoundError(f"{root}: the images lie directly in the folder, not in one folder per class "
                                f"(expected {root}/{next(iter(class_index))}/<image>): sort them into class "
                                f"folders; `rftbench data verify` says how")
    unknown = [name for name in found if name not in class_index]
    if unknown:
        raise ValueError(f"{root}: folders {unknown[:5]} are not classes of this dataset "
                         f"(expected names such as {next(iter(class_index))!r}); check the path")
    return [(path, class_index[name]) for name in found for path in list_images(root / name)]


# ---- decoding on the device (suite.decode=cuda) ---------------------------------------------------
# Workers only read file bytes; the main process decodes each batch's JPEGs with one batched
# `torchvision.io.decode_jpeg(..., device=...)` call and runs the split's transform on the decoded
# tensors there. Other files (PNG, CMYK JPEGs, anything not a 1- or 3-component JPEG) are decoded by
# PIL in the worker, exactly as with suite.decode=cpu.

DECODE = ("cpu", "cuda")  # suite.decode
JPEG_SOI = b"\xff\xd8\xff"
JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})  # SOFn markers


class Encoded(NamedTuple):
    """One image as a worker hands it over: `data` is a JPEG's bytes (1-D uint8) to decode on the
    device, then less `border` pixels on every side; or the (3, H, W) uint8 image PIL decoded (border
    already cut)."""

    data: torch.Tensor
    label: int
    seed: int | None
    path: str
    border: int


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a JPEG stream (1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK) read from its frame
    header; None when `data` is not a JPEG or has no frame header before its end."""
    if not data.startswith(JPEG_SOI):
        return None
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in JPEG_FRAMES:
            return data[i + 9] if i + 9 < len(data) else None
        else:  # a segment: FF, marker, 2-byte big-endian length (itself included), payload
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def image_source(dataset: Dataset, i: int) -> tuple[ImageFiles, int]:
    """The `ImageFiles` behind a split's dataset (through `Subset`s) and the index of its item `i` there."""
    while isinstance(dataset, Subset):
        dataset, i = dataset.dataset, int(dataset.indices[i])
    if not isinstance(dataset, ImageFiles):
        raise TypeError(f"decoding on the device needs image files (ImageFiles), not {type(dataset).__name__}")
    return dataset, i


def is_image_files(dataset: Dataset) -> bool:
    """Whether the items of `dataset` are `ImageFiles`' (through `Subset`s)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, ImageFiles)


class EncodedFiles(Dataset):
    """A split's image files as `Encoded` items, for DataLoader workers that only read; keys are
    `(index, seed or None)` as for `rftbench.data.base.Transformed`."""

    def __init__(self, dataset: Dataset, split: str = ""):
        self.dataset, self.split = dataset, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int | None]) -> Encoded:
        i, seed = key
        files, j = image_source(self.dataset, i)
        path, label = files.samples[j]
        try:
            data = read_bytes(path)
            if jpeg_components(data) in (1, 3):
                return Encoded(torch.frombuffer(data, dtype=torch.uint8), int(label), seed, path, files.border)
            image, _ = files[j]
        except ImageFileError as exc:  # name the split too
            raise ImageFileError(f"{exc} (split {self.split})") from None
        return Encoded(pil_to_tensor(image), int(label), seed, path, 0)


def read_bytes(path: str) -> bytearray:
    try:
        with open(path, "rb") as f:
            return bytearray(f.read())
    except OSError as exc:
        raise ImageFileError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def _decode_jpeg(data: list[torch.Tensor], device: str | torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchCodec")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(item: Encoded, device: str | torch.device) -> torch.Tensor:
    """One JPEG on `device`, or by PIL when the device's decoder rejects it (PIL's error names the file)."""
    try:
        return _decode_jpeg([item.data], device)[0]
    except RuntimeError:
        return pil_to_tensor(read_rgb(item.path)).to(device)


def decode_jpegs(items: list[Encoded], device: str | torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB images of the items' JPEG bytes, decoded on `device` in one batched call (the
    batch failing: file by file, `_decode_one`), less each item's `border`."""
    if not items:
        return []
    try:
        images = _decode_jpeg([it.data for it in items], device)
    except RuntimeError:  # one bad file fails the whole call: find it
        images = [_decode_one(it, device) for it in items]
    return [x[:, it.border:x.shape[1] - it.border, it.border:x.shape[2] - it.border] if it.border else x
            for x, it in zip(images, items)]


def device_batch(items: list[Encoded], transform: Callable | None,
                 device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a batch of worker items: the JPEGs decoded on `device` (`decode_jpegs`), the
    others moved there, then each image transformed there under its own seed (as the workers do with
    suite.decode=cpu: `rftbench.utils.seeded`), stacked; labels on the CPU."""
    from rftbench.utils import seeded

    jpegs = [k for k, it in enumerate(items) if it.data.dim() == 1]
    images = [it.data.to(device) if it.data.dim() == 3 else None for it in items]
    for k, image in zip(jpegs, decode_jpegs([items[k] for k in jpegs], device)):
        images[k] = image
    x = torch.stack([seeded(transform, image, it.seed) for image, it in zip(images, items)])
    return x.as_subclass(torch.Tensor), torch.tensor([it.label for it in items])


@dataclass(frozen=True)
class DeviceDecoder:
    """`Split.decoder` of suite.decode=cuda: the workers' dataset (`EncodedFiles`) and the main process's
    decode + transform of each batch on `device` (`device_batch`)."""

    device: str

    def dataset(self, dataset: Dataset, split: str) -> Dataset:
        return EncodedFiles(dataset, split)

    def batch(self, items: list[Encoded], transform: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
        return device_batch(items, transform, self.device)


def decoder_for(decode: str, split) -> DeviceDecoder | None:
    """`Split.decoder` for `suite.decode`: None for `cpu` (the workers decode), a `DeviceDecoder` for a
    split of image files; another kind of streamed split is an error naming the key."""
    if decode not in DECODE:
        raise ValueError(f"suite.decode={decode!r}; valid: {list(DECODE)}")
    if decode == "cpu":
        return None
    if not is_image_files(split.dataset):
        raise ValueError(f"suite.decode=cuda decodes image files on the GPU, and split {split.name} streams a "
                         f"{type(split.dataset).__name__}; use suite.decode=cpu for this suite")
    return DeviceDecoder(decode)
