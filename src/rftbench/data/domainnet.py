"""DomainNet (Peng et al. 2019) from its official layout and split files (the FTP protocol).

Under `root` (`${paths.data}/domainnet`), as the release unpacks:
    <domain>/<class>/<image>.jpg            for domain in real, sketch, painting, infograph, clipart
    <domain>_train.txt, <domain>_test.txt   lines "<domain>/<class>/<image>.jpg <label>"
ID = `real` (train minus a seeded, stratified `val_fraction` held out as val; test = real_test),
OOD = the test split of every other listed domain. 345 classes; names from the split files' paths.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rftbench.data.base import Split, Suite, stratified_split
from rftbench.data.folders import ImageFiles

DOMAINS = ("real", "sketch", "painting", "infograph", "clipart", "quickdraw")
NUM_CLASSES = 345
SOURCE = "http://ai.bu.edu/M3SDA/ (each domain's zip and its <domain>_train.txt / <domain>_test.txt)"


def split_file(root: str | Path, domain: str, part: str) -> Path:
    return Path(root) / f"{domain}_{part}.txt"


def read_split_file(root: str | Path, domain: str, part: str) -> list[tuple[str, int]]:
    """[(relative path, label)] of `<domain>_<part>.txt`."""
    path = split_file(root, domain, part)
    if not path.is_file():
        raise FileNotFoundError(f"DomainNet split file {path} not found; get it from {SOURCE}, "
                                f"or check with: python -m rftbench.data verify suite=domainnet")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= NUM_CLASSES:
                raise ValueError(f"{path}:{n}: expected '<path> <label in 0..{NUM_CLASSES - 1}>', got {line!r}")
            out.append((parts[0], int(parts[1])))
    return out


def _dataset(root: str | Path, entries: list[tuple[str, int]], what: str) -> ImageFiles:
    root = Path(root)
    missing = [p for p, _ in entries if not (root / p).is_file()]
    if missing:
        raise FileNotFoundError(f"DomainNet {what}: {len(missing)} of {len(entries)} images missing, e.g. "
                                f"{root / missing[0]}; unpack the domain's zip from {SOURCE} into {root}")
    return ImageFiles([(str(root / p), y) for p, y in entries])


def class_names(entries: list[tuple[str, int]]) -> list[str]:
    """Class names (the `<class>` folder of each label) in label order."""
    names: dict[int, str] = {}
    for path, y in entries:
        names.setdefault(y, Path(path).parts[1])
    return [names.get(i, f"class_{i}") for i in range(NUM_CLASSES)]


def build_domainnet(root: str, seed: int, cache_dir: str, id_domain: str, ood_domains: Sequence[str],
                    val_fraction: float) -> Suite:
    del cache_dir  # nothing cached: splits stream from disk
    for d in (id_domain, *ood_domains):
        if d not in DOMAINS:
            raise ValueError(f"unknown DomainNet domain {d!r}; valid: {list(DOMAINS)}")
    train = read_split_file(root, id_domain, "train")
    rest, held = stratified_split(torch.tensor([y for _, y in train]), val_fraction, seed)
    splits = {
        "train": Split("train", "train", dataset=_dataset(root, [train[i] for i in rest.tolist()], f"{id_domain} train")),
        "val": Split("val", "val", dataset=_dataset(root, [train[i] for i in held.tolist()], f"{id_domain} train")),
        "test": Split("test", "test", dataset=_dataset(root, read_split_file(root, id_domain, "test"), f"{id_domain} test")),
    }
    for d in ood_domains:
        key = f"ood/{d}"
        splits[key] = Split(key, "ood", "domain", dataset=_dataset(root, read_split_file(root, d, "test"), f"{d} test"))
    return Suite("domainnet", NUM_CLASSES, splits, upstream_classes=None, class_names=class_names(train),
                 meta={"root": str(root), "id_domain": id_domain, "n_train": len(rest), "n_val": len(held),
                       "ood_evaluated": [f"ood/{d}" for d in ood_domains]})
