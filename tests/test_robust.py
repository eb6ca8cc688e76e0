"""Tests of rftbench.robust: imports, AutoAttack bounds, subsets, corruption loaders, model zoo."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rftbench.backbones import Classifier, Normalize, create_backbone
from rftbench.robust import (
    _provide_pkg_resources,
    attack,
    balanced_subset,
    import_autoattack,
    import_robustbench,
    load_cifar_c,
    load_imagenet_c,
    load_robustbench_model,
    robustbench_checkpoint_paths,
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    import_robustbench()
    import robustbench.utils

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", refuse)


# --------------------------------------------------------------------------- imports

def test_import_is_lazy():
    """`import rftbench.robust` imports no attack library."""
    code = textwrap.dedent("""
        import sys
        import rftbench.robust
        assert not {"robustbench", "autoattack", "pyautoattack"} & set(sys.modules), sorted(sys.modules)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_pkg_resources_stand_in(monkeypatch):
    """Without pkg_resources (setuptools >= 81) robustbench's only use of it still works."""
    import_robustbench()
    import robustbench.loaders as loaders

    ids = "helper_files/imagenet_test_image_ids.txt"
    expected = loaders.pkg_resources.resource_filename("robustbench.loaders", ids)
    monkeypatch.setitem(sys.modules, "pkg_resources", None)
    _provide_pkg_resources()
    stand_in = sys.modules["pkg_resources"]
    assert stand_in is not None and stand_in.resource_filename("robustbench.loaders", ids) == expected
    monkeypatch.setattr(loaders, "pkg_resources", stand_in)
    wnids = json.loads((Path(loaders.__file__).parent / "helper_files" / "imagenet_class_to_id_map.json").read_text())
    samples = loaders.make_custom_dataset("root", ids, wnids)
    assert len(samples) == 5000 and samples[0] == ("root/n09468604/ILSVRC2012_val_00015253.JPEG", wnids["n09468604"])


def test_import_robustbench_aliases_pyautoattack():
    rb = import_robustbench()
    aa = import_autoattack()
    import pyautoattack.state
    import robustbench.eval

    assert sys.modules["autoattack"] is aa
    assert sys.modules["autoattack.state"] is pyautoattack.state
    assert robustbench.eval.AutoAttack is aa.AutoAttack
    assert import_robustbench() is rb


# --------------------------------------------------------------------------- attacks

def tiny_classifier() -> Classifier:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return Classifier(body, nn.Linear(32, 10), Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


class Recorder(nn.Module):
    """Passes inputs to `model`, keeping a copy of each and the train/eval mode it ran in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().cpu().clone())
        self.modes.append(self.training)
        return self.model(x)


def distances(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """(len(a), len(b)) matrix of per-image Linf or L2 distances."""
    diff = (a[:, None] - b[None]).flatten(2)
    return diff.abs().amax(2) if norm == "Linf" else diff.norm(dim=2)


def images_and_labels(model: nn.Module, n: int, n_wrong: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    images = torch.rand(n, 3, 32, 32)
    with torch.no_grad():
        labels = model.eval()(images).argmax(1)
    labels[:n_wrong] = (labels[:n_wrong] + 1) % 10
    return images, labels


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 1.0)])
def test_quick_attack_stays_in_pixel_range_and_eps_ball(norm, eps):
    recorder = Recorder(tiny_classifier())
    images, labels = images_and_labels(recorder.model, n=20, n_wrong=3)
    off_diagonal = distances(images, images, norm) + 1e9 * torch.eye(len(images))
    assert off_diagonal.min() > 2 * eps  # so each input's nearest clean image is its own
    recorder.train()

    result = attack(recorder, images, labels, norm=norm, eps=eps, tier="quick", seed=0, batch_size=8,
                    n_iter=5, n_target_classes=2)

    adversarial = torch.cat(recorder.inputs)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    nearest = distances(adversarial, images, norm).min(1).values
    assert nearest.max() <= eps + (1e-6 if norm == "Linf" else 1e-5)
    assert nearest.max() > 0.5 * eps  # the attack did move the inputs
    assert max(len(x) for x in recorder.inputs) <= 8
    assert not any(recorder.modes) and recorder.training  # eval during the attack, mode restored
    assert result.clean_acc == pytest.approx(17 / 20)
    assert result.robust_acc <= result.clean_acc
    assert (result.n, result.norm, result.eps, result.tier, result.seed) == (20, norm, eps, "quick", 0)
    assert result.attacks == ["apgd-ce", "apgd-t"]
    assert (result.n_iter, result.n_target_classes) == (5, 2)
    assert result.version == import_autoattack().__version__ == "0.2.0"


def test_attack_is_seeded_and_keeps_the_global_rng():
    model = tiny_classifier()
    images, labels = images_and_labels(model, n=12, n_wrong=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = attack(model, images, labels, norm="Linf", eps=2 / 255, seed=3, n_iter=5, n_target_classes=2)
    assert torch.equal(torch.get_rng_state(), state)
    second = attack(model, images, labels, norm="Linf", eps=2 / 255, seed=3, n_iter=5, n_target_classes=2)
    assert first == second


def test_standard_tier_runs_full_autoattack():
    model = tiny_classifier()
    images, labels = images_and_labels(model, n=10, n_wrong=2)
    result = attack(model, images, labels, norm="Linf", eps=0.3, tier="standard", batch_size=4)
    assert result.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (result.n_iter, result.n_target_classes) == (100, 9)
    assert result.clean_acc == pytest.approx(0.8)
    assert result.robust_acc <= result.clean_acc


def test_attack_on_digits_backbone():
    model = create_backbone("resnet10t", num_classes=10, kwargs=dict(channels=(32, 64, 128, 256), stem_width=16))
    recorder = Recorder(model)
    images, labels = images_and_labels(model, n=6, n_wrong=1)
    result = attack(recorder, images, labels, norm="L2", eps=0.5, n_iter=2, n_target_classes=2, batch_size=4)
    adversarial = torch.cat(recorder.inputs)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert distances(adversarial, images, "L2").min(1).values.max() <= 0.5 + 1e-5
    assert result.robust_acc <= result.clean_acc == pytest.approx(5 / 6)


def test_attack_rejects_normalised_inputs_and_unknown_choices():
    model = tiny_classifier()
    images, labels = images_and_labels(model, n=4, n_wrong=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(model, (images - 0.5) / 0.25, labels)
    with pytest.raises(ValueError, match="valid: Linf, L2"):
        attack(model, images, labels, norm="L1")
    with pytest.raises(ValueError, match="valid: quick, standard"):
        attack(model, images, labels, tier="plus")


# --------------------------------------------------------------------------- subsets

def test_balanced_subset_is_fixed_and_balanced():
    labels = torch.arange(10).repeat_interleave(torch.arange(5, 15))  # class c has 5 + c examples
    subset = balanced_subset(labels, 47, seed=0)
    assert torch.equal(labels[subset].bincount(), torch.full((10,), 4))
    assert torch.equal(subset, subset.unique())  # sorted, no duplicates
    assert torch.equal(subset, balanced_subset(labels, 47, seed=0))
    assert not torch.equal(subset, balanced_subset(labels, 47, seed=1))
    with pytest.raises(ValueError, match="fewer than 6"):
        balanced_subset(labels, 60, seed=0)
    # fewer examples than classes (ImageNet with the default n): one example of each of n seeded classes
    few = balanced_subset(labels, 9, seed=0)
    assert len(few) == 9 and len(labels[few].unique()) == 9
    assert not torch.equal(labels[few].unique(), labels[balanced_subset(labels, 9, seed=3)].unique())


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


# --------------------------------------------------------------------------- model zoo

@pytest.mark.parametrize("wrap", [True, False])
def test_robustbench_model_loads_local_checkpoint(tmp_path, no_network, wrap):
    """RobustBench's checkpoint formats: {'state_dict': {'module.' + key: ...}} and a plain state dict."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    name = "Hendrycks2020AugMix_WRN"  # WideResNet-40-2, 2.2M parameters, normalises inside
    torch.manual_seed(0)
    reference = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.corruptions][name]["model"]()
    state = reference.state_dict()
    (path,) = robustbench_checkpoint_paths(name, "cifar10", "corruptions", tmp_path)
    assert path == tmp_path / "cifar10" / "corruptions" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state, path)

    model = load_robustbench_model(name, "cifar10", "corruptions", tmp_path)
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), reference.eval()(images))


def test_robustbench_timm_hosted_model_loads_local_checkpoint(tmp_path, no_network):
    import timm

    name = "Debenedetti2022Light_XCiT-S12"
    torch.manual_seed(0)
    reference = timm.create_model("debenedetti2022light_xcit_s12_cifar10_linf", num_classes=10)
    (path,) = robustbench_checkpoint_paths(name, "cifar10", "Linf", tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(reference.model.state_dict(), path)  # the timm model inside RobustBench's normalisation
    model = load_robustbench_model(name, "cifar10", "Linf", tmp_path)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())


def test_robustbench_model_missing_or_unknown(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match=r"cifar10/Linf/Standard\.pt"):
        load_robustbench_model("Standard", "cifar10", "Linf", tmp_path)
    paths = robustbench_checkpoint_paths("Chen2020Adversarial", "cifar10", "Linf", tmp_path)
    assert [p.name for p in paths] == ["Chen2020Adversarial.pt_m0.pt", "Chen2020Adversarial.pt_m1.pt",
                                       "Chen2020Adversarial.pt_m2.pt"]
    (torchvision_weights,) = robustbench_checkpoint_paths("Standard_R50", "imagenet", "corruptions_3d", tmp_path)
    assert torchvision_weights == Path(torch.hub.get_dir()) / "checkpoints" / "resnet50-0676ba61.pth"
    with pytest.raises(ValueError, match="valid: .*Standard"):
        load_robustbench_model("NoSuchModel", "cifar10", "Linf", tmp_path)
    with pytest.raises(ValueError, match="valid: cifar10, cifar100, imagenet"):
        load_robustbench_model("Standard", "mnist", "Linf", tmp_path)
    with pytest.raises(ValueError, match="valid: Linf, L2, corruptions"):
        load_robustbench_model("Standard", "cifar10", "L1", tmp_path)
