"""CIFAR-10 / CIFAR-100 suites read from the official python-pickle archives (no download here).

Layout expected under `root` (as torchvision's CIFAR10/CIFAR100 extract them):
    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python/{train, test, meta}
OOD corruption splits come from CIFAR-10-C / CIFAR-100-C (`corruption_root`) through
`rftbench.robust.load_cifar_c`. Images stay uint8 in memory and are served as float [0, 1] by a
Dataset, so batches stream through DataLoader workers like any on-disk suite.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from rftbench.data.base import Split, Suite, stratified_split

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
HOW_TO_GET = ("download the python version from https://www.cs.toronto.edu/~kriz/cifar.html (or "
              "torchvision.datasets.CIFAR10(root, download=True) on a machine with internet) and set "
              "suite.build.root")


# The only globals a CIFAR python-pickle needs: NumPy array reconstruction (official archives:
# numpy.core.multiarray._reconstruct, ndarray, dtype; files re-pickled by Python 3 / NumPy 2 use
# their numpy._core names, _frombuffer and _codecs.encode for bytes). Nothing else is loaded.
_SAFE_GLOBALS = {
    **{(mod, "_reconstruct"): ("numpy._core.multiarray", "_reconstruct")
       for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "_frombuffer"): ("numpy._core.numeric", "_frombuffer")
       for mod in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only dicts, lists, bytes, str, numbers and NumPy arrays (`_SAFE_GLOBALS`)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        import importlib

        mod, attr = _SAFE_GLOBALS[(module, name)]
        return getattr(importlib.import_module(mod), attr)


def load_pickle(path: Path) -> dict:
    """One CIFAR batch file, unpickled by `_CifarUnpickler`; a truncated, garbled or crafted file
    raises a ValueError naming it."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused global"):
            raise ValueError(f"{path} is not an official CIFAR file: it asks to load code ({exc}); "
                             f"replace it by re-extracting the official archive ({HOW_TO_GET})") from None
        raise ValueError(f"{path} is truncated or corrupt ({exc}); re-extract the archive "
                         f"({HOW_TO_GET})") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError) as exc:
        raise ValueError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); re-extract the "
                         f"archive ({HOW_TO_GET})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR batch (a {type(d).__name__}, not a dict); re-extract the "
                         f"archive ({HOW_TO_GET})")
    return d


class UInt8Images(Dataset):
    """(N, H, W, C) uint8 images -> (C, H, W) float in [0, 1], with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).float().div_(255)
        return x, int(self.labels[i])


def read_cifar(root: str | Path, dataset: str = "cifar10") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images NHWC uint8, labels), 'test': ...} from the python-pickle archives."""
    if dataset not in LAYOUT:
        raise ValueError(f"unknown CIFAR dataset {dataset!r}; valid: {sorted(LAYOUT)}")
    folder, train_files, test_files, label_key, _ = LAYOUT[dataset]
    base = Path(root) / folder
    if not base.is_dir():
        raise FileNotFoundError(f"{dataset} not found: expected the folder {base}; {HOW_TO_GET}")
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = [], []
        for name in files:
            path = base / name
            if not path.exists():
                raise FileNotFoundError(f"{dataset}: missing {path}; {HOW_TO_GET}")
            d = load_pickle(path)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def build_cifar(root: str, dataset: str = "cifar10", seed: int = 0, val_fraction: float = 0.2,
                corruption_root: str | None = None, corruptions: Sequence[str] = (),
                severities: Sequence[int] = (1, 2, 3, 4, 5), corruption_n: int | None = None,
                cache_dir: str | None = None, **_: object) -> Suite:
    """CIFAR suite: train/val (stratified, seeded split of the official train set), test, and
    `ood/corruption/<name>/<severity>` from CIFAR-10-C / CIFAR-100-C when `corruption_root` is set."""
    data = read_cifar(root, dataset)
    xtr, ytr = data["train"]
    rest, held = stratified_split(torch.from_numpy(ytr), val_fraction, seed)
    rest, held = rest.numpy(), held.numpy()
    splits = {
        "train": Split("train", "train", dataset=UInt8Images(xtr[rest], ytr[rest])),
        "val": Split("val", "val", dataset=UInt8Images(xtr[held], ytr[held])),
        "test": Split("test", "test", dataset=UInt8Images(*data["test"])),
    }
    if corruption_root and corruptions:
        from rftbench import robust

        sets = robust.load_cifar_c(corruption_root, dataset, list(corruptions), list(severities),
                                   n_examples=corruption_n)
        for (name, sev), (x, y) in sets.items():
            key = f"ood/corruption/{name}/{sev}"
            splits[key] = Split(key, "ood", "corruption", x=x, y=y, corruption=name, severity=sev)
    num_classes = LAYOUT[dataset][4]
    # a model pre-trained on the same dataset (e.g. a RobustBench model) keeps its head
    return Suite(dataset, num_classes, splits, upstream_classes=list(range(num_classes)),
                 meta={"upstream": dataset, "root": str(root), "n_train": len(rest), "n_val": len(held)})
