"""CIFAR-10-C / CIFAR-100-C / ImageNet-C test sets in their released on-disk layouts.

RobustBench downloads what is missing (CIFAR-C from Zenodo) and its CIFAR-C loader hard-codes
10,000 images per severity. `load_cifar_c` and `load_imagenet_c` check the files first and raise
FileNotFoundError naming the expected path and where to get the data; they never download. The
corruption names and severities are those of `rftbench.data.corruptions`.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from rftbench.data.corruptions import CORRUPTIONS, SEVERITIES
from rftbench.utils import missing_file

IMAGENET_C_N_MAX = 5000
_CIFAR_C = {  # dataset -> (folder, Zenodo record that holds <folder>.tar)
    "cifar10": ("CIFAR-10-C", "https://zenodo.org/records/2535967"),
    "cifar100": ("CIFAR-100-C", "https://zenodo.org/records/3555552"),
}
_IMAGENET_C_URL = "https://zenodo.org/records/2235448"

class CorruptionSplits(Mapping):
    """Read-only mapping (corruption, severity) -> (images in [0, 1] NCHW float32, int64 labels).

    Each split is read from disk when it is accessed (the full sets do not fit in memory).
    """

    def __init__(self, keys: Sequence[tuple[str, int]], load: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]):
        self._keys = dict.fromkeys(keys)
        self._load = load

    def __getitem__(self, key: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._keys:
            raise KeyError(key)
        return self._load(*key)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _check_severities(severities: Sequence[int]) -> list[int]:
    severities = [int(s) for s in severities]
    if not set(severities) <= set(SEVERITIES):
        raise ValueError(f"severities must be in {SEVERITIES}, got {severities}")
    return severities


def load_cifar_c(
    root: str | Path,
    dataset: str = "cifar10",
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_examples: int | None = None,
) -> CorruptionSplits:
    """CIFAR-10-C / CIFAR-100-C splits from `<root>/CIFAR-10-C/<corruption>.npy` (or CIFAR-100-C).

    Each `<corruption>.npy` is uint8 (5N, H, W, 3), severities 1..5 stacked in blocks of N (N is
    10,000 for the released files), with `labels.npy` of length 5N (or N). A split holds the first
    `n_examples` images of its severity block (all N when None), as RobustBench does.
    """
    if dataset not in _CIFAR_C:
        raise ValueError(f"unknown CIFAR-C dataset {dataset!r}; valid: {', '.join(_CIFAR_C)}")
    severities = _check_severities(severities)
    folder, url = _CIFAR_C[dataset]
    data_dir = Path(root) / folder
    how = f"Download {folder}.tar from {url} and extract it into {Path(root)}."
    if not data_dir.is_dir():
        raise missing_file(data_dir, f"{folder} folder", how)
    labels_path = data_dir / "labels.npy"
    if not labels_path.is_file():
        raise missing_file(labels_path, f"{folder} labels", how)
    labels = np.load(labels_path)
    per_severity = {}
    for corruption in corruptions:
        path = data_dir / f"{corruption}.npy"
        if not path.is_file():
            raise missing_file(path, f"{folder} corruption {corruption!r}", how)
        images = np.load(path, mmap_mode="r")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) % 5:
            raise ValueError(f"{path}: expected uint8 images of shape (5N, H, W, 3), got {images.dtype} {images.shape}")
        if len(labels) not in (len(images), len(images) // 5):
            raise ValueError(f"{labels_path} has {len(labels)} labels; expected {len(images)} or {len(images) // 5}")
        per_severity[corruption] = len(images) // 5

    def load(corruption: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_total = per_severity[corruption]
        n = n_total if n_examples is None else min(n_examples, n_total)
        start = (severity - 1) * n_total
        images = np.load(data_dir / f"{corruption}.npy", mmap_mode="r")[start:start + n]
        y = labels[start:start + n] if len(labels) == 5 * n_total else labels[:n]
        x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(255)
        return x.contiguous(), torch.from_numpy(np.asarray(y)).long()

    return CorruptionSplits([(c, s) for c in corruptions for s in severities], load)


def _robustbench_helper_file(name: str) -> Path:
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("robustbench is not installed; it provides the ImageNet-C 5,000-image list")
    return Path(spec.submodule_search_locations[0]) / "helper_files" / name


def robustbench_imagenet_ids(n: int = IMAGENET_C_N_MAX) -> list[str]:
    """The first `n` (1..5,000) entries, `<wnid>/<file>.JPEG`, of RobustBench's fixed list of ImageNet val
    images (robustbench/helper_files/imagenet_test_image_ids.txt, read from the installed package): the
    images of its ImageNet clean, adversarial and ImageNet-C evaluations."""
    if not 0 < n <= IMAGENET_C_N_MAX:
        raise ValueError(f"RobustBench's ImageNet list has {IMAGENET_C_N_MAX} images: n must be in "
                         f"1..{IMAGENET_C_N_MAX}, got {n}")
    return _robustbench_helper_file("imagenet_test_image_ids.txt").read_text().split()[:n]


def robustbench_class_index() -> dict[str, int]:
    """RobustBench's synset -> standard class index map (helper_files/imagenet_class_to_id_map.json)."""
    return json.loads(_robustbench_helper_file("imagenet_class_to_id_map.json").read_text())


def _imagenet_c_transform():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize([224, 224]), transforms.ToTensor()])


def load_imagenet_c(
    root: str | Path,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_examples: int = IMAGENET_C_N_MAX,
    transform: Callable | None = None,
) -> CorruptionSplits:
    """ImageNet-C splits from `<root>/<corruption>/<severity>/<wnid>/<file>.JPEG`, RobustBench's protocol.

    A split holds the first `n_examples` (at most 5,000) images of RobustBench's fixed list
    (robustbench/helper_files/imagenet_test_image_ids.txt), labelled with the standard ImageNet
    class indices and resized to 224x224 (RobustBench's `Res224`) unless `transform` is given.
    """
    from PIL import Image

    severities = _check_severities(severities)
    transform = transform or _imagenet_c_transform()
    files = robustbench_imagenet_ids(n_examples)
    class_index = robustbench_class_index()
    labels = torch.tensor([class_index[f.split("/")[0]] for f in files])
    how = f"Download ImageNet-C from {_IMAGENET_C_URL} and extract the corruption folders into {Path(root)}."
    for corruption in corruptions:
        for severity in severities:
            folder = Path(root) / corruption / str(severity)
            if not folder.is_dir():
                raise missing_file(folder, f"ImageNet-C {corruption} severity {severity}", how)

    def load(corruption: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for name in files:
            path = Path(root) / corruption / str(severity) / name
            if not path.is_file():
                raise missing_file(path, "ImageNet-C image", how)
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        return torch.stack(images), labels.clone()

    return CorruptionSplits([(c, s) for c in corruptions for s in severities], load)

