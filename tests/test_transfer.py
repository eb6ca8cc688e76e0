"""suite=ct_transfer/<name>: tiny trees in the files each torchvision class reads (download=False)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from rftbench.data.transfer import SPECS, build_transfer
from test_imagenet import write_images
from test_suites import leaderboard_row, run_done


def build(root, name, seed=0):
    return build_transfer(str(root), name, seed=seed, cache_dir="", val_fraction=0.25, test_fraction=0.25,
                          split_seed=0)


def write_flowers102(root: Path, monkeypatch) -> None:
    from scipy.io import savemat

    base = root / "flowers-102"
    labels = np.repeat([1, 2, 3], 6)  # 18 images, 3 classes (1-based, as imagelabels.mat)
    (base / "jpg").mkdir(parents=True)
    for i in range(1, 19):
        write_images(base / "jpg", 1)
        (base / "jpg" / "img_0.JPEG").rename(base / "jpg" / f"image_{i:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": labels})
    ids = np.arange(1, 19).reshape(3, 6)  # per class: 2 train, 2 val, 2 test
    savemat(base / "setid.mat", {"trnid": ids[:, :2].ravel(), "valid": ids[:, 2:4].ravel(), "tstid": ids[:, 4:].ravel()})
    # the release's md5 sums cannot match tiny files: only the checksum is bypassed
    monkeypatch.setattr("torchvision.datasets.flowers102.check_integrity", lambda *a, **k: True)


def write_dtd(root: Path) -> None:
    data = root / "dtd" / "dtd"
    for cls in ("banded", "blotchy"):
        write_images(data / "images" / cls, 6, "jpg")
    (data / "labels").mkdir(parents=True)
    for part, files in (("train", (0, 1)), ("val", (2, 3)), ("test", (4, 5))):
        lines = [f"{c}/img_{i}.jpg" for c in ("banded", "blotchy") for i in files]
        (data / "labels" / f"{part}1.txt").write_text("\n".join(lines) + "\n")


def write_food101(root: Path) -> None:
    base = root / "food-101"
    meta = {"train": {}, "test": {}}
    for cls in ("apple_pie", "baby_back_ribs"):
        write_images(base / "images" / cls, 8, "jpg")
        meta["train"][cls] = [f"{cls}/img_{i}" for i in range(6)]
        meta["test"][cls] = [f"{cls}/img_{i}" for i in range(6, 8)]
    (base / "meta").mkdir()
    for part, d in meta.items():
        (base / "meta" / f"{part}.json").write_text(json.dumps(d))


def write_pets(root: Path) -> None:
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    lines = {"trainval": [], "test": []}
    for label, breed in enumerate(("Abyssinian", "beagle"), 1):
        for i in range(6):
            write_images(base / "images", 1)
            (base / "images" / "img_0.JPEG").rename(base / "images" / f"{breed}_{i}.jpg")
            lines["trainval" if i < 4 else "test"].append(f"{breed}_{i} {label} {label} 1")
    for part, ls in lines.items():
        (base / "annotations" / f"{part}.txt").write_text("\n".join(ls) + "\n")


def write_eurosat(root: Path) -> None:
    for cls in ("AnnualCrop", "Forest", "River"):
        write_images(root / "eurosat" / "2750" / cls, 8, "jpg", size=(64, 64))


def write_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_every_ct_transfer_dataset_has_a_config():
    configs = Path(__file__).resolve().parents[1] / "configs/suite/ct_transfer"
    assert sorted(p.stem for p in configs.glob("*.yaml")) == sorted(SPECS)


def test_flowers102_official_splits(tmp_path, monkeypatch):
    write_flowers102(tmp_path, monkeypatch)
    s = build(tmp_path, "flowers102")
    assert (len(s.train), len(s.val), len(s["test"])) == (6, 6, 6) and s.num_classes == 102
    assert s.val.labels.tolist() == [0, 0, 1, 1, 2, 2] and s.meta["official_val"]
    assert build(tmp_path, "flowers102", seed=1).val.dataset.indices == s.val.dataset.indices  # official


def test_dtd_official_splits(tmp_path):
    write_dtd(tmp_path)
    s = build(tmp_path, "dtd")
    assert (len(s.train), len(s.val), len(s["test"])) == (4, 4, 4)
    assert s.class_names == ["banded", "blotchy"]
    assert s["test"].labels.tolist() == [0, 0, 1, 1]


def test_food101_val_is_a_seeded_stratified_split_of_train(tmp_path):
    write_food101(tmp_path)
    s = build(tmp_path, "food101")
    assert (len(s.train), len(s.val), len(s["test"])) == (8, 4, 4)  # 6 per class, round(1.5) = 2 held out
    assert sorted(s.val.labels.tolist()) == [0, 0, 1, 1] and s.class_names == ["apple_pie", "baby_back_ribs"]
    other = build(tmp_path, "food101", seed=3)
    assert set(s.train.dataset.indices).isdisjoint(s.val.dataset.indices)
    assert [build(tmp_path, "food101").val.dataset.indices] == [s.val.dataset.indices]
    assert len(other.val) == 4 and other.val.dataset.indices != s.val.dataset.indices


def test_oxford_pet_splits(tmp_path):
    write_pets(tmp_path)
    s = build(tmp_path, "oxford_iiit_pet")
    assert (len(s.train), len(s.val), len(s["test"])) == (6, 2, 4)
    assert s["test"].labels.tolist() == [0, 0, 1, 1] and s.class_names == ["Abyssinian", "Beagle"]


def test_eurosat_fixed_test_and_seeded_val(tmp_path):
    write_eurosat(tmp_path)
    s = build(tmp_path, "eurosat")
    assert (len(s.train), len(s.val), len(s["test"])) == (12, 6, 6) and s.num_classes == 3
    other = build(tmp_path, "eurosat", seed=1)
    assert other["test"].dataset.indices == s["test"].dataset.indices  # fixed by split_seed
    assert set(s["test"].dataset.indices).isdisjoint(s.train.dataset.indices + s.val.dataset.indices)


def test_fashion_mnist_idx_files(tmp_path):
    write_fashion_mnist(tmp_path)
    s = build(tmp_path, "fashion_mnist")
    assert (len(s.train), len(s.val), len(s["test"])) == (30, 10, 20) and s.num_classes == 10
    x, y = s["test"].dataset[3]
    assert x.size == (28, 28) and y == 3


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="rftbench.data download suite=ct_transfer/dtd"):
        build(tmp_path, "dtd")
    with pytest.raises(FileNotFoundError, match="cannot download"):
        build(tmp_path, "stanford_cars")


def test_ct_transfer_runs_end_to_end(make_cfg, tmp_path, single_thread):
    write_fashion_mnist(tmp_path / "data" / "ct_transfer", n_train=100, n_test=50)
    m = run_done(make_cfg, "suite=ct_transfer/fashion_mnist", f"paths.data={tmp_path / 'data'}")
    assert {"test", "ood/adversarial/Linf"} <= set(m["split"])
    assert leaderboard_row(tmp_path, "ct_transfer/fashion_mnist")


def test_ct_transfer_experiment_sweeps_every_suite(make_cfg):
    cfg = Path(__file__).resolve().parents[1] / "configs/experiment/ct_transfer.yaml"
    import yaml

    params = yaml.safe_load(cfg.read_text())["hydra"]["sweeper"]["params"]
    assert sorted(s.removeprefix("ct_transfer/") for s in params["suite"].split(",")) == sorted(SPECS)
    assert {"lp", "ct"} <= set(params["method"].split(","))
