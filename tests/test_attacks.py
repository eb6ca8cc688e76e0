"""Tests of rftbench.attacks: import shims, AutoAttack bounds and seeding, the attacked subset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from rftbench.attacks import _provide_pkg_resources, attack, import_autoattack, import_robustbench
from rftbench.backbones import Classifier, Normalize, create_backbone
from rftbench.data.base import balanced_subset

pytestmark = pytest.mark.usefixtures("single_thread")
SETTINGS = dict(norm="Linf", eps=0.1, tier="quick", seed=0, n_iter=2, n_target_classes=1, batch_size=4)


# --------------------------------------------------------------------------- imports

def test_import_is_lazy():
    """`import rftbench.attacks` (and the zoo, the corruption-set loaders) imports no attack library."""
    code = textwrap.dedent("""
        import sys
        import rftbench.attacks, rftbench.zoo, rftbench.data.corruption_sets
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
    first = attack(model, images, labels, norm="Linf", eps=2 / 255, tier="quick", seed=3, n_iter=5,
                   n_target_classes=2, batch_size=256)
    assert torch.equal(torch.get_rng_state(), state)
    second = attack(model, images, labels, norm="Linf", eps=2 / 255, tier="quick", seed=3, n_iter=5,
                    n_target_classes=2, batch_size=256)
    assert first == second


def test_standard_tier_runs_full_autoattack():
    model = tiny_classifier()
    images, labels = images_and_labels(model, n=10, n_wrong=2)
    result = attack(model, images, labels, norm="Linf", eps=0.3, tier="standard", seed=0, batch_size=4,
                    n_iter=1, n_target_classes=1)  # the quick-tier settings are ignored
    assert result.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (result.n_iter, result.n_target_classes) == (100, 9)
    assert result.clean_acc == pytest.approx(0.8)
    assert result.robust_acc <= result.clean_acc


def test_attack_on_digits_backbone():
    model = create_backbone("resnet10t", num_classes=10, kwargs=dict(channels=(32, 64, 128, 256), stem_width=16))
    recorder = Recorder(model)
    images, labels = images_and_labels(model, n=6, n_wrong=1)
    result = attack(recorder, images, labels, norm="L2", eps=0.5, tier="quick", seed=0, n_iter=2, n_target_classes=2,
                    batch_size=4)
    adversarial = torch.cat(recorder.inputs)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert distances(adversarial, images, "L2").min(1).values.max() <= 0.5 + 1e-5
    assert result.robust_acc <= result.clean_acc == pytest.approx(5 / 6)


def test_attack_rejects_normalised_inputs_and_unknown_choices():
    model = tiny_classifier()
    images, labels = images_and_labels(model, n=4, n_wrong=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(model, (images - 0.5) / 0.25, labels, **SETTINGS)
    with pytest.raises(ValueError, match="valid: Linf, L2"):
        attack(model, images, labels, **{**SETTINGS, "norm": "L1"})
    with pytest.raises(ValueError, match="valid: quick, standard"):
        attack(model, images, labels, **{**SETTINGS, "tier": "plus"})
    with pytest.raises(TypeError, match="n_iter"):  # no code defaults: the eval config supplies them
        attack(model, images, labels, norm="Linf", eps=0.1, tier="quick", seed=0, batch_size=4)


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


def test_clean_correct_reads_autoattacks_outputs():
    """Correct before the attack = still correct, or moved by it (AutoAttack only moves images it
    broke, all of them correctly classified at first)."""
    from rftbench.attacks import clean_correct

    x = torch.zeros(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 3])
    x_adv = x.clone()
    x_adv[1] += 0.01                         # broken by the attack: was correct
    y_adv = torch.tensor([0, 5, 7, 3])       # 0 and 3 robust; 2 wrong from the start (not moved)
    assert clean_correct(x, labels, x_adv, y_adv).tolist() == [True, True, False, True]
