"""Tests of rftbench.data.corruption_sets: CIFAR-10-C / CIFAR-100-C / ImageNet-C in their on-disk layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rftbench.attacks import import_robustbench
from rftbench.data.corruption_sets import load_cifar_c, load_imagenet_c


# --------------------------------------------------------------------------- CIFAR-C

def write_cifar_c(root, folder, corruptions, n_per_severity, size=4, tile_labels=True):
    """Images whose pixel (severity s, index i, channel c) is 40*(s-1) + 4*i + c + 100*k (k: corruption)."""
    data_dir = root / folder
    data_dir.mkdir(parents=True)
    s, i, c = np.meshgrid(np.arange(5), np.arange(n_per_severity), np.arange(3), indexing="ij")
    for k, corruption in enumerate(corruptions):
        values = (40 * s + 4 * i + c + 20 * k).reshape(5 * n_per_severity, 1, 1, 3)
        np.save(data_dir / f"{corruption}.npy", np.broadcast_to(values, (5 * n_per_severity, size, size, 3)).astype(np.uint8))
    labels = np.arange(n_per_severity) % 10
    np.save(data_dir / "labels.npy", np.tile(labels, 5) if tile_labels else labels)
    return labels


@pytest.mark.parametrize("tile_labels", [True, False])
def test_cifar_c_reads_severity_blocks(tmp_path, tile_labels):
    labels = write_cifar_c(tmp_path, "CIFAR-10-C", ["fog", "snow"], n_per_severity=4, tile_labels=tile_labels)
    splits = load_cifar_c(tmp_path, "cifar10", corruptions=["fog", "snow"], severities=[1, 3, 5])
    assert list(splits) == [(c, s) for c in ("fog", "snow") for s in (1, 3, 5)]
    x, y = splits[("snow", 3)]
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = 40 * 2 + 4 * torch.arange(4)[:, None] + torch.arange(3)[None] + 20
    assert torch.equal(x * 255, expected[:, :, None, None].expand(4, 3, 4, 4).float())
    assert torch.equal(y, torch.from_numpy(labels))
    x, y = load_cifar_c(tmp_path, "cifar10", ["fog"], [2], n_examples=3)[("fog", 2)]
    assert x.shape[0] == 3 and torch.equal(x[:, 0, 0, 0] * 255, torch.tensor([40.0, 44.0, 48.0]))
    with pytest.raises(KeyError):
        splits[("fog", 2)]


def test_cifar_c_matches_robustbench_loader(tmp_path):
    """On files with RobustBench's 10,000 images per severity (1x1 pixels to stay small)."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "CIFAR-100-C"
    data_dir.mkdir()
    np.save(data_dir / "frost.npy", rng.integers(0, 256, (50000, 1, 1, 3), dtype=np.uint8))
    np.save(data_dir / "labels.npy", np.tile(rng.integers(0, 100, 10000), 5))
    import_robustbench()
    from robustbench.data import load_corruptions_cifar
    from robustbench.model_zoo.enums import BenchmarkDataset

    ours = load_cifar_c(tmp_path, "cifar100", ["frost"], [1, 2, 3, 4, 5], n_examples=37)
    for severity in range(1, 6):
        x_rb, y_rb = load_corruptions_cifar(BenchmarkDataset.cifar_100, 37, severity, str(tmp_path), ["frost"])
        x, y = ours[("frost", severity)]
        assert torch.equal(x, x_rb) and torch.equal(y, y_rb.long())


def test_cifar_c_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10-C.*zenodo\.org/records/2535967"):
        load_cifar_c(tmp_path, "cifar10")
    write_cifar_c(tmp_path, "CIFAR-10-C", ["fog"], n_per_severity=2)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10-C/snow\.npy"):
        load_cifar_c(tmp_path, "cifar10", ["fog", "snow"])
    with pytest.raises(ValueError, match="severities"):
        load_cifar_c(tmp_path, "cifar10", ["fog"], [0])
    with pytest.raises(ValueError, match="valid: cifar10, cifar100"):
        load_cifar_c(tmp_path, "svhn")


# --------------------------------------------------------------------------- ImageNet-C

def write_imagenet_c(root, corruption, severities, n_images, all_class_dirs=False):
    import_robustbench()
    import robustbench

    helper = Path(robustbench.__file__).parent / "helper_files"
    files = (helper / "imagenet_test_image_ids.txt").read_text().split()[:n_images]
    wnids = json.loads((helper / "imagenet_class_to_id_map.json").read_text())
    rng = np.random.default_rng(0)
    for severity in severities:
        folder = root / corruption / str(severity)
        for wnid in (wnids if all_class_dirs else {f.split("/")[0] for f in files}):
            (folder / wnid).mkdir(parents=True, exist_ok=True)
        for name in files:
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / name)
    return [wnids[f.split("/")[0]] for f in files]


def test_imagenet_c_follows_robustbench_protocol(tmp_path):
    labels = write_imagenet_c(tmp_path / "ImageNet-C", "fog", [2, 5], n_images=5, all_class_dirs=True)
    splits = load_imagenet_c(tmp_path / "ImageNet-C", ["fog"], [2, 5], n_examples=5)
    assert list(splits) == [("fog", 2), ("fog", 5)]
    import robustbench.data as rb_data

    for severity in (2, 5):
        x, y = splits[("fog", severity)]
        assert x.shape == (5, 3, 224, 224) and 0 <= x.min() and x.max() <= 1
        assert y.tolist() == labels
        x_rb, y_rb = rb_data.load_imagenetc(5, severity, str(tmp_path), corruptions=["fog"],
                                            prepr=rb_data.PREPROCESSINGS["Res224"])
        assert torch.equal(x, x_rb) and torch.equal(y, y_rb)


def test_imagenet_c_missing_data(tmp_path):
    write_imagenet_c(tmp_path, "snow", [1], n_images=2)
    with pytest.raises(FileNotFoundError, match=r"snow/3"):
        load_imagenet_c(tmp_path, ["snow"], [1, 3], n_examples=2)
    splits = load_imagenet_c(tmp_path, ["snow"], [1], n_examples=3)
    with pytest.raises(FileNotFoundError, match="ImageNet-C image"):
        splits[("snow", 1)]
    with pytest.raises(ValueError, match="1..5000"):
        load_imagenet_c(tmp_path, ["snow"], [1], n_examples=5001)
