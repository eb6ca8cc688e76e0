"""suite.decode=cuda: DataLoader workers read file bytes, the main process decodes the batch's JPEGs on a
device (`torchvision.io.decode_jpeg`, batched) and runs the split's transforms there.

On the CPU everything but nvjpeg is checked by running the same bytes path with the decode device set to
`cpu`: torchvision's CPU JPEG decoder and PIL both use libjpeg-turbo with the same defaults, so the
bytes path gives exactly (bit for bit) the tensors of the normal path, augmentation included. The
`gpu` test compares decode=cuda with decode=cpu within the tolerances stated there.
"""
from __future__ import annotations

import copy
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image
from torch.utils.data import Subset

from rftbench.backbones import InputSpec
from rftbench.data.base import Split, Suite, UInt8Images, batches
from rftbench.data.folders import (DeviceDecoder, EncodedFiles, ImageFileError, ImageFiles, decode_jpegs,
                                   device_batch, jpeg_components)
from rftbench.data.objectnet import BorderCropped
from rftbench.transforms import attach, eval_transform, train_transform
from rftbench.validate import ConfigError, validate_config

SPEC = InputSpec(size=32, interpolation="bicubic", crop_pct=0.875)
EVAL = {"name": "center_crop"}
TRAIN = {"name": "random_resized_crop", "scale": [0.08, 1.0], "flip": True}
# (file name, PIL mode, format): 4:2:0 and 4:4:4 colour JPEGs, a grey and a CMYK JPEG, a progressive
# JPEG, a PNG, and a PNG saved under a .JPEG name (as one ImageNet train file is)
FILES = [("a.JPEG", "RGB", "JPEG"), ("b.jpg", "RGB", "JPEG444"), ("c.JPEG", "L", "JPEG"),
         ("d.jpg", "CMYK", "JPEG"), ("e.jpeg", "RGB", "JPEGprog"), ("f.png", "RGB", "PNG"),
         ("g.JPEG", "RGB", "PNG"), ("h.JPEG", "RGB", "JPEG")]


def smooth_image(seed: int, mode: str = "RGB") -> Image.Image:
    """An image of random size (36..80 px a side) with smooth content (upsampled noise)."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(36, 80, 2))
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR).convert(mode)


def save(image: Image.Image, path: Path, kind: str) -> None:
    options = {"JPEG444": dict(format="JPEG", subsampling=0), "JPEGprog": dict(format="JPEG", progressive=True),
               "JPEG": dict(format="JPEG"), "PNG": dict(format="PNG")}[kind]
    image.save(path, **options)


def write_tree(root: Path, files=FILES) -> list[tuple[str, int]]:
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for k, (name, mode, kind) in enumerate(files):
        save(smooth_image(k, mode), root / name, kind)
        samples.append((str(root / name), k % 3))
    return samples


def split_of(samples, decode_device: str | None, dataset=None) -> Split:
    return Split("train", "train", dataset=dataset or ImageFiles(samples), transform=eval_transform(EVAL, SPEC),
                 train_transform=train_transform(TRAIN, SPEC, EVAL),
                 decoder=None if decode_device is None else DeviceDecoder(decode_device))


def jpeg_bytes(mode: str, **options) -> bytes:
    buf = io.BytesIO()
    smooth_image(0, mode).save(buf, format="JPEG", **options)
    return buf.getvalue()


def test_jpeg_components_come_from_the_frame_header():
    assert [jpeg_components(jpeg_bytes(m)) for m in ("L", "RGB", "CMYK")] == [1, 3, 4]
    assert jpeg_components(jpeg_bytes("RGB", progressive=True)) == 3  # SOF2
    png = io.BytesIO()
    smooth_image(0).save(png, format="PNG")
    assert jpeg_components(png.getvalue()) is None and jpeg_components(b"") is None
    whole = jpeg_bytes("RGB")
    frame = whole.index(b"\xff\xc0")
    assert jpeg_components(whole[:frame]) is None        # cut before its frame header
    assert jpeg_components(whole[:frame + 9]) is None    # ... inside it


def test_workers_hand_over_jpeg_bytes_and_decode_every_other_file(tmp_path):
    samples = write_tree(tmp_path)
    items = [EncodedFiles(Subset(ImageFiles(samples), [7, 0, 1, 2, 3, 4, 5, 6]))[(i, 10 + i)] for i in range(8)]
    order = [7, 0, 1, 2, 3, 4, 5, 6]
    assert [it.path for it in items] == [samples[k][0] for k in order]
    assert [(it.label, it.seed) for it in items] == [(samples[k][1], 10 + i) for i, k in enumerate(order)]
    for it in items:
        name = Path(it.path).name
        if name in ("d.jpg", "f.png", "g.JPEG"):  # CMYK JPEG and PNGs: PIL's RGB image, as (3, H, W) uint8
            expected = torch.from_numpy(np.array(Image.open(it.path).convert("RGB"))).permute(2, 0, 1)
            assert it.data.dtype == torch.uint8 and torch.equal(it.data, expected)
        else:  # the file's bytes, unchanged
            assert it.data.dim() == 1 and bytes(it.data.numpy()) == Path(it.path).read_bytes()


@pytest.mark.parametrize("workers", [0, 2])
def test_the_bytes_path_gives_the_cpu_paths_tensors_bit_for_bit(tmp_path, workers):
    """Evaluation batches and seeded augmented batches (random resized crop + flip), in the same order."""
    samples = write_tree(tmp_path)
    cpu, device_path = split_of(samples, None), split_of(samples, "cpu")
    for kw in (dict(), dict(shuffle=True, seed=5, augment=True)):
        ref = list(batches(cpu, 3, **kw))
        got = list(batches(device_path, 3, num_workers=workers, **kw))
        assert len(ref) == len(got) == 3
        for (x0, y0), (x1, y1) in zip(ref, got):
            assert x1.shape == x0.shape == (len(y0), 3, 32, 32) and x1.dtype == torch.float32
            assert torch.equal(y0, y1) and torch.equal(x0, x1)
    assert not torch.equal(next(iter(batches(cpu, 8, augment=True, seed=1)))[0],
                           next(iter(batches(cpu, 8, augment=True, seed=2)))[0])  # the seed does move the crops


def test_objectnets_border_is_cut_after_decoding(tmp_path):
    samples = write_tree(tmp_path, [("a.JPEG", "RGB", "JPEG"), ("b.png", "RGB", "PNG")])
    cropped = BorderCropped(samples, border=3)
    ref = list(batches(split_of(samples, None, cropped), 2))
    got = list(batches(split_of(samples, "cpu", cropped), 2))
    assert torch.equal(ref[0][0], got[0][0])
    items = [EncodedFiles(cropped)[(i, None)] for i in range(2)]
    assert [it.border for it in items] == [3, 0]  # the PNG came decoded and cropped already
    w, h = Image.open(samples[0][0]).size
    assert decode_jpegs(items[:1], "cpu")[0].shape == (3, h - 6, w - 6)


def test_a_broken_jpeg_fails_the_batch_then_is_named(tmp_path):
    samples = write_tree(tmp_path, [("a.JPEG", "RGB", "JPEG"), ("b.JPEG", "RGB", "JPEG")])
    data = Path(samples[1][0]).read_bytes()
    Path(samples[1][0]).write_bytes(data[:len(data) // 2])  # truncated: its header still says JPEG
    items = [EncodedFiles(ImageFiles(samples))[(i, None)] for i in range(2)]
    assert items[1].data.dim() == 1
    with pytest.raises(ImageFileError, match=r"cannot read image .*b\.JPEG"):
        device_batch(items, eval_transform(EVAL, SPEC), "cpu")
    x, y = device_batch(items[:1], eval_transform(EVAL, SPEC), "cpu")
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [0]


def test_attach_sets_the_decode_device_of_image_file_splits_only(tmp_path):
    samples = write_tree(tmp_path, FILES[:2])
    files = {"train": Split("train", "train", dataset=ImageFiles(samples)),
             "test": Split("test", "test", dataset=ImageFiles(samples)).subset(torch.tensor([1]))}
    suite = attach(Suite("s", 3, files), TRAIN, EVAL, SPEC, "cuda")
    assert [s.decoder for s in suite.splits.values()] == [DeviceDecoder("cuda"), DeviceDecoder("cuda")]
    assert attach(suite, TRAIN, EVAL, SPEC).train.decoder is None
    pixels = UInt8Images(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"suite.decode=cuda .*split px streams a UInt8Images.*suite.decode=cpu"):
        attach(Suite("s", 2, {"px": Split("px", "test", dataset=pixels)}), TRAIN, EVAL, SPEC, "cuda")
    in_memory = Suite("d", 2, {"test": Split("test", "test", x=torch.zeros(2, 3, 8, 8), y=torch.tensor([0, 1]))})
    with pytest.raises(ValueError, match=r"suite.decode=cuda: suite d keeps its images in memory"):
        attach(in_memory, TRAIN, EVAL, SPEC, "cuda")


def test_decode_is_validated_before_any_work(make_cfg, tmp_path, monkeypatch):
    from rftbench.run import execute

    cfg = lambda *o: make_cfg("suite=imagenet", *o, experiment=None)  # noqa: E731
    with pytest.raises(ConfigError, match=r"^suite.decode must be one of cpu, cuda, got 'gpu'$"):
        execute(cfg("suite.decode=gpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"suite.decode=cuda .*CUDA is not available here"):
        execute(cfg("suite.decode=cuda", "device=auto"))
    assert not (tmp_path / "runs").exists()  # no run folder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"suite.decode=cuda .*device=cpu"):
        validate_config(cfg("suite.decode=cuda"))
    validate_config(cfg("suite.decode=cuda", "device=cuda"))
    validate_config(make_cfg("suite=domainnet", experiment=None))  # the default: cpu


def test_decode_cuda_is_another_run_and_another_feature_entry(make_cfg, tmp_path):
    from rftbench.features import entry_key
    from rftbench.identity import run_id

    cfgs = {d: make_cfg("suite=imagenet", f"suite.decode={d}", experiment=None) for d in ("cpu", "cuda")}
    before = copy.deepcopy(cfgs["cpu"])
    with open_dict(before):
        del before.suite.decode  # a config from before the key: its runs keep their ids at the default
    assert run_id(cfgs["cpu"]) == run_id(before) != run_id(cfgs["cuda"])
    ctx = SimpleNamespace(device=torch.device("cuda"), cuda=True, spec={})
    samples = write_tree(tmp_path, FILES[:1])
    keys = {d: entry_key(None, split_of(samples, d), ctx, 128, extractor="x")[0] for d in (None, "cuda")}
    assert keys[None] != keys["cuda"]


# ---- on the GPU ---------------------------------------------------------------------------------

# decode=cuda against decode=cpu on smooth images (not measured on a GPU in this change): nvjpeg's
# IDCT and chroma upsampling and the CUDA resize kernels differ from libjpeg-turbo and the CPU uint8
# resize by a few grey levels, so each image's mean absolute difference stays within 0.02 (5 levels of
# 255) and no pixel moves by more than 0.25; a swapped channel order or a misplaced crop is far above.
MEAN_TOL, MAX_TOL = 0.02, 0.25
# the short evaluation (random weights, 52 test images, near-tied logits can flip): within 10 points
ACC_TOL = 0.10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_cuda_matches_cpu_within_tolerance_and_evaluates(make_cfg, tmp_path):
    from test_imagenet import write_imagenet
    from test_suites import run_done

    samples = write_tree(tmp_path / "tree", [(f"{k}{name}", mode, kind) for k in range(4)
                                             for name, mode, kind in FILES])
    for kw in (dict(), dict(shuffle=True, seed=5, augment=True)):
        ref = list(batches(split_of(samples, None), 8, device="cuda", **kw))
        got = list(batches(split_of(samples, "cuda"), 8, num_workers=2, device="cuda", **kw))
        assert len(ref) == len(got) == 4
        for (x0, y0), (x1, y1) in zip(ref, got):
            assert x1.device.type == "cuda" and x1.shape == x0.shape and torch.equal(y0, y1)
            diff = (x1 - x0).abs()
            assert diff.mean(dim=(1, 2, 3)).max() <= MEAN_TOL and diff.max() <= MAX_TOL
    write_imagenet(tmp_path / "data")
    common = ["suite=imagenet", f"paths.data={tmp_path / 'data'}", "suite.build.val_per_class=1",
              "suite.build.corruptions=[]", "method=zeroshot", "eval.adversarial.enabled=false", "device=cuda"]
    acc = {}
    for d in ("cpu", "cuda"):
        metrics = run_done(make_cfg, *common, f"suite.decode={d}")
        acc[d] = metrics.query("split == 'test' and metric == 'acc'")["value"].item()
    assert abs(acc["cuda"] - acc["cpu"]) <= ACC_TOL
