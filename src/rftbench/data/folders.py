"""Image files on disk as map-style datasets: `(path, label)` lists read lazily as RGB PIL images.

Shared by the folder-based suites (ImageNet and its shifts, DomainNet). Labels always come from an
explicit class index (a shipped synset list, a split file), never from the folders that happen to be
present, so a partial tree keeps the pre-trained head's indices.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFiles(Dataset):
    """`samples`: [(path, label)]; items are (PIL RGB image, label); `targets` lists the labels."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                return image.convert("RGB"), label
        except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated, empty or not an image
            raise ImageFileError(f"cannot read image {path}: {type(exc).__name__}: {exc}; replace or remove "
                                 f"the file (`rftbench data verify` lists the files of each split)") from None


class ImageFileError(OSError):
    """An image file of a suite cannot be decoded (truncated, empty, not an image): names the file.
    Raised in a DataLoader worker, it comes back with the worker's traceback in its message; `str`
    keeps the one line that names the file."""

    def __str__(self) -> str:
        text = super().__str__()
        start = text.rfind("cannot read image ")  # the last line: the message (source lines come first)
        return text[start:].splitlines()[0] if start >= 0 else text


def hidden(name: str) -> bool:
    """Hidden entries and macOS AppleDouble files (`.DS_Store`, `.ipynb_checkpoints`, `._x.JPEG`): never data."""
    return name.startswith(".")


def list_images(folder: str | Path) -> list[str]:
    """Image files directly inside `folder`, sorted by name (hidden and `._*` files ignored)."""
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and not hidden(e.name)
                      and e.name.lower().endswith(IMAGE_EXTENSIONS))


def class_folders(root: str | Path, class_index: dict[str, int]) -> list[tuple[str, int]]:
    """Samples of `root/<class>/<image>` for the class folders that exist, labelled by `class_index`
    (folders not in the index are an error: a wrong root or a foreign layout)."""
    root = Path(root)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not hidden(p.name))
    unknown = [name for name in found if name not in class_index]
    if unknown:
        raise ValueError(f"{root}: folders {unknown[:5]} are not classes of this dataset "
                         f"(expected names such as {next(iter(class_index))!r}); check the path")
    return [(path, class_index[name]) for name in found for path in list_images(root / name)]
