"""CIFAR-10 / CIFAR-100 suites read from the official python-pickle archives (no download here).

Layout expected under `root` (as torchvision's CIFAR10/CIFAR100 extract them):
    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python/{train, test, meta}
OOD corruption splits come from CIFAR-10-C / CIFAR-100-C (`corruption_root`) through
`rftbench.data.corruption_sets.load_cifar_c`. Images stay uint8 in memory and are served as float [0, 1] by a
Dataset, so batches stream through DataLoader workers like any on-disk suite.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rftbench.data.base import (
    SEEN_KEYS,
    Split,
    Suite,
    UInt8Images,
    balanced_subset,
    config_section,
    limit_per_class,
    stratified_split,
)
from rftbench.data.corruptions import corrupted_splits
from rftbench.utils import cache_root, config_target

log = logging.getLogger("rftbench")
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
META = {"cifar10": ("batches.meta", b"label_names"), "cifar100": ("meta", b"fine_label_names")}
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


def class_names(root: str | Path, dataset: str = "cifar10") -> list[str]:
    """The class names stored in the archive's meta file."""
    name, key = META[dataset]
    path = Path(root) / LAYOUT[dataset][0] / name
    if not path.exists():
        raise FileNotFoundError(f"{dataset}: missing {path}; {HOW_TO_GET}")
    with open(path, "rb") as f:
        return [n.decode() for n in pickle.load(f, encoding="bytes")[key]]


CIFAR10_1 = ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy")
CIFAR10_1_N = 2000
CIFAR10_1_SOURCE = "https://github.com/modestyachts/CIFAR-10.1 (datasets/cifar10.1_v6_data.npy and _labels.npy)"


def read_cifar10_1(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10.1 v6 from its `.npy` release: images (2000, 32, 32, 3) uint8 and labels in CIFAR-10's order."""
    paths = [Path(root) / name for name in CIFAR10_1]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; get it from {CIFAR10_1_SOURCE}")
    x, y = np.load(paths[0]), np.load(paths[1]).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise ValueError(f"{paths[0]}: expected uint8 images (N, 32, 32, 3) matching {len(y)} labels, "
                         f"got {x.dtype} {x.shape}")
    return x, y


@config_target("suite.build")
def build_cifar(*, root: str, dataset: str, seed: int, val_fraction: float, corruption_root: str | None,
                corruptions: Sequence[str], severities: Sequence[int], corruption_n: int | None,
                cifar10_1_root: str | None, seen_corruptions: dict, fraction: float | None = None,
                shots: int | None = None, cache_dir: str | None = None) -> Suite:
    """CIFAR suite: train/val (stratified, seeded split of the official train set), test,
    `ood/corruption/<name>/<severity>` from CIFAR-10-C / CIFAR-100-C when `corruption_root` is set,
    and (CIFAR-10) `ood/cifar10_1` from CIFAR-10.1 v6 under `cifar10_1_root` when present (skipped
    with a warning naming the path otherwise).

    `seen_corruptions` ({names, severity, n_val, seed}): for shift-aware methods (RWS), the val split
    (a class-balanced subset of `n_val` images, all if null) under each of `names`, corrupted at
    `severity` with `seed` (`rftbench.data.corruptions.corrupted_splits`, cached in `cache_dir`):
    `ood_val/<corruption>` splits, declared in `meta["seen_corruptions"]`; `names: []` makes none.

    `fraction` / `shots`: a class-balanced subset of train drawn by `seed` after val is held out
    (`rftbench.data.base.limit_per_class`); val, test and OOD keep all their images.

    The keywords are `suite.build` of configs/suite/cifar10.yaml (their defaults live there);
    `seed` and `cache_dir` come from the runner."""
    data = read_cifar(root, dataset)
    xtr, ytr = data["train"]
    rest, held = stratified_split(torch.from_numpy(ytr), val_fraction, seed)
    rest = rest[limit_per_class(torch.from_numpy(ytr)[rest], fraction, shots, seed)]
    rest, held = rest.numpy(), held.numpy()
    splits = {
        "train": Split("train", "train", dataset=UInt8Images(xtr[rest], ytr[rest])),
        "val": Split("val", "val", dataset=UInt8Images(xtr[held], ytr[held])),
        "test": Split("test", "test", dataset=UInt8Images(*data["test"])),
    }
    seen = config_section("seen_corruptions", seen_corruptions, SEEN_KEYS)
    if len(seen["names"]):
        val = splits["val"]
        if seen["n_val"] is not None:
            val = val.subset(balanced_subset(val.labels, seen["n_val"], seen["seed"]))
        splits.update({f"ood_val/{c}": s for c, s in corrupted_splits(
            val, seen["names"], seen["severity"], seen["seed"], cache_dir or cache_root(), role="ood_val",
            name="ood_val/{corruption}").items()})
    if corruption_root and corruptions:
        from rftbench.data.corruption_sets import load_cifar_c

        sets = load_cifar_c(corruption_root, dataset, list(corruptions), list(severities), n_examples=corruption_n)
        for (name, sev), (x, y) in sets.items():
            # streamed like the ID test set (uint8 again: the files are 8-bit), so every split reaches
            # the model through the same evaluation transform (e.g. resized to 224 px for ResNet-50)
            images = x.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            key = f"ood/corruption/{name}/{sev}"
            splits[key] = Split(key, "ood", "corruption", dataset=UInt8Images(images, y.numpy()),
                                corruption=name, severity=sev)
    meta_ood = {}
    if cifar10_1_root is not None:
        if dataset != "cifar10":
            raise ValueError("CIFAR-10.1 shares CIFAR-10's classes only; set suite.build.cifar10_1_root=null")
        try:
            splits["ood/cifar10_1"] = Split("ood/cifar10_1", "ood", "natural",
                                            dataset=UInt8Images(*read_cifar10_1(cifar10_1_root)))
            meta_ood["ood_evaluated"] = ["ood/cifar10_1"]
        except FileNotFoundError as exc:
            log.warning("CIFAR-10.1 split ood/cifar10_1 skipped: %s", exc)
            meta_ood["ood_missing"] = ["ood/cifar10_1"]
    num_classes = LAYOUT[dataset][4]
    # a model pre-trained on the same dataset (e.g. a RobustBench model) keeps its head
    return Suite(dataset, num_classes, splits, upstream_classes=list(range(num_classes)),
                 meta={"upstream": dataset, "root": str(root), "fraction": fraction, "shots": shots,
                       "n_train": len(rest), "n_val": len(held),
                       "seen_corruptions": list(seen["names"]), "seen_severity": seen["severity"],
                       "seen_seed": seen["seed"], **meta_ood},
                 class_names=class_names(root, dataset))
