"""Tests of rftbench.zoo: RobustBench model-zoo entries load from local files, never downloaded."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from rftbench.attacks import import_robustbench
from rftbench.zoo import load_robustbench_model, robustbench_checkpoint_paths

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
