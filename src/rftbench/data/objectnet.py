"""ObjectNet (Barbu et al., NeurIPS 2019) as `ood/objectnet` of the ImageNet suite, read from its release.

The release (objectnet-1.0.zip) unpacks under `${paths.data}` as:
    objectnet-1.0/images/<folder>/<file>.png                  313 class folders, 50,273 images
    objectnet-1.0/mappings/folder_to_objectnet_label.json     {folder: ObjectNet label}
    objectnet-1.0/mappings/objectnet_to_imagenet_1k.json      {ObjectNet label: "ImageNet name; ImageNet name; ..."}
    objectnet-1.0/mappings/imagenet_to_label_2012_v2          one ImageNet class name per line, ILSVRC2012_ID order
    objectnet-1.0/mappings/pytorch_to_imagenet_2012_id.json   {standard class index: line of the file above}

The protocol of the reference evaluations (ObjectNet's own evaluation template, WiSE-FT, model soups):
- only the ObjectNet classes that the release maps to ImageNet classes are scored (113 of 313);
  images of the other classes are not read;
- class k's logit is the maximum of the model's logits over its ImageNet classes (e.g. "Chair": barber
  chair, folding chair, rocking chair), so accuracy, ECE and NLL are those of the 113-way logits
  (`Split.logit_groups`, applied by `rftbench.data.base.pooled`); labels 0..112 follow the sorted
  folder names;
- every image loses a 2 px border on each side (the release's red frame) before the evaluation transform.
The class mapping is read from the release's own `mappings/` files; nothing about it is shipped here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image

from rftbench.data.base import Split
from rftbench.data.folders import ImageFiles, hidden, list_images

log = logging.getLogger("rftbench")

RELEASE = "objectnet-1.0"
FOLDER_TO_LABEL = "folder_to_objectnet_label.json"
LABEL_TO_IMAGENET = "objectnet_to_imagenet_1k.json"
IMAGENET_NAMES = "imagenet_to_label_2012_v2"
INDEX_TO_LINE = "pytorch_to_imagenet_2012_id.json"
MAPPING_FILES = (FOLDER_TO_LABEL, LABEL_TO_IMAGENET, IMAGENET_NAMES, INDEX_TO_LINE)
BORDER = 2           # pixels cropped on every side, as the reference evaluation code does
N_IMAGES = 50_273    # images in the release, all 313 classes
SOURCE = ("https://objectnet.dev/download.html (objectnet-1.0.zip, password on that page; unzip it into "
          "${paths.data} so that objectnet-1.0/images and objectnet-1.0/mappings exist)")


def mapping_file(root: str | Path, name: str) -> Path:
    """`<root>/mappings/<name>`, or FileNotFoundError naming it and where the release is."""
    path = Path(root) / "mappings" / name
    if not path.is_file():
        raise FileNotFoundError(f"ObjectNet mapping {path} not found; it comes with the release: {SOURCE}")
    return path


def _json(root: str | Path, name: str) -> dict:
    return json.loads(mapping_file(root, name).read_text())


def imagenet_index(root: str | Path) -> dict[str, int]:
    """ImageNet class name as written in `imagenet_to_label_2012_v2` -> standard class index (through
    `pytorch_to_imagenet_2012_id.json`); a name two classes share (e.g. "crane") maps to -1."""
    lines = mapping_file(root, IMAGENET_NAMES).read_text().splitlines()
    out: dict[str, int] = {}
    for index, line in _json(root, INDEX_TO_LINE).items():
        name = lines[int(line)].strip()
        out[name] = -1 if name in out else int(index)
    return out


def class_groups(root: str | Path) -> dict[str, list[int]]:
    """ObjectNet folder -> the sorted standard ImageNet indices its class maps to, for every ObjectNet
    class with a mapping (113 in the release), in sorted folder order (label k = k-th folder)."""
    folder_of = {label: folder for folder, label in _json(root, FOLDER_TO_LABEL).items()}
    index = imagenet_index(root)
    groups = {}
    for label, names in _json(root, LABEL_TO_IMAGENET).items():
        if label not in folder_of:
            raise ValueError(f"ObjectNet class {label!r} of {LABEL_TO_IMAGENET} has no folder in {FOLDER_TO_LABEL}")
        ids = [index.get(name.strip()) for name in names.split(";")]
        bad = [n.strip() for n, i in zip(names.split(";"), ids) if i is None or i < 0]
        if bad:
            raise ValueError(f"ObjectNet class {label!r}: ImageNet names {bad} are missing or ambiguous in "
                             f"{IMAGENET_NAMES}")
        groups[folder_of[label]] = sorted(ids)
    return dict(sorted(groups.items()))


class BorderCropped(ImageFiles):
    """`ImageFiles` whose images lose `border` pixels on every side."""

    def __init__(self, samples: list[tuple[str, int]], border: int = BORDER):
        super().__init__(samples)
        self.border = border

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = super().__getitem__(i)
        b = self.border
        return image.crop((b, b, image.width - b, image.height - b)), label


def objectnet_split(root: str | Path, name: str = "ood/objectnet", shift: str = "natural") -> Split:
    """The scored part of the ObjectNet release at `root` (the `objectnet-1.0` folder): images of the
    mapped classes (present folders only), labels 0..K-1, with the K logit groups and the border crop."""
    root = Path(root)
    groups = class_groups(root)
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"ObjectNet images {images} not found; {SOURCE}")
    known = _json(root, FOLDER_TO_LABEL)
    present = sorted(p.name for p in images.iterdir() if p.is_dir() and not hidden(p.name))
    unknown = [f for f in present if f not in known]
    if unknown:
        raise ValueError(f"{images}: folders {unknown[:5]} are not ObjectNet classes of {FOLDER_TO_LABEL}; "
                         f"check the path")
    label = {folder: k for k, folder in enumerate(groups)}
    samples = [(path, label[f]) for f in present if f in label for path in list_images(images / f)]
    log.info("ObjectNet: %d images of %d of its %d ImageNet-mapped classes scored; %d folders of other classes "
             "not scored", len(samples), sum(f in label for f in present), len(groups),
             sum(f not in label for f in present))
    return Split(name, "ood", shift, dataset=BorderCropped(samples), logit_groups=list(groups.values()))
