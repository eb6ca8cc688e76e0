"""Suites and splits: the data every method and the evaluation see.

A `Suite` is a set of named `Split`s (docs/protocol.md section 2). A split holds either tensors in
memory (small suites such as `digits`: batches are index slices, no DataLoader overhead) or any
map-style `Dataset` yielding `(image, label)` with images as float tensors in [0, 1] (large on-disk
suites: batches come from a DataLoader with workers). `batches()` hides the difference.

Streamed splits carry per-image transforms: `transform` (evaluation: resize/crop at the backbone's
input size, to float [0, 1]) and, on the train split, `train_transform` (augmentation), applied in
the DataLoader workers. Augmentation is seeded per (batch seed, image index), so the same trial seed
gives the same crops whatever the number of workers. A dataset should expose `targets` (one int
label per item) so that labels are read without decoding images. A split of image files with a
`decoder` (`suite.decode=cuda`) has its workers read file bytes only; the main process decodes
each batch's JPEGs on that device and runs the same transforms there (`rftbench.data.folders`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from rftbench.utils import seeded

ROLES = ("train", "val", "test", "ood", "ood_val")
SHIFTS = ("id", "domain", "corruption", "adversarial", "natural")


@dataclass
class Split:
    """One named split. `x`/`y` for in-memory data, or `dataset` for streamed data."""

    name: str
    role: str
    shift: str = "id"
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    dataset: Dataset | None = None
    corruption: str | None = None
    severity: int | None = None
    meta: dict = field(default_factory=dict)
    transform: Callable | None = None        # per-image evaluation transform (streamed splits)
    train_transform: Callable | None = None  # per-image augmentation when training on this split
    class_mask: list[int] | None = None      # only these classes' logits count (ImageNet-R/A)
    # the split's own classes as groups of model logits: class k scores max(logits[:, logit_groups[k]]),
    # labels are 0..len(logit_groups)-1 (ObjectNet's 113 classes over ImageNet's 1,000)
    logit_groups: list[list[int]] | None = None
    # None: the workers decode and transform; a `rftbench.data.folders.DeviceDecoder`: they read file
    # bytes (its `dataset`), the main process decodes and transforms each batch on its device (its
    # `batch`; image files only; suite.decode=cuda)
    decoder: Any = None
    _loaders: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"split {self.name}: role {self.role!r} not in {ROLES}")
        if self.shift not in SHIFTS:
            raise ValueError(f"split {self.name}: shift {self.shift!r} not in {SHIFTS}")
        if (self.x is None) == (self.dataset is None):
            raise ValueError(f"split {self.name}: give either tensors (x, y) or a dataset")
        if self.x is not None and (self.y is None or len(self.x) != len(self.y)):
            raise ValueError(f"split {self.name}: x and y must have the same length")
        if self.x is not None and (self.transform is not None or self.train_transform is not None):
            raise ValueError(f"split {self.name}: transforms apply to streamed (dataset) splits only")
        if self.class_mask is not None and self.logit_groups is not None:
            raise ValueError(f"split {self.name}: give a class_mask or logit_groups, not both")

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else len(self.dataset)

    @property
    def in_memory(self) -> bool:
        return self.x is not None

    @property
    def labels(self) -> torch.Tensor:
        """All labels (reads the dataset once if it is not in memory)."""
        if self.y is not None:
            return self.y
        if "labels" not in vars(self):  # read once
            self.__dict__["labels"] = dataset_targets(self.dataset)
        return self.__dict__["labels"]

    def _tags(self, name: str | None) -> dict:
        return dict(name=name or self.name, role=self.role, shift=self.shift, corruption=self.corruption,
                    severity=self.severity, meta=dict(self.meta), class_mask=self.class_mask,
                    logit_groups=self.logit_groups)

    def subset(self, index: torch.Tensor, name: str | None = None) -> "Split":
        """A split restricted to `index` (same role, shift, tags and transforms)."""
        if self.in_memory:
            return Split(x=self.x[index], y=self.y[index], **self._tags(name))
        return Split(dataset=Subset(self.dataset, torch.as_tensor(index).tolist()), transform=self.transform,
                     train_transform=self.train_transform, decoder=self.decoder, **self._tags(name))

    def materialize(self, name: str | None = None, batch_size: int = 256, num_workers: int = 0) -> "Split":
        """The same split as tensors in memory (evaluation transform applied): for code that needs
        `x`/`y`, e.g. AutoAttack on a fixed subset of a streamed test set."""
        if self.in_memory:
            return self
        xs = [xb for xb, _ in batches(self, batch_size, num_workers=num_workers)]
        return Split(x=torch.cat(xs), y=self.labels.clone(), **self._tags(name))


def masked(logits: torch.Tensor, split: Split) -> torch.Tensor:
    """Logits restricted to the split's `class_mask` (others set to -inf: ImageNet-R/A's 200 classes)."""
    if split.class_mask is None:
        return logits
    keep = torch.zeros(logits.shape[1], dtype=torch.bool)
    keep[torch.as_tensor(split.class_mask)] = True
    return logits.masked_fill(~keep, float("-inf"))


def pooled(logits: torch.Tensor, split: Split) -> torch.Tensor:
    """The split's own classes' logits from the model's: class k's logit is the maximum over the model
    logits of `split.logit_groups[k]` (ObjectNet: 113 classes from ImageNet's 1,000); unchanged without groups."""
    if split.logit_groups is None:
        return logits
    width = max(map(len, split.logit_groups))
    # (K, width) indices, short groups padded by repeating their first index (no effect on the max)
    index = torch.tensor([g + g[:1] * (width - len(g)) for g in split.logit_groups], device=logits.device)
    return logits[:, index].amax(2)


def scored_logits(logits: torch.Tensor, split: Split) -> torch.Tensor:
    """The logits a split is scored on: its `class_mask` (ImageNet-R/A) or its `logit_groups` (ObjectNet)
    applied to the model's logits; accuracy, ECE and NLL are computed on these."""
    return pooled(masked(logits, split), split)


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """Every label of a map-style dataset: its `targets` (through `Subset`s), else read item by item."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


# attributes where torchvision datasets keep their files (a list of paths, or of (path, label))
FILE_LISTS = ("samples", "imgs", "_samples", "_image_files", "_images", "images", "_files")


def image_files(dataset) -> list[str] | None:
    """The image paths behind a streamed split's dataset, item by item, read without decoding: a dataset
    that lists its files (`FILE_LISTS`: `rftbench.data.folders.ImageFiles`' samples, torchvision's
    file lists), or a subset of one (any dataset with `dataset` and `indices`: `Subset`, the transfer
    suites' `Indexed`); None for datasets of another kind (pixels in memory, e.g. CIFAR) and for none."""
    if dataset is None:
        return None
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        inner = image_files(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    n = len(dataset)
    for name in FILE_LISTS:
        items = getattr(dataset, name, None)
        if isinstance(items, (list, tuple)) and len(items) == n and n:
            first = items[0][0] if isinstance(items[0], (list, tuple)) else items[0]
            if isinstance(first, (str, os.PathLike)):
                return [os.fspath(it[0] if isinstance(it, (list, tuple)) else it) for it in items]
    return None


class ImageFileError(OSError):
    """An image file of a suite cannot be decoded (truncated, empty, not an image): names the file.
    Raised in a DataLoader worker, it comes back with the worker's traceback in its message; `str`
    keeps the one line that names the file."""

    def __str__(self) -> str:
        text = super().__str__()
        start = text.rfind("cannot read image ")  # the last line: the message (source lines come first)
        return text[start:].splitlines()[0] if start >= 0 else text


class Transformed(Dataset):
    """`dataset` with a per-image transform; a key `(i, seed)` runs the transform under
    `torch.manual_seed(seed)` (seeded augmentation, independent of the worker that loads it)."""

    def __init__(self, dataset: Dataset, transform: Callable | None, split: str = ""):
        self.dataset, self.transform, self.split = dataset, transform, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        i, seed = key
        try:
            x, y = self.dataset[i]
        except ImageFileError as exc:  # name the split too
            raise ImageFileError(f"{exc} (split {self.split})") from None
        except OSError as exc:  # a library's reader (torchvision datasets, PIL): name the file if it is known
            files = image_files(self.dataset)
            if files is None:
                raise
            raise ImageFileError(f"cannot read image {files[i]}: {type(exc).__name__}: {exc} "
                                 f"(split {self.split})") from None
        return seeded(self.transform, x, seed), int(y)


class SeededOrder(Sampler):
    """Yields `(index, per-image seed or None)`; the order and the seeds are a pure function of the
    seed set by `reset` before each pass (works with persistent workers: it lives in the main process)."""

    def __init__(self, n: int):
        self.n, self.shuffle, self.seed, self.augment = n, False, 0, False

    def reset(self, shuffle: bool, seed: int, augment: bool) -> None:
        self.shuffle, self.seed, self.augment = shuffle, seed, augment

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
                 if self.shuffle else range(self.n))
        base = (self.seed * 1_000_003) % (2**62)
        for i in order:
            yield i, (base + i if self.augment else None)


def _loader(split: Split, batch_size: int, augment: bool, num_workers: int, pin: bool):
    """A DataLoader over the split. Train and val (read every epoch) keep theirs, workers persisting;
    test/OOD splits (read once each) get a fresh one, so that dozens of OOD splits never hold workers."""
    key = (batch_size, augment, num_workers, pin)
    if key in split._loaders:
        return split._loaders[key]
    persistent = num_workers > 0 and split.role in ("train", "val")
    transform = split.train_transform if augment else split.transform
    extra = dict(persistent_workers=persistent, prefetch_factor=4) if num_workers > 0 else {}
    if split.decoder is None:
        dataset, collate = Transformed(split.dataset, transform, split.name), None
    else:  # workers read bytes; batches() decodes and transforms
        dataset, collate, pin = split.decoder.dataset(split.dataset, split.name), list, False
    loader = DataLoader(dataset, batch_size=batch_size, sampler=SeededOrder(len(split.dataset)),
                        num_workers=num_workers, pin_memory=pin, collate_fn=collate, **extra)
    if persistent or num_workers == 0:
        split._loaders[key] = loader
    return loader


def batches(split: Split, batch_size: int, shuffle: bool = False, seed: int = 0,
            num_workers: int = 0, device: torch.device | str = "cpu",
            augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches on `device`; the order (and, with `augment`, the augmentation of a split that
    has a `train_transform`) is a pure function of `seed`."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    if split.in_memory:
        n = len(split)
        order = torch.randperm(n, generator=gen) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                xb, yb = split.x[start:start + batch_size], split.y[start:start + batch_size]
            else:
                idx = order[start:start + batch_size]
                xb, yb = split.x[idx], split.y[idx]
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        return
    augment = augment and split.train_transform is not None
    loader = _loader(split, batch_size, augment, num_workers, device.type == "cuda")
    loader.sampler.reset(shuffle, seed, augment)
    if split.decoder is not None:
        transform = split.train_transform if augment else split.transform
        loader = (split.decoder.batch(items, transform) for items in loader)
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), torch.as_tensor(yb).to(device, non_blocking=True)


@dataclass
class Suite:
    """A downstream task: its splits, class count and how it relates to the upstream model.

    `upstream_classes`: for each suite class, the index of the matching class of the pre-trained
    model's head (enables the zero-shot head); None when the classes do not correspond.
    """

    name: str
    num_classes: int
    splits: dict[str, Split]
    upstream_classes: list[int] | None = None
    meta: dict = field(default_factory=dict)
    class_names: list[str] | None = None  # human-readable, one per class (CLIP zero-shot heads)

    def __getitem__(self, name: str) -> Split:
        try:
            return self.splits[name]
        except KeyError:
            raise KeyError(f"suite {self.name} has no split {name!r}; splits: {sorted(self.splits)}") from None

    @property
    def train(self) -> Split:
        return self["train"]

    @property
    def val(self) -> Split:
        return self["val"]

    def by_role(self, *roles: str) -> list[Split]:
        return [s for s in self.splits.values() if s.role in roles]

    def eval_splits(self) -> list[Split]:
        """Splits reported in the results: ID test and every OOD test split."""
        return self.by_role("test", "ood")


SEEN_KEYS = ("names", "severity", "n_val", "seed")  # suite.build.seen_corruptions (digits, cifar)


def config_section(name: str, value: dict, keys: tuple[str, ...]) -> dict:
    """A nested `suite.build.<name>` node with exactly `keys` (no defaults here: they are in YAML)."""
    if set(value) != set(keys):
        raise TypeError(f"suite.build.{name} must have exactly the keys {', '.join(keys)}; "
                        f"missing: {sorted(set(keys) - set(value))}, unknown: {sorted(set(value) - set(keys))}")
    return dict(value)


def stratified_split(y: torch.Tensor, fraction: float, seed: int,
                     keep_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held) with round(fraction * class count) of each class held out, seeded. With
    `keep_one` (fraction in (0, 1)), every class with two or more examples has at least one held out
    and keeps at least one."""
    if keep_one and not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    y = torch.as_tensor(y).long().cpu()
    gen = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(fraction * len(idx)))
        if keep_one:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
        rest.append(idx[k:])
    return torch.sort(torch.cat(rest)).values, torch.sort(torch.cat(held)).values


def check_limit(fraction: float | None, shots: int | None) -> None:
    """`suite.build.fraction` in (0, 1] or `suite.build.shots` an int >= 1, not both (null: all)."""
    if fraction is not None and shots is not None:
        raise ValueError(f"give suite.build.fraction ({fraction}) or suite.build.shots ({shots}), not both")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0.0 < fraction <= 1.0):
        raise ValueError(f"suite.build.fraction must be a number in (0, 1] (null: all), got {fraction!r}")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise ValueError(f"suite.build.shots must be an integer >= 1 (null: all), got {shots!r}")


def limit_per_class(labels: torch.Tensor, fraction: float | None, shots: int | None, seed: int,
                    shots_key: str = "suite.build.shots") -> torch.Tensor:
    """Sorted indices of the class-balanced training subset (docs/protocol.md section 2): of each
    class's n_c examples, after a shuffle drawn by `seed`, the first `shots`, or round(fraction * n_c)
    (at least 1); all of them when both are None. A class with fewer than `shots` is an error naming
    `shots_key`."""
    check_limit(fraction, shots)
    labels = torch.as_tensor(labels).long().cpu()
    if fraction is None and shots is None:
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    out = [torch.zeros(0, dtype=torch.long)]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        if shots is not None and shots > len(idx):
            raise ValueError(f"{shots_key}={shots} but class {c} has only {len(idx)} training examples")
        out.append(idx[:shots if shots is not None else max(1, int(round(fraction * len(idx))))])
    return torch.sort(torch.cat(out)).values


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a fixed subset with `n // num_classes` examples of every class in `labels`;
    with more classes than `n` (e.g. ImageNet), one example of each of `n`
    classes drawn by `seed`."""
    labels = torch.as_tensor(labels).long().cpu()
    classes = labels.unique()
    generator = torch.Generator().manual_seed(seed)
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    if n < len(classes):
        classes = classes[torch.randperm(len(classes), generator=generator)[:n]]
    per_class = n // len(classes)
    chosen = []
    for c in classes:
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c.item()} has {len(members)} examples, fewer than {per_class} per class")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def hold_out_per_class(y: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held) with `k` examples of every class held out after a seeded shuffle."""
    gen = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        if k >= len(idx):
            raise ValueError(f"val_per_class={k} but class {c} has only {len(idx)} training examples")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held.append(idx[:k])
        rest.append(idx[k:])
    cat = lambda parts: torch.sort(torch.cat(parts)).values if parts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return cat(rest), cat(held)


class UInt8Images(Dataset):
    """(N, H, W, C) uint8 images -> (C, H, W) float in [0, 1], with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.targets = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).float().div_(255)
        return x, int(self.labels[i])
