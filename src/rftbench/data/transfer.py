"""The CT paper's downstream (transfer) datasets through `torchvision.datasets` (download=False).

`suite=ct_transfer/<name>`: official train/val/test splits where the dataset has them; otherwise
val is a stratified split of train drawn by the trial seed (`val_fraction`) and, for datasets with
no official test split (EuroSAT, Caltech-101/256), test is a stratified split fixed by `split_seed`
(`test_fraction`). Everything lives under `root` in torchvision's own layout for each class (see
`python -m rftbench.data verify suite=ct_transfer/<name>`; `download` fetches what torchvision can).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torchvision.datasets as tvd
from torch.utils.data import Dataset

from rftbench.data.base import Split, Suite, limit_per_class, stratified_split


@dataclass(frozen=True)
class Spec:
    """How to build each official split: the torchvision class and its keyword arguments."""

    cls: Callable
    splits: dict[str, dict] = field(default_factory=dict)  # role (train/val/test) -> kwargs
    source: str = ""
    downloadable: bool = True


SPECS = {
    "cifar10": Spec(tvd.CIFAR10, {"train": {"train": True}, "test": {"train": False}},
                    "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "cifar100": Spec(tvd.CIFAR100, {"train": {"train": True}, "test": {"train": False}},
                     "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "food101": Spec(tvd.Food101, {"train": {"split": "train"}, "test": {"split": "test"}},
                    "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/"),
    "dtd": Spec(tvd.DTD, {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
                "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (partition 1)"),
    "flowers102": Spec(tvd.Flowers102, {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
                       "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    "oxford_iiit_pet": Spec(tvd.OxfordIIITPet, {"train": {"split": "trainval"}, "test": {"split": "test"}},
                            "https://www.robots.ox.ac.uk/~vgg/data/pets/"),
    "fgvc_aircraft": Spec(tvd.FGVCAircraft, {"train": {"split": "train"}, "val": {"split": "val"},
                                             "test": {"split": "test"}},
                          "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (variant level)"),
    "stanford_cars": Spec(tvd.StanfordCars, {"train": {"split": "train"}, "test": {"split": "test"}},
                          "the Stanford Cars release (its original URL is gone: torchvision cannot download it; "
                          "see https://github.com/pytorch/vision/issues/7545)", downloadable=False),
    "country211": Spec(tvd.Country211, {"train": {"split": "train"}, "val": {"split": "valid"},
                                        "test": {"split": "test"}},
                       "https://github.com/openai/CLIP/blob/main/data/country211.md"),
    "eurosat": Spec(tvd.EuroSAT, {"all": {}}, "https://github.com/phelber/EuroSAT (RGB, 2750/)"),
    "fashion_mnist": Spec(tvd.FashionMNIST, {"train": {"train": True}, "test": {"train": False}},
                          "https://github.com/zalandoresearch/fashion-mnist"),
    "caltech101": Spec(tvd.Caltech101, {"all": {}}, "https://data.caltech.edu/records/mzrjq-6wc02"),
    "caltech256": Spec(tvd.Caltech256, {"all": {}}, "https://data.caltech.edu/records/nyy15-4j048"),
}


def open_split(name: str, root: str, kwargs: dict, download: bool = False) -> Dataset:
    """The torchvision dataset of one official split; a clear error when its files are missing (and
    the tree left as it was: some torchvision classes, e.g. Caltech, create their folders first)."""
    spec = SPECS[name]
    before = _entries(root)
    try:
        return spec.cls(root, download=download, **kwargs)
    except (RuntimeError, FileNotFoundError) as exc:
        for new in _entries(root) - before:
            _remove_empty_tree(new)
        how = (f"python -m rftbench.data download suite=ct_transfer/{name}" if spec.downloadable
               else "place the files by hand")
        raise FileNotFoundError(f"{name} ({spec.cls.__name__}{kwargs or ''}) not found under {root}: {exc} "
                                f"Get it from {spec.source} ({how}).") from exc


def _entries(root: str) -> set[Path]:
    """`root` and what is directly in it (one listing: the data root may hold every dataset)."""
    top = Path(root)
    return {top, *top.iterdir()} if top.is_dir() else set()


def _remove_empty_tree(path: Path) -> None:
    """Remove `path` if it is a folder holding only (nested) empty folders."""
    if not path.is_dir():
        return
    for sub in path.iterdir():
        _remove_empty_tree(sub)
    if not any(path.iterdir()):
        path.rmdir()


def labels_of(ds: Dataset) -> list[int]:
    """Every label of a torchvision dataset without decoding images."""
    if isinstance(ds, tvd.StanfordCars):
        return [label for _, label in ds._samples]
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return [int(v) for v in getattr(ds, attr)]
    raise TypeError(f"cannot read the labels of {type(ds).__name__}")


def names_of(ds: Dataset) -> list[str]:
    if hasattr(ds, "categories"):  # Caltech: "001.ak47" (256) or "accordion" (101)
        return [c.split(".", 1)[-1] for c in ds.categories]
    return list(ds.classes)


class Indexed(Dataset):
    """`dataset` restricted to `indices`, with `targets` for label reads without decoding."""

    def __init__(self, dataset: Dataset, indices: list[int], labels: list[int]):
        self.dataset, self.indices = dataset, indices
        self.targets = [labels[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, _ = self.dataset[self.indices[i]]
        return x, self.targets[i]


def build_transfer(root: str, dataset: str, seed: int, cache_dir: str, val_fraction: float,
                   test_fraction: float, split_seed: int, fraction: float | None = None,
                   shots: int | None = None) -> Suite:
    """The `ct_transfer/<dataset>` suite; `fraction` / `shots`: a class-balanced subset of train drawn
    by `seed` after val is set apart (`rftbench.data.base.limit_per_class`); val and test unchanged."""
    del cache_dir  # nothing cached: splits stream from disk
    if dataset not in SPECS:
        raise ValueError(f"unknown ct_transfer dataset {dataset!r}; valid: {sorted(SPECS)}")
    spec = SPECS[dataset]
    parts = {role: open_split(dataset, root, kw) for role, kw in spec.splits.items()}
    pieces: dict[str, tuple[Dataset, list[int], list[int]]] = {}
    if "all" in parts:  # no official split: a fixed test split, then val off the rest
        ds = parts.pop("all")
        labels = labels_of(ds)
        rest, test = stratified_split(torch.tensor(labels), test_fraction, split_seed)
        pieces["test"] = (ds, test.tolist(), labels)
        parts_train = (ds, rest.tolist(), labels)
    else:
        ds = parts["train"]
        labels = labels_of(ds)
        parts_train = (ds, list(range(len(ds))), labels)
        test = parts["test"]
        pieces["test"] = (test, list(range(len(test))), labels_of(test))
    if "val" in parts:
        val = parts["val"]
        pieces["train"], pieces["val"] = parts_train, (val, list(range(len(val))), labels_of(val))
    else:
        ds, idx, labels = parts_train
        rest, held = stratified_split(torch.tensor([labels[i] for i in idx]), val_fraction, seed)
        pieces["train"] = (ds, [idx[i] for i in rest.tolist()], labels)
        pieces["val"] = (ds, [idx[i] for i in held.tolist()], labels)
    ds, idx, labels = pieces["train"]
    keep = limit_per_class(torch.tensor([labels[i] for i in idx], dtype=torch.long), fraction, shots, seed)
    pieces["train"] = (ds, [idx[i] for i in keep.tolist()], labels)
    splits = {role: Split(role, role, dataset=Indexed(*pieces[role])) for role in ("train", "val", "test")}
    for role, split in splits.items():
        if len(split) == 0:
            raise ValueError(f"ct_transfer/{dataset}: the {role} split is empty; raise "
                             f"suite.build.{'test' if role == 'test' else 'val'}_fraction or check the data under {root}")
    names = names_of(pieces["train"][0])
    return Suite(f"ct_transfer/{dataset}", len(names), splits, upstream_classes=None, class_names=names,
                 meta={"root": str(root), "dataset": dataset, "fraction": fraction, "shots": shots,
                       "n_train": len(splits["train"]),
                       "n_val": len(splits["val"]), "official_val": "val" in spec.splits})
