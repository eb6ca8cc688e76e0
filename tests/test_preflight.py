"""The pre-flight file check: empty and truncated image files of any split are named, with their
split, right after the suite is built and before any training; a passed check is remembered in the
cache (keyed by the files' paths, sizes and mtimes), and `rftbench data verify` lists the same files."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rftbench.data import preflight
from rftbench.data.base import Split, Suite
from rftbench.data.folders import ImageFileError, ImageFiles
from rftbench.data.preflight import damaged_files, damaged_images, trailer_damage
from rftbench.run import execute, run_folder
from test_bad_inputs import IMAGENET, failed_before_training, trainings  # noqa: F401 (fixture)
from test_imagenet import WNIDS, write_imagenet

PIXELS = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def image(path: Path, fmt: str) -> bytes:
    Image.fromarray(PIXELS).save(path, fmt)
    return path.read_bytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_whole_files_pass_and_an_empty_one_is_named(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    image(path, fmt)
    assert trailer_damage(str(path)) is None
    path.write_bytes(b"")
    assert trailer_damage(str(path)) == "empty file (0 bytes)"
    assert trailer_damage(str(tmp_path / "gone.jpg")) == "cannot be opened (No such file or directory)"


def test_jpeg_must_end_with_eoi_allowing_zero_padding(tmp_path):
    path = tmp_path / "x.JPEG"
    data = image(path, "JPEG")
    assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"
    path.write_bytes(data + b"\0" * 40)  # some encoders pad
    assert trailer_damage(str(path)) is None
    path.write_bytes(data[:-1])
    assert trailer_damage(str(path)) == (f"truncated JPEG ({len(data) - 1} bytes): "
                                         f"no end-of-image marker FF D9 at its end")
    # by the signature, not the name: a JPEG saved as .png (as a few ImageNet files are)
    other = tmp_path / "really_a_jpeg.png"
    other.write_bytes(data[:100])
    assert trailer_damage(str(other)).startswith("truncated JPEG (100 bytes)")


def test_png_must_end_with_the_iend_chunk_and_webp_bmp_with_their_declared_size(tmp_path):
    png = tmp_path / "x.png"
    data = image(png, "PNG")
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, "IEND", its CRC-32
    png.write_bytes(data[:-12])
    assert trailer_damage(str(png)) == f"truncated PNG ({len(data) - 12} bytes): no IEND chunk at its end"
    webp = tmp_path / "x.webp"
    data = image(webp, "WEBP")
    assert int.from_bytes(data[4:8], "little") + 8 == len(data)  # the RIFF size field
    webp.write_bytes(data[:-5])
    assert trailer_damage(str(webp)) == f"truncated ({len(data) - 5} of the {len(data)} bytes its header declares)"
    bmp = tmp_path / "x.bmp"
    data = image(bmp, "BMP")
    bmp.write_bytes(data[:-7])
    assert trailer_damage(str(bmp)) == f"truncated ({len(data) - 7} of the {len(data)} bytes its header declares)"


def test_a_flagged_file_that_decodes_is_not_damaged(tmp_path):
    """Data after the end marker (which PIL reads) passes; a cut file and an empty one do not."""
    whole, appended, cut, empty = (tmp_path / f"{n}.jpg" for n in ("whole", "appended", "cut", "empty"))
    data = image(whole, "JPEG")
    appended.write_bytes(data + b"trailing metadata")
    cut.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")
    assert trailer_damage(str(appended)) is not None
    bad = damaged_files([str(p) for p in (whole, appended, cut, empty)])
    assert [p for p, _ in bad] == [str(cut), str(empty)]
    assert bad[0][1].startswith("truncated JPEG") and "(PIL: OSError: " in bad[0][1]
    assert bad[1][1].startswith("empty file (0 bytes) (PIL: UnidentifiedImageError")


def file_suite(tmp_path: Path, n: int = 3) -> tuple[Suite, list[Path]]:
    """Two splits of the same `n` JPEG files (written if absent) and an in-memory split."""
    paths = [tmp_path / f"img_{i}.jpg" for i in range(n)]
    for p in paths:
        if not p.exists():
            image(p, "JPEG")
    files = ImageFiles([(str(p), i % 2) for i, p in enumerate(paths)])
    splits = {"test": Split("test", "test", dataset=files),
              "ood/x": Split("ood/x", "ood", dataset=files),
              "mem": Split("mem", "train", x=torch.zeros(1, 3, 4, 4), y=torch.zeros(1, dtype=torch.long))}
    return Suite("s", 2, splits), paths


@pytest.fixture
def counted_reads(monkeypatch) -> list[str]:
    reads = []
    real = preflight.trailer_damage
    monkeypatch.setattr(preflight, "trailer_damage", lambda p: reads.append(p) or real(p))
    return reads


def test_a_passed_check_is_remembered_by_path_size_and_mtime(tmp_path, counted_reads):
    cache = tmp_path / "cache"
    suite, paths = file_suite(tmp_path)
    # two splits of the same 3 files: checked once (one key), the in-memory split not at all
    assert damaged_images(suite, cache) == [] and len(counted_reads) == 3
    assert len(list((cache / "checked").iterdir())) == 1
    fresh, _ = file_suite(tmp_path)  # a later run: new split objects, files only stat'ed
    counted_reads.clear()
    assert damaged_images(fresh, cache) == [] and counted_reads == []
    data = paths[1].read_bytes()
    fresh, _ = file_suite(tmp_path)
    paths[1].write_bytes(data[:-20])  # another size and mtime: checked again
    bad = damaged_images(fresh, cache)
    assert [(s, p) for s, p, _ in bad] == [("test", str(paths[1])), ("ood/x", str(paths[1]))]
    assert len(counted_reads) == 6
    assert damaged_images(fresh, None) == bad  # without a cache: the same check


def test_a_read_only_cache_checks_without_remembering(tmp_path, monkeypatch, caplog, counted_reads):
    from rftbench import utils

    def refuse(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(utils, "write_text_atomic", refuse)
    suite, _ = file_suite(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rftbench"):
        assert damaged_images(suite, tmp_path / "ro") == [] and damaged_images(suite, tmp_path / "ro") == []
    assert len(counted_reads) == 12 and "is not writable (Read-only file system)" in caplog.text


def test_check_image_files_is_one_line_naming_file_split_and_the_others(tmp_path):
    suite, paths = file_suite(tmp_path)
    paths[0].write_bytes(b"")
    with pytest.raises(ImageFileError) as exc:
        preflight.check_image_files(suite, None)
    msg = str(exc.value)
    assert msg.startswith(f"cannot read image {paths[0]}: empty file (0 bytes)") and "\n" not in msg
    assert "1 more damaged file(s): `rftbench data verify" in msg and msg.endswith("(split test)")


TRAIN_0 = [f"imagenet/train/{WNIDS[0]}/img_{i}.JPEG" for i in range(4)]  # its train and val images


@pytest.mark.parametrize("split, names, damage", [
    ("test", [f"imagenet/val/{WNIDS[1]}/img_0.JPEG"], lambda b: b[: len(b) // 2]),
    ("ood/imagenet_r", [f"imagenet-r/{WNIDS[2]}/img_1.jpg"], lambda b: b""),
    ("train", TRAIN_0, lambda b: b[:-2]),
])
def test_a_damaged_image_fails_the_run_before_training_and_the_fixed_rerun_is_done(
        make_cfg, tmp_path, trainings, split, names, damage):
    data = tmp_path / "data"
    write_imagenet(data, val_per_class=2)
    good = {n: (data / n).read_bytes() for n in names}
    for n in names:
        (data / n).write_bytes(damage(good[n]))
    cfg = make_cfg(*IMAGENET, f"paths.data={data}", experiment=None)
    with pytest.raises(ImageFileError) as exc:
        execute(cfg)
    msg = str(exc.value)
    assert any(msg.startswith(f"cannot read image {data / n}: ") for n in names) and msg.endswith(f"(split {split})")
    failed_before_training(cfg, trainings)
    assert f"(split {split})" in (run_folder(cfg).path / "error.txt").read_text()
    for n in names:
        (data / n).write_bytes(good[n])
    assert execute(cfg) == "done"  # the same command, fixed


def test_an_image_error_is_one_console_line_naming_error_txt(tmp_path, cache_dir):
    import subprocess
    import sys

    data = tmp_path / "data"
    write_imagenet(data, val_per_class=2)
    cut = data / "imagenet/val" / WNIDS[1] / "img_0.JPEG"
    cut.write_bytes(cut.read_bytes()[:-3])
    cmd = [sys.executable, "-m", "rftbench.run", *IMAGENET, f"paths.data={data}", f"paths.runs={tmp_path / 'runs'}",
           f"paths.cache={cache_dir}", "device=cpu", "tracking.enabled=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in out
    (line,) = [ln for ln in out.splitlines() if "failed: ImageFileError" in ln]
    assert f"cannot read image {cut}: truncated JPEG" in line and "(split test) (details: " in line
    assert "Traceback" in Path(line.rsplit("(details: ", 1)[1].rstrip(")")).read_text()


def test_verify_lists_truncated_and_empty_files_with_their_split(tmp_path, capsys):
    from rftbench.data.__main__ import main

    write_imagenet(tmp_path, val_per_class=2)
    cut = tmp_path / "imagenet/val" / WNIDS[1] / "img_0.JPEG"
    cut.write_bytes(cut.read_bytes()[:-2])
    empty = tmp_path / "imagenet-r" / WNIDS[2] / "img_1.jpg"
    empty.write_bytes(b"")
    args = ["verify", "suite=imagenet", f"paths.data={tmp_path}", "suite.build.corruptions=[]",
            "suite.build.ood=[imagenet_r]", "suite.build.val_per_class=1", f"paths.cache={tmp_path / 'cache'}"]
    assert main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    damaged = [ln.split()[:3] for ln in lines if ln.startswith("damaged")]
    assert damaged == [["damaged", "test", str(cut)], ["damaged", "ood/imagenet_r", str(empty)]]
    assert lines[-1] == "0 found, 0 missing, 3 incomplete, 2 damaged image file(s)"
    cut.write_bytes(cut.read_bytes() + b"\xff\xd9")  # the cut end marker back: whole again
    os.remove(empty)
    assert main(args) == 1  # only incomplete (a tiny tree)
    lines = capsys.readouterr().out.splitlines()
    assert not [ln for ln in lines if ln.startswith("damaged")] and lines[-1] == "0 found, 0 missing, 3 incomplete"
    assert main(args[:-2] + args[-1:]) == 1  # the default val_per_class=10: more than the tree's 4 per class
    out = capsys.readouterr().out
    assert "file check skipped: the suite cannot be built: val_per_class=10 but class 0 has only 4" in out


class ListedFiles(torch.utils.data.Dataset):
    """A torchvision-style dataset (as the transfer suites load: Flowers102, DTD, ...): its files in
    `_image_files`, read by PIL in __getitem__, wrapped in a subset like `rftbench.data.transfer.Indexed`."""

    def __init__(self, paths: list[Path]):
        self._image_files, self._labels = paths, [0] * len(paths)

    def __len__(self) -> int:
        return len(self._image_files)

    def __getitem__(self, i: int):
        return Image.open(self._image_files[i]).convert("RGB"), self._labels[i]


def test_torchvision_datasets_that_list_their_files_are_checked_and_named_too(tmp_path):
    from rftbench.data.base import Transformed, image_files

    paths = [tmp_path / f"{i}.jpg" for i in range(3)]
    data = image(paths[0], "JPEG")
    for p in paths[1:]:
        p.write_bytes(data)
    paths[2].write_bytes(data[:200])  # truncated
    listed = torch.utils.data.Subset(ListedFiles(paths), [2, 0])
    assert image_files(listed) == [str(paths[2]), str(paths[0])]
    suite = Suite("t", 1, {"test": Split("test", "test", dataset=listed)})
    with pytest.raises(ImageFileError, match=rf"cannot read image {paths[2]}: truncated JPEG .*\(split test\)$"):
        preflight.check_image_files(suite, None)
    paths[1].write_bytes(b"")  # read by the loader: the library's OSError comes back naming the file
    with pytest.raises(ImageFileError, match=rf"cannot read image {paths[1]}: UnidentifiedImageError.*\(split s\)$"):
        Transformed(ListedFiles(paths), None, "s")[(1, None)]
