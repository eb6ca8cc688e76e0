"""DomainNet (Peng et al. 2019) as the seed papers use it: one builder, two suites.

`suite=domainnet` (345 classes, FTP / TPGM): ID = real, OOD = the sketch, painting, infograph and
clipart test splits (quickdraw left out, as their OOD average leaves it out). `split_files`:
    tpgm      FTP/TPGM's own files: <domain>_train_<percent>_percent_split.txt and
              <domain>_val_<percent>_percent_split.txt (percent 1, 5, 10, 20, 50 or 100: their data
              fractions) and <domain>_test.txt
    official  the release's <domain>_train.txt / <domain>_test.txt; val = a stratified
              `val_fraction` of train drawn by the trial seed
`suite=domainnet40` (40 classes, LP-FT): SENTRY's files <domain>_train_mini.txt and
<domain>_test_mini.txt (`split_files: sentry`, domains clipart, painting, real, sketch; the class list
is shipped in domainnet40_classes.txt); ID = sketch, OOD = real, painting, clipart; val as `official`.

Images lie under `root` as the release unpacks (<domain>/<class>/<image>.jpg); split files under
`split_root`, one "<domain>/<class>/<image>.jpg <label>" a line (paths relative to `root`).
`fraction` / `shots` keep a class-balanced part of train, drawn by the trial seed once val is set
apart (`rftbench.data.base.limit_per_class`); val and the test splits keep all their images.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from rftbench.data.base import Split, Suite, limit_per_class, stratified_split
from rftbench.data.folders import ImageFiles

DOMAINS = ("real", "sketch", "painting", "infograph", "clipart", "quickdraw")
SENTRY_DOMAINS = ("clipart", "painting", "real", "sketch")
TPGM_PERCENTS = (1, 5, 10, 20, 50, 100)
IMAGES_SOURCE = "http://ai.bu.edu/M3SDA/ (each domain's zip)"
SOURCE = "http://ai.bu.edu/M3SDA/ (each domain's zip and its <domain>_train.txt / <domain>_test.txt)"
TPGM_SOURCE = ("github.com/PotatoTian/TPGM, DomainNet_ResNet_Exp/datasets/download_meta.sh (the "
               "domainnet.zip of FTP/TPGM's split files)")
SENTRY_SOURCE = "github.com/virajprabhu/SENTRY, data/DomainNet/txt/<domain>_{train,test}_mini.txt"


@dataclass(frozen=True)
class Layout:
    """One set of split files: file name patterns ({domain}, {percent}), class count, domains."""

    classes: int
    train: str
    val: str | None  # None: val is drawn from train (`val_fraction`)
    test: str
    domains: tuple[str, ...]
    source: str


LAYOUTS = {
    "tpgm": Layout(345, "{domain}_train_{percent}_percent_split.txt", "{domain}_val_{percent}_percent_split.txt",
                   "{domain}_test.txt", DOMAINS, TPGM_SOURCE),
    "official": Layout(345, "{domain}_train.txt", None, "{domain}_test.txt", DOMAINS, SOURCE),
    "sentry": Layout(40, "{domain}_train_mini.txt", None, "{domain}_test_mini.txt", SENTRY_DOMAINS, SENTRY_SOURCE),
}
SPLIT_KEYS = ("split_root", "split_files", "percent", "id_domain", "ood_domains")  # of suite.build


def layout(split_files: str) -> Layout:
    if split_files not in LAYOUTS:
        raise ValueError(f"suite.build.split_files={split_files!r}; valid: {sorted(LAYOUTS)}")
    return LAYOUTS[split_files]


def split_file_paths(split_root: str | Path, split_files: str, percent: int | None, id_domain: str,
                     ood_domains: Sequence[str]) -> dict[str, Path]:
    """{'<domain>_<part>': path} of every split file the suite reads: the ID domain's train, val (when
    the layout has val files) and test, each OOD domain's test."""
    lay = layout(split_files)
    parts = {"train": lay.train, "val": lay.val, "test": lay.test}
    path = lambda pattern, domain: Path(split_root) / pattern.format(domain=domain, percent=percent)  # noqa: E731
    out = {f"{id_domain}_{part}": path(pattern, id_domain) for part, pattern in parts.items() if pattern}
    out.update({f"{d}_test": path(lay.test, d) for d in ood_domains})
    return out


def suite_name(classes: int) -> str:
    """`domainnet` (345 classes) or `domainnet40`: the suite config of each version."""
    return "domainnet" if classes == 345 else f"domainnet{classes}"


def read_split_file(path: Path, classes: int, source: str) -> list[tuple[str, int]]:
    """[(image path relative to the image root, label)] of one split file."""
    if not path.is_file():
        raise FileNotFoundError(f"DomainNet split file {path} not found; get it from {source}, "
                                f"or check with: python -m rftbench.data verify suite={suite_name(classes)}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= classes:
                raise ValueError(f"{path}:{n}: expected '<domain>/<class>/<image> <label in 0..{classes - 1}>', "
                                 f"got {line!r}")
            out.append((parts[0], int(parts[1])))
    return out


def sentry_classes() -> list[str]:
    """SENTRY's 40 DomainNet classes in label order (the shipped domainnet40_classes.txt)."""
    text = resources.files("rftbench.data").joinpath("domainnet40_classes.txt").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def class_names(entries: list[tuple[str, int]], classes: int) -> list[str]:
    """One name per label: the `<class>` folder of its images (SENTRY's list for 40 classes); a label
    whose images lie in two class folders, or not in SENTRY's, is an error."""
    names: dict[int, str] = dict(enumerate(sentry_classes())) if classes == 40 else {}
    for path, y in entries:
        folder = Path(path).parts[1] if len(Path(path).parts) == 3 else None
        if names.setdefault(y, folder) != folder:
            raise ValueError(f"DomainNet split files: {path} has label {y}, whose class is {names[y]!r}; "
                             f"the split files and suite.build.classes={classes} do not match")
    return [names.get(i, f"class_{i}") for i in range(classes)]


def _dataset(root: str | Path, entries: list[tuple[str, int]], what: str) -> ImageFiles:
    root = Path(root)
    missing = [p for p, _ in entries if not (root / p).is_file()]
    if missing:
        raise FileNotFoundError(f"DomainNet {what}: {len(missing)} of {len(entries)} images missing, e.g. "
                                f"{root / missing[0]}; unpack the domain's zip from {IMAGES_SOURCE} into {root}")
    return ImageFiles([(str(root / p), y) for p, y in entries])


def check_options(classes: int, split_files: str, percent: int | None, id_domain: str,
                  ood_domains: Sequence[str], val_fraction: float | None) -> Layout:
    """The layout of `split_files`, after checking that the other keys fit it."""
    lay = layout(split_files)
    if classes != lay.classes:
        raise ValueError(f"suite.build.classes={classes} but split_files={split_files} has {lay.classes} classes "
                         f"(345: suite=domainnet, split_files tpgm or official; 40: suite=domainnet40, sentry)")
    for d in (id_domain, *ood_domains):
        if d not in lay.domains:
            raise ValueError(f"DomainNet domain {d!r} is not in the {split_files} split files; "
                             f"valid: {list(lay.domains)}")
    if id_domain in ood_domains:
        raise ValueError(f"suite.build.ood_domains holds the ID domain {id_domain!r}")
    if split_files == "tpgm" and percent not in TPGM_PERCENTS:
        raise ValueError(f"suite.build.percent={percent!r}: FTP/TPGM's split files exist for {list(TPGM_PERCENTS)}")
    if lay.val is None and val_fraction is None:
        raise ValueError(f"split_files={split_files} has no val file: set suite.build.val_fraction")
    return lay


def _labels(entries: list[tuple[str, int]]) -> torch.Tensor:
    return torch.tensor([y for _, y in entries], dtype=torch.long)


def _pick(entries: list[tuple[str, int]], index: torch.Tensor) -> list[tuple[str, int]]:
    return [entries[i] for i in index.tolist()]


def build_domainnet(root: str, seed: int, cache_dir: str, split_root: str, classes: int, split_files: str,
                    percent: int | None, id_domain: str, ood_domains: Sequence[str], val_fraction: float | None,
                    fraction: float | None = None, shots: int | None = None) -> Suite:
    """The DomainNet suite of `split_files` (module docstring); `seed` draws val (no val file) and the
    `fraction` / `shots` subset of train."""
    del cache_dir  # nothing cached: splits stream from disk
    lay = check_options(classes, split_files, percent, id_domain, ood_domains, val_fraction)
    read = {key: read_split_file(path, classes, lay.source) for key, path in
            split_file_paths(split_root, split_files, percent, id_domain, ood_domains).items()}
    names = class_names([e for entries in read.values() for e in entries], classes)
    train = read.pop(f"{id_domain}_train")
    if lay.val is not None:
        val = read.pop(f"{id_domain}_val")
    else:
        rest, held = stratified_split(_labels(train), val_fraction, seed)
        train, val = _pick(train, rest), _pick(train, held)
    train = _pick(train, limit_per_class(_labels(train), fraction, shots, seed))
    splits = {
        "train": Split("train", "train", dataset=_dataset(root, train, f"{id_domain} train")),
        "val": Split("val", "val", dataset=_dataset(root, val, f"{id_domain} val")),
        "test": Split("test", "test", dataset=_dataset(root, read[f"{id_domain}_test"], f"{id_domain} test")),
    }
    for d in ood_domains:
        key = f"ood/{d}"
        splits[key] = Split(key, "ood", "domain", dataset=_dataset(root, read[f"{d}_test"], f"{d} test"))
    return Suite(suite_name(classes), classes, splits, upstream_classes=None, class_names=names,
                 meta={"root": str(root), "split_files": split_files, "percent": percent, "id_domain": id_domain,
                       "fraction": fraction, "shots": shots, "n_train": len(train), "n_val": len(val),
                       "ood_evaluated": [f"ood/{d}" for d in ood_domains]})
