"""suite.build.fraction / suite.build.shots: class-balanced, seeded training subsets for every suite
(rftbench.data.base.limit_per_class), val and test never reduced, null keys out of the run id."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rftbench.data.base import limit_per_class, stratified_split
from rftbench.identity import run_id_of
from rftbench.utils import tensor_digest
from test_backbones import NO_SEEN, write_cifar10

SUITES = Path(__file__).resolve().parents[1] / "configs/suite"
# class sizes 10, 5, 1, 3 (class c at indices where labels == c, interleaved)
LABELS = torch.tensor([0, 1, 0, 2, 0, 1, 3, 0, 0, 1, 3, 0, 0, 1, 0, 3, 0, 1, 0])


def per_class_counts(labels: torch.Tensor, index: torch.Tensor) -> list[int]:
    return torch.bincount(labels[index], minlength=4).tolist()


def test_fraction_keeps_round_fraction_of_each_class_at_least_one():
    # round(5.0) = 5, round(2.5) = 2 (ties to even, as stratified_split), round(0.5) = 0 -> 1, round(1.5) = 2
    index = limit_per_class(LABELS, 0.5, None, seed=0)
    assert per_class_counts(LABELS, index) == [5, 2, 1, 2]
    assert torch.equal(index, index.sort().values) and len(set(index.tolist())) == len(index)
    assert per_class_counts(LABELS, limit_per_class(LABELS, 0.1, None, seed=0)) == [1, 1, 1, 1]
    assert torch.equal(limit_per_class(LABELS, 1.0, None, seed=3), torch.arange(len(LABELS)))
    assert torch.equal(limit_per_class(LABELS, None, None, seed=3), torch.arange(len(LABELS)))


def test_shots_keeps_exactly_shots_per_class_or_names_the_key():
    index = limit_per_class(LABELS, None, 1, seed=0)
    assert per_class_counts(LABELS, index) == [1, 1, 1, 1]
    big = LABELS[LABELS != 2]
    assert per_class_counts(big, limit_per_class(big, None, 3, seed=0)) == [3, 3, 0, 3]
    with pytest.raises(ValueError, match=r"suite.build.shots=3 but class 2 has only 1 training examples"):
        limit_per_class(LABELS, None, 3, seed=0)


def test_subsets_are_seeded():
    labels = torch.arange(200) % 4
    a, b = limit_per_class(labels, None, 5, seed=0), limit_per_class(labels, None, 5, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, limit_per_class(labels, None, 5, seed=1))
    assert not torch.equal(limit_per_class(labels, 0.2, None, seed=0), limit_per_class(labels, 0.2, None, seed=1))


@pytest.mark.parametrize("fraction, shots, match", [
    (0.5, 2, "suite.build.fraction .* or suite.build.shots .*, not both"),
    (0.0, None, r"suite.build.fraction must be a number in \(0, 1\]"),
    (1.5, None, r"suite.build.fraction must be a number in \(0, 1\]"),
    (True, None, r"suite.build.fraction must be a number"),
    (None, 0, "suite.build.shots must be an integer >= 1"),
    (None, 2.0, "suite.build.shots must be an integer >= 1"),
])
def test_bad_settings_name_the_key(fraction, shots, match):
    with pytest.raises(ValueError, match=match):
        limit_per_class(LABELS, fraction, shots, seed=0)


# --- every suite config has both keys, null by default, and null keys stay out of the run id ---

@pytest.mark.parametrize("path", sorted(SUITES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(SUITES)))
def test_every_suite_config_has_null_fraction_and_shots(path):
    build = yaml.safe_load(path.read_text())["build"]
    assert build["fraction"] is None and build["shots"] is None


def test_fraction_and_shots_are_part_of_the_run_id(make_cfg):
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(make_cfg("suite=cifar10", experiment=None), resolve=True)
    ids = {run_id_of(OmegaConf.to_container(make_cfg("suite=cifar10", o, experiment=None), resolve=True))
           for o in ("suite.build.shots=5", "suite.build.shots=6", "suite.build.fraction=0.1")}
    assert len(ids) == 3 and run_id_of(resolved) not in ids


# --- each builder: exact counts, val unchanged, seeded ---

def test_digits_default_subset_is_the_committed_one_and_shots_replace_it(tmp_path):
    from rftbench.data.digits import build_digits, handwritten_digits

    kw = dict(seed=0, train_per_class=20, val_fraction=0.2, test_fraction=0.4, split_seed=0, image_size=32,
              fonts_held_out=None, typed={"n": 10, "augment": "mild", "seed": 1},
              corruption={"n": 10, "names": [], "severities": [1], "seed": 2}, seen_corruptions=NO_SEEN,
              cache_dir=str(tmp_path))
    default = build_digits(**kw)
    x, y = handwritten_digits(32)
    pool, _ = stratified_split(y, 0.4, 0)
    rest, _ = stratified_split(y[pool], 0.2, 0)
    index = pool[rest][limit_per_class(y[pool[rest]], None, 20, 0)]
    assert tensor_digest(index) == "b25523c14b43d07b"  # the training images of the committed bench, seed 0
    assert torch.equal(default.train.x, x[index]) and default.meta["n_train"] == 200
    five = build_digits(**kw, shots=5)
    assert five.train.y.bincount().tolist() == [5] * 10 and five.meta["n_train"] == 50
    assert torch.equal(five.val.x, default.val.x) and torch.equal(five["test"].x, default["test"].x)
    assert torch.equal(five.train.x, build_digits(**kw, shots=5).train.x)
    assert not torch.equal(five.train.x, build_digits(**(kw | {"seed": 1}), shots=5).train.x)
    half = build_digits(**kw, fraction=0.5)  # of the whole pool (86 or 87 per class), not of train_per_class
    pool_counts = y[pool[rest]].bincount()
    assert half.train.y.bincount().tolist() == [round(0.5 * int(n)) for n in pool_counts]
    with pytest.raises(ValueError, match="suite.build.train_per_class=200 but class 0 has only"):
        build_digits(**(kw | {"train_per_class": 200}))
    with pytest.raises(ValueError, match="not both"):
        build_digits(**kw, shots=5, fraction=0.5)


def test_cifar_shots_and_fraction(tmp_path):
    from rftbench.data.cifar import build_cifar

    write_cifar10(tmp_path, n_train_per_batch=20)  # 10 per class; val 0.2 -> 2 per class, train 8
    kw = dict(root=str(tmp_path), dataset="cifar10", seed=0, val_fraction=0.2, corruption_root=None, corruptions=[],
              severities=[], corruption_n=None, cifar10_1_root=None, seen_corruptions=NO_SEEN)
    full, three = build_cifar(**kw), build_cifar(**kw, shots=3)
    assert three.train.labels.bincount().tolist() == [3] * 10 and three.meta["n_train"] == 30
    assert build_cifar(**kw, fraction=0.25).train.labels.bincount().tolist() == [2] * 10
    assert torch.equal(three.val.labels, full.val.labels) and len(three["test"]) == len(full["test"]) == 20
    assert (three.val.dataset.images == full.val.dataset.images).all()
    other = build_cifar(**(kw | {"seed": 1}), shots=3)
    assert not (other.train.dataset.images == three.train.dataset.images).all()
    with pytest.raises(ValueError, match="suite.build.shots=9 but class 0 has only 8"):
        build_cifar(**kw, shots=9)


def test_imagenet_shots_and_fraction(tmp_path):
    from test_imagenet import build, write_imagenet

    write_imagenet(tmp_path, val_per_class=2)  # 4 train images per class, 1 held out as val
    full, two = build(tmp_path), build(tmp_path, shots=2)
    assert sorted(two.train.labels.tolist()) == [0, 0, 1, 1, 2, 2, 15, 15] and two.meta["n_train"] == 8
    assert set(two.train.dataset.samples) < set(full.train.dataset.samples)
    assert two.val.dataset.samples == full.val.dataset.samples and len(two["test"]) == len(full["test"]) == 8
    assert len(build(tmp_path, fraction=0.5).train) == 8  # round(1.5) = 2 of 3
    assert len(build(tmp_path, shots=1, val_per_class=0).train) == 4  # no val split: of all of train
    assert build(tmp_path, shots=2).train.dataset.samples == two.train.dataset.samples
    assert build(tmp_path, shots=2, seed=1).train.dataset.samples != two.train.dataset.samples
    with pytest.raises(ValueError, match="suite.build.shots=4 but class 0 has only 3"):
        build(tmp_path, shots=4)


def test_domainnet_shots_and_fraction(tmp_path):
    from test_domainnet import build, write_domainnet

    write_domainnet(tmp_path, domains=("real", "sketch"))  # tpgm files: 10 train, 2 val, 4 test per class
    full, half = build(tmp_path, ood_domains=["sketch"]), build(tmp_path, ood_domains=["sketch"], fraction=0.5)
    assert half.train.labels.bincount().tolist() == [5, 5, 5] and half.meta["n_train"] == 15
    assert half.val.dataset.samples == full.val.dataset.samples
    assert half["ood/sketch"].dataset.samples == full["ood/sketch"].dataset.samples
    assert build(tmp_path, ood_domains=[], shots=1).train.labels.tolist() == [0, 1, 2]
    assert build(tmp_path, ood_domains=[], fraction=0.5, seed=1).train.dataset.samples != half.train.dataset.samples
    with pytest.raises(ValueError, match="suite.build.shots=11 but class 0 has only 10"):
        build(tmp_path, ood_domains=[], shots=11)


def test_transfer_shots_and_fraction(tmp_path, monkeypatch):
    from rftbench.data.transfer import build_transfer
    from test_transfer import write_flowers102, write_food101

    write_food101(tmp_path)  # 6 train per class; val 0.25 -> 2 held out, 4 left
    write_flowers102(tmp_path, monkeypatch)  # official val: 2 train, 2 val, 2 test per class
    kw = dict(root=str(tmp_path), seed=0, cache_dir="", val_fraction=0.25, test_fraction=0.25, split_seed=0)
    full, three = build_transfer(dataset="food101", **kw), build_transfer(dataset="food101", **kw, shots=3)
    assert sorted(three.train.labels.tolist()) == [0, 0, 0, 1, 1, 1] and three.meta["n_train"] == 6
    assert three.val.dataset.indices == full.val.dataset.indices
    assert set(three.train.dataset.indices) < set(full.train.dataset.indices)
    assert three["test"].dataset.indices == full["test"].dataset.indices
    assert build_transfer(dataset="food101", **(kw | {"seed": 1}), shots=3).train.dataset.indices != \
        three.train.dataset.indices
    assert len(build_transfer(dataset="food101", **kw, fraction=0.25).train) == 2  # round(1.0) of 4
    flowers = build_transfer(dataset="flowers102", **kw, shots=1)
    assert flowers.train.labels.tolist() == [0, 1, 2] and len(flowers.val) == 6  # the official val, whole
    with pytest.raises(ValueError, match="suite.build.shots=3 but class 0 has only 2"):
        build_transfer(dataset="flowers102", **kw, shots=3)


def test_shots_reach_the_builder_from_the_command_line(make_cfg, tmp_path):
    from rftbench.run import build_suite
    from rftbench.train import RunContext

    write_cifar10(tmp_path / "data" / "cifar10", n_train_per_batch=20)
    cfg = make_cfg("suite=cifar10", f"paths.data={tmp_path / 'data'}", "suite.build.corruptions=[]",
                   "suite.build.cifar10_1_root=null", "suite.build.seen_corruptions.names=[]",
                   "suite.build.shots=4", experiment=None)
    suite = build_suite(cfg, RunContext(cache_dir=tmp_path / "cache"))
    assert suite.train.labels.bincount().tolist() == [4] * 10 and suite.meta["shots"] == 4
