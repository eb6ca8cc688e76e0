"""ImageNet (ILSVRC-2012) with its natural shifts and ImageNet-C, streamed from the releases' layouts.

Under `root` (`${paths.data}`), as the releases unpack:
    imagenet/train/<wnid>/*                         ID train (val_per_class per class held out as val)
    imagenet/val/<wnid>/*                           ID test (the official 50,000-image val set)
    imagenetv2-matched-frequency-format-val/<i>/*   ood/imagenet_v2 (folders are class indices)
    imagenet-r/<wnid>/*                             ood/imagenet_r (200 classes, logits masked)
    imagenet-a/<wnid>/*                             ood/imagenet_a (200 classes, logits masked)
    imagenet-sketch/sketch/<wnid>/*                 ood/imagenet_sketch
    objectnet-1.0/{images,mappings}/...             ood/objectnet (113 classes, max-pooled logits: data/objectnet.py)
    ImageNet-C/<corruption>/<severity>/<wnid>/*     ood/corruption/<c>/<s> (RobustBench's 5,000 images)
Class indices follow the standard 1,000-synset order shipped in `imagenet_synsets.txt`; the 200
classes of ImageNet-R and ImageNet-A are the shipped `imagenet_{r,a}_synsets.txt`. A missing OOD
split is skipped with one warning naming its path; `Suite.meta` says which were evaluated.
`headline_ood` (the suite's headline OOD splits, WiSE-FT's five shifts) goes to `Suite.meta["headline_ood"]`:
`rftbench.evaluate.summary_rows` makes the headline `ood acc_mean` from exactly those.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from rftbench.data import objectnet
from rftbench.data.base import Split, Suite, hold_out_per_class, limit_per_class
from rftbench.data.folders import ImageFiles, class_folders

log = logging.getLogger("rftbench")


def _lines(name: str) -> list[str]:
    return resources.files("rftbench.data").joinpath(name).read_text().split("\n")[:-1]


def synsets() -> list[str]:
    """The 1,000 ImageNet synsets in the standard class-index order."""
    return _lines("imagenet_synsets.txt")


def class_names() -> list[str]:
    """One human-readable name per class (the first WordNet lemma), in the standard order."""
    return _lines("imagenet_class_names.txt")


def subset_indices(name: str) -> list[int]:
    """Standard class indices of the 200 classes of ImageNet-R (`r`) or ImageNet-A (`a`)."""
    index = {s: i for i, s in enumerate(synsets())}
    return sorted(index[s] for s in _lines(f"imagenet_{name}_synsets.txt"))


@dataclass(frozen=True)
class Part:
    """One part of the ImageNet family on disk: where it unpacks, its folder names, its size."""

    path: str
    folders: str             # "wnid", "index" or "objectnet" (its own release layout)
    expected: int            # images in the full release
    source: str              # where to get it
    mask: str | None = None  # "r" / "a": the 200-class subset
    shift: str = "id"


IMAGENET_SOURCE = "https://image-net.org/download-images.php (ILSVRC2012 train and val; val sorted into synset folders, e.g. with the PyTorch examples' valprep.sh)"
PARTS = {
    "train": Part("imagenet/train", "wnid", 1_281_167, IMAGENET_SOURCE),
    "test": Part("imagenet/val", "wnid", 50_000, IMAGENET_SOURCE),
    "ood/imagenet_v2": Part("imagenetv2-matched-frequency-format-val", "index", 10_000,
                            "https://huggingface.co/datasets/vaishaal/ImageNetV2 (imagenetv2-matched-frequency.tar.gz)",
                            shift="natural"),
    "ood/imagenet_r": Part("imagenet-r", "wnid", 30_000, "https://github.com/hendrycks/imagenet-r (imagenet-r.tar)", "r", "domain"),
    "ood/imagenet_a": Part("imagenet-a", "wnid", 7_500, "https://github.com/hendrycks/natural-adv-examples (imagenet-a.tar)", "a", "natural"),
    "ood/imagenet_sketch": Part("imagenet-sketch/sketch", "wnid", 50_889,
                                "https://github.com/HaohanWang/ImageNet-Sketch (ImageNet-Sketch.zip)", shift="domain"),
    "ood/objectnet": Part(objectnet.RELEASE, "objectnet", objectnet.N_IMAGES, objectnet.SOURCE, shift="natural"),
}
OOD = ("imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch", "objectnet")
IMAGENET_C_SOURCE = "https://zenodo.org/records/2235448 (ImageNet-C, one tar per corruption family)"


def class_index(folders: str) -> dict[str, int]:
    if folders == "index":
        return {str(i): i for i in range(1000)}
    return {s: i for i, s in enumerate(synsets())}


def read_part(root: str | Path, part: Part) -> ImageFiles:
    return ImageFiles(class_folders(Path(root) / part.path, class_index(part.folders)))


def ood_split(root: str | Path, key: str, part: Part) -> Split:
    """One OOD split of the family: ImageNet-R/A with their 200-class mask, ObjectNet with its 113
    logit groups and border crop, the others over all 1,000 classes."""
    if part.folders == "objectnet":
        return objectnet.objectnet_split(Path(root) / part.path, key, part.shift)
    mask = subset_indices(part.mask) if part.mask else None
    return Split(key, "ood", part.shift, dataset=read_part(root, part), class_mask=mask)


def imagenet_c_files(root: str | Path, corruption: str, severity: int, n: int) -> list[tuple[str, int]]:
    """RobustBench's ImageNet-C protocol: the first `n` (<= 5,000) files of its fixed list, labelled
    with the standard indices (the list and the label map of `rftbench.data.corruption_sets.load_imagenet_c`)."""
    from rftbench.data import corruption_sets as robust

    if not 0 < n <= robust.IMAGENET_C_N_MAX:
        raise ValueError(f"corruption_n must be in 1..{robust.IMAGENET_C_N_MAX} (RobustBench's list), got {n}")
    files, labels = robust.robustbench_imagenet_ids(n), robust.robustbench_class_index()
    folder = Path(root) / corruption / str(severity)
    return [(str(folder / f), labels[f.split("/")[0]]) for f in files]


def build_imagenet(root: str, seed: int, cache_dir: str, val_per_class: int, ood: Sequence[str],
                   corruption_root: str | None, corruptions: Sequence[str], severities: Sequence[int],
                   corruption_n: int, headline_ood: Sequence[str] = (), fraction: float | None = None,
                   shots: int | None = None) -> Suite:
    """ImageNet suite: train (minus `val_per_class` images per class, seeded, held out as `val`; 0 =
    no val split), the official val as `test`, and each OOD split present on disk; `headline_ood`
    names the splits of the headline OOD mean (one not in `ood` or not on disk: not reported, see
    `rftbench.evaluate.headline_rows`). `fraction` / `shots`: a class-balanced
    subset of train drawn by `seed` after val is held out (`rftbench.data.base.limit_per_class`)."""
    del cache_dir  # nothing is cached: every split streams from disk
    unknown = set(ood) - set(OOD)
    if unknown:
        raise ValueError(f"suite.build.ood has unknown splits {sorted(unknown)}; valid: {list(OOD)}")
    if set(headline_ood) - set(OOD):
        raise ValueError(f"suite.build.headline_ood has unknown splits {sorted(set(headline_ood) - set(OOD))}; "
                         f"valid: {list(OOD)}")
    for name in ("train", "test"):
        path = Path(root) / PARTS[name].path
        if not path.is_dir():
            raise FileNotFoundError(f"ImageNet {name} not found at {path}; get it from {PARTS[name].source}, "
                                    f"or check with: python -m rftbench.data verify suite=imagenet")
    train = read_part(root, PARTS["train"])
    splits: dict[str, Split] = {}
    targets = torch.as_tensor(train.targets)
    rest, held = (hold_out_per_class(targets, val_per_class, seed) if val_per_class > 0
                  else (torch.arange(len(targets)), None))
    rest = rest[limit_per_class(targets[rest], fraction, shots, seed)]
    splits["train"] = Split("train", "train", dataset=ImageFiles([train.samples[i] for i in rest.tolist()]))
    if held is not None:
        splits["val"] = Split("val", "val", dataset=ImageFiles([train.samples[i] for i in held.tolist()]))
    splits["test"] = Split("test", "test", dataset=read_part(root, PARTS["test"]))
    evaluated, missing = [], []
    for name in ood:
        key, part = f"ood/{name}", PARTS[f"ood/{name}"]
        path = Path(root) / part.path
        if not path.is_dir():
            log.warning("ImageNet OOD split %s skipped: %s not found (get it from %s)", key, path, part.source)
            missing.append(key)
            continue
        splits[key] = ood_split(root, key, part)
        evaluated.append(key)
    for corruption in corruptions:
        folder = Path(corruption_root or "") / corruption
        if corruption_root is None or not folder.is_dir():
            log.warning("ImageNet-C %s skipped: %s not found (get it from %s)", corruption, folder, IMAGENET_C_SOURCE)
            missing.append(f"ood/corruption/{corruption}")
            continue
        for sev in severities:
            key = f"ood/corruption/{corruption}/{sev}"
            files = ImageFiles(imagenet_c_files(corruption_root, corruption, sev, corruption_n))
            # ImageNet-C images are 224 px centre crops already: resized, not cropped again (RobustBench)
            splits[key] = Split(key, "ood", "corruption", dataset=files, corruption=corruption, severity=sev,
                                meta={"eval_transform": {"name": "resize"}})
            evaluated.append(key)
    meta = {"upstream": "imagenet", "root": str(root), "fraction": fraction, "shots": shots,
            "n_train": len(splits["train"]),
            "n_val": len(splits["val"]) if "val" in splits else 0, "ood_evaluated": evaluated,
            "ood_missing": missing, "headline_ood": [f"ood/{n}" for n in headline_ood]}
    return Suite("imagenet", 1000, splits, upstream_classes=list(range(1000)), meta=meta,
                 class_names=class_names())
