"""Real suites end to end on tiny trees written in each dataset's exact on-disk format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import pytest

from rftbench.data.base import batches
from rftbench.run import execute, run_folder
from test_backbones import NO_SEEN, write_cifar10

TINY = ["backbone=resnet18", "backbone.pretrained=false", "backbone.input.size=32", "method=ft",
        "budget.epochs=1", "budget.batch_size=16", "num_workers=0"]


def run_done(make_cfg, *overrides: str) -> pd.DataFrame:
    cfg = make_cfg(*TINY, *overrides, experiment=None)
    assert execute(cfg) == "done"
    folder = run_folder(cfg).path
    assert (folder / "done").exists()
    return pd.read_csv(folder / "metrics.csv")


def test_cifar10_file_backed_runs_end_to_end_with_the_default_eval(make_cfg, tmp_path, single_thread):
    """The defect of issue 12: AutoAttack took `sub.x` (None) of a streamed test split."""
    write_cifar10(tmp_path / "data" / "cifar10", n_train_per_batch=10, n_test=50)
    m = run_done(make_cfg, "suite=cifar10", f"paths.data={tmp_path / 'data'}", "suite.build.corruptions=[]")
    adv = m[m["split"] == "ood/adversarial/Linf"]
    assert set(adv["metric"]) == {"robust_acc", "clean_acc"}
    assert m[(m["split"] == "test") & (m["metric"] == "acc")]["value"].notna().all()
    assert leaderboard_row(tmp_path, "cifar10")


def leaderboard_row(tmp_path: Path, suite: str) -> bool:
    from rftbench import leaderboard

    board = leaderboard.build(tmp_path / "runs")
    return bool((board["suite"] == suite).any())


def write_cifar10_1(root: Path, n: int = 20, seed: int = 0) -> None:
    """The CIFAR-10.1 v6 release files (`.npy`), tiny."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    np.save(root / "cifar10.1_v6_data.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    np.save(root / "cifar10.1_v6_labels.npy", (np.arange(n) % 10).astype(np.int64))


def test_cifar10_1_split_and_augmentation(make_cfg, tmp_path, caplog):
    from rftbench.data.cifar import build_cifar

    write_cifar10(tmp_path / "cifar10")
    suite = build_cifar(root=str(tmp_path / "cifar10"), dataset="cifar10", seed=0, val_fraction=0.2, corruption_root=None,
                        corruptions=[], severities=[], corruption_n=None, cifar10_1_root=str(tmp_path / "c101"),
                        seen_corruptions=NO_SEEN)
    assert "ood/cifar10_1" not in suite.splits and str(tmp_path / "c101") in caplog.text
    write_cifar10_1(tmp_path / "c101")
    suite = build_cifar(root=str(tmp_path / "cifar10"), dataset="cifar10", seed=0, val_fraction=0.2, corruption_root=None,
                        corruptions=[], severities=[], corruption_n=None, cifar10_1_root=str(tmp_path / "c101"),
                        seen_corruptions=NO_SEEN)
    split = suite["ood/cifar10_1"]
    assert len(split) == 20 and split.labels.tolist() == [i % 10 for i in range(20)]
    x, _ = split.dataset[3]
    raw = np.load(tmp_path / "c101" / "cifar10.1_v6_data.npy")[3]
    assert torch.equal(x, torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    assert suite.class_names == [f"c{i}" for i in range(10)]
    cfg = make_cfg("suite=cifar10", experiment=None)
    assert cfg.suite.train_transform.name == "crop_flip" and cfg.suite.train_transform.padding == 4


def test_cifar10_1_runs_end_to_end(make_cfg, tmp_path, single_thread):
    write_cifar10(tmp_path / "data" / "cifar10", n_train_per_batch=10, n_test=50)
    write_cifar10_1(tmp_path / "data" / "CIFAR-10.1")
    m = run_done(make_cfg, "suite=cifar10", f"paths.data={tmp_path / 'data'}", "suite.build.corruptions=[]",
                 "eval.adversarial.enabled=false")
    assert "ood/cifar10_1" in set(m["split"])


def test_cifar_seen_corruption_splits_are_the_corrupted_val_split(tmp_path):
    """`ood_val/<c>`: the class-balanced val subset under each seen corruption, labels unchanged,
    pixels exactly `corrupt`'s, stored as uint8 and served through the suite's eval transform."""
    from rftbench.backbones import InputSpec
    from rftbench.data.base import balanced_subset
    from rftbench.data.cifar import build_cifar
    from rftbench.data.corruptions import corrupt
    from rftbench.transforms import attach

    write_cifar10(tmp_path / "cifar10", n_train_per_batch=20)
    kw = dict(root=str(tmp_path / "cifar10"), dataset="cifar10", seed=0, val_fraction=0.2, corruption_root=None,
              corruptions=[], severities=[], corruption_n=None, cifar10_1_root=None, cache_dir=str(tmp_path / "c"))
    seen = {"names": ["saturate", "spatter"], "severity": 5, "n_val": 10, "seed": 3}
    suite = build_cifar(**kw, seen_corruptions=seen)
    assert suite.meta["seen_corruptions"] == ["saturate", "spatter"]
    assert (suite.meta["seen_severity"], suite.meta["seen_seed"]) == (5, 3)
    val = suite.val
    sub = balanced_subset(val.labels, 10, 3)
    clean = torch.stack([val.dataset[int(i)][0] for i in sub])
    for c in seen["names"]:
        split = suite[f"ood_val/{c}"]
        assert (split.role, split.shift, split.corruption, split.severity) == ("ood_val", "corruption", c, 5)
        assert len(split) == 10 and split.labels.tolist() == val.labels[sub].tolist()
        assert sorted(split.labels.tolist()) == list(range(10))  # one per class
        assert split.dataset.images.dtype == np.uint8  # a quarter of float32's memory
        x = torch.stack([split.dataset[i][0] for i in range(len(split))])
        assert torch.equal(x, corrupt(clean, c, 5, 3))
    # n_val null: all of val; names []: no split, nothing declared
    assert len(build_cifar(**kw, seen_corruptions={**seen, "n_val": None})["ood_val/saturate"]) == len(val) == 20
    off = build_cifar(**kw, seen_corruptions=NO_SEEN)
    assert not off.by_role("ood_val") and off.meta["seen_corruptions"] == []
    with pytest.raises(TypeError, match="seen_corruptions.*missing: \\['seed'\\]"):
        build_cifar(**kw, seen_corruptions={"names": [], "severity": 5, "n_val": None})
    # streamed like val: the backbone's eval transform reaches them too
    attach(suite, {"name": "none"}, {"name": "resize"}, InputSpec(48, "bilinear", 1.0))
    xb, yb = next(iter(batches(suite["ood_val/saturate"], 4)))
    assert xb.shape == (4, 3, 48, 48) and yb.tolist() == val.labels[sub][:4].tolist()


def test_rws_runs_end_to_end_on_streamed_cifar10(make_cfg, tmp_path, single_thread):
    """method=rws on the file-backed CIFAR-10 suite: the corrupted train copies keep the train split's
    augmentation and resize (uint8, streamed); the run completes with the RWS rows and tables."""
    from rftbench.methods.rws_method import corrupted_train
    from rftbench.run import build_suite
    from rftbench.train import RunContext

    write_cifar10(tmp_path / "data" / "cifar10", n_train_per_batch=10, n_test=20)
    tiny = [o for o in TINY if not o.startswith(("method=", "backbone"))]  # a narrow random ResNet-10-T
    overrides = [*tiny, "backbone=digits_resnet", "backbone.pretrain=null", "method=rws", "method.adapt.bn=recalibrate", "method.adapt.coeffs=[0.0,1.0]", "method.adapt.alphas=[0.0,2.0]",
        "suite=cifar10", f"paths.data={tmp_path / 'data'}", "suite.build.corruptions=[]",
        "suite.build.cifar10_1_root=null", "eval.adversarial.enabled=false",
        "suite.build.seen_corruptions.names=[saturate,speckle_noise]"]
    cfg = make_cfg(*overrides, experiment=None)
    suite = build_suite(cfg, RunContext(cache_dir=tmp_path / "cache"))
    train = corrupted_train(suite, RunContext(cache_dir=tmp_path / "cache"))["saturate"]
    assert not train.in_memory and train.dataset.images.dtype == np.uint8 and len(train) == len(suite.train)
    assert train.train_transform is suite.train.train_transform and train.transform is suite.train.transform
    assert train.labels.tolist() == suite.train.labels.tolist()

    m = run_done(make_cfg, *overrides)
    acc = m[(m["metric"] == "acc") & (m["detail"].fillna("") != "row:bn_only")]  # rws's own rows
    assert sorted(acc[acc["split"].str.startswith("ood_seen/")]["split"]) == ["ood_seen/saturate/5",
                                                                              "ood_seen/speckle_noise/5"]
    assert {"acc_single", "acc_quant"} <= set(m["metric"]) and "acc_mean" in set(m["metric"])
    folder = run_folder(make_cfg(*overrides, experiment=None)).path
    assert sorted(p.name for p in (folder / "signatures").iterdir()) == sorted(
        f"{c}{q}.safetensors" for c in ("saturate", "speckle_noise") for q in ("", ".q16"))
    experts = pd.read_csv(folder / "rws_experts.csv")
    assert experts["select"].tolist() == ["val", "ood_val/saturate", "ood_val/speckle_noise"]


def test_cifar_c_splits_stream_through_the_backbones_eval_transform(tmp_path):
    """CIFAR-10-C splits reach the model like the ID test split: at the backbone's input size, with
    exactly the files' pixels before the resize."""
    from omegaconf import OmegaConf

    from rftbench.backbones import input_spec
    from rftbench.data.cifar import build_cifar
    from rftbench.transforms import attach
    from test_corruption_sets import write_cifar_c

    write_cifar10(tmp_path / "cifar10")
    write_cifar_c(tmp_path / "c", "CIFAR-10-C", ["fog"], n_per_severity=10, size=32)
    suite = build_cifar(root=str(tmp_path / "cifar10"), dataset="cifar10", seed=0, val_fraction=0.2,
                        corruption_root=str(tmp_path / "c"), corruptions=["fog"], severities=[2],
                        corruption_n=None, cifar10_1_root=None, seen_corruptions=NO_SEEN)
    split = suite["ood/corruption/fog/2"]
    raw = np.load(tmp_path / "c" / "CIFAR-10-C" / "fog.npy")[10 + 3]  # severity 2, image 3
    assert not split.in_memory and torch.equal(split.dataset[3][0], torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    spec = input_spec(OmegaConf.create({"source": "timm", "arch": "resnet50", "kwargs": {},
                                        "input": {"size": 64, "interpolation": "bilinear", "crop_pct": 1.0}}))
    suite = attach(suite, {"name": "none"}, {"name": "center_crop"}, spec)
    shapes = {name: next(iter(batches(suite[name], 4)))[0].shape[-2:] for name in ("test", "ood/corruption/fog/2")}
    assert shapes["test"] == shapes["ood/corruption/fog/2"] == (64, 64)
