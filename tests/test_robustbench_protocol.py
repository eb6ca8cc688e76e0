"""RobustBench's protocols: which test images AutoAttack gets (`eval.adversarial.subset`: the first n
for CIFAR, RobustBench's fixed 5,000-image ImageNet list read from the installed package) and the
eval presets that use them (`eval=standard`, `eval=robustbench_imagenet`)."""
from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from rftbench.data.base import Split, balanced_subset
from rftbench.data.corruption_sets import IMAGENET_C_N_MAX, robustbench_imagenet_ids
from rftbench.data.folders import ImageFiles
from rftbench.evaluate import attack_subset
from rftbench.validate import ConfigError, check_suite, validate_config

LABELS = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1, 1])


def in_memory(labels: torch.Tensor = LABELS) -> Split:
    return Split("test", "test", x=torch.zeros(len(labels), 1), y=labels)


def test_first_and_balanced_subsets_on_known_labels():
    test = in_memory()
    assert attack_subset(test, {"subset": "first", "n": 4, "seed": 0}).tolist() == [0, 1, 2, 3]
    balanced = attack_subset(test, {"subset": "balanced", "n": 6, "seed": 3})
    assert torch.equal(balanced, balanced_subset(LABELS, 6, 3))
    assert Counter(LABELS[balanced].tolist()) == {0: 2, 1: 2, 2: 2}
    with pytest.raises(ValueError, match="n=11 with subset=first, but the test split has 10 images"):
        attack_subset(test, {"subset": "first", "n": 11, "seed": 0})
    with pytest.raises(ValueError, match="must be one of balanced, first, robustbench_imagenet"):
        attack_subset(test, {"subset": "random", "n": 2, "seed": 0})


def test_robustbench_list_is_the_installed_packages():
    ids = robustbench_imagenet_ids()
    package = importlib.util.find_spec("robustbench").submodule_search_locations[0]  # not imported: slow
    helper = Path(package) / "helper_files" / "imagenet_test_image_ids.txt"
    assert ids == helper.read_text().split() and len(ids) == len(set(ids)) == IMAGENET_C_N_MAX == 5000
    assert ids[:2] == ["n09468604/ILSVRC2012_val_00015253.JPEG", "n02823750/ILSVRC2012_val_00020685.JPEG"]
    per_class = Counter(i.split("/")[0] for i in ids)  # a fixed list, not a class-balanced draw
    assert len(per_class) == 997 and (min(per_class.values()), max(per_class.values())) == (1, 12)
    assert robustbench_imagenet_ids(3) == ids[:3]
    with pytest.raises(ValueError, match="n must be in 1..5000"):
        robustbench_imagenet_ids(5001)


def test_robustbench_imagenet_subset_finds_the_listed_val_images_in_their_order(tmp_path):
    listed = robustbench_imagenet_ids(3)
    others = ["n01440764/ILSVRC2012_val_00000293.JPEG", "n01443537/ILSVRC2012_val_00000236.JPEG"]
    files = sorted([*listed, *others])  # the test split's order: sorted synset folders and files
    test = Split("test", "test", dataset=ImageFiles([(str(tmp_path / "imagenet/val" / f), 0) for f in files]))
    idx = attack_subset(test, {"subset": "robustbench_imagenet", "n": 3, "seed": 0})
    assert [files[i] for i in idx] == listed
    with pytest.raises(FileNotFoundError, match="1 of the 4 images of RobustBench's ImageNet list are not in the test"):
        attack_subset(test, {"subset": "robustbench_imagenet", "n": 4, "seed": 0})
    with pytest.raises(ValueError, match="needs a test split of ImageNet val image files"):
        attack_subset(in_memory(), {"subset": "robustbench_imagenet", "n": 3, "seed": 0})


def test_eval_presets_compose(make_cfg):
    default = make_cfg(experiment=None).eval.adversarial
    assert (default.subset, default.tier, default.n) == ("balanced", "quick", 50)  # unchanged behaviour
    cfg = make_cfg("suite=imagenet", "eval=robustbench_imagenet", experiment=None)
    validate_config(cfg)
    adv = cfg.eval.adversarial
    assert (adv.subset, adv.tier, adv.n) == ("robustbench_imagenet", "standard", 5000)
    assert [dict(t) for t in adv.threats] == [{"norm": "Linf", "eps": 4 / 255}]
    assert cfg.suite.build.corruption_n == 5000  # ImageNet-C on the same 5,000 images
    cifar = make_cfg("suite=cifar10", "eval=standard", experiment=None).eval.adversarial
    assert (cifar.subset, cifar.tier, cifar.n) == ("first", "standard", 1000)
    assert [(t.norm, t.eps) for t in cifar.threats] == [("Linf", 8 / 255), ("L2", 0.5)]
    with pytest.raises(ConfigError, match="eval.adversarial.subset must be one of balanced, first"):
        validate_config(make_cfg("eval.adversarial.subset=random", experiment=None))


def test_check_suite_names_missing_robustbench_images_before_training(make_cfg, tmp_path):
    from test_imagenet import build, write_imagenet

    write_imagenet(tmp_path, val_per_class=2)
    suite = build(tmp_path)
    cfg = make_cfg("suite=imagenet", "eval=robustbench_imagenet", experiment=None)
    with pytest.raises(ConfigError, match="5000 of the 5000 images of RobustBench's ImageNet list are not in"):
        check_suite(cfg, suite)
    check_suite(make_cfg("suite=imagenet", "eval=robustbench_imagenet", "eval.adversarial.subset=first",
                         "eval.adversarial.n=8", experiment=None), suite)
