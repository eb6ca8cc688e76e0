"""The pre-flight file check of a run: every image file of the suite's splits that is empty or
truncated, found from its size and trailer (no decode: a few bytes per file), before any training, so
that a damaged test or OOD image costs no training. A split that passed is remembered in the cache
(keyed by its files' paths, sizes and modification times: `rftbench.features.split_keys`), so a
later run only stats its files. `rftbench data verify` prints the same list.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from rftbench.data.base import ImageFileError, image_files
from rftbench.data.folders import JPEG_SOI

TAIL_BYTES = 64  # read from the end of each file: enough for a trailer and some zero padding
HEAD_BYTES = 16  # read from the start: the signature and, for WebP and BMP, the declared file size
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE, PNG_IEND = b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82"  # IEND: length 0, type, CRC
CHECK_VERSION = b"image-files-check-1"  # part of a remembered result's key: bump when the check changes


def _declared_size(head: bytes) -> int | None:
    """The file size a WebP (RIFF: chunk size + 8) or BMP (bfSize) header declares; None for others."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8
    if head[:2] == b"BM":
        return int.from_bytes(head[2:6], "little") or None  # 0: not filled in by the encoder
    return None


def trailer_damage(path: str) -> str | None:
    """Why the file at `path` is damaged, from its size and its first and last bytes (no decode): empty,
    a JPEG (by its signature, whatever the extension) that does not end with the end-of-image marker
    FF D9 (trailing zero padding allowed), a PNG that does not end with its IEND chunk, a WebP or BMP
    shorter than its header says; None when it looks whole."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError as exc:
        return f"cannot be opened ({exc.strerror or exc})"
    if size == 0:
        return "empty file (0 bytes)"
    if head.startswith(JPEG_SOI) and not tail.rstrip(b"\0").endswith(JPEG_EOI):
        return f"truncated JPEG ({size} bytes): no end-of-image marker FF D9 at its end"
    if head.startswith(PNG_SIGNATURE) and not tail.endswith(PNG_IEND):
        return f"truncated PNG ({size} bytes): no IEND chunk at its end"
    declared = _declared_size(head)
    if declared is not None and size < declared:
        return f"truncated ({size} of the {declared} bytes its header declares)"
    return None


def decode_error(path: str) -> str | None:
    """PIL's error when it decodes `path` as the loader does (None: it decodes)."""
    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _in_threads(fn, items: list, block: int = 2048) -> list:
    """`[fn(x) for x in items]` in threads (file reads wait on the disk, not the interpreter)."""
    from concurrent.futures import ThreadPoolExecutor

    from rftbench.utils import available_cores

    blocks = [items[i:i + block] for i in range(0, len(items), block)]
    with ThreadPoolExecutor(max_workers=min(32, 4 * available_cores())) as pool:
        return [r for rows in pool.map(lambda b: [fn(x) for x in b], blocks) for r in rows]


def damaged_files(paths: list[str]) -> list[tuple[str, str]]:
    """(path, why) of each file that fails `trailer_damage` and that PIL cannot decode either (a file
    with data after its end marker, which PIL reads, is not damaged)."""
    flagged = [(p, why) for p, why in zip(paths, _in_threads(trailer_damage, paths)) if why is not None]
    return [(p, f"{why} (PIL: {err})") for p, why in flagged if (err := decode_error(p)) is not None]


def _checked_marker(split, cache_dir: str | Path | None) -> Path | None:
    """Where a passed check of `split`'s files is remembered: keyed by every file's path, size and
    mtime (the feature store's image keys, `rftbench.features.split_keys`); None without a cache or
    when a file cannot be stat'ed (the check itself then names it)."""
    import hashlib

    from rftbench.features import split_keys

    if not cache_dir:
        return None
    try:
        keys = split_keys(split)
    except OSError:
        return None
    if keys is None:
        return None
    return Path(cache_dir) / "checked" / hashlib.sha256(CHECK_VERSION + b"".join(keys)).hexdigest()


def _remember(marker: Path) -> None:
    from rftbench.utils import UNWRITABLE, cache_unwritable, write_text_atomic

    try:
        write_text_atomic(marker, "")
    except OSError as exc:  # a read-only cache: checked, not remembered
        if exc.errno not in UNWRITABLE:
            raise
        cache_unwritable(marker.parent, exc)


def damaged_images(suite, cache_dir: str | Path | None) -> list[tuple[str, str, str]]:
    """(split, path, why) of every damaged image file (`damaged_files`) of the suite's splits whose
    items are image files. A split that passes is remembered in `<cache_dir>/checked/` (when writable),
    so that a later run over the same files only stats them."""

    bad = []
    for name, split in suite.splits.items():
        files = None if split.in_memory else image_files(split.dataset)
        if not files:
            continue
        marker = _checked_marker(split, cache_dir)
        if marker is not None and marker.exists():
            continue
        found = damaged_files(files)
        bad += [(name, path, why) for path, why in found]
        if not found and marker is not None:
            _remember(marker)
    return bad


def check_image_files(suite, cache_dir: str | Path | None) -> None:
    """Raise one `ImageFileError` naming the first damaged image file of `suite` and its split (and how
    many others there are), before any training reads them (`damaged_images`)."""
    bad = damaged_images(suite, cache_dir)
    if bad:
        split, path, why = bad[0]
        more = (f"; {len(bad) - 1} more damaged file(s): `rftbench data verify suite=...` lists them"
                if len(bad) > 1 else "")
        raise ImageFileError(f"cannot read image {path}: {why}; replace or remove the file{more} (split {split})")
