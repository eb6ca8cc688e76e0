"""`python -m rftbench.data verify|download suite=<s> [overrides]`: what of a suite's data is on disk.

`verify` lists, per part, found / missing / incomplete with the image or file count expected, the
path it looked at and how to obtain the part (the official source). `download` fetches only what
torchvision can download (the ct_transfer datasets, CIFAR) and only when asked; nothing else here
ever downloads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from rftbench.data.base import image_files
from rftbench.data.folders import hidden, list_images


@dataclass
class Check:
    part: str
    status: str        # found | missing | incomplete | unsorted (flat ImageNet val)
    path: str
    found: int | None
    expected: int | None
    how: str

    def line(self) -> str:
        count = "" if self.expected is None and self.found is None else f"{self.found or 0}/{self.expected or '?'}"
        tail = "" if self.status == "found" else f"  -> {self.how}"
        return f"{self.status:<10} {self.part:<32} {count:>16}  {self.path}{tail}"


def count_images(folder: Path) -> int:
    """Image files in the class folders of `folder` (one level down; hidden folders, hidden files and
    macOS `._*` files are not data and are not counted)."""
    return sum(len(list_images(sub.path)) for sub in os.scandir(folder) if sub.is_dir() and not hidden(sub.name))


FLAT_VAL = ("the images lie directly in the folder (the official ILSVRC2012 val tarball's layout): sort them "
            "into one folder per synset, e.g. torchvision.datasets.ImageNet(root, split='val') does it with the "
            "devkit, or the widely used valprep.sh")


def _counted(part: str, path: Path, found: int | None, expected: int | None, how: str) -> Check:
    if found is None:
        return Check(part, "missing", str(path), None, expected, how)
    status = "found" if expected is None or found >= expected else "incomplete"
    return Check(part, status, str(path), found, expected, how)


def verify_objectnet(key: str, root: Path) -> list[Check]:
    """The ObjectNet release at `root` (objectnet-1.0): its images (all 313 classes, counted against the
    release's 50,273) and each of its `mappings/` files; one `missing` line when the folder is absent."""
    from rftbench.data import objectnet

    if not root.is_dir():
        return [Check(key, "missing", str(root), None, objectnet.N_IMAGES, objectnet.SOURCE)]
    images = root / "images"
    out = [_counted(key, images, count_images(images) if images.is_dir() else None, objectnet.N_IMAGES,
                    objectnet.SOURCE)]
    for name in objectnet.MAPPING_FILES:
        path = root / "mappings" / name
        out.append(Check(f"{key}/mappings/{name}", "found" if path.is_file() else "missing", str(path), None,
                         None, f"part of the release: {objectnet.SOURCE}"))
    return out


def verify_imagenet(build: Mapping) -> list[Check]:
    from rftbench.data import imagenet

    root = Path(build["root"])
    wanted = ["train", "test", *[f"ood/{n}" for n in build["ood"]]]
    out = []
    for key in wanted:
        part = imagenet.PARTS[key]
        path = root / part.path
        if part.folders == "objectnet":
            out += verify_objectnet(key, path)
            continue
        found = count_images(path) if path.is_dir() else None
        if found == 0 and list_images(path):  # a flat val folder
            out.append(Check(key, "unsorted", str(path), 0, part.expected, FLAT_VAL))
            continue
        out.append(_counted(key, path, found, part.expected, part.source))
    croot = Path(build["corruption_root"]) if build.get("corruption_root") else None
    for c in build["corruptions"]:
        for s in build["severities"]:
            key = f"ood/corruption/{c}/{s}"
            path = (croot or Path("<suite.build.corruption_root unset>")) / c / str(s)
            found = None
            if croot is not None and path.is_dir():
                files = imagenet.imagenet_c_files(croot, c, s, build["corruption_n"])
                found = sum(Path(f).is_file() for f, _ in files)
            out.append(_counted(key, path, found, build["corruption_n"], imagenet.IMAGENET_C_SOURCE))
    return out


def verify_domainnet(build: Mapping) -> list[Check]:
    from rftbench.data import domainnet

    root = Path(build["root"])
    source = domainnet.layout(build["split_files"]).source
    out = []
    for key, split_file in domainnet.split_file_paths(**{k: build[k] for k in domainnet.SPLIT_KEYS}).items():
        if not split_file.is_file():
            out.append(Check(key, "missing", str(split_file), None, None, source))
            continue
        entries = domainnet.read_split_file(split_file, build["classes"], source)
        found = sum((root / p).is_file() for p, _ in entries)
        out.append(_counted(key, root / key.rsplit("_", 1)[0], found, len(entries), source))
    return out


def verify_cifar(build: Mapping) -> list[Check]:
    import numpy as np

    from rftbench.data import cifar

    dataset = build["dataset"]
    folder, train_files, test_files, _, _ = cifar.LAYOUT[dataset]
    base = Path(build["root"]) / folder
    out = []
    for name in [*train_files, *test_files, cifar.META[dataset][0]]:
        path = base / name
        out.append(Check(f"{dataset}/{name}", "found" if path.is_file() else "missing", str(path),
                         None, None, cifar.HOW_TO_GET))
    if build.get("corruption_root") and build["corruptions"]:
        from rftbench.data import corruption_sets as robust

        cfolder, url = robust._CIFAR_C[dataset]
        for name in [*build["corruptions"], "labels"]:
            path = Path(build["corruption_root"]) / cfolder / f"{name}.npy"
            out.append(Check(f"ood/corruption/{name}" if name != "labels" else f"{cfolder}/labels",
                             "found" if path.is_file() else "missing", str(path), None, None,
                             f"{cfolder}.tar from {url}"))
    if build.get("cifar10_1_root"):
        for name in cifar.CIFAR10_1:
            path = Path(build["cifar10_1_root"]) / name
            n = len(np.load(path, mmap_mode="r")) if path.is_file() else None
            out.append(_counted(f"ood/cifar10_1 ({name.split('_')[-1]})", path, n, cifar.CIFAR10_1_N,
                                cifar.CIFAR10_1_SOURCE))
    return out


def verify_transfer(build: Mapping) -> list[Check]:
    from rftbench.data import transfer

    name, root = build["dataset"], build["root"]
    spec = transfer.SPECS[name]
    out = []
    for role, kwargs in spec.splits.items():
        how = (f"{spec.source}, or: python -m rftbench.data download suite=ct_transfer/{name}"
               if spec.downloadable else spec.source)
        try:
            n = len(transfer.open_split(name, root, kwargs))
            out.append(Check(f"{name}/{role}", "found", root, n, None, how))
        except FileNotFoundError:
            out.append(Check(f"{name}/{role}", "missing", root, None, None, how))
    return out


VERIFIERS = {
    "rftbench.data.imagenet.build_imagenet": verify_imagenet,
    "rftbench.data.domainnet.build_domainnet": verify_domainnet,
    "rftbench.data.cifar.build_cifar": verify_cifar,
    "rftbench.data.transfer.build_transfer": verify_transfer,
}


def verify(suite_cfg: Mapping) -> list[Check]:
    build = dict(suite_cfg["build"])
    target = build.pop("_target_")
    if target not in VERIFIERS:
        return [Check(suite_cfg["name"], "found", "(embedded)", None, None, "nothing to obtain")]
    return VERIFIERS[target](build)


def download(suite_cfg: Mapping) -> list[str]:
    """Download what torchvision can for the suite (ct_transfer datasets, CIFAR); say what it cannot."""
    build = dict(suite_cfg["build"])
    target = build["_target_"]
    if target == "rftbench.data.transfer.build_transfer":
        from rftbench.data import transfer

        spec = transfer.SPECS[build["dataset"]]
        if not spec.downloadable:
            return [f"cannot download {build['dataset']}: get it from {spec.source}"]
        for kwargs in spec.splits.values():
            transfer.open_split(build["dataset"], build["root"], kwargs, download=True)
        return [f"downloaded {build['dataset']} into {build['root']}"]
    if target == "rftbench.data.cifar.build_cifar":
        import torchvision

        cls = torchvision.datasets.CIFAR10 if build["dataset"] == "cifar10" else torchvision.datasets.CIFAR100
        cls(build["root"], download=True)
        return [f"downloaded {build['dataset']} into {build['root']}; CIFAR-10-C / CIFAR-10.1 are not "
                f"downloadable through torchvision: see `verify` for their sources"]
    return [f"suite {suite_cfg['name']}: torchvision cannot download it; `verify` names each part's source"]


def unreadable_images(suite) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(split, path, error) of every image file of `suite` that PIL cannot decode (a full decode, as the
    loader does), and the splits that were not checked (in memory, or another dataset kind)."""
    from PIL import Image

    bad, skipped, seen = [], [], set()
    for name, split in suite.splits.items():
        files = None if split.in_memory else image_files(split.dataset)
        if files is None:
            skipped.append(name)
            continue
        for path in files:
            if path in seen:
                continue
            seen.add(path)
            try:
                with Image.open(path) as image:
                    image.convert("RGB")
            except Exception as exc:  # truncated, empty, not an image
                bad.append((name, path, f"{type(exc).__name__}: {exc}"))
    return bad, skipped
