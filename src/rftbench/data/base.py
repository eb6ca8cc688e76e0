"""Suites and splits: the data every method and the evaluation see.

A `Suite` is a set of named `Split`s (docs/protocol.md section 2). A split holds either tensors in
memory (small suites such as `digits`: batches are index slices, no DataLoader overhead) or any
map-style `Dataset` yielding `(image, label)` with images as float tensors in [0, 1] (large on-disk
suites: batches come from a DataLoader with workers). `batches()` hides the difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

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

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"split {self.name}: role {self.role!r} not in {ROLES}")
        if self.shift not in SHIFTS:
            raise ValueError(f"split {self.name}: shift {self.shift!r} not in {SHIFTS}")
        if (self.x is None) == (self.dataset is None):
            raise ValueError(f"split {self.name}: give either tensors (x, y) or a dataset")
        if self.x is not None and (self.y is None or len(self.x) != len(self.y)):
            raise ValueError(f"split {self.name}: x and y must have the same length")

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
        return torch.as_tensor([int(self.dataset[i][1]) for i in range(len(self.dataset))])

    def subset(self, index: torch.Tensor, name: str | None = None) -> "Split":
        """A split restricted to `index` (same role, shift and tags)."""
        kw = dict(name=name or self.name, role=self.role, shift=self.shift, corruption=self.corruption,
                  severity=self.severity, meta=dict(self.meta))
        if self.in_memory:
            return Split(x=self.x[index], y=self.y[index], **kw)
        return Split(dataset=torch.utils.data.Subset(self.dataset, index.tolist()), **kw)


def batches(split: Split, batch_size: int, shuffle: bool = False, seed: int = 0,
            num_workers: int = 0, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches on `device`; the order is a pure function of `seed` when shuffling."""
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
    loader = DataLoader(split.dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
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


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held) with round(fraction * class count) of each class held out, seeded."""
    gen = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(fraction * len(idx)))
        held.append(idx[:k])
        rest.append(idx[k:])
    return torch.sort(torch.cat(rest)).values, torch.sort(torch.cat(held)).values


def per_class(y: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """Indices of the first `n` examples of each class after a seeded shuffle (all if n is None)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        if n is not None and n > len(idx):
            raise ValueError(f"train_per_class={n} but class {c} has only {len(idx)} examples")
        out.append(idx[:n] if n is not None else idx)
    return torch.sort(torch.cat(out)).values


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a fixed subset with `n // num_classes` examples of every class in `labels`."""
    labels = torch.as_tensor(labels).long().cpu()
    classes = labels.unique()
    per_class = n // len(classes)
    if per_class < 1:
        raise ValueError(f"n={n} is smaller than the number of classes ({len(classes)})")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c.item()} has {len(members)} examples, fewer than {per_class} per class")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values
